"""Token windows of a corpus split, and their cache on disk.

:func:`load_windows` resolves the source, splits its documents into ``train`` and ``eval``,
tokenises the split's documents in order, concatenates their tokens and cuts
non-overlapping windows of ``seq_len`` (the tail is dropped), so windows never cross the
split. All windows of a split are tokenised once and cached under ``<cache>/windows``,
keyed by the source's fingerprint, the tokenizer's, ``seq_len``, the split and
``eval_fraction``; ``max_windows`` then keeps the first ones.

Kinds whose windows are not cut from documents (``passkey``) build them their own way
(:meth:`~drrl_env.data.sources.Source.build_windows`) and may attach per-window metadata
(e.g. the expected answer): parallel arrays in :attr:`WindowSet.metadata`, cached with the
windows and sliced with them.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from drrl_env.data.documents import Document
from drrl_env.data.sources import Metadata, Source, resolve_source
from drrl_env.data.split import check_eval_fraction, check_split
from drrl_env.paths import cache_dir as default_cache_dir

WINDOW_CACHE_FORMAT = 1
WINDOW_CACHE_FOLDER = "windows"
METADATA_PREFIX = "meta_"  # cached metadata arrays are stored as meta_<name>
BYTE_TOKENIZER = "drrl_env.lm.models.ByteTokenizer"
PROBE_TEXT = "Tokenizer probe: 0123456789, naïve café, Straße, 東京, emoji 🙂.\n\tEnd of probe."


class Tokenizer(Protocol):
    """Anything with a Hugging Face style ``encode`` method."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class WindowSet:
    """Token windows of one corpus split; ``tokens`` has shape ``(n_windows, seq_len)``, int64.

    ``metadata`` maps names to arrays of length ``n_windows``, window ``i``'s values at
    index ``i`` (``passkey``: ``answer``, ``needle_start``, ``depth``...; empty for the
    prose kinds).
    """

    corpus: str
    split: str
    seq_len: int
    tokens: np.ndarray
    metadata: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def check_seq_len(seq_len: int) -> None:
    """Raise ValueError unless ``seq_len`` is an integer >= 2."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")


def check_max_windows(max_windows: int | None) -> None:
    """Raise ValueError unless ``max_windows`` is None or an integer >= 1."""
    if max_windows is None:
        return
    if isinstance(max_windows, bool) or not isinstance(max_windows, numbers.Integral):
        raise ValueError(f"max_windows must be None or an integer >= 1, got {max_windows!r}")
    if max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")


def make_windows(
    documents: Sequence[Document],
    tokenizer: Tokenizer,
    seq_len: int,
    max_windows: int | None = None,
    where: str = "the documents",
) -> np.ndarray:
    """Tokenise documents and cut non-overlapping windows, shape ``(n_windows, seq_len)``, int64.

    Each document's :attr:`~drrl_env.data.documents.Document.content` is encoded without
    special tokens; the streams are concatenated in order, the tail shorter than ``seq_len``
    is dropped and ``max_windows`` (None: all) keeps the first windows.

    Args:
        documents: The documents, in order.
        tokenizer: Has ``encode(text, add_special_tokens=False)``.
        seq_len: Tokens per window.
        max_windows: Keep at most this many windows (the first ones).
        where: What the documents are, for the error message.

    Raises:
        ValueError: If ``seq_len < 2``, ``max_windows`` is not an integer >= 1, or the
            documents hold fewer than ``seq_len`` tokens.
    """
    check_seq_len(seq_len)
    check_max_windows(max_windows)
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer.encode(document.content, add_special_tokens=False))
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise ValueError(
            f"seq_len={seq_len} exceeds the {len(ids)} tokens of {where}: one window needs "
            f"{seq_len} tokens; use a smaller seq_len or more text"
        )
    if max_windows is not None:
        n_windows = min(n_windows, int(max_windows))
    flat = np.asarray(ids[: n_windows * seq_len], dtype=np.int64)
    return flat.reshape(n_windows, seq_len)


def _class_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Identity of a tokenizer, for cache keys.

    - the project's ``ByteTokenizer``: its class name;
    - fast Hugging Face tokenizers: sha256 of ``backend_tokenizer.to_str()`` (vocabulary,
      merges, normalizer and pre-tokenizer);
    - other tokenizers with ``get_vocab``: class, name, sha256 of the sorted vocabulary and of
      the ids of a probe text;
    - anything else with ``encode``: class and the sha256 of the ids of a probe text.

    Raises:
        TypeError: If ``tokenizer`` has no ``encode`` method.
    """
    name = _class_name(tokenizer)
    if name == BYTE_TOKENIZER:
        return f"class:{name}"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and callable(getattr(backend, "to_str", None)):
        return f"hf-fast:{_sha256(backend.to_str())}"
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must have an encode(text) method, got {name}")
    probe = _sha256(json.dumps([int(i) for i in tokenizer.encode(PROBE_TEXT)]))
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        vocab = _sha256(json.dumps(sorted(get_vocab().items()), ensure_ascii=False))
        label = getattr(tokenizer, "name_or_path", "")
        return f"vocab:{name}:{label}:{vocab[:32]}:{probe[:32]}"
    return f"probe:{name}:{probe}"


def window_cache_key(
    source: Source, tokenizer: Tokenizer, seq_len: int, split: str, eval_fraction: float
) -> dict:
    """What the windows of a split depend on, as plain JSON values."""
    return {
        "format": WINDOW_CACHE_FORMAT,
        "source": source.fingerprint(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": int(seq_len),
        "split": split,
        "eval_fraction": float(eval_fraction),
    }


def window_cache_path(root: Path, key: dict) -> Path:
    """Where the windows of ``key`` are cached under the cache root ``root``."""
    digest = _sha256(json.dumps(key, sort_keys=True))[:24]
    return root / WINDOW_CACHE_FOLDER / f"{key['split']}-{key['seq_len']}-{digest}.npz"


def read_cached_windows(path: Path, key: dict) -> tuple[np.ndarray, Metadata] | None:
    """The cached windows at ``path`` and their metadata, or None if absent.

    Unreadable files warn and give None.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = json.loads(str(archive["key"]))
            tokens = archive["tokens"]
            metadata = {
                name[len(METADATA_PREFIX) :]: archive[name]
                for name in archive.files
                if name.startswith(METADATA_PREFIX)
            }
        if stored != key:
            raise ValueError("it was built for another configuration")
        if tokens.dtype != np.int64 or tokens.ndim != 2 or tokens.shape[1] != key["seq_len"]:
            raise ValueError(f"its tokens have shape {tokens.shape} and dtype {tokens.dtype}")
        if len(tokens) == 0:
            raise ValueError("it holds no window")
        check_metadata(metadata, len(tokens))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        warnings.warn(f"rebuilding unreadable window cache {path}: {error}", stacklevel=3)
        return None
    return tokens, metadata


def check_metadata(metadata: Metadata, n_windows: int) -> None:
    """Raise ValueError unless every metadata array has one entry per window."""
    for name, values in metadata.items():
        if np.ndim(values) == 0 or len(values) != n_windows:
            raise ValueError(
                f"metadata {name!r} has shape {np.shape(values)}, expected {n_windows} entries"
            )


def write_cached_windows(
    path: Path, key: dict, tokens: np.ndarray, metadata: Metadata | None = None
) -> None:
    """Write windows atomically (temporary file, then ``os.replace``); failures only warn."""
    temporary = None
    arrays = {f"{METADATA_PREFIX}{name}": values for name, values in (metadata or {}).items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, key=np.array(json.dumps(key, sort_keys=True)), tokens=tokens, **arrays)
        os.replace(temporary, path)
    except OSError as error:
        warnings.warn(f"could not write window cache {path}: {error}", stacklevel=3)
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def load_windows(
    tokenizer: Tokenizer,
    seq_len: int,
    split: str = "train",
    corpus: str = "wikitext-2",
    data_path: str | os.PathLike | None = None,
    eval_fraction: float = 0.2,
    max_windows: int | None = None,
    text_field: str = "text",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> WindowSet:
    """Load one document-level split of a corpus as token windows.

    Args:
        tokenizer: Has ``encode(text, add_special_tokens=False)``.
        seq_len: Tokens per window, at least 2.
        split: ``train`` or ``eval``.
        corpus: A registered kind (:func:`~drrl_env.data.registry.corpus_names`), with its
            option if any: ``wikitext-2``, ``wikitext-103``, ``text``, ``jsonl``,
            ``folder``, ``hf:<dataset>[:<config>][@<split>]``, ``code[:<glob>]``,
            ``passkey[:<seed>]``, ``passkey-ruler[:<seed>]``, ``passkey:seed=S,needles=N``
            (see :mod:`drrl_env.data.sources`).
        data_path: Local file or folder; with ``corpus`` left at ``wikitext-2`` its kind is
            detected (``code``: the folder; ``passkey``: the filler's source).
        eval_fraction: Fraction of documents held out for ``eval``, in (0, 1).
        max_windows: Keep the first windows only (None: all).
        text_field: JSON key (``jsonl``) or dataset column (``hf:``) holding the text.
        cache_dir: Cache root; default ``drrl_env.paths.cache_dir()``.
        use_cache: Read and write the window cache.

    Returns:
        The windows and their metadata; ``corpus`` is the resolved corpus (e.g. ``text``
        when detected).

    Raises:
        ValueError: On an invalid argument, too few documents or too few tokens (the message
            gives the tokens of the split and those a window needs).
        CorpusFormatError: A file cannot be read as its kind (a ``ValueError``).
        DataNotFoundError: The corpus cannot be found locally nor on the hub.
    """
    check_split(split)
    check_seq_len(seq_len)
    check_max_windows(max_windows)
    check_eval_fraction(eval_fraction)
    source = resolve_source(corpus, data_path, text_field)
    cached = None
    if use_cache:
        key = window_cache_key(source, tokenizer, seq_len, split, eval_fraction)
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = window_cache_path(root, key)
        cached = read_cached_windows(path, key)
    if cached is None:
        tokens, metadata = source.build_windows(tokenizer, seq_len, split, eval_fraction)
        metadata = {name: np.asarray(values) for name, values in metadata.items()}
        check_metadata(metadata, len(tokens))
        if use_cache:
            write_cached_windows(path, key, tokens, metadata)
    else:
        tokens, metadata = cached
    if max_windows is not None and int(max_windows) < len(tokens):
        tokens = tokens[: int(max_windows)].copy()
        metadata = {name: values[: int(max_windows)].copy() for name, values in metadata.items()}
    return WindowSet(
        corpus=source.corpus, split=split, seq_len=int(seq_len), tokens=tokens, metadata=metadata
    )
