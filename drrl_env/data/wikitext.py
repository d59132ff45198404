"""WikiText-2 and WikiText-103: parsing raw files into articles, local lookup, the hub.

Text comes from a local raw file (``wiki.test.raw`` and friends) when found through
``data_path``, ``$DRRL_DATA_DIR`` or a ``shared/data`` folder next to the repository, else from
the Hugging Face hub (``Salesforce/wikitext``) when reachable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from drrl_env import hub
from drrl_env.data.documents import (
    Article,
    CorpusFormatError,
    DataNotFoundError,
    read_text_file,
)

CORPORA = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
DATA_DIR_ENV = "DRRL_DATA_DIR"
SHARED_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HUB_DATASET = "Salesforce/wikitext"
HUB_TIMEOUT_S = hub.DEFAULT_TIMEOUT_S
HUB_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
MARKER_FILE = "wiki.test.raw"
RAW_SUFFIX = ".raw"
ACCEPTED_FORMATS = (
    "WikiText (corpus='wikitext-2' or 'wikitext-103') starts with a title line ' = Title = '; "
    "for other text pass corpus='text' (documents separated by blank lines, or one per line), "
    "corpus='jsonl' (one JSON object per line, text_field= its text) or corpus='folder' "
    "(a folder of .txt files, one document each)"
)


def title_of(line: str) -> str | None:
    """Return the title if ``line`` is an article title line (`` = Title = ``), else None."""
    s = line.strip()
    if not (s.startswith("= ") and s.endswith(" =")):
        return None
    inner = s[2:-2].strip()
    if not inner or inner.startswith("=") or inner.endswith("="):
        return None
    return inner


def looks_like_wikitext(text: str) -> bool:
    """Whether the first non-blank line of ``text`` is a WikiText article title line."""
    for line in text.splitlines():
        if line.strip():
            return title_of(line.lstrip("\ufeff")) is not None
    return False


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
        new_title = title_of(line)
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


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ValueError naming ``name`` if ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")


def search_folder(folder: Path, corpus: str) -> Path | None:
    """Find ``wiki.test.raw`` in ``folder`` directly or in a ``<corpus>-raw``/config subfolder."""
    for candidate in (folder, folder / f"{corpus}-raw", folder / CORPORA[corpus]):
        if (candidate / MARKER_FILE).is_file():
            return candidate / MARKER_FILE
    return None


def _search(root: Path, corpus: str) -> Path | None:
    if root.is_file():
        return root if root.suffix == RAW_SUFFIX else None
    return search_folder(root, corpus) if root.is_dir() else None


def find_local_corpus(
    corpus: str = "wikitext-2", data_path: str | os.PathLike | None = None
) -> Path | None:
    """Return the path of a local raw file of ``corpus``, or None.

    Looks at ``data_path``, then ``$DRRL_DATA_DIR``, then ``SHARED_DATA_DIR``. An explicit
    ``data_path`` file is returned as it is (whether it is WikiText is checked when it is
    read); a folder, and the two other roots, may be a ``.raw`` file or a folder holding
    ``wiki.test.raw`` directly or in a subfolder named ``<corpus>-raw`` (e.g.
    ``wikitext-2-raw``) or after the hub config.

    Raises:
        ValueError: If ``corpus`` is unknown.
        DataNotFoundError: If ``data_path`` is given but holds no raw file.
    """
    check_choice("corpus", corpus, list(CORPORA))
    if data_path is not None:
        root = Path(data_path).expanduser()
        found = root if root.is_file() else _search(root, corpus)
        if found is None:
            raise DataNotFoundError(
                f"data_path={str(data_path)!r} is not a file nor a folder holding "
                f"{MARKER_FILE} (directly or in a '{corpus}-raw' subfolder). {ACCEPTED_FORMATS}"
            )
        return found
    for root in (os.environ.get(DATA_DIR_ENV), SHARED_DATA_DIR):
        if root:
            found = _search(Path(root).expanduser(), corpus)
            if found is not None:
                return found
    return None


def _not_found_message(corpus: str, reason: str) -> str:
    return (
        f"no local copy of {corpus!r} found and {reason}. Pass data_path= (a wiki.test.raw "
        f"file or a folder holding it, or your own text: a .txt or .jsonl file or a folder of "
        f".txt files), or set {DATA_DIR_ENV} to a folder with wiki.test.raw (directly or in a "
        f"'{corpus}-raw' subfolder), or enable network access to the Hugging Face hub."
    )


def hub_source(corpus: str, hub_split: str = "test") -> str:
    """The hub identity of a WikiText split: ``Salesforce/wikitext/<config>:<split>``."""
    return f"{HUB_DATASET}/{CORPORA[corpus]}:{hub_split}"


def _load_hub_text(corpus: str, hub_split: str) -> str:
    if not hub.hub_reachable():
        reason = f"the Hugging Face hub cannot be used ({hub.unreachable_reason()})"
        raise DataNotFoundError(_not_found_message(corpus, reason))
    from datasets import load_dataset

    try:
        with hub.bounded_hub_timeouts():
            rows = load_dataset(HUB_DATASET, CORPORA[corpus], split=hub_split)
    except Exception as exc:  # any hub failure means no data
        raise DataNotFoundError(_not_found_message(corpus, f"the hub failed ({exc})")) from exc
    return "".join(line if line.endswith("\n") else line + "\n" for line in rows["text"])


def _local_file(found: Path, data_path: str | os.PathLike | None, hub_split: str) -> Path:
    """Prefer ``wiki.{hub_split}.raw`` next to a file found by folder search."""
    if data_path is not None and Path(data_path).expanduser().is_file():
        return found
    sibling = found.parent / HUB_FILES[hub_split]
    return sibling if sibling.is_file() else found


def local_wikitext_file(
    corpus: str, data_path: str | os.PathLike | None, hub_split: str = "test"
) -> Path | None:
    """The local file :func:`load_articles` reads, or None when it would use the hub."""
    found = find_local_corpus(corpus, data_path)
    return None if found is None else _local_file(found, data_path, hub_split)


def parse_wikitext_file(path: Path) -> list[Article]:
    """Read and parse a local WikiText file.

    Raises:
        DataNotFoundError: If ``path`` is not a file.
        CorpusFormatError: If the file is empty, binary, not UTF-8 or has no WikiText title
            line before its first text (the message lists the accepted formats).
    """
    text = read_text_file(path)
    try:
        return parse_wikitext(text)
    except ValueError as error:
        raise CorpusFormatError(f"{path} is not WikiText: {error}. {ACCEPTED_FORMATS}") from None


def load_articles(
    corpus: str = "wikitext-2",
    data_path: str | os.PathLike | None = None,
    hub_split: str = "test",
) -> list[Article]:
    """Load the articles of ``corpus`` from a local file (``find_local_corpus``) or the hub.

    Args:
        corpus: A key of ``CORPORA``.
        data_path: Explicit WikiText file or folder.
        hub_split: ``"train"``, ``"validation"`` or ``"test"``: the hub split and, in a local
            folder, ``wiki.{train,valid,test}.raw`` (``wiki.test.raw`` when absent).

    Raises:
        ValueError: On an unknown corpus or hub split, or if no article is found.
        CorpusFormatError: If the local file is empty, binary, not UTF-8 or not WikiText.
        DataNotFoundError: If no local file exists and the hub cannot be used.
    """
    check_choice("corpus", corpus, list(CORPORA))
    check_choice("hub_split", hub_split, list(HUB_FILES))
    path = local_wikitext_file(corpus, data_path, hub_split)
    if path is not None:
        articles = parse_wikitext_file(path)
        source = str(path)
    else:
        articles = parse_wikitext(_load_hub_text(corpus, hub_split))
        source = hub_source(corpus, hub_split)
    if not articles:
        raise ValueError(f"no articles found in {source}")
    return articles
