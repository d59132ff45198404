"""``DynamicRankEnv``: choose the attention setting of each layer of a frozen LM, per segment."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from drrl_env.envs.backends import make_backend
from drrl_env.envs.config import EnvConfig
from drrl_env.envs.observation import ObservationBuilder, ObservationLayout, StepState
from drrl_env.envs.problem import Problem

RESET_OPTIONS = ("window",)
PLANNED_WINDOWS = 256
"""Windows whose observation plans an environment keeps (teacher-forced backends)."""


class DynamicRankEnv(gym.Env):
    """Dynamic-rank attention as a sequential decision problem.

    ## Description

    A frozen, pretrained causal language model reads a window of ``seq_len`` tokens in
    segments of ``segment_length`` tokens. Before each attention layer runs on a segment,
    the agent picks the rank ``r`` with which that layer's query-key interaction is
    computed, by the attention ``method`` (a name of :mod:`drrl_env.methods`): ``gram``
    (top eigenvectors of ``Q^T Q + K^T K``, found online), ``svd`` (the DR-RL paper's
    separate SVDs), ``calibrated`` (a fixed basis per layer and query head, keys rotated
    once), ``calibrated-kv`` (per kv head), ``topk`` (rank-r scores select, for each query,
    ``keep`` times the segment's keys; exact attention on those), ``topk-block``, ``topp``
    (rank-r scores select, for each query and head, the fewest keys holding a fraction
    ``p`` of the estimated attention mass: the agent sets the target, the input sets the
    cost), ``full``. Steps run
    segment-major, layer-minor: step ``t`` is segment ``t // n_layers``, layer
    ``t % n_layers``.

    ## Action Space

    ``Discrete(A)``, an index into the action grid (:class:`~drrl_env.envs.actions.ActionGrid`,
    ``env.unwrapped.actions``): the candidate ranks (default multiples of ``d/8`` up to the
    head dim ``d``), the last action being exact attention. For a sparse method with
    ``keeps=(k1, k2, ...)`` the actions are the (rank, keep) pairs of the ranks below ``d``,
    flattened rank-major, then exact attention; for ``topp`` a setting's ``keep`` is the
    mass target ``p`` (0: only the ``min_keys`` best keys, the static-cost floor), and the
    pairs include rank ``d`` (exact scores select: the upper bound of the selection).
    ``action_masks()`` (sb3-contrib protocol) returns the allowed actions: unbudgeted, the
    guardrail masks ranks whose perturbation exceeds ``max_perturbation`` (exact attention
    never); budgeted, the action wall masks
    actions after which the budget could not be met (with input-dependent costs it plans
    with each action's upper bound and the realised spend, so the final spend never exceeds
    the budget; see :mod:`drrl_env.envs.budget`). A masked action passed to ``step`` is
    replaced (guardrail: by the first allowed action above it; budget: by the most
    expensive allowed action); ``info["action_masked"]`` says so and
    ``info["requested_action"]`` keeps what was asked.

    ## Observation Space

    A flat ``float32`` Box; with ``A`` actions (``env.unwrapped.layout.table()``):

    | index | feature | min | max | description |
    |---|---|---|---|---|
    | 0 | layer | 0 | 1 | layer index / (layers - 1) |
    | 1 | segment | 0 | 1 | segment index / (segments - 1) |
    | 2 | prev_rank_layer | 0 | 1 | this layer's rank on the previous segment / d |
    | 3 | prev_rank_step | 0 | 1 | rank chosen at the previous step / d |
    | 4 .. 3+A | energy | 0 | 1 | spectral energy retained at each action's rank |
    | 4+A .. 3+2A | perturbation | 0 | 1 | perturbation of moving to each action's rank |
    | 4+2A .. 3+3A | action_cost | 0 | 4 | executed / exact FLOPs of each action at this step |
    | 4+3A .. 6+3A | sequence_dynamics | -1 | 1 | input RMS, consecutive-token cosine, spread |
    | 7+3A .. 9+3A | layer_weights | 0 | 1 | attention-weight RMS, stable rank, relative RMS |
    | 10+3A | flops_spent | 0 | 4 | executed FLOPs so far / exact FLOPs of the episode |
    | +1 | kept_prev_layer | 0 | 1 | (input-dependent costs) this layer's kept / causal keys |
    |    |                 |   |   | on the previous segment |
    | +1 | cost_prev_layer | 0 | 4 | (input-dependent costs) its FLOPs ratio there |
    | +1 | budget_left | 0 | 1 | (budgeted only) budget left / exact FLOPs of the episode |
    | +1 | steps_left | 0 | 1 | (budgeted only) steps left / steps of the episode |
    | +1 | budget_per_step | 0 | 4 | (budgeted only) budget left per step left / average step |

    The spectrum behind ``energy`` and ``perturbation`` is the method's own (eigenvalues of
    its Gram, or running energies of the rotated keys), in the order a truncation keeps it.
    With input-dependent costs (``topp``), ``action_cost`` holds each action's upper bound
    (every causal key kept; the floor's exact cost), what the budget wall plans with; the
    realised FLOPs and kept fraction of a step are in ``info`` (``flops``,
    ``kept_fraction``) and the previous segment's of the layer in the observation.

    ## Rewards

    Unbudgeted: ``reward = alpha * fidelity - beta * flops - gamma * perturbation``;
    budgeted: ``reward = alpha * fidelity`` (the budget replaces ``beta`` and ``gamma``). See
    :mod:`drrl_env.rewards`: ``fidelity`` is the term ``fidelity=`` names (``cosine``: the
    cosine of the layer's executed vs exact attention output; ``loss``/``loss-fisher``:
    ``1 - steps x`` an estimate of the change of the window's mean loss that this cell
    causes), ``flops`` the executed attention FLOPs (observation features and basis search
    included) over exact FLOPs of the call, ``perturbation`` the normalised spectral energy
    between the layer's previous and new rank (paper Eq. 8). Every term, weighted term and
    raw measurement is in ``info``.

    Two options serve learners that plan: ``damage_scale=s`` puts the fidelity term in damage
    units, ``-s * (1 - fidelity)`` (0 at exact attention; the return's spread across
    policies becomes of order 1 at ``s = drrl_env.rewards.DAMAGE_SCALE``), and
    ``reward_at_end=True`` pays the episode's summed reward at its last step and 0 before
    (``info["step_reward"]`` keeps each step's own).
    ``enforce_budget=False`` keeps a budget's observation (budget left, steps left) but lifts
    the wall: every action is allowed and the episode may overspend (a soft constraint, for
    learners that price the budget themselves, e.g. ``lagrangian_ppo``).

    ## Starting State

    ``reset`` samples one of the ``env.unwrapped.n_windows`` windows of the split with
    ``self.np_random``; ``options={"window": i}`` pins window ``i`` (any other option key is
    refused). Every layer starts from full rank.

    ## Episode End

    The episode terminates after ``n_segments * n_layers`` steps (the window is read); it is
    never truncated, whatever ``seq_len`` is passed. ``info["episode_summary"]`` then holds
    mean fidelity, executed-FLOPs reduction, mean kept fraction, mean rank, the ranks (and
    keeps) chosen; the live backend adds the window's perplexity with those settings and at
    exact attention, the mean token KL divergence of the next-token distributions to exact
    attention's (``mean_kl``, nats) and the fraction of tokens whose most likely next token
    is exact attention's (``top1_agreement``). On windows that expect an answer (``passkey``,
    and the passkey windows of ``mix``) it also generates the answer greedily with the chosen
    settings still active: ``retrieval_correct`` (1.0 or 0.0), ``retrieval_correct_full``
    (exact attention), ``answer`` and ``generated``; mix windows name their ``window_kind``.

    ## Arguments

    | kwarg | default | meaning |
    |---|---|---|
    | model | ``smollm2-135m`` | frozen LM (embedded), ``tiny-llama``, ``tiny-gpt2``, HF id |
    | corpus, data_path, text_field | ``wikitext-2``, None, ``text`` | text source |
    | split | ``train`` | ``train`` or ``eval`` documents |
    | seq_len, segment_length | 1024, 256 | window and segment sizes in tokens |
    | method | ``gram`` | a registered attention method |
    | ranks | multiples of d/8 | candidate ranks, ending at d |
    | keep, keeps | 0.5, None | sparse methods: keep fraction, or a grid of them |
    | fidelity | ``cosine`` | fidelity term of the reward |
    | alpha, beta, gamma | 1.0, 0.5, 0.1 | reward weights (beta, gamma unset with budget) |
    | budget | None | cap on executed attention FLOPs, fraction of exact |
    | damage_scale, reward_at_end | None, False | reward in damage units; paid at the end |
    | enforce_budget | True | False: the budget is observed but not enforced (soft) |
    | max_perturbation | 0.5 | guardrail threshold of ``action_masks`` (unbudgeted) |
    | backend | ``cached`` | ``cached`` or ``live`` |
    | max_windows, device, cache_dir | 32, cpu, None | data size, torch device, cache root |

    ``env.unwrapped.problem`` (:class:`~drrl_env.envs.problem.Problem`) holds what the
    configuration determines, built once and shared with the backend: the model (loaded on
    first use), shape, action grid, method, costs, windows, weight statistics, reward and
    budget wall.

    What the backend can do is declared, not inferred from its name:
    ``env.unwrapped.teacher_forced`` (stored lookups of every action: ``candidate_values``,
    ``rollout``; cached) and ``env.unwrapped.bitwise_replay`` (episodes replay bit for bit;
    cached).

    ```python
    import gymnasium as gym
    import drrl_env  # registers the ids

    env = gym.make("DRRL-Wikitext-v0", method="topk", keep=0.25, budget=0.6)
    ```

    ## Version History

    * v0: initial version.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is not None and kwargs:
            raise TypeError("pass either config= or keyword arguments, not both")
        self.config = config if config is not None else EnvConfig(**kwargs)
        self.problem = problem = Problem(self.config)
        self.backend = make_backend(problem)
        shape = problem.shape
        self.actions = problem.actions
        self.n_layers, self.n_segments = shape.n_layers, self.config.n_segments
        self.head_dim = shape.head_dim
        self.steps = problem.steps
        self.costs = problem.costs
        self.episode_full_flops = float(self.costs.full.sum() * self.n_layers)
        self.wall = problem.wall
        self.layout = ObservationLayout(
            len(self.actions), budgeted=self.wall is not None, input_costs=not self.costs.static
        )
        self.action_space = spaces.Discrete(len(self.actions))
        self.observation_space = spaces.Box(self.layout.low, self.layout.high, dtype=np.float32)
        self.reward_function = problem.reward
        self.builder = ObservationBuilder(
            self.layout,
            self.n_layers,
            self.n_segments,
            self.head_dim,
            self.actions.ranks,
            self.costs.ratios,
            problem.weight_stats,
            self.episode_full_flops,
            self.steps,
        )
        self._t: int | None = None
        self._plans: dict[int, Any] = {}

    @property
    def step_index(self) -> int | None:
        """The step about to run (segment-major, layer-minor); None before ``reset``."""
        return self._t

    @property
    def ranks(self) -> tuple[int, ...]:
        """Rank of each action (repeated across keep fractions for a pair grid)."""
        return tuple(int(r) for r in self.actions.ranks)

    # -- what the backend offers -----------------------------------------------------------

    @property
    def n_windows(self) -> int:
        """Windows of the split an episode can read (``reset(options={"window": i})``)."""
        return self.backend.n_windows

    @property
    def tokens(self) -> np.ndarray:
        """(n_windows, seq_len) token ids of the windows."""
        return self.backend.tokens

    @property
    def teacher_forced(self) -> bool:
        """Whether every action's measurements are stored lookups (the cached backend).

        Then :meth:`candidate_values`, :meth:`candidate_rewards` and :meth:`rollout` work
        and the observations do not depend on the actions; False on the live backend
        (closed loop). See :class:`~drrl_env.envs.backends.base.Backend`.
        """
        return self.backend.teacher_forced

    @property
    def bitwise_replay(self) -> bool:
        """Whether an episode replays bit for bit (the cached backend's lookups).

        False on the live backend, whose float32 kernels replay within
        :func:`drrl_env.replay.reward_tolerance`.
        """
        return self.backend.bitwise_replay

    def rollout(self, name: str, window: int | None = None) -> np.ndarray:
        """The stored teacher-forced array ``name`` of ``window``, or of every window (W, ...).

        E.g. ``rollout("cosine")`` is (W, S, L, A): the cosine of every action at every cell
        of every window. Teacher-forced backends only (``teacher_forced``); see
        :meth:`~drrl_env.envs.backends.cached.CachedBackend.rollout`.

        Raises:
            RuntimeError: The backend stores no rollouts (live).
        """
        return self.backend.rollout(name, window)

    # -- gymnasium API ---------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options is not None and not isinstance(options, dict):
            raise ValueError(
                f"options={options!r} must be a dict such as {{'window': 0}} (or None); "
                f"keys: {RESET_OPTIONS}"
            )
        options = dict(options or {})
        unknown = sorted(set(options) - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; options: {RESET_OPTIONS}")
        window = options.get("window")
        n_windows = self.n_windows
        if window is None:
            window = int(self.np_random.integers(n_windows))
        elif isinstance(window, bool) or not isinstance(window, int | np.integer):
            raise ValueError(f"options['window']={window!r} must be an int in 0..{n_windows - 1}")
        elif not 0 <= window < n_windows:
            raise ValueError(f"options['window']={window!r} must be an int in 0..{n_windows - 1}")
        self.window = int(window)
        self._t = 0
        self._prev_rank = [self.head_dim] * self.n_layers
        self._prev_step_rank = self.head_dim
        self._prev_cost = [(1.0, 1.0)] * self.n_layers  # (kept, FLOPs ratio) of last segment
        self._spent, self._masked, self._return = 0.0, 0, 0.0
        self._log: dict[str, list] = {
            name: []
            for name in (
                "action",
                "fidelity",
                "cosine",
                "flops",
                "flops_full",
                "perturbation",
                "kept",
            )
        }
        self._raw_sums: dict[str, float] = {}
        view = self.backend.begin(self.window)
        self._plan = self._episode_plan(self.window)
        self._observe(view)
        return self._observation, {"window": self.window}

    def step(self, action):
        if self._t is None:
            raise RuntimeError("step() called before reset()")
        if self._t >= self.steps:
            raise RuntimeError("step() called after the episode ended; call reset()")
        if type(action) is int or type(action) is np.int64:  # the common case, checked fast
            valid = 0 <= action < self.action_space.n
        else:
            valid = not isinstance(action, bool | np.bool_) and self.action_space.contains(action)
        if not valid:
            raise ValueError(
                f"action={action!r} is not in {self.action_space}: pass an int index "
                f"0..{self.action_space.n - 1}"
            )
        segment, layer = divmod(self._t, self.n_layers)
        requested = int(action)
        index, masked = self._apply_mask(requested)
        setting = self.actions.settings[index]
        raw = self.backend.execute(segment, layer, index)
        flops, kept = raw.pop("flops", None), raw.pop("kept", None)
        if flops is None:  # a static cost: the table's
            flops, kept = self.costs.executed[segment, index], self.costs.kept[segment, index]
        flops_full = self.costs.full[segment]
        perturbation = float(self._perturbations[index])
        flops_ratio = flops / flops_full
        terms = self.reward_function.components(raw, flops_ratio, perturbation)
        self._record(
            setting.rank, index, terms["fidelity"], raw, flops, flops_full, perturbation, kept
        )
        self._prev_cost[layer] = (float(kept), float(flops_ratio))
        self._masked += int(masked)
        self._t += 1
        terminated = self._t == self.steps
        self._return += terms["reward"]
        if self.config.reward_at_end:
            reward = self._return if terminated else 0.0
        else:
            reward = terms["reward"]
        info = {
            "segment": segment,
            "layer": layer,
            "window": self.window,
            "action": index,
            "rank": setting.rank,
            "keep": setting.keep,
            "requested_action": requested,
            "requested_rank": self.actions.settings[requested].rank,
            "action_masked": masked,
            "flops_ratio": float(flops_ratio),
            "perturbation": perturbation,
            "flops": float(flops),
            "flops_full": float(flops_full),
            "kept_fraction": float(kept),
            **{f"raw_{name}": value for name, value in raw.items()},
            **terms,
            "step_reward": terms["reward"],
        }
        info["reward"] = float(reward)
        if self.wall is not None:
            info["budget_left"] = self.wall.left(self._spent) / self.episode_full_flops
        if terminated:
            info["episode_summary"] = self._summary()
            self._observation = self.builder.terminal(self._state(0, 0))
        else:
            self._observe(None if self._plan is not None else self.backend.view())
        return self._observation, float(reward), terminated, False, info

    def action_masks(self) -> np.ndarray:
        """Allowed actions: the guardrail, or the budget's action wall (see the docstring)."""
        if self._t is None:
            raise RuntimeError("action_masks() called before reset()")
        return self._mask.copy()

    def candidate_rewards(self) -> np.ndarray:
        """Immediate reward of every action at the current step, without stepping.

        Teacher-forced lookups (``teacher_forced``: ``backend='cached'``); a masked action
        gets the reward of the action it would be replaced by.
        """
        values = self.candidate_values()
        return values["reward"][[self._apply_mask(a)[0] for a in range(len(self.actions))]]

    def candidate_values(self) -> dict[str, np.ndarray]:
        """Per action (A,): the fidelity term, FLOPs ratio, perturbation and reward.

        Teacher-forced lookups at the current step (``teacher_forced``:
        ``backend='cached'``), ignoring masks. ``reward`` is the step's own reward (with
        ``reward_at_end`` it is paid at the episode's end, summed).
        """
        if self._t is None or self._t >= self.steps:
            raise RuntimeError("candidate_values() needs a running episode: call reset()")
        segment, layer = divmod(self._t, self.n_layers)
        raw = self.backend.candidates(segment, layer)
        term = self.reward_function.fidelity
        fidelity = term.value(np.asarray(raw[term.raw]), self.steps)
        if "flops" in raw:  # input-dependent costs: what each action realises here
            flops = np.asarray(raw["flops"]) / self.costs.full[segment]
        else:
            flops = self.costs.ratios[segment]
        reward = self.reward_function.combine(fidelity, flops, self._perturbations)
        return {
            "fidelity": fidelity,
            "flops_ratio": flops,
            "perturbation": self._perturbations.copy(),
            "reward": reward,
        }

    def signature(self) -> dict:
        """What a trained policy's actions and inputs mean here, as plain JSON values.

        The model, the attention method, the action grid (one ``[rank, keep]`` pair per
        action) and the observation layout (feature names and sizes). Two envs with equal
        signatures interpret an action index and an observation vector the same way.
        """
        return {
            "model": self.config.model,
            "method": self.config.method,
            "actions": [[int(s.rank), float(s.keep)] for s in self.actions.settings],
            "observation": [[f.name, f.size] for f in self.layout.features],
        }

    def close(self) -> None:
        self.backend.close()

    # -- internals -------------------------------------------------------------------------

    def backend_flops_full_per_layer(self) -> np.ndarray:
        """Exact attention FLOPs of one layer call at each segment (S,)."""
        return self.costs.full

    def _state(self, segment: int, layer: int) -> StepState:
        left = self.wall.left(self._spent) if self.wall is not None else None
        kept, cost = self._prev_cost[layer]
        return StepState(
            segment,
            layer,
            self._prev_rank[layer],
            self._prev_step_rank,
            self._spent,
            left,
            self.steps - self._t,
            kept,
            cost,
        )

    def _episode_plan(self, window: int):
        """The observation plan of ``window`` when the backend knows the whole episode.

        A teacher-forced backend's views do not depend on the actions, so the static part
        of every observation is computed once per window (kept for the last windows) and a
        step fills in what the actions change; other backends build each observation.
        """
        views = self.backend.episode_views(window)
        if views is None:
            return None
        if window not in self._plans:
            if len(self._plans) >= PLANNED_WINDOWS:
                self._plans.pop(next(iter(self._plans)))
            self._plans[window] = self.builder.plan(*views)
        return self._plans[window]

    def _observe(self, view) -> None:
        segment, layer = divmod(self._t, self.n_layers)
        state = self._state(segment, layer)
        if self._plan is not None:
            self._observation, self._perturbations = self.builder.fill(self._plan, self._t, state)
        else:
            self._observation, self._perturbations = self.builder.build(
                state, view.spectrum, view.input_stats
            )
        if self.wall is not None and not self.config.enforce_budget:
            self._mask = np.ones(len(self.actions), dtype=bool)  # a soft budget: observed only
        elif self.wall is not None:
            self._mask = self.wall.allowed(self._t, self._spent)
        else:
            self._mask = self._perturbations <= self.config.max_perturbation
            self._mask[self.actions.full_action] = True

    def _apply_mask(self, index: int) -> tuple[int, bool]:
        if self._mask[index]:
            return index, False
        if self.wall is not None:
            return self.wall.replacement(self._t, self._mask), True
        return int(np.flatnonzero(self._mask[index:])[0]) + index, True

    def _record(self, rank, index, fidelity, raw, flops, flops_full, perturbation, kept) -> None:
        layer = self._t % self.n_layers
        self._prev_rank[layer], self._prev_step_rank = rank, rank
        self._spent += flops
        values = (
            index,
            fidelity,
            raw.get("cosine", np.nan),
            flops,
            flops_full,
            perturbation,
            kept,
        )
        for name, value in zip(self._log, values, strict=True):
            self._log[name].append(value)
        for name, value in raw.items():
            self._raw_sums[name] = self._raw_sums.get(name, 0.0) + value

    def _summary(self) -> dict:
        actions = np.array(self._log["action"]).reshape(self.n_segments, self.n_layers)
        ranks = self.actions.ranks[actions]
        spent_full = float(np.sum(self._log["flops_full"]))
        summary = {
            "window": self.window,
            "mean_fidelity": float(np.mean(self._log["fidelity"])),
            "mean_cosine": float(np.mean(self._log["cosine"])),
            "flops_ratio": float(self._spent / spent_full),
            "flops_reduction": float(1.0 - self._spent / spent_full),
            "mean_perturbation": float(np.mean(self._log["perturbation"])),
            "kept_fraction": float(np.mean(self._log["kept"])),
            "mean_rank": float(ranks.mean()),
            "masked_actions": self._masked,
            "ranks": ranks.tolist(),
            "actions": actions.tolist(),
        }
        if len(set(self.actions.keeps)) > 1 or self.actions.keeps[0] < 1:
            summary["keeps"] = self.actions.keeps[actions].tolist()
        if "dnll_taylor" in self._raw_sums:
            summary["dnll_taylor_sum"] = self._raw_sums["dnll_taylor"]
        if self.config.budget is not None:
            summary["budget"] = self.config.budget
        summary.update(self.backend.finish())
        return summary

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.config.backend == "live":
            self.backend.__getstate__()  # raises with the reason and what to do
        return state
