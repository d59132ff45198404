"""Offline bases for the ``calibrated`` method: eigenvectors of the mean query/key Gram.

:func:`calibrate_basis` runs calibration windows at full rank, segment by segment over the
KV cache exactly as :func:`~drrl_env.lm.runner.run_window` does, while a
:class:`~drrl_env.lm.attention.RankController` sums per layer and query head the Gram
``Q^T Q + K^T K`` that the ``gram`` method would decompose at each call (the queries of the
segment, the keys of the whole cache). The eigenvectors of that sum, by decreasing eigenvalue,
are the fixed basis: ``basis[layer, head, :, :r]`` spans the rank-r subspace.

:func:`save_basis` / :func:`load_basis` keep a basis on disk with the model it belongs to.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from drrl_env.lm.attention import RankController
from drrl_env.lm.models import LoadedModel
from drrl_env.lm.runner import forward_segments

BASIS_FORMAT = 1
"""Version of the file layout written by :func:`save_basis`."""


def calibrate_basis(
    lm: LoadedModel,
    windows: np.ndarray,
    segment_length: int,
    progress: bool = True,
) -> torch.Tensor:
    """Estimate a fixed low-rank basis per layer and query head from calibration windows.

    Args:
        lm: A model from :func:`drrl_env.lm.models.load_model`.
        windows: Token ids, shape (n, seq_len), one calibration window per row.
        segment_length: Tokens per segment, as in :func:`~drrl_env.lm.runner.run_window`.
        progress: Show a progress bar over windows.

    Returns:
        (L, H, d, d) float32 on the model's device; ``basis[l, h]`` is orthonormal with columns
        sorted by decreasing eigenvalue of the summed Gram ``Q^T Q + K^T K``.

    Raises:
        ValueError: ``windows`` is not a non-empty 2-D array, or a window or
            ``segment_length`` is invalid for the model.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must have shape (n, seq_len) with n >= 1, got {windows.shape}")
    controller = RankController(
        lm.n_layers, lm.head_dim, method="full", record=False, collect_gram=True
    )
    for window in tqdm(windows, desc="calibrating basis", unit="window", disable=not progress):
        forward_segments(lm, window, segment_length, controller)
    grams = controller.calibration_grams()  # per layer (H, d, d)
    missing = [layer for layer, gram in enumerate(grams) if gram is None]
    if missing:
        raise RuntimeError(f"no attention call reached layers {missing} during calibration")
    stacked = torch.stack(grams).double()  # (L, H, d, d)
    stacked = (stacked + stacked.transpose(-1, -2)) / 2  # exact symmetry for eigh
    _, vectors = torch.linalg.eigh(stacked)  # ascending eigenvalues
    return vectors.flip(-1).float().contiguous()  # (L, H, d, d), by decreasing eigenvalue


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
