"""The state-token Transformer: tokens follow the observation layout, sizes come from the space."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from agents import StateTokenExtractor, layout_for_space, token_spec
from drrl_env.envs.observation import ObservationLayout


def box(size: int) -> spaces.Box:
    return spaces.Box(-np.inf, np.inf, (size,), np.float32)


@pytest.mark.parametrize("n_ranks", [1, 4, 8, 16])
def test_layout_is_reconstructed_from_the_space_size(n_ranks):
    layout = ObservationLayout(n_ranks)
    assert layout_for_space(box(layout.size)) == layout
    # A budgeted layout's size also fits an unbudgeted one: it is read as unbudgeted, so
    # make_agent hands the env's own layout to the extractor.
    budgeted = ObservationLayout(n_ranks, budgeted=True)
    assert layout_for_space(box(budgeted.size)) == ObservationLayout(n_ranks + 1)


@pytest.mark.parametrize(
    ("space", "match"),
    [
        (box(27), "not a dynamic-rank observation"),
        (box(11), "n_actions >= 1"),
        (spaces.Box(0, 1, (3, 9), np.float32), "flat Box"),
        (spaces.Discrete(27), "flat Box"),
    ],
)
def test_spaces_that_fit_no_layout(space, match):
    with pytest.raises(ValueError, match=match):
        layout_for_space(space)


def test_token_spec_covers_every_entry_once():
    layout = ObservationLayout(8)
    spec = token_spec(layout)
    assert spec.rank_features == ("energy", "perturbation", "action_cost")
    assert [name for name, _ in spec.groups] == [
        "position",
        "sequence_dynamics",
        "layer_weights",
        "flops_spent",
    ]
    assert spec.n_tokens == 1 + 8 + 4
    starts = [layout.slices[name].start for name in spec.rank_features]
    np.testing.assert_array_equal(spec.rank_index[3], [start + 3 for start in starts])
    used = [*spec.rank_index.flatten().tolist(), *(i for _, idx in spec.groups for i in idx)]
    assert sorted(used) == list(range(layout.size))


@pytest.mark.parametrize("n_ranks", [4, 8])
def test_each_entry_moves_exactly_the_token_that_owns_it(n_ranks):
    layout = ObservationLayout(n_ranks)
    extractor = StateTokenExtractor(box(layout.size))
    spec = extractor.spec
    owner = {int(i): 1 + k for k, row in enumerate(spec.rank_index) for i in row}
    owner |= {i: 1 + n_ranks + g for g, (_, idx) in enumerate(spec.groups) for i in idx}
    base = torch.rand(1, layout.size)
    with torch.no_grad():
        reference = extractor.tokens(base)
        for index in range(layout.size):
            moved = base.clone()
            moved[0, index] += 0.5
            changed = (extractor.tokens(moved) != reference).any(dim=-1)[0]
            assert torch.nonzero(changed).flatten().tolist() == [owner[index]], index


def test_features_shape_and_gradients_on_real_observations(tmp_path_factory):
    env = gym.make(
        "DRRL-Tiny-v0",
        cache_dir=str(tmp_path_factory.getbasetemp() / "agents-cache"),
        max_windows=2,
    )
    observations = [env.reset(options={"window": 0})[0]]
    for action in range(7):
        observations.append(env.step(action)[0])
    batch = torch.as_tensor(np.stack(observations))
    extractor = StateTokenExtractor(env.observation_space, layout=env.unwrapped.layout)
    features = extractor(batch)
    assert features.shape == (8, extractor.features_dim) == (8, 64)
    assert extractor.tokens(batch).shape == (8, 13, 32)
    features.square().sum().backward()
    for name, parameter in extractor.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_inconsistent_arguments_are_refused():
    space = box(ObservationLayout(8).size)
    with pytest.raises(ValueError, match="layout has 23 entries"):
        StateTokenExtractor(space, layout=ObservationLayout(4))
    with pytest.raises(ValueError, match="n_heads=3 must divide d_model=32"):
        StateTokenExtractor(space, n_heads=3)
    with pytest.raises(ValueError, match="rank_fractions must hold 8 values"):
        StateTokenExtractor(space, rank_fractions=(0.5, 1.0))


def test_make_agent_gives_a_budgeted_env_its_own_layout(tmp_path):
    import gymnasium as gym

    from agents import make_agent

    env = gym.make("DRRL-Tiny-Budget-v0", cache_dir=str(tmp_path), max_windows=1)
    model = make_agent("maskable_ppo", env, policy="transformer")
    extractor = model.policy.features_extractor
    assert extractor.spec.n_ranks == env.action_space.n
    groups = [name for name, _ in extractor.spec.groups]
    assert groups[-3:] == ["budget_left", "steps_left", "budget_per_step"]
    model.learn(64)
