"""Backends of the dynamic-rank environment: what a step executes.

- :class:`CachedBackend` looks up what every candidate rank does at every (segment, layer)
  of every window, measured once with teacher forcing (the layer inputs are those of the
  full-rank model) and stored under the cache directory. Training wants this one.
- :class:`LiveBackend` runs the frozen model closed loop: the ranks chosen so far change
  the inputs of later layers, so errors compound, and the window's perplexity is real.

Both report FLOPs with the same accounting (:mod:`drrl_env.flops`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from drrl_env.envs.config import EnvConfig
from drrl_env.flops import full_attention_flops, lowrank_attention_flops
from drrl_env.paths import cache_dir as default_cache_dir

CACHE_FORMAT = 2
CALIBRATION_WINDOWS = 8  # train windows the calibrated bases are estimated on


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of a model."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class LayerView:
    """What the observation shows of the layer about to run."""

    spectrum: np.ndarray  # (d,) normalised
    input_stats: np.ndarray  # (3,)


@lru_cache(maxsize=4)
def shared_model(name: str, device: str, cache_dir: str | None):
    """One loaded model per (name, device) in a process, shared by environments."""
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


def data_source(config: EnvConfig) -> str:
    """Identity of the corpus source: a local file (path, size, mtime) or the hub config."""
    from drrl_env.data import find_local_corpus

    path = find_local_corpus(config.corpus, config.data_path)
    if path is None:
        return f"hub:{config.corpus}"
    stat = path.stat()
    return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def load_split_windows(config: EnvConfig, tokenizer) -> np.ndarray:
    """Token windows (n, seq_len) of the configured split."""
    from drrl_env.data import load_windows

    windows = load_windows(
        tokenizer,
        config.seq_len,
        split=config.split,
        corpus=config.corpus,
        data_path=config.data_path,
        eval_fraction=config.eval_fraction,
        max_windows=config.max_windows,
    )
    return windows.tokens


def calibrated_basis(config: EnvConfig, lm):
    """The calibrated bases of ``config.model``, estimated on train windows and cached."""
    from dataclasses import replace

    from drrl_env.lm.calibration import calibrate_basis, load_basis, save_basis

    root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    n_calibration = CALIBRATION_WINDOWS
    fields = ("model", "corpus", "seq_len", "segment_length", "eval_fraction")
    key = {name: getattr(config, name) for name in fields}
    key["source"], key["n_calibration"] = data_source(config), n_calibration
    path = root / "bases" / f"{_slug(config.model)}-{_digest(key)}.pt"
    if path.is_file():
        try:
            return load_basis(path, expected_model=lm.name)
        except (ValueError, OSError, RuntimeError) as error:
            warnings.warn(f"rebuilding unreadable basis cache {path}: {error}", stacklevel=2)
    train = replace(config, split="train", max_windows=n_calibration)
    basis = calibrate_basis(lm, load_split_windows(train, lm.tokenizer), config.segment_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_basis(path, basis, lm.name)
    return basis


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class FlopsTable:
    """Executed and full-rank attention FLOPs of every (segment, rank) of an episode."""

    def __init__(self, config: EnvConfig, shape: ModelShape, ranks: tuple[int, ...]) -> None:
        t, d, h, kv = config.segment_length, shape.head_dim, shape.n_heads, shape.n_kv_heads
        self.full = np.array(
            [full_attention_flops(t, (s + 1) * t, d, h).total for s in range(config.n_segments)],
            dtype=np.float64,
        )
        self.executed = np.zeros((config.n_segments, len(ranks), 2))  # [..., incremental]
        for s in range(config.n_segments):
            n = (s + 1) * t
            for k, r in enumerate(ranks):
                for incremental, new_keys in enumerate((n, t if s else n)):
                    self.executed[s, k, incremental] = lowrank_attention_flops(
                        t, n, d, r, config.method, h, kv, new_keys=new_keys
                    ).total
        self.method, self.head_dim = config.method, d

    def incremental(self, segment: int, previous_rank: int) -> bool:
        """Whether the gram method keeps its key Gram from the layer's previous segment."""
        return self.method == "gram" and segment > 0 and previous_rank < self.head_dim


class CachedRollouts:
    """Teacher-forced measurements of every candidate rank on every window, on disk."""

    ARRAYS = (
        "tokens",
        "fidelity",
        "spectra",
        "input_stats",
        "nll_full",
        "weight_stats",
        "shape",
        "ranks",
    )
    PER_WINDOW = ("tokens", "fidelity", "spectra", "input_stats", "nll_full")

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.tokens = arrays["tokens"]  # (W, seq_len)
        self.fidelity = arrays["fidelity"]  # (W, S, L, K)
        self.spectra = arrays["spectra"]  # (W, S, L, d)
        self.input_stats = arrays["input_stats"]  # (W, S, L, 3)
        self.nll_full = arrays["nll_full"]  # (W,)
        self.weight_stats = arrays["weight_stats"]  # (L, 3)
        self.shape = ModelShape(*(int(x) for x in arrays["shape"]))
        self.ranks = tuple(int(r) for r in arrays["ranks"])

    @staticmethod
    def key(config: EnvConfig) -> dict:
        fields = (
            "model",
            "corpus",
            "split",
            "eval_fraction",
            "seq_len",
            "segment_length",
            "method",
            "ranks",
        )
        key = {name: getattr(config, name) for name in fields}
        key["ranks"] = list(config.ranks) if config.ranks else None
        key["source"], key["format"] = data_source(config), CACHE_FORMAT
        return key

    @classmethod
    def path(cls, config: EnvConfig) -> Path:
        root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        key = cls.key(config)
        return root / "rollouts" / f"{_slug(config.model)}-{config.method}-{_digest(key)}.npz"

    @classmethod
    def load(cls, path: Path, key: dict, max_windows: int | None = None) -> CachedRollouts:
        """Read and check a cache file, keeping its first ``max_windows`` windows.

        Windows are the first ones of the split, so a cache of more windows serves a
        request for fewer. ``complete`` marks a cache holding every window of the split.

        Raises:
            ValueError: The file is stale, corrupt, or holds too few windows.
        """
        with np.load(path, allow_pickle=False) as archive:
            if json.loads(str(archive["key"])) != key:
                raise ValueError("cache was built for another configuration")
            arrays = {name: archive[name] for name in (*cls.ARRAYS, "complete")}
        held, complete = len(arrays["tokens"]), bool(arrays["complete"])
        if (max_windows is None and not complete) or (
            max_windows is not None and held < max_windows and not complete
        ):
            raise ValueError(f"cache holds {held} windows, {max_windows or 'all'} wanted")
        if max_windows is not None and held > max_windows:
            arrays = {
                name: value[:max_windows] if name in cls.PER_WINDOW else value
                for name, value in arrays.items()
            }
        rollouts = cls(arrays)
        w, s, layers, k = rollouts.fidelity.shape
        consistent = (
            rollouts.tokens.shape[0] == w
            and rollouts.spectra.shape[:3] == (w, s, layers)
            and len(rollouts.ranks) == k
            and rollouts.weight_stats.shape == (layers, 3)
            and all(np.isfinite(a).all() for a in (rollouts.fidelity, rollouts.spectra))
        )
        if not consistent:
            raise ValueError("cache arrays are inconsistent")
        return rollouts

    @classmethod
    def build(cls, config: EnvConfig) -> dict[str, np.ndarray]:
        """Measure every rank of the grid on every window (progress bar)."""
        from tqdm.auto import tqdm

        from drrl_env.lm.runner import run_window

        lm = shared_model(config.model, config.device, config.cache_dir)
        ranks = config.rank_grid(lm.head_dim)
        basis = calibrated_basis(config, lm) if config.method == "calibrated" else None
        tokens = load_split_windows(config, lm.tokenizer)
        columns: dict[str, list] = {"fidelity": [], "spectra": [], "input_stats": [], "nll": []}
        for window in tqdm(tokens, desc=f"caching {config.model} {config.split} rollouts"):
            result = run_window(
                lm,
                window,
                config.segment_length,
                config.method,
                schedule=None,
                sweep_ranks=ranks,
                basis=basis,
            )
            columns["fidelity"].append(result.sweep_fidelity)
            columns["spectra"].append(result.spectra)
            columns["input_stats"].append(result.input_stats)
            columns["nll"].append(result.nll_sum)
        shape = model_shape(lm)
        return {
            "tokens": tokens.astype(np.int64),
            "fidelity": np.stack(columns["fidelity"]).astype(np.float64),
            "spectra": np.stack(columns["spectra"]).astype(np.float64),
            "input_stats": np.stack(columns["input_stats"]).astype(np.float64),
            "nll_full": np.array(columns["nll"]),
            "weight_stats": weight_statistics(lm),
            "shape": np.array([shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim]),
            "ranks": np.array(ranks),
            "complete": np.array(config.max_windows is None or len(tokens) < config.max_windows),
        }

    @classmethod
    def load_or_build(cls, config: EnvConfig) -> CachedRollouts:
        """The cached rollouts of ``config``, rebuilt if missing, stale or corrupt."""
        path, key = cls.path(config), cls.key(config)
        if path.is_file():
            try:
                return cls.load(path, key, config.max_windows)
            except Exception as error:  # noqa: BLE001 (any unreadable cache is rebuilt)
                warnings.warn(f"rebuilding cache {path.name}: {error}", stacklevel=2)
        arrays = cls.build(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, key=np.array(json.dumps(key, sort_keys=True)), **arrays)
        os.replace(partial, path)
        return cls.load(path, key, config.max_windows)


class CachedBackend:
    """Steps are lookups in :class:`CachedRollouts`."""

    def __init__(self, config: EnvConfig) -> None:
        self.rollouts = CachedRollouts.load_or_build(config)
        self.shape, self.ranks = self.rollouts.shape, self.rollouts.ranks
        self.weight_stats = self.rollouts.weight_stats
        self.n_windows = len(self.rollouts.tokens)
        self.flops = FlopsTable(config, self.shape, self.ranks)
        self._window = 0

    def begin(self, window: int) -> LayerView:
        self._window = window
        return self.view(0, 0)

    def view(self, segment: int, layer: int) -> LayerView:
        w = self._window
        return LayerView(
            self.rollouts.spectra[w, segment, layer], self.rollouts.input_stats[w, segment, layer]
        )

    def execute(self, segment, layer, rank_index, previous_rank) -> tuple[float, float, float]:
        """(fidelity, executed FLOPs, full-rank FLOPs) of ``rank_index`` at (segment, layer)."""
        incremental = self.flops.incremental(segment, previous_rank)
        return (
            float(self.rollouts.fidelity[self._window, segment, layer, rank_index]),
            float(self.flops.executed[segment, rank_index, int(incremental)]),
            float(self.flops.full[segment]),
        )

    def next_view(self, segment: int, layer: int) -> LayerView:
        return self.view(segment, layer)

    def finish(self) -> dict:
        return {}


class LiveBackend:
    """Steps run the frozen model closed loop, one layer at a time."""

    def __init__(self, config: EnvConfig) -> None:
        from drrl_env.lm.runner import LiveWindow

        self.config = config
        self.lm = shared_model(config.model, config.device, config.cache_dir)
        self.shape = model_shape(self.lm)
        self.ranks = config.rank_grid(self.lm.head_dim)
        self.weight_stats = weight_statistics(self.lm)
        self.tokens = load_split_windows(config, self.lm.tokenizer)
        self.n_windows = len(self.tokens)
        basis = calibrated_basis(config, self.lm) if config.method == "calibrated" else None
        self._basis = basis
        self._live = LiveWindow(
            self.lm, self.tokens[0], config.segment_length, config.method, basis=basis
        )
        self._request = None
        self._full_perplexity: dict[int, float] = {}
        self._window = 0

    def _view(self, request) -> LayerView:
        return LayerView(request.spectrum, request.input_stats)

    def begin(self, window: int) -> LayerView:
        from drrl_env.lm.runner import LiveWindow

        self._live.close()
        self._window = window
        self._live = LiveWindow(
            self.lm,
            self.tokens[window],
            self.config.segment_length,
            self.config.method,
            basis=self._basis,
        )
        self._request = self._live.start()
        return self._view(self._request)

    def execute(self, segment, layer, rank_index, previous_rank) -> tuple[float, float, float]:
        record, self._request = self._live.step(self.ranks[rank_index])
        return record.fidelity, float(record.flops.total), float(record.flops_full.total)

    def next_view(self, segment: int, layer: int) -> LayerView:
        return self._view(self._request)

    def full_rank_perplexity(self, window: int) -> float:
        from drrl_env.lm.runner import run_window

        if window not in self._full_perplexity:
            result = run_window(
                self.lm,
                self.tokens[window],
                self.config.segment_length,
                self.config.method,
                schedule=None,
                basis=self._basis,
            )
            self._full_perplexity[window] = result.perplexity
        return self._full_perplexity[window]

    def finish(self) -> dict:
        result = self._live.result
        return {
            "perplexity": result.perplexity,
            "perplexity_full": self.full_rank_perplexity(self._window),
        }

    def close(self) -> None:
        self._live.close()


def make_backend(config: EnvConfig) -> CachedBackend | LiveBackend:
    return CachedBackend(config) if config.backend == "cached" else LiveBackend(config)
