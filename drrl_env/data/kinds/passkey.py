"""``passkey[:<option>]`` and ``passkey-ruler[:<option>]``: retrieval windows over prose filler.

Each window is exactly ``seq_len`` tokens, built from token ids::

    header + "\\n" | filler[:a] | "\\n" + needle + "\\n" | filler[a:] | "\\n" + question

so the answer is the continuation of the window. ``passkey`` is the Landmark Attention /
LongLoRA format (a 5-digit pass key); ``passkey-ruler`` is RULER's ``niah_single`` needle
(a word-pair key and a 7-digit value, the question naming the key) with RULER's single-needle
header.

The filler of window ``i`` is the start of window ``i`` of the prose the filler source gives
for the same split and ``seq_len``: ``data_path`` is found as ``corpus="wikitext-2"`` finds
it (WikiText-2 by default; another file is detected as usual), so WikiText's train/eval
document split decides which filler a split uses, and a split has as many passkey windows as
prose windows. Window ``i``'s key and depth depend only on ``(seed, split, i)``: they are
drawn from sha256 digests, stable across machines and library versions. The needle starts
``round(depth * F)`` filler tokens into the ``F`` filler tokens of the window.

The option is a seed (``passkey:3``) or named values ``seed=S,needles=N`` (either may be
left out; defaults 0 and 1). With ``needles=N`` each filler window carries ``N`` windows,
each with its own key and depth: window ``i`` is filled from prose window ``i // N``, so a
split has ``N`` times as many passkey windows (as RULER draws many needles over one
haystack). Long windows need it: WikiText-2's eval split yields 12 prose windows of 4096
tokens. ``needles=1`` is the plain spelling, with the same windows and fingerprint.

Per-window metadata (:attr:`~drrl_env.data.windows.WindowSet.metadata`): ``answer`` (the
digits expected, str), ``key`` (``passkey``: the pass key; ``passkey-ruler``: the word
pair), ``depth`` (the drawn fraction in [0, 1]), ``needle_start`` and ``needle_end`` (token
offsets of the needle line, its newlines included, in the window).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from drrl_env.data.documents import Document
from drrl_env.data.sources import (
    DEFAULT_CORPUS,
    CorpusRequest,
    Metadata,
    Source,
    digest_fingerprint,
    read_documents,
    resolve_source,
)

if TYPE_CHECKING:
    from drrl_env.data.windows import Tokenizer

DEFAULT_SEED = 0
PASSKEY_FORMAT = 1
"""Bumped when the construction changes, so cached windows of another construction are rebuilt."""
DEPTH_STEPS = 1_000_000
"""Depths are drawn on a grid of this many steps in [0, 1]."""
OPTION_NAMES = ("seed", "needles")
"""The names the option may give values to (``seed=S,needles=N``)."""

PASSKEY_HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

RULER_HEADER = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards."
)
RULER_NEEDLE = "One of the special magic numbers for {key} is: {value}."
RULER_QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
ADJECTIVES = (
    "ancient", "bitter", "brave", "bright", "calm", "clever", "crimson", "curious", "damp",
    "eager", "elegant", "faint", "fierce", "fragile", "gentle", "giant", "golden", "hollow",
    "humble", "icy", "jolly", "lazy", "loud", "lucky", "mellow", "misty", "modern", "narrow",
    "noisy", "odd", "pale", "polite", "proud", "quiet", "rapid", "rough", "rusty", "shiny",
    "silent", "sleepy", "smooth", "solid", "spicy", "steady", "sticky", "sunny", "tender",
    "tiny", "vivid", "wild",
)  # fmt: skip
NOUNS = (
    "anchor", "apple", "badger", "banjo", "barrel", "basket", "beacon", "blanket", "bridge",
    "bucket", "cabin", "candle", "canyon", "carpet", "castle", "cherry", "cloud", "comet",
    "compass", "cookie", "desert", "dragon", "engine", "falcon", "feather", "forest", "garden",
    "glacier", "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern",
    "meadow", "mirror", "orchard", "otter", "pencil", "pepper", "pillow", "puzzle", "rabbit",
    "saddle", "sweater", "teapot", "tunnel", "violin",
)  # fmt: skip


def draw(seed: int, split: str, index: int, what: str) -> int:
    """A 64-bit integer that depends only on its arguments (sha256 of their spelling)."""
    digest = hashlib.sha256(f"{seed}:{split}:{index}:{what}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def needle_depth(seed: int, split: str, index: int) -> float:
    """The depth of window ``index``'s needle, a fraction in [0, 1] of its filler."""
    return (draw(seed, split, index, "depth") % (DEPTH_STEPS + 1)) / DEPTH_STEPS


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]


@dataclass(frozen=True)
class Needle:
    """The texts of one window: header, needle line, question, and the answer and key."""

    header: str
    needle: str
    question: str
    answer: str
    key: str


@dataclass(frozen=True)
class PasskeySource(Source):
    """Passkey retrieval windows (Landmark / LongLoRA format); see the module docstring.

    Attributes:
        seed: Seeds every window's key and depth.
        filler: The source whose prose fills the windows.
        needles: Windows per filler window, each with its own key and depth.
    """

    seed: int = DEFAULT_SEED
    filler: Source | None = None
    needles: int = 1

    spelling = "passkey[:<seed>|seed=S,needles=N]"
    takes_option = True
    rule = "passkey windows: the filler's documents (WikiText articles by default)"
    variant: ClassVar[str] = "passkey"

    @classmethod
    def resolve(cls, request: CorpusRequest) -> Source:
        """The seed and needles (``option``) and the filler found as the default corpus is.

        Raises:
            ValueError: If the option is neither a seed (a non-negative integer) nor
                ``seed=S,needles=N`` with known names given once each, ``S >= 0`` and
                ``N >= 1``.
            DataNotFoundError: If ``data_path`` does not exist.
        """
        corpus, option, data_path, text_field = request
        values = cls.parse_option(corpus, option)
        filler = resolve_source(DEFAULT_CORPUS, data_path, text_field)
        return cls(corpus, cls.variant, filler.path, text_field, filler=filler, **values)

    @classmethod
    def parse_option(cls, corpus: str, option: str | None) -> dict[str, int]:
        """``{"seed": S, "needles": N}`` from ``None``, ``"S"`` or ``"seed=S,needles=N"``."""
        values = {"seed": DEFAULT_SEED, "needles": 1}
        if option is None:
            return values
        if option.isdigit():
            return {**values, "seed": int(option)}
        usage = (
            f"the option is a seed, a non-negative integer ('{cls.variant}:3'), or named "
            f"values ('{cls.variant}:seed=3,needles=2')"
        )
        given: set[str] = set()
        for item in option.split(","):
            name, equals, value = item.partition("=")
            name = name.strip()
            if not equals or name not in OPTION_NAMES:
                raise ValueError(
                    f"corpus={corpus!r}: {usage}; names: {', '.join(OPTION_NAMES)}; got {item!r}"
                )
            if name in given:
                raise ValueError(f"corpus={corpus!r}: {name} is given twice")
            given.add(name)
            value = value.strip()
            least = 1 if name == "needles" else 0
            if not value.isdigit() or int(value) < least:
                raise ValueError(
                    f"corpus={corpus!r}: {name} must be an integer >= {least}, got {value!r}"
                )
            values[name] = int(value)
        return values

    def text_groups(self, n_windows: int) -> np.ndarray:
        """Window ``i`` is filled from prose window ``i // needles`` of the filler: its label."""
        return np.arange(n_windows, dtype=np.int64) // self.needles

    def describe(self) -> str:
        needles = f", {self.needles} needles per filler window" if self.needles != 1 else ""
        return f"{self.variant} windows (seed {self.seed}{needles}) over {self.filler.describe()}"

    def fingerprint(self) -> str:
        parts = [
            ["format", PASSKEY_FORMAT],
            ["templates", list(self.templates())],
            ["seed", self.seed],
            ["filler", self.filler.fingerprint()],
        ]
        if self.needles != 1:  # the plain spelling keeps the fingerprint it always had
            parts.append(["needles", self.needles])
        return digest_fingerprint(self.kind, parts)

    def read(self) -> list[Document]:
        """The filler's documents."""
        return read_documents(self.filler)

    @classmethod
    def templates(cls) -> tuple[str, ...]:
        """The header, needle and question templates (part of the fingerprint)."""
        return PASSKEY_HEADER, PASSKEY_NEEDLE, PASSKEY_QUESTION

    def needle(self, split: str, index: int) -> Needle:
        """The texts of window ``index`` of ``split``: a seeded 5-digit pass key."""
        key = str(10_000 + draw(self.seed, split, index, "key") % 90_000)
        return Needle(PASSKEY_HEADER, PASSKEY_NEEDLE.format(key=key), PASSKEY_QUESTION, key, key)

    def build_windows(
        self, tokenizer: Tokenizer, seq_len: int, split: str, eval_fraction: float
    ) -> tuple[np.ndarray, Metadata]:
        """``needles`` windows per filler window of the split, each exactly ``seq_len`` tokens.

        Raises:
            ValueError: If ``seq_len`` cannot hold the header, needle and question, or the
                filler's split holds fewer than ``seq_len`` tokens.
        """
        prose, _ = self.filler.build_windows(tokenizer, seq_len, split, eval_fraction)
        tokens = np.empty((len(prose) * self.needles, seq_len), dtype=prose.dtype)
        rows: dict[str, list] = {n: [] for n in ("answer", "key", "depth", "start", "end")}
        for index in range(len(tokens)):
            filler = prose[index // self.needles]
            texts = self.needle(split, index)
            header = _encode(tokenizer, texts.header + "\n")
            needle = _encode(tokenizer, "\n" + texts.needle + "\n")
            question = _encode(tokenizer, "\n" + texts.question)
            room = seq_len - len(header) - len(needle) - len(question)
            if room < 0:
                raise ValueError(
                    f"seq_len={seq_len} is too small for {self.variant} windows: the header, "
                    f"needle and question take {seq_len - room} tokens"
                )
            depth = needle_depth(self.seed, split, index)
            at = round(depth * room)
            row = [*header, *filler[:at], *needle, *filler[at:room], *question]
            assert len(row) == seq_len
            tokens[index] = row
            start = len(header) + at
            for name, value in zip(
                rows, (texts.answer, texts.key, depth, start, start + len(needle)), strict=True
            ):
                rows[name].append(value)
        metadata = {
            "answer": np.array(rows["answer"], dtype=str),
            "key": np.array(rows["key"], dtype=str),
            "depth": np.array(rows["depth"], dtype=np.float64),
            "needle_start": np.array(rows["start"], dtype=np.int64),
            "needle_end": np.array(rows["end"], dtype=np.int64),
        }
        return tokens, metadata


@dataclass(frozen=True)
class RulerPasskeySource(PasskeySource):
    """RULER's single needle: a word-pair key and a 7-digit value; see the module docstring."""

    spelling = "passkey-ruler[:<seed>|seed=S,needles=N]"
    variant: ClassVar[str] = "passkey-ruler"

    @classmethod
    def templates(cls) -> tuple[str, ...]:
        return RULER_HEADER, RULER_NEEDLE, RULER_QUESTION

    def needle(self, split: str, index: int) -> Needle:
        """The texts of window ``index`` of ``split``: a seeded key and 7-digit value."""
        adjective = ADJECTIVES[draw(self.seed, split, index, "adjective") % len(ADJECTIVES)]
        noun = NOUNS[draw(self.seed, split, index, "noun") % len(NOUNS)]
        key = f"{adjective}-{noun}"
        value = str(1_000_000 + draw(self.seed, split, index, "value") % 9_000_000)
        return Needle(
            RULER_HEADER,
            RULER_NEEDLE.format(key=key, value=value),
            RULER_QUESTION.format(key=key),
            value,
            key,
        )
