"""Corpus sources: which kind of text a configuration reads, its documents and its fingerprint.

``corpus`` names a kind registered in :mod:`drrl_env.data.registry`, optionally followed by
``:OPTION``; each kind is one :class:`Source` subclass under :mod:`drrl_env.data.kinds`:

==================  =======================================================================
``wikitext-2``      WikiText-2 (the default): ``data_path``, ``$DRRL_DATA_DIR``, a
                    ``shared/data`` folder next to the repository, else the hub.
``wikitext-103``    WikiText-103, looked up the same way.
``text``            ``data_path`` is a plain UTF-8 file (see the document rule below).
``jsonl``           ``data_path`` is a JSON Lines file; ``text_field`` names the text key.
``folder``          ``data_path`` is a folder; each ``.txt`` file in it is a document.
``hf:ID[:CONFIG]``  a Hugging Face dataset through ``datasets``, split ``train``, column
                    ``text_field``; ``hf:ID[:CONFIG]@SPLIT`` picks another split.
``code[:GLOB]``     source files of a folder (default: this Python's standard library).
``passkey[:SEED]``  passkey retrieval windows over WikiText filler (``passkey-ruler``:
                    RULER's single needle; ``:seed=S,needles=N``: N per filler window).
``mix[:SEED]``      prose, code and passkey windows in turn.
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
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from drrl_env.data.documents import (
    CorpusFormatError,
    DataNotFoundError,
    Document,
    text_files,
)
from drrl_env.data.registry import corpus_class, corpus_spellings, split_corpus
from drrl_env.data.split import split_documents
from drrl_env.data.wikitext import MARKER_FILE, RAW_SUFFIX, looks_like_wikitext, search_folder

if TYPE_CHECKING:
    import numpy as np

    from drrl_env.data.windows import Tokenizer

DEFAULT_CORPUS = "wikitext-2"
LOCAL_KINDS = ("text", "jsonl", "folder")
HF_PREFIX = "hf:"
JSONL_SUFFIX = ".jsonl"
DETECT_BYTES = 64 * 1024
FULL_HASH_BYTES = 8 * 1024 * 1024
SAMPLE_BYTES = 1024 * 1024

Metadata = dict[str, "np.ndarray"]
"""Per-window values of a kind, name -> array of length ``n_windows`` (e.g. ``answer``)."""


class CorpusRequest(NamedTuple):
    """What a configuration asks of a corpus kind (:meth:`Source.resolve`).

    Attributes:
        corpus: ``corpus=`` as written, e.g. ``code:**/*.py``.
        option: What follows the registered name's ``:`` (None without one).
        data_path: ``data_path=`` (None: the kind's default).
        text_field: ``text_field=`` (JSONL and hub kinds).
    """

    corpus: str
    option: str | None
    data_path: str | os.PathLike | None
    text_field: str


@dataclass(frozen=True)
class Source:
    """Where the text of a configuration comes from; each corpus kind is a subclass.

    A kind resolves a ``corpus`` string to an instance (:meth:`resolve`), names it
    (:meth:`describe`), fingerprints what it reads (:meth:`fingerprint`) and reads its
    documents (:meth:`read`); :meth:`build_windows` cuts the windows of a split from them
    (kinds whose windows are not cut from documents override it).

    Attributes:
        corpus: The resolved corpus: ``wikitext-2``, ``text``, ``code:**/*.pyi``, the
            ``hf:`` spelling...
        kind: The family named in the fingerprint: ``wikitext``, ``text``, ``jsonl``,
            ``folder``, ``hf``, ``code``, ``passkey``...
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

    spelling: ClassVar[str | None] = None
    """How ``corpus=`` is written when the kind takes an option (e.g. ``code[:<glob>]``)."""
    takes_option: ClassVar[bool] = False
    """Whether ``corpus`` may carry ``:OPTION`` after the registered name."""
    rule: ClassVar[str] = "each document of the source"
    """What a document is, for messages."""
    reads_folder: ClassVar[bool | None] = None
    """Kinds read from the local ``data_path`` alone: whether it is a folder (True) or a
    file (False); their :meth:`resolve` is this class's. None: the kind resolves itself."""

    @classmethod
    def resolve(cls, request: CorpusRequest) -> Source:
        """The source a configuration's corpus arguments ask for.

        Raises:
            ValueError: On a bad option or argument.
            DataNotFoundError: If ``data_path`` does not exist or is not what the kind reads.
        """
        corpus, option, data_path, text_field = request
        if cls.reads_folder is None:
            raise NotImplementedError(f"{cls.__name__} must define resolve() or reads_folder")
        path = local_path(corpus, data_path, cls.reads_folder, cls.rule)
        return cls(corpus, corpus, path, text_field)

    def describe(self) -> str:
        """A short name of the source for messages: the path, or the hub dataset."""
        if self.path is not None:
            return str(self.path)
        config = f":{self.config}" if self.config else ""
        return f"hub dataset {self.dataset}{config}@{self.hub_split}"

    def fingerprint(self) -> str:
        """Identity of the text read: see :func:`source_fingerprint`."""
        raise NotImplementedError

    def read(self) -> list[Document]:
        """The documents of the source, in source order (use :func:`read_documents`)."""
        raise NotImplementedError

    def build_windows(
        self, tokenizer: Tokenizer, seq_len: int, split: str, eval_fraction: float
    ) -> tuple[np.ndarray, Metadata]:
        """All token windows of ``split`` (n, seq_len) int64 and their per-window metadata.

        The default: the split's documents (:func:`~drrl_env.data.split.split_documents`)
        tokenised and cut by :func:`~drrl_env.data.windows.make_windows`; no metadata.
        """
        from drrl_env.data.windows import make_windows

        documents = read_documents(self)
        own = split_documents(documents, split, eval_fraction)
        where = (
            f"the {split!r} split of {self.describe()} ({len(own)} of {len(documents)} "
            f"documents, eval_fraction={eval_fraction})"
        )
        return make_windows(own, tokenizer, seq_len, where=where), {}

    def text_groups(self, n_windows: int) -> np.ndarray:
        """A label per window ``0 .. n_windows - 1`` (int64): windows with one label share
        text, so they are not independent samples (statistics resample them together, see
        :func:`harness.statistics.mean_interval`). By default every window has its own
        text; kinds that reuse text (``passkey`` with several needles per filler window,
        ``mix``) say which windows share it. A window's label is the index of the window
        of its underlying text, so kinds that share a filler share labels."""
        import numpy as np

        return np.arange(n_windows, dtype=np.int64)


def file_identity(path: Path) -> list:
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


def digest_fingerprint(kind: str, parts: list) -> str:
    """``<kind>:<sha256 of the JSON of parts, 32 hex digits>``: the fingerprint of local kinds."""
    return f"{kind}:{hashlib.sha256(json.dumps(parts).encode('utf-8')).hexdigest()[:32]}"


def hub_fingerprint(source: Source) -> str:
    """``hub:<dataset>:<config>@<split>#<column>``: the fingerprint of hub sources."""
    config = source.config or ""
    return f"hub:{source.dataset}:{config}@{source.hub_split}#{source.text_field}"


def check_text_field(text_field: str) -> None:
    """Raise ValueError unless ``text_field`` is a non-empty string."""
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")


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


def local_path(kind: str, data_path: str | os.PathLike | None, folder: bool, rule: str) -> Path:
    """``data_path`` of a local kind, checked to be a folder (``folder``) or a file.

    Raises:
        ValueError: If ``data_path`` is None.
        DataNotFoundError: If it is not a folder (or not a file).
    """
    if data_path is None:
        raise ValueError(f"corpus={kind!r} needs data_path= (a {rule})")
    path = Path(data_path).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        what = "folder" if folder else "file"
        raise DataNotFoundError(f"corpus={kind!r} needs data_path= a {what}; {path} is not one")
    return path


def resolve_source(
    corpus: str = DEFAULT_CORPUS,
    data_path: str | os.PathLike | None = None,
    text_field: str = "text",
) -> Source:
    """Resolve a configuration's ``corpus``, ``data_path`` and ``text_field`` to a source.

    Raises:
        ValueError: On an unknown corpus spelling, an option the kind does not take, an empty
            ``text_field``, a local kind without ``data_path``, or ``data_path`` with a hub
            dataset.
        DataNotFoundError: If ``data_path`` does not exist or is not what the kind reads.
    """
    check_text_field(text_field)
    if not isinstance(corpus, str):
        raise ValueError(f"corpus must be a string, one of {list(corpus_spellings())}")
    name, option = split_corpus(corpus)
    try:
        cls = corpus_class(name)
    except ValueError:
        raise ValueError(
            f"unknown corpus {corpus!r}; expected one of {list(corpus_spellings())}"
        ) from None
    if option is not None and not cls.takes_option:
        raise ValueError(f"corpus={corpus!r}: {name!r} takes no ':' option")
    return cls.resolve(CorpusRequest(corpus, option, data_path, text_field))


def source_fingerprint(
    corpus: str = DEFAULT_CORPUS,
    data_path: str | os.PathLike | None = None,
    text_field: str = "text",
) -> str:
    """Identity of the text a configuration reads, cheap to compute.

    Local sources: the kind and a digest of each file's size and sha256 (beyond 8 MiB:
    size, mtime and the sha256 of three 1 MiB samples), with file names for folders (relative
    paths for ``code``, with its glob) and the text field for JSON Lines; it changes when the
    content changes and not when a file is only touched or moved. Hub sources:
    ``hub:<dataset>:<config>@<split>#<column>``. Generated kinds (``passkey``) fingerprint
    their construction and their filler's source.

    Raises:
        ValueError, DataNotFoundError: As :func:`resolve_source`.
    """
    return resolve_source(corpus, data_path, text_field).fingerprint()


def read_documents(source: Source) -> list[Document]:
    """The documents of ``source``, in source order.

    Raises:
        DataNotFoundError: If a file is missing or the hub cannot be used.
        CorpusFormatError: If a file cannot be read as the source's kind, or the source
            holds fewer than 2 documents (a train/eval split needs both).
    """
    documents = source.read()
    if len(documents) < 2:
        raise CorpusFormatError(
            f"{source.describe()} holds {len(documents)} document(s) as corpus="
            f"{source.corpus!r}; the train/eval split needs at least 2 ({source.rule})"
        )
    return documents
