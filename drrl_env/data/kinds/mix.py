"""``mix[:<seed>]``: prose, code and passkey windows interleaved, one kind after the other.

Window ``3 i`` is prose window ``i`` (WikiText, found as ``corpus="wikitext-2"`` finds it,
``data_path`` included), window ``3 i + 1`` is code window ``i`` (this Python's standard
library, :mod:`drrl_env.data.kinds.code`) and window ``3 i + 2`` is passkey window ``i``
(:mod:`drrl_env.data.kinds.passkey`, seeded by the option, default 0). Each kind keeps its
own train/eval split, so a mix split never shares a document with the other split. A split
holds ``3 * min(n_prose, n_code, n_passkey)`` windows, and the first ``3 k`` of them hold
``k`` windows of every kind, so ``max_windows`` keeps the kinds balanced when it is a
multiple of 3.

Per-window metadata: ``kind`` (``prose``, ``code`` or ``passkey``, str), ``answer`` (the
pass key for passkey windows, ``""`` otherwise), ``needle_start`` and ``needle_end``
(``-1`` outside passkey windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from drrl_env.data.sources import (
    DEFAULT_CORPUS,
    CorpusRequest,
    Metadata,
    Source,
    digest_fingerprint,
    resolve_source,
)

if TYPE_CHECKING:
    from drrl_env.data.documents import Document
    from drrl_env.data.windows import Tokenizer

MIX_KINDS = ("prose", "code", "passkey")
"""The kinds of a mix, in the order their windows alternate."""
MIX_FORMAT = 1
"""Bumped when the interleaving changes, so cached windows of another one are rebuilt."""


@dataclass(frozen=True)
class MixSource(Source):
    """Prose, code and passkey windows in turn; see the module docstring.

    Attributes:
        parts: The sources of the kinds of :data:`MIX_KINDS`, in that order.
    """

    parts: tuple[Source, ...] = ()

    spelling = "mix[:<seed>]"
    takes_option = True
    rule = "a mix of prose, code and passkey windows"

    @classmethod
    def resolve(cls, request: CorpusRequest) -> Source:
        """The prose (``data_path``), code (standard library) and passkey (seed) sources.

        Raises:
            ValueError: If the seed is not a non-negative integer.
            DataNotFoundError: If ``data_path`` does not exist.
        """
        corpus, option, data_path, text_field = request
        if option is not None and not option.isdigit():
            raise ValueError(
                f"corpus={corpus!r}: the option is the passkey seed, a non-negative integer "
                f"('mix:3'), got {option!r}"
            )
        passkey = "passkey" if option is None else f"passkey:{option}"
        parts = (
            resolve_source(DEFAULT_CORPUS, data_path, text_field),
            resolve_source("code"),
            resolve_source(passkey, data_path, text_field),
        )
        return cls(corpus, "mix", parts[0].path, text_field, parts=parts)

    def describe(self) -> str:
        named = ", ".join(
            f"{k}: {p.describe()}" for k, p in zip(MIX_KINDS, self.parts, strict=True)
        )
        return f"mix of {named}"

    def text_groups(self, n_windows: int) -> np.ndarray:
        """Prose window ``i`` (row ``3 i``) and passkey window ``i`` (row ``3 i + 2``) share
        text: the passkey's filler is the prose window of its label. Code windows have
        their own labels (``n_windows`` on)."""
        rows = np.arange(n_windows, dtype=np.int64)
        part, index = rows % len(self.parts), rows // len(self.parts)
        per_part = [p.text_groups(int(index.max()) + 1 if n_windows else 0) for p in self.parts]
        labels = np.empty(n_windows, dtype=np.int64)
        for row in rows:
            label = per_part[part[row]][index[row]]
            labels[row] = label + n_windows if MIX_KINDS[part[row]] == "code" else label
        return labels

    def fingerprint(self) -> str:
        parts = [["format", MIX_FORMAT], *([p.fingerprint()] for p in self.parts)]
        return digest_fingerprint(self.kind, parts)

    def read(self) -> list[Document]:
        raise TypeError("a mix has no documents of its own: its windows come from its parts")

    def build_windows(
        self, tokenizer: Tokenizer, seq_len: int, split: str, eval_fraction: float
    ) -> tuple[np.ndarray, Metadata]:
        """Every part's windows of the split, interleaved (see the module docstring).

        Raises:
            ValueError, CorpusFormatError: As the parts' ``build_windows``.
        """
        built = [p.build_windows(tokenizer, seq_len, split, eval_fraction) for p in self.parts]
        per_kind = min(len(tokens) for tokens, _ in built)
        tokens = np.empty((per_kind * len(built), seq_len), dtype=np.int64)
        kinds, answers = [], []
        starts = np.full(len(tokens), -1, dtype=np.int64)
        ends = np.full(len(tokens), -1, dtype=np.int64)
        for row in range(len(tokens)):
            part, index = row % len(built), row // len(built)
            part_tokens, metadata = built[part]
            tokens[row] = part_tokens[index]
            kinds.append(MIX_KINDS[part])
            answers.append(str(metadata["answer"][index]) if "answer" in metadata else "")
            if "needle_start" in metadata:
                starts[row] = metadata["needle_start"][index]
                ends[row] = metadata["needle_end"][index]
        metadata = {
            "kind": np.array(kinds, dtype=str),
            "answer": np.array(answers, dtype=str),
            "needle_start": starts,
            "needle_end": ends,
        }
        return tokens, metadata
