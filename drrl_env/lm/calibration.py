"""Offline bases for the calibrated methods: eigenvectors of calibration Grams.

:func:`calibrate_basis` runs calibration windows at exact attention, segment by segment
over the KV cache exactly as :func:`~drrl_env.lm.runner.run_window` does, while a
:class:`GramCollector` sums per layer the post-RoPE Grams the bases are made of: ``K^T K``
per key/value head (each key once, when it enters the cache) and ``Q^T Q`` per query head.
The eigenvectors, by decreasing eigenvalue, are the fixed bases:

- scope ``query_head`` (method ``calibrated``): of ``Q^T Q + K^T K`` per (layer, query head),
  with the key Gram of the head's kv head;
- scope ``kv_head`` (methods ``calibrated-kv``, ``topk``, ``topk-block``): of the sum of
  those over the query heads of each (layer, kv head), so a key is rotated once for all the
  query heads that read it. (The keys' Gram alone, Loki's choice, measured far worse for
  low-rank scores on SmolLM2: README, "Low-rank attention with one rank at every layer".)

``basis[layer, head, :, :r]`` spans the rank-r subspace. :func:`save_basis` /
:func:`load_basis` keep a basis on disk with the model it belongs to.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from drrl_env.lm.controller import AttentionController
from drrl_env.lm.models import LoadedModel
from drrl_env.lm.runner import forward_segments
from drrl_env.methods import make_method
from drrl_env.methods.base import repeat_kv

BASIS_FORMAT = 3
"""Version of the file layout written by :func:`save_basis`."""
SCOPES = ("kv_head", "query_head")


class GramCollector:
    """Probe that sums, per layer, ``Q^T Q`` per query head and new keys' ``K^T K`` per kv head."""

    def __init__(self, n_layers: int) -> None:
        self.query_grams: list[torch.Tensor | None] = [None] * n_layers  # (H, d, d)
        self.key_grams: list[torch.Tensor | None] = [None] * n_layers  # (Hkv, d, d)

    def measure(self, context, setting, output, record) -> None:
        layer, fresh = context.state["layer"], context.state["fresh"]
        query = context.query.double()  # (B, H, T, d)
        keys = context.key[:, :, context.key.shape[2] - fresh :].double()  # (B, Hkv, n, d)
        query_gram = torch.matmul(query.transpose(-1, -2), query).sum(dim=0)
        key_gram = torch.matmul(keys.transpose(-1, -2), keys).sum(dim=0)
        for grams, update in ((self.query_grams, query_gram), (self.key_grams, key_gram)):
            grams[layer] = update if grams[layer] is None else grams[layer] + update

    def bases(self, scope: str) -> torch.Tensor:
        """(L, heads, d, d) eigenvectors by decreasing eigenvalue, heads per ``scope``."""
        missing = [i for i, gram in enumerate(self.key_grams) if gram is None]
        if missing:
            raise RuntimeError(f"no attention call reached layers {missing} during calibration")
        keys = torch.stack(self.key_grams)  # (L, Hkv, d, d)
        queries = torch.stack(self.query_grams)  # (L, H, d, d)
        layers, kv_heads, dim = keys.shape[0], keys.shape[1], keys.shape[-1]
        groups = queries.shape[1] // kv_heads
        if scope == "kv_head":  # the query-head Grams of each kv head, summed
            grams = queries.reshape(layers, kv_heads, groups, dim, dim).sum(2) + groups * keys
        else:
            grams = queries + repeat_kv(keys, groups)
        grams = (grams + grams.transpose(-1, -2)) / 2  # exact symmetry for eigh
        _, vectors = torch.linalg.eigh(grams)  # ascending eigenvalues
        return vectors.flip(-1).float().contiguous()


def calibrate_basis(
    lm: LoadedModel,
    windows: np.ndarray,
    segment_length: int,
    progress: bool = True,
    scope: str = "kv_head",
) -> torch.Tensor:
    """Estimate a fixed basis per layer and head from calibration windows.

    Args:
        lm: A model from :func:`drrl_env.lm.models.load_model`.
        windows: Token ids, shape (n, seq_len), one calibration window per row.
        segment_length: Tokens per segment, as in :func:`~drrl_env.lm.runner.run_window`.
        progress: Show a progress bar over windows.
        scope: ``kv_head`` (bases (L, Hkv, d, d)) or ``query_head`` ((L, H, d, d)).

    Returns:
        float32 bases on the CPU; ``basis[l, h]`` is orthonormal with columns sorted by
        decreasing eigenvalue of the summed Gram.

    Raises:
        ValueError: ``windows`` is not a non-empty 2-D array, ``scope`` is unknown, or a
            window or ``segment_length`` is invalid for the model.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must have shape (n, seq_len) with n >= 1, got {windows.shape}")
    collector = GramCollector(lm.n_layers)
    method = make_method("full", lm.head_dim, lm.n_layers)
    controller = AttentionController(method, lm.n_layers, probes=[collector], input_stats=False)
    for window in tqdm(windows, desc="calibrating basis", unit="window", disable=not progress):
        controller.reset()
        forward_segments(lm, window, segment_length, controller)
    return collector.bases(scope).cpu()


def save_basis(
    path: str | os.PathLike,
    basis: torch.Tensor,
    model_name: str,
    metadata: dict | None = None,
) -> Path:
    """Write ``basis`` with the model it belongs to, atomically (temp file, then rename).

    Args:
        path: Destination file; parent folders are created.
        basis: (L, H, d, d) basis from :func:`calibrate_basis`.
        model_name: The :attr:`LoadedModel.name` the basis was calibrated on.
        metadata: Extra plain values kept in the file (windows used, segment length, ...).

    Returns:
        The path written.
    """
    if basis.ndim != 4 or basis.shape[-1] != basis.shape[-2]:
        raise ValueError(f"basis must have shape (layers, heads, d, d), got {tuple(basis.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": BASIS_FORMAT,
        "model": model_name,
        "shape": list(basis.shape),
        "basis": basis.detach().to("cpu", torch.float32).contiguous(),
        "metadata": dict(metadata or {}),
    }
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_basis(
    path: str | os.PathLike,
    expected_model: str | None = None,
    expected_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Read a basis written by :func:`save_basis`.

    Args:
        path: The file.
        expected_model: Refuse a basis calibrated on another model.
        expected_shape: Refuse a basis of another shape, e.g. ``(L, H, d, d)`` of the model.

    Returns:
        The (L, H, d, d) float32 basis on the CPU.

    Raises:
        OSError: The file cannot be opened.
        ValueError: The file is not a basis file, or belongs to another model or shape; the
            message names both.
    """
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # truncated, not a torch file, or arbitrary pickles
        raise ValueError(f"{path} is not a readable basis file: {error}") from error
    if not isinstance(payload, dict) or "basis" not in payload or "model" not in payload:
        raise ValueError(f"{path} is not a basis file written by save_basis")
    model, basis = payload["model"], payload["basis"]
    if expected_model is not None and model != expected_model:
        raise ValueError(
            f"basis in {path} was calibrated for model {model!r}, not for {expected_model!r}"
        )
    if expected_shape is not None and tuple(basis.shape) != tuple(expected_shape):
        raise ValueError(
            f"basis in {path} has shape {tuple(basis.shape)}, expected {tuple(expected_shape)}"
        )
    return basis
