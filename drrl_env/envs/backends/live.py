"""The live backend: steps run the frozen model closed loop, one layer call at a time.

The settings chosen so far change the inputs of later layers, so errors compound, and the
window's perplexity at the end is real, as are its mean token KL divergence to exact
attention and its top-1 agreement with it (against exact attention's next-token log-probs
of the same window, computed once per window with one exact pass). A window that carries an
``answer`` (``passkey`` windows, and those of a ``mix``) is then continued greedily for
:data:`~drrl_env.lm.retrieval.MAX_NEW_TOKENS` tokens with the approximate attention still
active, every layer at its last-segment setting; ``retrieval_correct`` is 1.0 when the first
integer of that answer is the expected one (:func:`~drrl_env.lm.retrieval.score_answer`),
and ``retrieval_correct_full`` is the same for exact attention. Mix windows also name
their kind (``window_kind``). Several live
environments of one process share the model (each window runs in a greenlet of its own,
with its own controller).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from drrl_env.envs.backends.base import LayerView
from drrl_env.envs.problem import Problem

REFERENCE_BYTES = 1 << 30
"""Exact next-token log-probs kept per live backend (the last windows' references)."""


class LiveBackend:
    """Runs the model closed loop (see the module docstring).

    Not teacher forced (each view follows the settings chosen before it; nothing is stored)
    and not replayed bit for bit (float32 kernels: replayed rewards agree within
    :func:`drrl_env.replay.reward_tolerance`).
    """

    teacher_forced = False
    bitwise_replay = False

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.config = problem.config
        self.lm = problem.lm
        self.method = problem.method
        windows = problem.windows
        self.tokens = windows.tokens
        self.metadata = dict(windows.metadata)
        self.n_windows = len(self.tokens)
        raw = problem.reward.fidelity.raw
        self.terms = ("cosine",) if raw == "cosine" else ("cosine", raw)
        self.static_cost = self.method.static_cost
        self._live = None
        self._request = None
        self._full: dict[int, tuple[float, float]] = {}
        self._full_answers: dict[int, str] = {}
        self._references: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._gradient = None  # (window, LossGradient) of the last window that needed one
        self._window = 0

    def __getstate__(self):
        raise TypeError(
            "a live dynamic-rank env holds a model forward pass suspended mid-window and "
            "cannot be pickled. Pickle its configuration instead (env.unwrapped.config) and "
            "rebuild it with DynamicRankEnv(config) or gym.make(id, **config.as_dict()); "
            "vectorized envs build each copy in its worker from the id, which works."
        )

    def begin(self, window: int) -> LayerView:
        from drrl_env.lm.runner import LiveWindow

        self.close()
        self._window = window
        gradient = self.gradient(window) if len(self.terms) > 1 else None
        self._live = LiveWindow(
            self.lm,
            self.tokens[window],
            self.config.segment_length,
            self.method,
            terms=self.terms,
            gradient=gradient,
            reference=self.reference(window),
            generate=self._generate(window),
        )
        self._request = self._live.start()
        return self.view()

    def answer(self, window: int) -> str | None:
        """The answer ``window`` expects after its last token (retrieval windows), else None."""
        answers = self.metadata.get("answer")
        if answers is None or not str(answers[window]):
            return None
        return str(answers[window])

    def _generate(self, window: int) -> int:
        from drrl_env.lm.retrieval import MAX_NEW_TOKENS

        return MAX_NEW_TOKENS if self.answer(window) is not None else 0

    def episode_views(self, window: int) -> None:
        """None: closed loop, each view follows the settings chosen before it."""
        return None

    def view(self) -> LayerView:
        return LayerView(self._request.spectrum, self._request.input_stats)

    def execute(self, segment: int, layer: int, action: int) -> dict[str, float]:
        record, self._request = self._live.step(self.problem.actions.settings[action])
        raw = dict(record.terms)
        if not self.static_cost:
            raw.update(flops=float(record.flops.total), kept=float(record.kept))
        return raw

    def candidates(self, segment: int, layer: int) -> dict[str, np.ndarray]:
        raise RuntimeError(
            "the live backend runs one setting per layer call: candidate measurements need "
            "backend='cached'"
        )

    def rollout(self, name: str, window: int | None = None) -> np.ndarray:
        raise RuntimeError(
            f"the live backend runs the model closed loop and stores no rollouts: the cached "
            f"array {name!r} needs backend='cached'"
        )

    def reference(self, window: int) -> torch.Tensor:
        """Exact attention's next-token log-probs of ``window`` (n_predicted, V).

        Computed with one exact pass, which also gives :meth:`full_rank`; the references of
        the last windows are kept up to :data:`REFERENCE_BYTES`.
        """
        from drrl_env.lm.runner import exact_logprobs

        if window in self._references:
            self._references.move_to_end(window)
            return self._references[window]
        result, logprobs = exact_logprobs(
            self.lm, self.tokens[window], self.config.segment_length, self._generate(window)
        )
        self._full[window] = (result.perplexity, result.nll_sum / result.n_predicted)
        if result.generated is not None:
            self._full_answers[window] = self.lm.tokenizer.decode(result.generated)
        self._references[window] = logprobs
        while len(self._references) > 1 and (
            sum(r.numel() * r.element_size() for r in self._references.values()) > REFERENCE_BYTES
        ):
            self._references.popitem(last=False)
        return logprobs

    def gradient(self, window: int):
        """The loss gradient of ``window`` at exact attention, for the loss terms
        (:func:`~drrl_env.lm.measure.loss_gradient`: one forward and one backward pass).

        It depends on the window alone, so the last window's is kept: episodes played one
        after another on a window (every policy of an evaluation) compute it once.
        """
        from drrl_env.lm.measure import loss_gradient

        if self._gradient is None or self._gradient[0] != window:
            self._gradient = None  # free the last one before computing the next
            self._gradient = (window, loss_gradient(self.lm, self.tokens[window]))
        return self._gradient[1]

    def full_rank(self, window: int) -> tuple[float, float]:
        """(perplexity, mean NLL) of ``window`` at exact attention (computed once)."""
        if window not in self._full:
            self.reference(window)
        return self._full[window]

    def finish(self) -> dict:
        from drrl_env.lm.retrieval import score_answer

        result = self._live.result
        perplexity_full, mean_nll_full = self.full_rank(self._window)
        summary = {
            "perplexity": result.perplexity,
            "perplexity_full": perplexity_full,
            "mean_nll": result.nll_sum / result.n_predicted,
            "mean_nll_full": mean_nll_full,
            "mean_kl": result.mean_kl,
            "top1_agreement": result.top1_agreement,
        }
        if "kind" in self.metadata:  # mix windows: prose, code or passkey
            summary["window_kind"] = str(self.metadata["kind"][self._window])
        expected = self.answer(self._window)
        if expected is not None:
            generated = self.lm.tokenizer.decode(result.generated)
            full = self._full_answers[self._window]
            summary.update(
                answer=expected,
                generated=generated,
                retrieval_correct=float(score_answer(generated, expected)),
                retrieval_correct_full=float(score_answer(full, expected)),
            )
        return summary

    def close(self) -> None:
        if self._live is not None:
            self._live.close()
