"""Corpus sources: which kind of text a configuration reads, its documents and its fingerprint.

``corpus`` names the kind:

==================  =======================================================================
``wikitext-2``      WikiText-2 (the default): ``data_path``, ``$DRRL_DATA_DIR``, a
                    ``shared/data`` folder next to the repository, else the hub.
``wikitext-103``    WikiText-103, looked up the same way.
``text``            ``data_path`` is a plain UTF-8 file (see the document rule below).
``jsonl``           ``data_path`` is a JSON Lines file; ``text_field`` names the text key.
``folder``          ``data_path`` is a folder; each ``.txt`` file in it is a document.
``hf:ID[:CONFIG]``  a Hugging Face dataset through ``datasets``, split ``train``, column
                    ``text_field``; ``hf:ID[:CONFIG]@SPLIT`` picks another split.
==================  =======================================================================

When ``data_path`` is given and ``corpus`` is left at ``wikitext-2``, the kind is detected from
the path: a ``.raw`` file, a file whose first non-blank line is a title line `` = Title = ``,
or a folder holding ``wiki.test.raw`` is WikiText; a ``.jsonl`` file is ``jsonl``; any other
folder holding ``.txt`` files is ``folder``; any other file is ``text``.

Plain-text document rule: if the file has a blank line between two non-blank lines, blank
lines separate documents; otherwise every line is a document.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from drrl_env import hub
from drrl_env.data.documents import (
    CorpusFormatError,
    DataNotFoundError,
    Document,
    parse_jsonl,
    read_text_file,
    read_text_folder,
    split_plain_text,
    text_files,
)
from drrl_env.data.wikitext import (
    CORPORA,
    HUB_DATASET,
    MARKER_FILE,
    RAW_SUFFIX,
    load_articles,
    local_wikitext_file,
    looks_like_wikitext,
    search_folder,
)

DEFAULT_CORPUS = "wikitext-2"
LOCAL_KINDS = ("text", "jsonl", "folder")
HF_PREFIX = "hf:"
DEFAULT_HF_SPLIT = "train"
WIKITEXT_SPLIT = "test"  # the WikiText file or hub split the train/eval split is cut from
JSONL_SUFFIX = ".jsonl"
CORPUS_SPELLINGS = (*CORPORA, *LOCAL_KINDS, "hf:<dataset>[:<config>][@<split>]")
DETECT_BYTES = 64 * 1024
FULL_HASH_BYTES = 8 * 1024 * 1024
SAMPLE_BYTES = 1024 * 1024
DOCUMENT_RULES = {
    "wikitext": "WikiText articles start at title lines ' = Title = '",
    "text": "plain text: separate documents by blank lines, or put one document per line",
    "jsonl": "JSON Lines: one object per line, each a document",
    "folder": "a folder: each .txt file is a document",
    "hf": "a hub dataset: each non-empty row of the column is a document",
}
_OFFLINE_HELP = (
    "Point at local files instead: pass data_path= a .txt file (documents separated by blank "
    "lines, or one per line), a folder of .txt files, or a .jsonl file with text_field= its "
    "text key (on a machine with network access, datasets.load_dataset(...).to_json("
    "'corpus.jsonl') writes one)"
)


@dataclass(frozen=True)
class Source:
    """Where the text of a configuration comes from.

    Attributes:
        corpus: The resolved corpus: ``wikitext-2``, ``wikitext-103``, ``text``, ``jsonl``,
            ``folder`` or the ``hf:`` spelling.
        kind: ``wikitext``, ``text``, ``jsonl``, ``folder`` or ``hf``.
        path: The local file or folder; None for hub sources.
        text_field: The JSON key or dataset column holding the text.
        dataset: Hub dataset id (hub sources).
        config: Hub dataset config, or None.
        hub_split: Hub split read.
    """

    corpus: str
    kind: str
    path: Path | None = None
    text_field: str = "text"
    dataset: str | None = None
    config: str | None = None
    hub_split: str | None = None

    def describe(self) -> str:
        """A short name of the source for messages: the path, or the hub dataset."""
        if self.path is not None:
            return str(self.path)
        config = f":{self.config}" if self.config else ""
        return f"hub dataset {self.dataset}{config}@{self.hub_split}"

    def fingerprint(self) -> str:
        """Identity of the text read: see :func:`source_fingerprint`."""
        if self.path is None:
            config = self.config or ""
            return f"hub:{self.dataset}:{config}@{self.hub_split}#{self.text_field}"
        if self.kind == "folder":
            parts = [[p.name, *_file_identity(p)] for p in text_files(self.path)]
        else:
            parts = [_file_identity(self.path)]
        if self.kind == "jsonl":
            parts.append(["text_field", self.text_field])
        digest = hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:32]
        return f"{self.kind}:{digest}"


def _file_identity(path: Path) -> list:
    """Size and sha256 of a file; beyond ``FULL_HASH_BYTES``, mtime and sampled bytes."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if stat.st_size <= FULL_HASH_BYTES:
            digest.update(handle.read())
            return [stat.st_size, digest.hexdigest()]
        for offset in (0, (stat.st_size - SAMPLE_BYTES) // 2, stat.st_size - SAMPLE_BYTES):
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))
    return [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def _check_text_field(text_field: str) -> None:
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")


def parse_hf_corpus(corpus: str, text_field: str = "text") -> Source:
    """Parse ``hf:<dataset>[:<config>][@<split>]`` (split ``train`` by default).

    Raises:
        ValueError: If the dataset id, config or split is empty.
    """
    spec = corpus[len(HF_PREFIX) :]
    spec, at, split = spec.partition("@")
    dataset, colon, config = spec.partition(":")
    if not dataset.strip() or (colon and not config.strip()) or (at and not split.strip()):
        raise ValueError(
            f"corpus={corpus!r} is not of the form 'hf:<dataset>[:<config>][@<split>]', "
            "e.g. 'hf:Salesforce/wikitext:wikitext-2-raw-v1@test'"
        )
    return Source(
        corpus,
        "hf",
        text_field=text_field,
        dataset=dataset.strip(),
        config=config.strip() or None,
        hub_split=split.strip() or DEFAULT_HF_SPLIT,
    )


def detect_kind(data_path: str | os.PathLike) -> str:
    """Kind of a local path: ``wikitext``, ``jsonl``, ``folder`` or ``text`` (module rules).

    Raises:
        DataNotFoundError: If the path does not exist, or is a folder holding neither
            ``wiki.test.raw`` nor ``.txt`` files.
    """
    path = Path(data_path).expanduser()
    if path.is_dir():
        if search_folder(path, DEFAULT_CORPUS) is not None:
            return "wikitext"
        if text_files(path):
            return "folder"
        raise DataNotFoundError(
            f"data_path={str(data_path)!r} is a folder holding neither {MARKER_FILE} (WikiText) "
            "nor .txt files (one document each)"
        )
    if not path.is_file():
        raise DataNotFoundError(f"data_path={str(data_path)!r} does not exist")
    if path.suffix.lower() == RAW_SUFFIX:
        return "wikitext"
    if path.suffix.lower() == JSONL_SUFFIX:
        return "jsonl"
    with path.open("rb") as handle:
        head = handle.read(DETECT_BYTES).decode("utf-8", errors="ignore")
    return "wikitext" if looks_like_wikitext(head) else "text"


def _local_source(kind: str, data_path: str | os.PathLike | None, text_field: str) -> Source:
    if data_path is None:
        raise ValueError(f"corpus={kind!r} needs data_path= (a {DOCUMENT_RULES[kind]})")
    path = Path(data_path).expanduser()
    wanted = path.is_dir() if kind == "folder" else path.is_file()
    if not wanted:
        what = "folder" if kind == "folder" else "file"
        raise DataNotFoundError(f"corpus={kind!r} needs data_path= a {what}; {path} is not one")
    return Source(kind, kind, path, text_field)


def resolve_source(
    corpus: str = DEFAULT_CORPUS,
    data_path: str | os.PathLike | None = None,
    text_field: str = "text",
) -> Source:
    """Resolve a configuration's ``corpus``, ``data_path`` and ``text_field`` to a source.

    Raises:
        ValueError: On an unknown corpus spelling, an empty ``text_field``, a local kind
            without ``data_path``, or ``data_path`` with a hub dataset.
        DataNotFoundError: If ``data_path`` does not exist or is not what the kind reads.
    """
    _check_text_field(text_field)
    if not isinstance(corpus, str):
        raise ValueError(f"corpus must be a string, one of {list(CORPUS_SPELLINGS)}")
    if corpus.startswith(HF_PREFIX):
        if data_path is not None:
            raise ValueError(
                f"data_path={str(data_path)!r} is not used with corpus={corpus!r}; for local "
                "files pass corpus='text', 'jsonl' or 'folder' (or leave corpus out)"
            )
        return parse_hf_corpus(corpus, text_field)
    if corpus in LOCAL_KINDS:
        return _local_source(corpus, data_path, text_field)
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; expected one of {list(CORPUS_SPELLINGS)}")
    if data_path is not None and corpus == DEFAULT_CORPUS:
        kind = detect_kind(data_path)
        if kind != "wikitext":
            return _local_source(kind, data_path, text_field)
    path = local_wikitext_file(corpus, data_path)
    if path is not None:
        return Source(corpus, "wikitext", path, text_field)
    return Source(corpus, "wikitext", None, "text", HUB_DATASET, CORPORA[corpus], WIKITEXT_SPLIT)


def source_fingerprint(
    corpus: str = DEFAULT_CORPUS,
    data_path: str | os.PathLike | None = None,
    text_field: str = "text",
) -> str:
    """Identity of the text a configuration reads, cheap to compute.

    Local sources: the kind and a digest of each file's size and sha256 (beyond 8 MiB:
    size, mtime and the sha256 of three 1 MiB samples), with file names for folders and the
    text field for JSON Lines; it changes when the content changes and not when a file is
    only touched or moved. Hub sources: ``hub:<dataset>:<config>@<split>#<column>``.

    Raises:
        ValueError, DataNotFoundError: As :func:`resolve_source`.
    """
    return resolve_source(corpus, data_path, text_field).fingerprint()


def _hub_documents(source: Source) -> list[Document]:
    if not hub.hub_reachable():
        raise DataNotFoundError(
            f"corpus={source.corpus!r} is read from the Hugging Face hub, which cannot be used "
            f"({hub.unreachable_reason()}). {_OFFLINE_HELP}"
        )
    from datasets import load_dataset

    try:
        with hub.bounded_hub_timeouts():
            rows = load_dataset(source.dataset, source.config, split=source.hub_split)
    except Exception as exc:  # any hub failure means no data
        raise DataNotFoundError(
            f"corpus={source.corpus!r}: the hub failed ({exc}). {_OFFLINE_HELP}"
        ) from exc
    columns = list(rows.column_names)
    if source.text_field not in columns:
        raise CorpusFormatError(
            f"{source.describe()} has no column {source.text_field!r}; its columns are "
            f"{columns}. Pass text_field= the column that holds the text"
        )
    texts = rows[source.text_field]
    return [Document("", t.strip()) for t in texts if isinstance(t, str) and t.strip()]


def _read(source: Source) -> list[Document]:
    if source.kind == "wikitext":
        return load_articles(source.corpus, source.path)
    if source.kind == "hf":
        return _hub_documents(source)
    assert source.path is not None
    if source.kind == "folder":
        return read_text_folder(source.path)
    text = read_text_file(source.path)
    if source.kind == "jsonl":
        return parse_jsonl(text, str(source.path), source.text_field)
    return split_plain_text(text)


def read_documents(source: Source) -> list[Document]:
    """The documents of ``source``, in source order.

    Raises:
        DataNotFoundError: If a file is missing or the hub cannot be used.
        CorpusFormatError: If a file cannot be read as the source's kind, or the source
            holds fewer than 2 documents (a train/eval split needs both).
    """
    documents = _read(source)
    if len(documents) < 2:
        raise CorpusFormatError(
            f"{source.describe()} holds {len(documents)} document(s) as corpus="
            f"{source.corpus!r}; the train/eval split needs at least 2 "
            f"({DOCUMENT_RULES[source.kind]})"
        )
    return documents
