"""Learners that plan under a budget: the one-shot env, the expert, BC and DAgger (tiny model)."""

from __future__ import annotations

import shutil

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from script_runner import load_script
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import drrl_env
from agents import load_agent, make_agent, save_agent
from agents.budget_baselines import knapsack
from agents.evaluation import actor
from agents.imitation import Expert
from drrl_env.episodes import play_episode

STEPS = 16  # 4 segments x 4 layers


@pytest.fixture(scope="module")
def budget_env(cache_root):
    return gym.make("DRRL-Tiny-TopP-Budget-v0", cache_dir=cache_root, max_windows=3)


@pytest.fixture(scope="module")
def one_shot(cache_root):
    return gym.make("DRRL-Tiny-TopP-OneShot-v0", cache_dir=cache_root, max_windows=3)


def test_one_shot_ids_are_registered_in_damage_units():
    assert set(drrl_env.ONE_SHOT_IDS) == {
        "DRRL-Mix-TopP-OneShot-v0",
        "DRRL-Wikitext-Budget-OneShot-v0",
        "DRRL-Tiny-TopP-OneShot-v0",
    }
    for kwargs in drrl_env.ONE_SHOT_IDS.values():
        assert kwargs["budget"] is not None and kwargs["damage_scale"] == drrl_env.DAMAGE_SCALE


def test_one_shot_env_passes_both_checkers(one_shot):
    gym_check_env(one_shot.unwrapped, skip_render_check=True)
    sb3_check_env(one_shot.unwrapped, warn=True)


def test_one_shot_step_is_the_sequential_episode(one_shot, cache_root):
    env = one_shot.unwrapped
    sequential = gym.make(
        "DRRL-Tiny-TopP-Budget-v0",
        cache_dir=cache_root,
        max_windows=3,
        damage_scale=drrl_env.DAMAGE_SCALE,
    )
    rng = np.random.default_rng(0)
    assert env.action_space.shape == (STEPS,)
    for window in range(3):
        action = rng.integers(len(env.actions), size=STEPS)
        observation, info = one_shot.reset(options={"window": window})
        first, _ = sequential.reset(options={"window": window})
        np.testing.assert_array_equal(observation, first)
        _, reward, terminated, truncated, info = one_shot.step(action)
        trace = play_episode(sequential, action.reshape(4, 4), window)
        assert terminated and not truncated
        assert reward == pytest.approx(trace.rewards.sum(), abs=1e-12)
        np.testing.assert_array_equal(info["requested"], action.reshape(4, 4))
        assert info["episode_summary"]["actions"] == trace.summary["actions"]
        assert info["episode_summary"]["flops_ratio"] <= 0.5 + 1e-9  # the wall clips
        assert reward <= 0.0  # damage units: exact attention scores 0


def test_one_shot_refuses_bad_actions_and_a_step_before_reset(cache_root):
    env = gym.make("DRRL-Tiny-TopP-OneShot-v0", cache_dir=cache_root, max_windows=3).unwrapped
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros(STEPS, dtype=np.int64))
    env.reset(seed=0)
    n = len(env.actions)
    for bad in (np.zeros(STEPS - 1, dtype=np.int64), np.full(STEPS, n), np.zeros(STEPS) + 0.5):
        with pytest.raises(ValueError, match="one per segment x layer cell"):
            env.step(bad)
    env.step(np.zeros(STEPS, dtype=np.int64))
    with pytest.raises(RuntimeError, match="before reset"):  # one step per episode
        env.step(np.zeros(STEPS, dtype=np.int64))


def test_expert_is_the_knapsack_optimum_from_every_state(budget_env):
    expert = Expert(budget_env)
    actions = len(budget_env.unwrapped.actions)
    for window in range(3):
        flat_values = expert.values[window].reshape(-1, actions)
        flat_costs = expert.costs[window].reshape(-1, actions)

        def worth(chosen, cells=slice(None), values=flat_values, costs=flat_costs):
            picked = np.asarray(chosen)[:, None]
            return (
                np.take_along_axis(values[cells], picked, 1).sum(),
                np.take_along_axis(costs[cells], picked, 1).sum(),
            )

        # From the start: feasible and worth at least the knapsack's own plan.
        schedule = expert.schedule(window).reshape(-1)
        value, cost = worth(schedule)
        assert cost <= expert.cap * (1 + 1e-9)
        assert value >= worth(knapsack(flat_values, flat_costs, expert.cap))[0] - 1e-12
        # From a state after other choices (exact attention at the first five cells): the
        # optimum of the rest, the knapsack of the remaining cells with the budget left.
        spent = float(flat_costs[:5, -1].sum())
        units = int(np.floor((expert.cap - spent) / expert.unit + 1e-9))
        rest = knapsack(flat_values[5:], flat_costs[5:], units * expert.unit, bins=units)
        walked, cost = [], spent
        for step in range(5, STEPS):
            walked.append(expert.action(window, step, cost))
            cost += flat_costs[step, walked[-1]]
        assert cost <= expert.cap * (1 + 1e-9)
        assert worth(walked, slice(5, None))[0] >= worth(rest, slice(5, None))[0] - 1e-12


def test_expert_needs_a_budgeted_cached_env(cache_root):
    with pytest.raises(ValueError, match="under a budget"):
        Expert(gym.make("DRRL-Tiny-TopP-v0", cache_dir=cache_root, max_windows=3))
    live = gym.make("DRRL-Tiny-TopP-Budget-v0", cache_dir=cache_root, max_windows=3)
    live.unwrapped.backend.teacher_forced = False  # as the live backend declares
    try:
        with pytest.raises(ValueError, match="backend='cached'"):
            Expert(live)
    finally:
        live.close()


@pytest.mark.parametrize(("algo", "policy"), [("bc", "mlp"), ("dagger", "transformer")])
def test_imitation_learns_the_expert_on_its_windows(algo, policy, budget_env, tmp_path):
    extra = {"rounds": 2} if algo == "dagger" else {}
    model = make_agent(algo, budget_env, policy, seed=0, imitation_epochs=200, **extra)
    model.learn(6 * STEPS)
    history = model.imitation_history
    assert len(history) == (1 if algo == "bc" else 2)
    assert history[-1]["samples"] == 6 * STEPS and model.num_timesteps == 6 * STEPS
    if algo == "dagger":
        assert [row["expert_rate"] for row in history] == [1.0, 0.5]
    # Deterministic imitation of a deterministic expert on three windows it saw twice.
    expert = Expert(budget_env)
    agree = []
    for window in range(3):
        trace = play_episode(budget_env, actor(model), window)
        agree.append(np.mean(trace.actions == expert.schedule(window)))
        assert trace.summary["flops_ratio"] <= 0.5 + 1e-9
    assert history[-1]["accuracy"] >= 0.8 and np.mean(agree) >= 0.6
    again = load_agent(save_agent(model, tmp_path / algo), env=budget_env)
    trace = play_episode(budget_env, actor(again), 0)
    np.testing.assert_array_equal(trace.actions, play_episode(budget_env, actor(model), 0).actions)


def test_imitation_refuses_an_unbudgeted_env_and_bad_settings(cache_root, budget_env):
    plain = gym.make("DRRL-Tiny-TopP-v0", cache_dir=cache_root, max_windows=3)
    with pytest.raises(ValueError, match="imitates the per-window optimum under a budget"):
        make_agent("bc", plain)
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        make_agent("dagger", budget_env, rounds=0)
    with pytest.raises(ValueError, match="imitation_epochs must be an int >= 1"):
        make_agent("bc", budget_env, imitation_epochs=0)
    assert make_agent("bc", budget_env, target_kl=0.05).target_kl == 0.05  # PPO's keywords


# -- experiments/planning.py -------------------------------------------------------------


def test_planning_script_writes_the_frontier_and_resumes(tmp_path, cache_root, monkeypatch):
    import pandas as pd

    from harness.statistics import iqm

    monkeypatch.setenv("DRRL_CACHE_DIR", cache_root)
    planning = load_script("experiments/planning.py")
    args = planning.Args(
        env_id="DRRL-Tiny-TopP-Budget-v0",
        budgets=(0.6,),
        seeds=2,
        train_windows=3,
        eval_windows=3,
        total_timesteps=96,
        out_dir=str(tmp_path),
        threads=1,
        device="cpu",
    )
    folder = planning.main(args)
    rows = pd.read_csv(folder / "episodes.csv")
    assert rows.groupby("policy")["window"].nunique().eq(3).all()
    assert set(rows["policy"]) == {"static_layer", "static_cell", "per_window_optimum", "dagger"}
    assert sorted(rows.loc[rows["policy"] == "dagger", "seed"].unique()) == [0, 1]
    assert (rows["flops_ratio"] <= 0.6 + 1e-9).all()  # every policy under the same wall
    assert (rows["mean_kl"] >= 0).all() and rows["top1_agreement"].between(0, 1).all()
    assert len(list((folder / "models").glob("dagger__0.6__*.zip"))) == 2
    table = pd.read_csv(folder / "frontier.csv").set_index("policy")
    assert np.isnan(table.loc["static_layer", "kl_vs_static_mean"])
    dagger = rows[rows["policy"] == "dagger"]
    dagger = dagger.pivot(index="seed", columns="window", values="mean_kl")
    assert table.loc["dagger", "mean_kl_mean"] == pytest.approx(iqm(dagger.to_numpy()))
    static = rows[rows["policy"] == "static_layer"].set_index("window")["mean_kl"]
    paired = (dagger.mean(axis=0) - static).mean()
    assert table.loc["dagger", "kl_vs_static_mean"] == pytest.approx(paired)
    assert set(table["verdict"].dropna()) <= {"lower KL", "higher KL", "no difference"}
    assert (folder / "frontier.md").read_text().count("\n") == len(table) + 2
    assert (folder / "frontier.png").stat().st_size > 0
    curves = sorted((folder / "curves").glob("dagger__0.6__*.csv"))
    assert len(curves) == 2 and (folder / "learning_curves.png").stat().st_size > 0
    curve = pd.read_csv(curves[0])
    assert curve["timesteps"].iloc[0] == 0 and curve["timesteps"].iloc[-1] == 96
    assert {"baseline_static_layer", "baseline_per_window_optimum"} <= set(curve)
    # the last point is the saved model's return on the cached eval windows
    from agents import load_agent

    evaluation = gym.make("DRRL-Tiny-TopP-Budget-v0", split="eval", max_windows=3, budget=0.6)
    model = load_agent(folder / "models" / "dagger__0.6__0.zip", env=evaluation)
    returns = [play_episode(evaluation, actor(model), w).rewards.sum() for w in range(3)]
    assert curve["eval_return_mean"].iloc[-1] == pytest.approx(np.mean(returns), abs=1e-9)
    before = rows.copy()
    curves[0].unlink()  # a model saved without its curve is trained again, identically
    planning.main(planning.Args(**{**args.__dict__, "resume": True}))
    pd.testing.assert_frame_equal(pd.read_csv(folder / "episodes.csv"), before)
    pd.testing.assert_frame_equal(pd.read_csv(curves[0]), curve)
    # committed results hold no models/: a finished budget resumes without training, and
    # without the rollout caches (its tables come from episodes.csv alone)
    shutil.rmtree(folder / "models")
    frontier = pd.read_csv(folder / "frontier.csv")
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("DRRL_CACHE_DIR", str(empty))
    planning.main(planning.Args(**{**args.__dict__, "resume": True}))
    assert not (folder / "models").exists() and not (empty / "rollouts").exists()
    pd.testing.assert_frame_equal(pd.read_csv(folder / "episodes.csv"), before)
    pd.testing.assert_frame_equal(pd.read_csv(folder / "frontier.csv"), frontier)
    monkeypatch.setenv("DRRL_CACHE_DIR", cache_root)
    # another budget on resume: its rows are added, the tables show the budgets named
    planning.main(planning.Args(**{**args.__dict__, "resume": True, "budgets": (0.5,)}))
    rows = pd.read_csv(folder / "episodes.csv")
    assert sorted(rows["budget"].unique()) == [0.5, 0.6] and len(rows) == 2 * len(before)
    assert set(pd.read_csv(folder / "frontier.csv")["budget"]) == {0.5}


def test_planning_frontier_resamples_windows_that_share_text_together():
    import pandas as pd

    planning = load_script("experiments/planning.py")
    rng = np.random.default_rng(4)
    kl = rng.uniform(0.01, 0.05, size=4)
    rows = pd.DataFrame(
        [
            {
                "budget": 0.6,
                "policy": policy,
                "seed": 0,
                "window": window,
                "mean_kl": value,
                **dict(top1_agreement=0.9, delta_ppl_pct=1.0, retrieval_correct=np.nan),
                **dict(flops_ratio=0.6, masked_actions=0),
            }
            for policy, shift in (("static_layer", 0.0), ("static_cell", 0.004))
            for window in range(8)
            for value in [kl[window // 2] + shift * (1 + window // 2) + 1e-3 * (window % 2)]
        ]
    )
    naive = planning.frontier(rows).set_index("policy")
    apart = planning.frontier(rows, groups=np.arange(8)).set_index("policy")
    pd.testing.assert_frame_equal(naive, apart)  # distinct labels: the plain bootstrap
    paired = planning.frontier(rows, groups=np.arange(8) // 2).set_index("policy")
    width = paired["kl_vs_static_high"] - paired["kl_vs_static_low"]
    assert (
        width["static_cell"]
        > (naive["kl_vs_static_high"] - naive["kl_vs_static_low"])["static_cell"]
    )
    assert (
        paired.loc["static_cell", "kl_vs_static_mean"]
        == naive.loc["static_cell", "kl_vs_static_mean"]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"env_id": "DRRL-Tiny-TopP-v0"}, "is not a budgeted id"),
        ({"env_id": "DRRL-Tiny-Live-v0"}, "is not a cached id"),
        ({"agents": ("dqn",)}, "is not a masked learner"),
        ({"seeds": 0}, "seeds must be >= 1"),
        ({"budgets": (0.6, 0.6)}, "budgets must not repeat"),
        ({"agents": ("static_layer",)}, "is not a masked learner"),
    ],
)
def test_planning_script_refuses_bad_arguments(kwargs, message):
    planning = load_script("experiments/planning.py")
    with pytest.raises(ValueError, match=message):
        planning.Args(**{"env_id": "DRRL-Tiny-TopP-Budget-v0", "device": "cpu", **kwargs})


def test_a_soft_budget_is_observed_but_not_enforced(cache_root):
    soft = gym.make(
        "DRRL-Tiny-TopP-Budget-v0", cache_dir=cache_root, max_windows=3, enforce_budget=False
    )
    hard = gym.make("DRRL-Tiny-TopP-Budget-v0", cache_dir=cache_root, max_windows=3)
    exact = np.full((4, 4), len(soft.unwrapped.actions) - 1)
    free, walled = play_episode(soft, exact, 0, record_steps=True), play_episode(hard, exact, 0)
    assert all(step["mask"].all() and not step["action_masked"] for step in free.steps)
    assert free.summary["flops_ratio"] > 0.5 >= walled.summary["flops_ratio"]
    assert np.array_equal(free.actions, exact) and walled.summary["masked_actions"] > 0
    assert soft.unwrapped.layout == hard.unwrapped.layout  # the same observation
    observation, _ = soft.reset(options={"window": 1})
    for _ in range(STEPS):
        observation, *_ = soft.step(len(soft.unwrapped.actions) - 1)
        assert soft.observation_space.contains(observation)
    with pytest.raises(ValueError, match="enforce_budget=False needs a budget"):
        gym.make("DRRL-Tiny-TopP-v0", cache_dir=cache_root, enforce_budget=False)
