"""The ``mix`` corpus kind, and retrieval scored by live episodes (greedy answer at the end)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import drrl_env
from drrl_env.data import load_windows, resolve_source, source_fingerprint
from drrl_env.data.documents import DataNotFoundError
from drrl_env.data.kinds.mix import MIX_KINDS
from drrl_env.lm.retrieval import MAX_NEW_TOKENS, greedy_tokens, score_answer

SEQ_LEN = 512


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return tiny_llama.tokenizer


def _windows(tokenizer, corpus: str, split: str = "eval", **kw):
    try:
        return load_windows(tokenizer, SEQ_LEN, split=split, corpus=corpus, use_cache=False, **kw)
    except DataNotFoundError:
        pytest.skip("no local WikiText-2")


def test_mix_interleaves_prose_code_and_passkey_windows(tokenizer) -> None:
    mix = _windows(tokenizer, "mix", max_windows=9)
    parts = [_windows(tokenizer, c, max_windows=3) for c in ("wikitext-2", "code", "passkey")]
    assert mix.tokens.shape == (9, SEQ_LEN) and mix.corpus == "mix"
    meta = mix.metadata
    assert set(meta) == {"kind", "answer", "needle_start", "needle_end"}
    assert list(meta["kind"]) == list(MIX_KINDS) * 3
    for row in range(9):
        part, index = parts[row % 3], row // 3
        np.testing.assert_array_equal(mix.tokens[row], part.tokens[index])
        if meta["kind"][row] == "passkey":
            assert meta["answer"][row] == part.metadata["answer"][index] != ""
            assert meta["needle_start"][row] == part.metadata["needle_start"][index] >= 0
            assert meta["needle_end"][row] == part.metadata["needle_end"][index]
        else:
            assert meta["answer"][row] == "" and meta["needle_start"][row] == -1
            assert meta["needle_end"][row] == -1


def test_mix_text_groups_pair_each_passkey_with_its_filler_prose(tokenizer) -> None:
    mix = _windows(tokenizer, "mix", max_windows=9)
    labels = resolve_source("mix").text_groups(9)
    assert labels.tolist() == [0, 9, 0, 1, 10, 1, 2, 11, 2]
    meta = mix.metadata
    for row in range(2, 9, 3):  # the passkey rows: their filler is the prose row of one label
        (prose,) = [r for r in range(9) if labels[r] == labels[row] and r != row]
        start, end = int(meta["needle_start"][row]), int(meta["needle_end"][row])
        filler = np.concatenate([mix.tokens[row][:start], mix.tokens[row][end:]])
        words = mix.tokens[prose][:48]  # the prose window's start is in the passkey window
        windows = np.lib.stride_tricks.sliding_window_view(filler, len(words))
        assert (windows == words).all(axis=1).any(), row
    assert resolve_source("mix").text_groups(0).size == 0


def test_mix_balances_its_kinds_and_splits_each_kind_apart(tokenizer) -> None:
    full = _windows(tokenizer, "mix")
    counts = [len(_windows(tokenizer, c)) for c in ("wikitext-2", "code", "passkey")]
    assert len(full) == 3 * min(counts)
    train = _windows(tokenizer, "mix", split="train", max_windows=6)
    eval_ = _windows(tokenizer, "mix", max_windows=6)
    rows = {tuple(r) for r in train.tokens}
    assert not rows & {tuple(r) for r in eval_.tokens}


def test_mix_seed_is_the_passkey_seed_and_bad_options_are_refused(tokenizer) -> None:
    seeded = _windows(tokenizer, "mix:3", max_windows=3)
    passkey = _windows(tokenizer, "passkey:3", max_windows=1)
    assert seeded.metadata["answer"][2] == passkey.metadata["answer"][0]
    try:
        assert source_fingerprint("mix:3") != source_fingerprint("mix")
        assert source_fingerprint("mix") == resolve_source("mix").fingerprint()
    except DataNotFoundError:
        pytest.skip("no local WikiText-2")
    for bad in ("mix:x", "mix:-1", "mix:"):
        with pytest.raises(ValueError, match="the option is the passkey seed"):
            resolve_source(bad)
    with pytest.raises(TypeError, match="no documents of its own"):
        resolve_source("mix").read()


# --- retrieval in live episodes ----------------------------------------------------------


def _episode(env, window: int, policy) -> dict:
    env.reset(options={"window": window})
    while True:
        _, _, terminated, _, info = env.step(policy(env))
        if terminated:
            return info["episode_summary"]


@pytest.fixture(scope="module")
def live_mix(cache_root):
    try:
        env = gym.make(
            "DRRL-Tiny-Mix-TopP-Live-v0", split="eval", max_windows=3, cache_dir=cache_root
        )
    except DataNotFoundError:
        pytest.skip("no local WikiText-2")
    yield env
    env.close()


def test_live_episode_scores_the_greedy_answer_of_passkey_windows(live_mix, tiny_llama) -> None:
    base = live_mix.unwrapped
    rng = np.random.default_rng(0)
    cheapest = 0

    def random(env):
        return int(rng.integers(env.action_space.n))

    for window, kind in enumerate(MIX_KINDS):
        summary = _episode(live_mix, window, random)
        assert summary["window_kind"] == kind
        if kind != "passkey":
            assert "retrieval_correct" not in summary and "generated" not in summary
            continue
        answer = str(base.problem.windows.metadata["answer"][window])
        assert summary["answer"] == answer
        # the continuation equals the reference decoder run on the episode's settings
        settings = np.empty(np.shape(summary["actions"]), dtype=object)
        for index, action in np.ndenumerate(np.asarray(summary["actions"])):
            settings[index] = base.actions.settings[action]
        tokens = base.backend.tokens[window]
        method = base.problem.method
        expected = greedy_tokens(tiny_llama, tokens, base.config.segment_length, method, settings)
        assert summary["generated"] == tiny_llama.tokenizer.decode(expected)
        assert 1 <= len(expected) <= MAX_NEW_TOKENS
        assert summary["retrieval_correct"] == float(score_answer(summary["generated"], answer))
        exact = greedy_tokens(tiny_llama, tokens, base.config.segment_length)
        full = float(score_answer(tiny_llama.tokenizer.decode(exact), answer))
        assert summary["retrieval_correct_full"] == full
        # a random tiny model never answers a 5-digit key: a wrong answer is scored wrong
        assert summary["retrieval_correct"] == 0.0 and full == 0.0
        # the same window again (the same settings) answers the same
        again = _episode(live_mix, window, lambda env: cheapest)
        assert again["retrieval_correct"] == 0.0 and "generated" in again


def test_leaderboard_rows_carry_retrieval_and_replay_checks_it(live_mix, tmp_path) -> None:
    from agents.baselines import FullRankPolicy
    from agents.evaluation import LIVE_COLUMNS, evaluate_policy_on_windows, read_csv, replay_csv

    assert "retrieval_correct" in LIVE_COLUMNS
    path = tmp_path / "mix.csv"
    frame = evaluate_policy_on_windows(
        FullRankPolicy(live_mix), live_mix, [0, 2], name="full_rank", csv_path=path
    )
    assert np.isnan(frame.loc[0, "retrieval_correct"])
    assert frame.loc[1, "retrieval_correct"] in (0.0, 1.0)
    replay_csv(path, live_mix, labels={"policy": "full_rank"})
    rows = read_csv(path)
    rows.loc[1, "retrieval_correct"] = 1.0 - rows.loc[1, "retrieval_correct"]
    rows.to_csv(path, index=False)
    from drrl_env.replay import ReplayMismatch

    with pytest.raises(ReplayMismatch, match="retrieval_correct"):
        replay_csv(path, live_mix, labels={"policy": "full_rank"})


def test_mix_ids_are_registered_for_both_lengths() -> None:
    for name in ("DRRL-Mix-TopP", "DRRL-Long-Mix-TopP"):
        for suffix, backend in (("-v0", "cached"), ("-Live-v0", "live"), ("-Budget-v0", "cached")):
            kwargs = drrl_env.ENV_IDS[name + suffix]
            assert kwargs["corpus"] == "mix" and kwargs["method"] == "topp"
            assert kwargs["backend"] == backend
            assert ("budget" in kwargs) == (suffix == "-Budget-v0")
        assert drrl_env.ENV_IDS[name + "-v0"].get("seq_len", 1024) in (1024, 4096)
