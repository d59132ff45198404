"""``DynamicRankEnv``: pick the attention rank of each layer of a frozen LM, segment by segment."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from drrl_env.envs.backends import LayerView, make_backend
from drrl_env.envs.config import EnvConfig
from drrl_env.envs.observation import MAX_FLOPS_RATIO, ObservationLayout


class DynamicRankEnv(gym.Env):
    """Dynamic-rank attention as a sequential decision problem.

    ## Description

    A frozen, pretrained causal language model reads a window of ``seq_len`` tokens in
    segments of ``segment_length`` tokens. Before each attention layer runs on a segment,
    the agent picks the rank ``r`` with which that layer's query-key interaction is
    computed: scores ``(Q P)(K P)^T`` with an orthonormal ``d x r`` basis ``P`` found by
    ``method`` (``gram``: top eigenvectors of ``Q^T Q + K^T K``; ``svd``: the DR-RL paper's
    separate SVDs; ``calibrated``: a fixed basis per layer and head). Steps run
    segment-major, layer-minor: step ``t`` is segment ``t // n_layers``, layer
    ``t % n_layers``.

    ## Action Space

    ``Discrete(len(ranks))``: index into the rank grid (default: multiples of ``d/8``
    up to the head dim ``d``; the last action is full rank). ``action_masks()`` returns the
    guardrail mask (sb3-contrib protocol): ranks whose perturbation exceeds
    ``max_perturbation`` are masked, full rank never is. A masked action passed to
    ``step`` is replaced by the smallest allowed rank above it; ``info["action_masked"]``
    says so and ``info["requested_rank"]`` keeps what was asked.

    ## Observation Space

    A flat ``float32`` Box; with ``K`` candidate ranks (see
    :class:`~drrl_env.envs.observation.ObservationLayout`, ``env.unwrapped.layout.table()``):

    | index | feature | min | max | description |
    |---|---|---|---|---|
    | 0 | layer | 0 | 1 | layer index / (layers - 1) |
    | 1 | segment | 0 | 1 | segment index / (segments - 1) |
    | 2 | prev_rank_layer | 0 | 1 | this layer's rank on the previous segment / d (1 on segment 0) |
    | 3 | prev_rank_step | 0 | 1 | rank chosen at the previous step / d (1 at the first step) |
    | 4 .. 3+K | energy | 0 | 1 | energy of ``Q^T Q + K^T K`` retained at each candidate rank |
    | 4+K .. 3+2K | perturbation | 0 | 1 | perturbation of moving to each candidate rank |
    | 4+2K .. 6+2K | sequence_dynamics | -1 | 1 | input RMS, consecutive-token cosine, spread |
    | 7+2K .. 9+2K | layer_weights | 0 | 1 | attention-weight RMS, stable rank, relative RMS |
    | 10+2K | flops_spent | 0 | 4 | executed FLOPs so far / full-rank FLOPs of the episode |

    ## Rewards

    ``reward = alpha * fidelity - beta * flops_ratio - gamma * perturbation``
    (see :mod:`drrl_env.rewards`): ``fidelity`` is the mean cosine of the layer's low-rank
    vs full-rank attention output on the segment, ``flops_ratio`` the executed attention
    FLOPs (basis search included) over full-rank FLOPs for that layer and segment, and
    ``perturbation`` the normalised spectral energy between the layer's previous and new
    rank (paper Eq. 8). Every component and raw number is in ``info``.

    ## Starting State

    ``reset`` samples a window of the split with ``self.np_random``;
    ``options={"window": i}`` pins window ``i``. Every layer starts from full rank.

    ## Episode End

    The episode terminates after ``n_segments * n_layers`` steps (the window is read).
    ``info["episode_summary"]`` then holds mean fidelity, executed-FLOPs reduction, mean
    rank and the ranks chosen; the live backend adds the window's perplexity with those
    ranks and at full rank. Registered ids truncate at the same step count.

    ## Arguments

    | kwarg | default | meaning |
    |---|---|---|
    | model | ``smollm2-135m`` | frozen LM (embedded), ``tiny-llama``, ``tiny-gpt2``, HF id |
    | corpus, data_path | ``wikitext-2``, None | text source (local file/folder or hub) |
    | split | ``train`` | ``train`` or ``eval`` articles |
    | seq_len, segment_length | 1024, 256 | window and segment sizes in tokens |
    | method | ``gram`` | ``gram``, ``svd``, ``calibrated``, ``full`` |
    | ranks | multiples of d/8 | candidate ranks, ending at d |
    | alpha, beta, gamma | 1.0, 0.5, 0.1 | reward weights |
    | max_perturbation | 0.5 | guardrail threshold of ``action_masks`` |
    | backend | ``cached`` | ``cached`` or ``live`` |
    | max_windows, device, cache_dir | 32, cpu, None | data size, torch device, cache root |

    ```python
    import gymnasium as gym
    import drrl_env  # registers the ids

    env = gym.make("DRRL-Wikitext-v0", method="svd", beta=0.3)
    ```

    ## Version History

    * v0: initial version.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = config if config is not None else EnvConfig(**kwargs)
        if config is not None and kwargs:
            raise TypeError("pass either config= or keyword arguments, not both")
        self.backend = make_backend(self.config)
        shape = self.backend.shape
        self.ranks = self.backend.ranks
        self.config.rank_grid(shape.head_dim)  # validates ranks against the head dim
        self.n_layers, self.n_segments = shape.n_layers, self.config.n_segments
        self.head_dim = shape.head_dim
        self.layout = ObservationLayout(len(self.ranks))
        self.action_space = spaces.Discrete(len(self.ranks))
        self.observation_space = spaces.Box(self.layout.low, self.layout.high, dtype=np.float32)
        self._rank_array = np.asarray(self.ranks)
        self._weights = self.config.weights
        self._weight_stats = np.asarray(self.backend.weight_stats, dtype=np.float64)
        self._episode_full_flops = 0.0
        self._t: int | None = None

    # -- gymnasium API ---------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        window = (options or {}).get("window")
        if window is None:
            window = int(self.np_random.integers(self.backend.n_windows))
        elif not isinstance(window, int | np.integer) or not 0 <= window < self.backend.n_windows:
            raise ValueError(
                f"options['window']={window!r} must be an int in 0..{self.backend.n_windows - 1}"
            )
        self.window = int(window)
        self._t = 0
        self._prev_rank = [self.head_dim] * self.n_layers
        self._prev_step_rank = self.head_dim
        self._spent, self._spent_full, self._masked = 0.0, 0.0, 0
        self._log: dict[str, list] = {
            "rank": [],
            "fidelity": [],
            "flops": [],
            "flops_full": [],
            "perturbation": [],
        }
        self._episode_full_flops = float(self.backend_flops_full_per_layer().sum() * self.n_layers)
        self._view = self.backend.begin(self.window)
        return self._observe(), {"window": self.window}

    def step(self, action):
        if self._t is None:
            raise RuntimeError("step() called before reset()")
        if self._t >= self.n_segments * self.n_layers:
            raise RuntimeError("step() called after the episode ended; call reset()")
        if not self.action_space.contains(action):
            raise ValueError(f"action={action!r} is not in {self.action_space}")
        segment, layer = divmod(self._t, self.n_layers)
        requested = int(action)
        index, masked = self._apply_mask(requested)
        rank = self.ranks[index]
        previous = self._prev_rank[layer]
        fidelity, flops, flops_full = self.backend.execute(segment, layer, index, previous)
        perturbation = float(self._perturbations[index])
        flops_ratio = flops / flops_full
        terms = self._weights.components(fidelity, flops_ratio, perturbation)
        self._record(rank, fidelity, flops, flops_full, perturbation, masked)
        self._t += 1
        terminated = self._t == self.n_segments * self.n_layers
        info = {
            "segment": segment,
            "layer": layer,
            "window": self.window,
            "rank": rank,
            "requested_rank": self.ranks[requested],
            "action_masked": masked,
            "fidelity": fidelity,
            "flops_ratio": flops_ratio,
            "perturbation": perturbation,
            "flops": flops,
            "flops_full": flops_full,
            **terms,
        }
        if terminated:
            info["episode_summary"] = self._summary()
            observation = self._observe_terminal()
        else:
            self._view = self.backend.next_view(*divmod(self._t, self.n_layers))
            observation = self._observe()
        return observation, float(terms["reward"]), terminated, False, info

    def action_masks(self) -> np.ndarray:
        """Guardrail: allowed actions (perturbation <= ``max_perturbation``; full rank always)."""
        if self._t is None:
            raise RuntimeError("action_masks() called before reset()")
        return self._mask.copy()

    def candidate_rewards(self) -> np.ndarray:
        """Immediate reward of every action at the current step, without stepping.

        A lookup on the cached backend (the greedy one-step oracle uses it); a masked action
        gets the reward of the rank it would be replaced by.
        """
        if self._t is None or self._t >= self.n_segments * self.n_layers:
            raise RuntimeError("candidate_rewards() needs a running episode: call reset()")
        if self.config.backend != "cached":
            raise RuntimeError("candidate_rewards() needs backend='cached'")
        segment, layer = divmod(self._t, self.n_layers)
        rewards = np.empty(len(self.ranks))
        for action in range(len(self.ranks)):
            index, _ = self._apply_mask(action)
            fidelity, flops, flops_full = self.backend.execute(
                segment, layer, index, self._prev_rank[layer]
            )
            terms = self._weights.components(
                fidelity, flops / flops_full, float(self._perturbations[index])
            )
            rewards[action] = terms["reward"]
        return rewards

    def close(self) -> None:
        if hasattr(self.backend, "close"):
            self.backend.close()

    # -- internals -------------------------------------------------------------------------

    def backend_flops_full_per_layer(self) -> np.ndarray:
        """Full-rank attention FLOPs of one layer on each segment (S,)."""
        if hasattr(self.backend, "flops"):
            return self.backend.flops.full
        from drrl_env.flops import full_attention_flops

        t, shape = self.config.segment_length, self.backend.shape
        return np.array(
            [
                full_attention_flops(t, (s + 1) * t, shape.head_dim, shape.n_heads).total
                for s in range(self.n_segments)
            ],
            dtype=np.float64,
        )

    def _apply_mask(self, index: int) -> tuple[int, bool]:
        if self._mask[index]:
            return index, False
        return int(np.flatnonzero(self._mask[index:])[0]) + index, True

    def _record(self, rank, fidelity, flops, flops_full, perturbation, masked) -> None:
        layer = self._t % self.n_layers
        self._prev_rank[layer], self._prev_step_rank = rank, rank
        self._spent += flops
        self._spent_full += flops_full
        self._masked += int(masked)
        for name, value in zip(
            self._log, (rank, fidelity, flops, flops_full, perturbation), strict=True
        ):
            self._log[name].append(value)

    def _observe(self) -> np.ndarray:
        segment, layer = divmod(self._t, self.n_layers)
        view: LayerView = self._view
        cumulative = np.concatenate([[0.0], np.cumsum(view.spectrum)])
        energy = cumulative[self._rank_array]
        previous = cumulative[self._prev_rank[layer]]
        self._perturbations = np.sqrt(np.clip(np.abs(energy - previous), 0.0, 1.0))
        self._mask = self._perturbations <= self.config.max_perturbation
        self._mask[-1] = True
        observation = np.concatenate(
            [
                [
                    layer / max(self.n_layers - 1, 1),
                    segment / max(self.n_segments - 1, 1),
                    self._prev_rank[layer] / self.head_dim,
                    self._prev_step_rank / self.head_dim,
                ],
                np.clip(energy, 0.0, 1.0),
                self._perturbations,
                np.clip(view.input_stats, -1.0, 1.0),
                self._weight_stats[layer],
                [min(self._spent / self._episode_full_flops, MAX_FLOPS_RATIO)],
            ]
        )
        return observation.astype(np.float32)

    def _observe_terminal(self) -> np.ndarray:
        observation = np.zeros(self.layout.size, dtype=np.float32)
        observation[self.layout.slices["flops_spent"]] = min(
            self._spent / self._episode_full_flops, MAX_FLOPS_RATIO
        )
        return observation

    def _summary(self) -> dict:
        ranks = np.array(self._log["rank"]).reshape(self.n_segments, self.n_layers)
        summary = {
            "window": self.window,
            "mean_fidelity": float(np.mean(self._log["fidelity"])),
            "flops_ratio": self._spent / self._spent_full,
            "flops_reduction": 1.0 - self._spent / self._spent_full,
            "mean_perturbation": float(np.mean(self._log["perturbation"])),
            "mean_rank": float(ranks.mean()),
            "masked_actions": self._masked,
            "ranks": ranks.tolist(),
        }
        summary.update(self.backend.finish())
        return summary
