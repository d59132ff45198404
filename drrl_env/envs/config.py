"""Configuration of the dynamic-rank environment: one frozen dataclass, every field a kwarg."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from drrl_env.methods import check_method_name
from drrl_env.rewards import FIDELITY_TERMS, RewardWeights, check_weight

BACKENDS = ("cached", "live")
SPLITS = ("train", "eval")
DEFAULT_FIDELITY = "cosine"
"""The fidelity term of the reward unless ``fidelity=`` says otherwise (README, proxy validity)."""
PATH_FIELDS = {"data_path": "a corpus file or folder", "cache_dir": "a cache folder"}
"""Fields holding a path (and what it names): a str (an ``os.PathLike`` is turned into one),
or None for the default."""
DEFAULT_KEEP = 0.5
"""Keep fraction of the sparse methods (``topk``) unless ``keep=`` says otherwise."""


def _is_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def _check_int(name: str, value: object, low: int) -> int:
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _is_number(value: object) -> bool:
    """A finite real number (a bool is not one)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float | np.integer | np.floating)
        and math.isfinite(value)
    )


def _check_path(name: str, value: object) -> None:
    if value is None:
        return
    what = PATH_FIELDS[name]
    if not isinstance(value, str):
        raise ValueError(
            f"{name} must be {what} (a str or os.PathLike path) or None, got {value!r} "
            f"({type(value).__name__})"
        )
    if not value.strip():
        raise ValueError(f"{name}={value!r} is an empty path; pass {what}, or None for the default")


def _check_fraction(name: str, value: object, allow_zero: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.floating)
        or not math.isfinite(value)
        or not (0 <= value <= 1 if allow_zero else 0 < value <= 1)
    ):
        allowed = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EnvConfig:
    """Everything that defines a dynamic-rank environment.

    Every field can be passed to ``gym.make`` as a keyword argument.
    """

    model: str = "smollm2-135m"
    """Frozen LM: ``smollm2-135m`` (embedded), ``tiny-llama``, ``tiny-gpt2``, HF id or folder."""
    corpus: str = "wikitext-2"
    """Text source kind: ``wikitext-2``, ``wikitext-103``, ``text``, ``jsonl``, ``folder``,
    ``hf:<dataset>``; with ``data_path`` and a WikiText default the kind is detected."""
    data_path: str | None = None
    """Local corpus file or folder (else ``$DRRL_DATA_DIR`` or the hub for WikiText)."""
    text_field: str = "text"
    """Text field of a ``.jsonl`` corpus, or column of a Hugging Face dataset."""
    split: str = "train"
    """Document split the windows come from: ``train`` or ``eval``."""
    eval_fraction: float = 0.2
    """Fraction of documents held out for ``eval``."""
    seq_len: int = 1024
    """Tokens per window (one episode)."""
    segment_length: int = 256
    """Tokens per segment; ``seq_len`` must be a multiple of it."""
    method: str = "gram"
    """Attention method, a name of the registry (``drrl_env.methods.method_names()``)."""
    ranks: tuple[int, ...] | None = None
    """Candidate ranks, increasing, ending at the head dim; default multiples of d/8."""
    keep: float | None = None
    """Keep fraction of a sparse method's actions (default 0.5 for ``topk``); for ``topp``
    the softmax-mass target ``p`` (0: the ``min_keys`` best keys only)."""
    keeps: tuple[float, ...] | None = None
    """Sparse methods: a grid of keep fractions (``topp``: of mass targets, default
    ``drrl_env.methods.topp.MASS_TARGETS``); actions are then (rank, keep) pairs."""
    max_windows: int | None = 32
    """Windows taken from the split (the first ones); None for all."""
    fidelity: str = DEFAULT_FIDELITY
    """Fidelity term of the reward (``drrl_env.rewards.FIDELITY_TERMS``)."""
    alpha: float = RewardWeights.alpha
    """Weight of the fidelity term in the reward."""
    beta: float | None = None
    """Weight of the executed-FLOPs ratio (default 0.5; must stay unset with ``budget``)."""
    gamma: float | None = None
    """Weight of the rank-change perturbation (default 0.1; unset with ``budget``)."""
    budget: float | None = None
    """Cap on the episode's executed attention FLOPs, a fraction of exact attention's."""
    damage_scale: float | None = None
    """None: the paper's fidelity term; a number ``s``: the term in damage units,
    ``-s * (1 - fidelity)`` (``drrl_env.rewards.DAMAGE_SCALE`` is the measured default)."""
    enforce_budget: bool = True
    """With ``budget``: False observes the budget but lifts the action wall (a soft budget
    that a learner prices itself; episodes may overspend)."""
    reward_at_end: bool = False
    """Pay the episode's summed reward at its last step only (0 before); ``info`` keeps
    each step's own reward as ``step_reward``."""
    max_perturbation: float = 0.5
    """Guardrail: ranks whose perturbation exceeds this are masked (full rank never is)."""
    backend: str = "cached"
    """``cached`` (precomputed teacher-forced lookups) or ``live`` (the model, closed loop)."""
    device: str = "cpu"
    """Torch device of the model."""
    cache_dir: str | None = None
    """Cache root; default ``$DRRL_CACHE_DIR`` or the user cache directory."""

    def __post_init__(self) -> None:
        for name in PATH_FIELDS:  # a pathlib.Path is kept as its string
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        if self.ranks is not None:
            object.__setattr__(self, "ranks", self._int_tuple("ranks", self.ranks))
        if self.keeps is not None:
            keeps = self._tuple("keeps", self.keeps)
            object.__setattr__(
                self, "keeps", tuple(_check_fraction("keeps", k, self._zero_keep()) for k in keeps)
            )
        self.validate()

    def _zero_keep(self) -> bool:
        """Whether the method reads ``keep = 0`` (``topp``: its static-cost floor)."""
        from drrl_env.methods import method_class

        check_method_name(self.method)
        return method_class(self.method).keep_allows_zero

    @staticmethod
    def _tuple(name: str, value: object) -> tuple:
        if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
            raise ValueError(f"{name} must be a sequence of numbers, got {value!r}")
        return tuple(value)

    def _int_tuple(self, name: str, value: object) -> tuple[int, ...]:
        items = self._tuple(name, value)
        for item in items:
            if not _is_int(item) and not (
                isinstance(item, float | np.floating) and float(item).is_integer()
            ):
                raise ValueError(f"{name} must hold integers, got {item!r} in {value!r}")
        return tuple(int(item) for item in items)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its allowed values."""
        for name in ("model", "corpus", "text_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is not one of {SPLITS}")
        check_method_name(self.method)
        if self.fidelity not in FIDELITY_TERMS:
            raise ValueError(
                f"fidelity={self.fidelity!r} is not a fidelity term; terms: "
                f"{', '.join(FIDELITY_TERMS)}"
            )
        for name in ("seq_len", "segment_length"):
            _check_int(name, getattr(self, name), 2)
        if self.seq_len % self.segment_length:
            raise ValueError(
                f"seq_len={self.seq_len} is not a multiple of segment_length={self.segment_length}"
            )
        if self.max_windows is not None:
            _check_int("max_windows", self.max_windows, 1)
        if not _is_number(self.eval_fraction) or not 0 < self.eval_fraction < 1:
            raise ValueError(
                f"eval_fraction must be a number in (0, 1) (the fraction of documents held "
                f"out for split='eval'), got {self.eval_fraction!r}"
            )
        if (
            not _is_number(self.max_perturbation)
            or not isinstance(self.max_perturbation, int | float)
            or not 0 <= self.max_perturbation <= 1
        ):
            raise ValueError(
                f"max_perturbation must be a number in [0, 1], got {self.max_perturbation!r}"
            )
        for name in PATH_FIELDS:
            _check_path(name, getattr(self, name))
        if self.ranks is not None:
            if not self.ranks or list(self.ranks) != sorted(set(self.ranks)) or self.ranks[0] < 1:
                raise ValueError(f"ranks={self.ranks!r} must be strictly increasing integers >= 1")
        self._validate_keep()
        self._validate_reward()
        if not isinstance(self.device, str):
            raise ValueError(
                f"device must be a string such as 'cpu' or 'cuda', got {self.device!r}"
            )
        if self.device != "cpu":
            from drrl_env.devices import check_device

            check_device(self.device)

    def _validate_keep(self) -> None:
        from drrl_env.methods import method_class

        sparse = method_class(self.method).uses_keep
        if self.keep is not None:
            _check_fraction("keep", self.keep, self._zero_keep())
        if (self.keep is not None or self.keeps is not None) and not sparse:
            raise ValueError(
                f"keep/keeps apply to sparse methods (topk); method={self.method!r} keeps every key"
            )
        if self.keep is not None and self.keeps is not None:
            raise ValueError("pass keep= (one fraction) or keeps= (a grid), not both")
        if self.keeps is not None and (
            not self.keeps or list(self.keeps) != sorted(set(self.keeps))
        ):
            raise ValueError(f"keeps={self.keeps!r} must be strictly increasing fractions")

    def _validate_reward(self) -> None:
        check_weight("alpha", self.alpha)
        if self.damage_scale is not None:
            if not _is_number(self.damage_scale) or self.damage_scale <= 0:
                raise ValueError(
                    f"damage_scale must be a number > 0 (or None for the paper's reward), "
                    f"got {self.damage_scale!r}"
                )
        if not isinstance(self.reward_at_end, bool | np.bool_):
            raise ValueError(f"reward_at_end must be a bool, got {self.reward_at_end!r}")
        if not isinstance(self.enforce_budget, bool | np.bool_):
            raise ValueError(f"enforce_budget must be a bool, got {self.enforce_budget!r}")
        if not self.enforce_budget and self.budget is None:
            raise ValueError("enforce_budget=False needs a budget to observe (budget=b)")
        if self.budget is None:
            self.weights  # noqa: B018 (validates beta and gamma)
            return
        _check_fraction("budget", self.budget)
        set_weights = [n for n in ("beta", "gamma") if getattr(self, n) not in (None, 0, 0.0)]
        if set_weights:
            raise ValueError(
                f"budget={self.budget} replaces the FLOPs and perturbation weights: leave "
                f"{' and '.join(set_weights)} unset (the reward is alpha * fidelity)"
            )

    @property
    def weights(self) -> RewardWeights:
        """The reward weights (``beta = gamma = 0`` in budgeted episodes)."""
        if self.budget is not None:
            return RewardWeights(self.alpha, 0.0, 0.0)
        beta = RewardWeights.beta if self.beta is None else self.beta
        gamma = RewardWeights.gamma if self.gamma is None else self.gamma
        return RewardWeights(self.alpha, beta, gamma)

    @property
    def n_segments(self) -> int:
        return self.seq_len // self.segment_length

    @property
    def sparse_keeps(self) -> tuple[float, ...]:
        """Keep fractions of the non-exact actions (``(1.0,)`` for dense methods)."""
        from drrl_env.methods import method_class

        cls = method_class(self.method)
        if not cls.uses_keep:
            return (1.0,)
        if self.keeps is not None:
            return self.keeps
        if self.keep is not None:
            return (self.keep,)
        return cls.default_keeps or (DEFAULT_KEEP,)

    def rank_grid(self, head_dim: int) -> tuple[int, ...]:
        """The candidate ranks for a head dim: ``ranks`` checked, or the multiples of d/8."""
        if self.ranks is None:
            step = max(head_dim // 8, 1)
            return tuple(sorted({*range(step, head_dim + 1, step), head_dim}))
        if self.ranks[-1] != head_dim:
            raise ValueError(
                f"ranks={self.ranks!r} must be in 1..{head_dim} and end at full rank {head_dim}"
            )
        return self.ranks

    def as_dict(self) -> dict:
        return asdict(self)
