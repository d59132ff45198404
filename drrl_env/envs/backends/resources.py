"""What both backends share: the model of a process, its facts, windows, bases, costs, keys.

Everything computed once is keyed on what it depends on: the model's weights and tokenizer
(:func:`drrl_env.lm.models.model_fingerprint`, from full-content hashes of its weight,
config and tokenizer files), the text's content (:func:`drrl_env.data.source_fingerprint`),
and the configuration
fields that change numbers. Overwriting a model folder or a corpus file changes the key, so
a stale cache is never served.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from drrl_env.envs.actions import ActionGrid
from drrl_env.envs.backends.base import CostTable, ModelShape
from drrl_env.envs.config import EnvConfig
from drrl_env.paths import cache_dir as default_cache_dir

if TYPE_CHECKING:
    from drrl_env.data import WindowSet

CALIBRATION_WINDOWS = 8
"""Train windows the calibrated bases are estimated on."""


def cache_root(config: EnvConfig) -> Path:
    """The cache root of ``config``: ``cache_dir`` or the default."""
    return Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()


@lru_cache(maxsize=4)
def shared_model(name: str, device: str, cache_dir: str | None):
    """One loaded model per (name, device) in a process, shared by its environments."""
    from drrl_env.lm.models import load_model

    return load_model(name, device=device, cache_dir=cache_dir)


def model_shape(lm) -> ModelShape:
    return ModelShape(lm.n_layers, lm.n_heads, lm.n_kv_heads, lm.head_dim)


def weight_statistics(lm) -> np.ndarray:
    """Per layer ``w_t`` (L, 3): RMS, stable rank and relative RMS of the attention weights."""
    from drrl_env.lm.attention import attention_modules

    rows = []
    for module in attention_modules(lm.model):
        matrices = [p.detach().double() for p in module.parameters() if p.ndim == 2]
        rms = float(np.mean([m.pow(2).mean().sqrt().item() for m in matrices]))
        largest = max(matrices, key=lambda m: m.numel())
        singular = np.linalg.svd(largest.cpu().numpy(), compute_uv=False)
        stable_rank = float((singular**2).sum() / singular[0] ** 2) / min(largest.shape)
        rows.append([rms, stable_rank])
    table = np.array(rows)
    relative = table[:, 0] / table[:, 0].max()
    return np.column_stack([table[:, 0] / (1 + table[:, 0]), table[:, 1], relative])


def load_split_windows(config: EnvConfig, tokenizer) -> np.ndarray:
    """Token windows (n, seq_len) of the configured split (tokenisation is cached)."""
    return split_window_set(config, tokenizer).tokens


def split_window_set(config: EnvConfig, tokenizer) -> WindowSet:
    """The configured split's windows with their metadata (e.g. passkey ``answer``)."""
    from drrl_env.data import load_windows

    return load_windows(
        tokenizer,
        config.seq_len,
        split=config.split,
        corpus=config.corpus,
        data_path=config.data_path,
        eval_fraction=config.eval_fraction,
        max_windows=config.max_windows,
        text_field=config.text_field,
        cache_dir=cache_root(config),
    )


def data_key(config: EnvConfig) -> dict[str, Any]:
    """The identity of the model and text a configuration reads, for cache keys."""
    from drrl_env.data import source_fingerprint
    from drrl_env.lm.models import model_fingerprint

    return {
        "model": config.model,
        "model_fingerprint": model_fingerprint(config.model),
        "corpus": config.corpus,
        "source": source_fingerprint(config.corpus, config.data_path, config.text_field),
        "seq_len": config.seq_len,
        "segment_length": config.segment_length,
        "eval_fraction": config.eval_fraction,
    }


def calibrated_basis(config: EnvConfig, lm, scope: str):
    """The calibrated bases of ``config.model`` for ``scope``, estimated on train windows.

    Stored atomically under the cache root, keyed on the model's and the text's
    fingerprints; estimated once.
    """
    import torch

    from drrl_env.lm.calibration import calibrate_basis
    from drrl_env.store import ShardStore

    key = {**data_key(config), "scope": scope, "windows": CALIBRATION_WINDOWS, "format": 4}
    store = ShardStore(cache_root(config) / "bases", key, f"{config.model}-{scope}")
    if store.has_shared():
        return torch.from_numpy(np.array(store.read_shared(mmap=False)["basis"]))
    store.check_writable()
    train = replace(config, split="train", max_windows=CALIBRATION_WINDOWS)
    windows = load_split_windows(train, lm.tokenizer)
    basis = calibrate_basis(lm, windows, config.segment_length, scope=scope)
    store.write_shared({"basis": basis.numpy()})
    return basis


def build_method(config: EnvConfig, shape: ModelShape, lm=None):
    """The attention method of ``config`` for a model of ``shape``, with bases given ``lm``.

    Without ``lm`` a method that needs bases is built for FLOPs counting only.
    """
    from drrl_env.methods import make_method, method_class

    cls = method_class(config.method)
    kwargs: dict[str, Any] = {}
    if cls.needs_basis and lm is not None:
        kwargs["basis"] = calibrated_basis(config, lm, cls.scope)
    return make_method(config.method, shape.head_dim, shape.n_layers, **kwargs)


def cost_table(method, config: EnvConfig, shape: ModelShape, actions: ActionGrid) -> CostTable:
    """FLOPs of one layer call at every segment and action (queries over the KV cache).

    For a method with input-dependent costs these are its upper bounds (see
    :class:`~drrl_env.envs.backends.base.CostTable`).
    """
    from drrl_env.methods.base import CallShape, exact_flops

    t = config.segment_length
    executed = np.zeros((config.n_segments, len(actions)))
    kept = np.zeros((config.n_segments, len(actions)))
    full = np.zeros(config.n_segments)
    for segment in range(config.n_segments):
        call = CallShape(
            t, (segment + 1) * t, shape.head_dim, shape.n_heads, shape.n_kv_heads, new_keys=t
        )
        full[segment] = exact_flops(call).total
        for index, setting in enumerate(actions.settings):
            executed[segment, index] = method.flops(call, setting).total
            kept[segment, index] = method.kept_total(call, setting) / call.causal_total
    return CostTable(executed, full, kept, method.static_cost)
