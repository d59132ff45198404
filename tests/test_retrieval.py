"""Tests for drrl_env.lm.retrieval: greedy answers under a schedule, and exact-match scoring."""

from __future__ import annotations

import numpy as np
import pytest

from drrl_env.data import DataNotFoundError, load_windows
from drrl_env.lm.retrieval import first_integer, greedy_answer, greedy_tokens, score_answer
from drrl_env.lm.runner import run_window
from drrl_env.methods.base import Setting

# --- scoring -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "right"),
    [
        (" 47760.\n\nWhat", "47760", True),  # leading space, then trailing text
        ("47760", 47760, True),  # an int expected
        ("   \n 47760 is the pass key", "47760", True),
        (": 2604897.", "2604897", True),
        ("The key is 12 and 47760", "47760", False),  # the first number counts
        (" 477600000", "47760", False),  # extra digits
        (" 4776", "47760", False),  # missing digit
        (",,,,,,,,,,", "47760", False),  # no number
        ("", "47760", False),
        (" 47,760", "47760", False),  # separators end the integer
        (" ٤٧٧٦٠", "47760", False),  # non-ASCII digits are not digits here
    ],
)
def test_score_answer(text: str, expected: str | int, right: bool) -> None:
    assert score_answer(text, expected) is right


def test_first_integer() -> None:
    assert first_integer("a 12 b 34") == "12"
    assert first_integer("none") is None


# --- greedy generation ---------------------------------------------------------------------


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n)


def test_the_window_runs_as_run_window_does(tiny_llama) -> None:
    """The first generated token is run_window's next-token argmax at the last position."""
    tokens = _tokens(48)
    table = np.array([[8, 64, 16, 4], [64, 2, 32, 16], [4, 8, 64, 1]])
    (first,) = greedy_tokens(tiny_llama, tokens, 16, "gram", table, max_new_tokens=1)
    extended = np.concatenate([tokens, [0]])  # one more token: its own segment, after ours
    full_table = np.vstack([table, table[-1:]])
    result = run_window(tiny_llama, extended, 16, "gram", full_table, keep_logprobs=True)
    assert first == int(result.logprobs[47].argmax())
    exact = run_window(tiny_llama, extended, 16, "full", keep_logprobs=True)
    (exact_first,) = greedy_tokens(tiny_llama, tokens, 16, "full", None, max_new_tokens=1)
    assert exact_first == int(exact.logprobs[47].argmax())


def test_generated_tokens_use_the_last_segment_settings(tiny_llama) -> None:
    calls = []

    def schedule(segment, request):
        calls.append((segment, request.layer, request.queries, request.keys))
        return Setting(2 + segment)

    generated = greedy_tokens(tiny_llama, _tokens(40), 16, "gram", schedule, max_new_tokens=4)
    assert len(generated) == 4
    layers = range(tiny_llama.n_layers)
    window = [
        (s, layer, q, k) for s, q, k in ((0, 16, 16), (1, 16, 32), (2, 8, 40)) for layer in layers
    ]
    steps = [(2, layer, 1, 40 + i) for i in (1, 2, 3) for layer in layers]
    assert calls == window + steps  # the 4th token is never fed back


def test_greedy_is_deterministic_and_decodes(tiny_llama) -> None:
    tokens = _tokens(64, seed=1)
    first = greedy_tokens(tiny_llama, tokens, 32, "gram", 4, max_new_tokens=5)
    assert first == greedy_tokens(tiny_llama, tokens, 32, "gram", 4, max_new_tokens=5)
    text = greedy_answer(tiny_llama, tokens, 32, "gram", 4, max_new_tokens=5)
    assert text == tiny_llama.tokenizer.decode(first)


def test_generation_stops_at_end_of_sequence(tiny_llama, monkeypatch) -> None:
    tokens = _tokens(32)
    (first,) = greedy_tokens(tiny_llama, tokens, 16, max_new_tokens=1)
    monkeypatch.setattr(tiny_llama.tokenizer, "eos_token_id", first, raising=False)
    assert greedy_tokens(tiny_llama, tokens, 16) == []
    assert greedy_answer(tiny_llama, tokens, 16) == ""


def test_bad_arguments(tiny_llama) -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            greedy_tokens(tiny_llama, _tokens(16), 8, max_new_tokens=bad)
    with pytest.raises(ValueError, match="exceed the context"):
        greedy_tokens(tiny_llama, _tokens(2045), 512, max_new_tokens=4)
    with pytest.raises(ValueError, match="expected \\(segments, layers\\)"):
        greedy_tokens(tiny_llama, _tokens(32), 16, "gram", np.ones((3, 4), dtype=int))
    with pytest.raises(ValueError, match="needs basis="):
        greedy_tokens(tiny_llama, _tokens(32), 16, "calibrated", 8)


# --- SmolLM2 on passkey windows ------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_retrieves_the_pass_key_exactly_and_not_when_broken(smollm2, tmp_path) -> None:
    """Exact attention answers a 1024-token passkey window; ``gram`` at rank 1 does not."""
    try:
        windows = load_windows(
            smollm2.tokenizer,
            1024,
            split="eval",
            corpus="passkey",
            max_windows=1,
            cache_dir=tmp_path,
        )
    except DataNotFoundError:
        pytest.skip("no local WikiText-2 for the filler")
    tokens, answer = windows.tokens[0], str(windows.metadata["answer"][0])
    exact = greedy_answer(smollm2, tokens, 256)
    assert score_answer(exact, answer), (exact, answer)
    broken = greedy_answer(smollm2, tokens, 256, "gram", 1)
    assert not score_answer(broken, answer), (broken, answer)
    assert answer not in broken
