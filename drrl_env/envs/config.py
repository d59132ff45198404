"""Configuration of the dynamic-rank environment: one frozen dataclass, every field a kwarg."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from drrl_env.flops import METHODS
from drrl_env.rewards import RewardWeights

BACKENDS = ("cached", "live")
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class EnvConfig:
    """Everything that defines a dynamic-rank environment.

    Every field can be passed to ``gym.make`` as a keyword argument.
    """

    model: str = "smollm2-135m"
    """Frozen LM: ``smollm2-135m`` (embedded), ``tiny-llama``, ``tiny-gpt2``, HF id or folder."""
    corpus: str = "wikitext-2"
    """``wikitext-2`` or ``wikitext-103``."""
    data_path: str | None = None
    """Local WikiText ``.raw`` file or folder (else ``$DRRL_DATA_DIR`` or the hub)."""
    split: str = "train"
    """Article split the windows come from: ``train`` or ``eval``."""
    eval_fraction: float = 0.2
    """Fraction of articles held out for ``eval``."""
    seq_len: int = 1024
    """Tokens per window (one episode)."""
    segment_length: int = 256
    """Tokens per segment; ``seq_len`` must be a multiple of it."""
    method: str = "gram"
    """How the low-rank basis is found: ``gram``, ``svd``, ``calibrated`` (or ``full``)."""
    ranks: tuple[int, ...] | None = None
    """Candidate ranks, increasing, ending at the head dim; default multiples of d/8."""
    max_windows: int | None = 32
    """Windows taken from the split (the first ones); None for all."""
    alpha: float = RewardWeights.alpha
    """Weight of fidelity in the reward."""
    beta: float = RewardWeights.beta
    """Weight of the executed-FLOPs ratio in the reward."""
    gamma: float = RewardWeights.gamma
    """Weight of the rank-change perturbation in the reward."""
    max_perturbation: float = 0.5
    """Guardrail: ranks whose perturbation exceeds this are masked (full rank never is)."""
    backend: str = "cached"
    """``cached`` (precomputed teacher-forced lookups) or ``live`` (the model, closed loop)."""
    device: str = "cpu"
    """Torch device of the model."""
    cache_dir: str | None = None
    """Cache root; default ``$DRRL_CACHE_DIR`` or the user cache directory."""

    def __post_init__(self) -> None:
        if self.ranks is not None:
            object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its allowed values."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is not one of {SPLITS}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        for name in ("seq_len", "segment_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an int >= 2, got {value!r}")
        if self.seq_len % self.segment_length:
            raise ValueError(
                f"seq_len={self.seq_len} is not a multiple of segment_length={self.segment_length}"
            )
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"max_windows must be None or >= 1, got {self.max_windows!r}")
        if not 0 <= self.max_perturbation <= 1:
            raise ValueError(f"max_perturbation must be in [0, 1], got {self.max_perturbation!r}")
        if self.ranks is not None:
            if not self.ranks or list(self.ranks) != sorted(set(self.ranks)) or self.ranks[0] < 1:
                raise ValueError(f"ranks={self.ranks!r} must be strictly increasing integers >= 1")
        self.weights  # noqa: B018 (validates the reward weights)

    @property
    def weights(self) -> RewardWeights:
        return RewardWeights(self.alpha, self.beta, self.gamma)

    @property
    def n_segments(self) -> int:
        return self.seq_len // self.segment_length

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
