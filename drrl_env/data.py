"""WikiText corpora: loading, deterministic article-level splits and token windows.

Text comes from local WikiText raw files (``wiki.test.raw`` and friends) when found, else from
the Hugging Face hub when reachable. Articles are split by a hash of their title into ``train``
and ``eval``, tokenised and cut into non-overlapping windows that never cross the split.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import numpy as np

CORPORA = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
SPLITS = ("train", "eval")
DATA_DIR_ENV = "DRRL_DATA_DIR"
SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HUB_DATASET = "Salesforce/wikitext"
HUB_TIMEOUT_S = 3.0
_HUB_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
_MARKER_FILE = "wiki.test.raw"
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Article:
    """One WikiText article: ``title`` without ``=`` marks, ``text`` its lines joined by ``\\n``."""

    title: str
    text: str


class DataNotFoundError(RuntimeError):
    """Raised when no corpus can be read locally or from the hub."""


class Tokenizer(Protocol):
    """Anything with a Hugging Face style ``encode`` method."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class WindowSet:
    """Token windows of one corpus split; ``tokens`` has shape ``(n_windows, seq_len)``, int64."""

    corpus: str
    split: str
    seq_len: int
    tokens: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _title_of(line: str) -> str | None:
    """Return the title if ``line`` is an article title line (`` = Title = ``), else None."""
    s = line.strip()
    if not (s.startswith("= ") and s.endswith(" =")):
        return None
    inner = s[2:-2].strip()
    if not inner or inner.startswith("=") or inner.endswith("="):
        return None
    return inner


def parse_wikitext(text: str) -> list[Article]:
    """Parse WikiText raw text into articles, in file order.

    LF or CRLF, with or without blank lines between paragraphs: lines are stripped and blank
    lines dropped, so every layout gives the same articles.

    Raises:
        ValueError: If non-blank text precedes the first title line.
    """
    articles: list[Article] = []
    title: str | None = None
    body: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        new_title = _title_of(line)
        if new_title is not None:
            if title is not None:
                articles.append(Article(title, "\n".join(body)))
            title, body = new_title, []
        elif line:
            if title is None:
                raise ValueError(f"text before the first article title: {line[:60]!r}")
            body.append(line)
    if title is not None:
        articles.append(Article(title, "\n".join(body)))
    return articles


def _check(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")


def _search(root: Path, corpus: str) -> Path | None:
    """Find ``wiki.test.raw`` at ``root``: the file itself, in it, or in a corpus subfolder."""
    if root.is_file():
        return root if root.suffix == ".raw" else None
    for folder in (root, root / f"{corpus}-raw", root / CORPORA[corpus]):
        if (folder / _MARKER_FILE).is_file():
            return folder / _MARKER_FILE
    return None


def find_local_corpus(
    corpus: str = "wikitext-2", data_path: str | os.PathLike | None = None
) -> Path | None:
    """Return the path of a local raw file of ``corpus``, or None.

    Looks at ``data_path``, then ``$DRRL_DATA_DIR``, then ``SHARED_DATA_DIR``. Each may be a
    ``.raw`` file or a folder holding ``wiki.test.raw`` directly or in a subfolder named
    ``<corpus>-raw`` (e.g. ``wikitext-2-raw``) or after the hub config.

    Raises:
        ValueError: If ``corpus`` is unknown.
        DataNotFoundError: If ``data_path`` is given but holds no raw file.
    """
    _check("corpus", corpus, list(CORPORA))
    if data_path is not None:
        found = _search(Path(data_path).expanduser(), corpus)
        if found is None:
            raise DataNotFoundError(
                f"data_path={str(data_path)!r} is not a .raw file nor a folder holding "
                f"{_MARKER_FILE} (directly or in a '{corpus}-raw' subfolder)"
            )
        return found
    for root in (os.environ.get(DATA_DIR_ENV), SHARED_DATA_DIR):
        if root:
            found = _search(Path(root).expanduser(), corpus)
            if found is not None:
                return found
    return None


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Return whether the Hugging Face hub may be used: not declared offline and reachable."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        with socket.create_connection((host or "huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _not_found_message(corpus: str, reason: str) -> str:
    return (
        f"no local copy of {corpus!r} found and {reason}. Pass data_path= (a wiki.test.raw "
        f"file or a folder holding it), or set {DATA_DIR_ENV} to a folder with wiki.test.raw "
        f"(directly or in a '{corpus}-raw' subfolder), or enable network access to the "
        "Hugging Face hub."
    )


def _load_hub_text(corpus: str, hub_split: str) -> str:
    if not hub_reachable():
        raise DataNotFoundError(_not_found_message(corpus, "the Hugging Face hub is unreachable"))
    from datasets import load_dataset

    try:
        rows = load_dataset(HUB_DATASET, CORPORA[corpus], split=hub_split)
    except Exception as exc:  # any hub failure means no data
        raise DataNotFoundError(_not_found_message(corpus, f"the hub failed ({exc})")) from exc
    return "".join(line if line.endswith("\n") else line + "\n" for line in rows["text"])


def _local_file(found: Path, data_path: str | os.PathLike | None, hub_split: str) -> Path:
    """Prefer ``wiki.{hub_split}.raw`` next to a file found by folder search."""
    if data_path is not None and Path(data_path).expanduser().is_file():
        return found
    sibling = found.parent / _HUB_FILES[hub_split]
    return sibling if sibling.is_file() else found


def load_articles(
    corpus: str = "wikitext-2",
    data_path: str | os.PathLike | None = None,
    hub_split: str = "test",
) -> list[Article]:
    """Load the articles of ``corpus`` from a local file (``find_local_corpus``) or the hub.

    Args:
        corpus: A key of ``CORPORA``.
        data_path: Explicit ``.raw`` file or folder.
        hub_split: ``"train"``, ``"validation"`` or ``"test"``: the hub split and, in a local
            folder, ``wiki.{train,valid,test}.raw`` (``wiki.test.raw`` when absent).

    Raises:
        ValueError: On an unknown corpus or hub split, or if no article is found.
        DataNotFoundError: If no local file exists and the hub cannot be used.
    """
    _check("corpus", corpus, list(CORPORA))
    _check("hub_split", hub_split, list(_HUB_FILES))
    found = find_local_corpus(corpus, data_path)
    if found is not None:
        path = _local_file(found, data_path, hub_split)
        text = path.read_text(encoding="utf-8")
        source = str(path)
    else:
        text = _load_hub_text(corpus, hub_split)
        source = f"{HUB_DATASET}/{CORPORA[corpus]}:{hub_split}"
    articles = parse_wikitext(text)
    if not articles:
        raise ValueError(f"no articles found in {source}")
    return articles


def _rank_key(article: Article) -> tuple[str, str]:
    title = hashlib.sha256(article.title.encode("utf-8")).hexdigest()
    return title, hashlib.sha256(article.text.encode("utf-8")).hexdigest()


def split_articles(
    articles: Sequence[Article], split: str, eval_fraction: float = 0.2
) -> list[Article]:
    """Return the articles of ``split``, in their original order.

    Articles are ranked by the sha256 of their title (ties: of their text), so the result does
    not depend on their order; the first ``ceil(eval_fraction * n)`` (at most ``n - 1``) form
    ``eval``, the rest ``train``.

    Raises:
        ValueError: On an unknown split, a fraction outside (0, 1) or fewer than 2 articles.
    """
    _check("split", split, SPLITS)
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = len(articles)
    if n < 2:
        raise ValueError(f"need at least 2 articles to split, got {n}")
    n_eval = min(math.ceil(eval_fraction * n - 1e-9), n - 1)
    ranked = sorted(range(n), key=lambda i: _rank_key(articles[i]))
    eval_ids = set(ranked[:n_eval])
    want_eval = split == "eval"
    return [a for i, a in enumerate(articles) if (i in eval_ids) == want_eval]


def make_windows(
    articles: Sequence[Article],
    tokenizer: Tokenizer,
    seq_len: int,
    max_windows: int | None = None,
) -> np.ndarray:
    """Tokenise articles and cut non-overlapping windows, shape ``(n_windows, seq_len)``, int64.

    Each article is encoded as ``title + "\\n" + text`` without special tokens; the streams
    are concatenated in order, the tail shorter than ``seq_len`` is dropped and ``max_windows``
    (None: all) keeps the first windows.

    Raises:
        ValueError: If ``seq_len < 2``, ``max_windows < 1`` or there are too few tokens.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    ids: list[int] = []
    for article in articles:
        ids.extend(tokenizer.encode(f"{article.title}\n{article.text}", add_special_tokens=False))
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise ValueError(
            f"seq_len={seq_len} exceeds the {len(ids)} tokens available; need at least one window"
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    flat = np.asarray(ids[: n_windows * seq_len], dtype=np.int64)
    return flat.reshape(n_windows, seq_len)


def load_windows(
    tokenizer: Tokenizer,
    seq_len: int,
    split: str = "train",
    corpus: str = "wikitext-2",
    data_path: str | os.PathLike | None = None,
    eval_fraction: float = 0.2,
    max_windows: int | None = None,
) -> WindowSet:
    """Load one article-level split of ``corpus`` as token windows.

    Chains ``load_articles`` (hub split ``test`` or the local file), ``split_articles`` and
    ``make_windows``; see those for the arguments.

    Raises:
        ValueError: On an unknown split or any invalid argument of the steps above.
        DataNotFoundError: If the corpus cannot be found.
    """
    _check("split", split, SPLITS)
    articles = split_articles(load_articles(corpus, data_path), split, eval_fraction)
    tokens = make_windows(articles, tokenizer, seq_len, max_windows)
    return WindowSet(corpus=corpus, split=split, seq_len=seq_len, tokens=tokens)
