"""Corpora for the environment: documents, a deterministic train/eval split, token windows.

Kinds (``corpus=``), one :class:`~drrl_env.data.sources.Source` subclass each under
:mod:`drrl_env.data.kinds`, registered below (:mod:`drrl_env.data.registry`):

=========================  ================================================================
``wikitext-2``             WikiText-2 (default): a local ``.raw`` file or folder
                           (``data_path``, ``$DRRL_DATA_DIR``, ``shared/data`` next to the
                           repository), else the hub.
``wikitext-103``           WikiText-103, looked up the same way.
``text``                   a plain UTF-8 file: if it has blank lines, blank lines separate
                           documents; otherwise every line is a document.
``jsonl``                  a JSON Lines file; ``text_field`` (default ``text``) holds the text.
``folder``                 a folder of ``.txt`` files, one document each, sorted by name.
``hf:ID[:CONFIG]``         a Hugging Face dataset (split ``train``, or ``@SPLIT``), column
                           ``text_field``, through ``datasets`` when the hub is reachable.
``code[:GLOB]``            source files of ``data_path`` matching ``GLOB`` (``**/*.py``), one
                           document each; default folder: this Python's standard library.
``passkey[:SEED]``         passkey retrieval windows (Landmark / LongLoRA format) over
                           WikiText filler; each window carries its answer and needle depth
                           (``passkey:seed=S,needles=N``: N windows per filler window).
``passkey-ruler[:SEED]``   the same with RULER's single needle (word-pair key, 7 digits).
``mix[:SEED]``             prose, code and passkey windows in turn (``kind`` and ``answer``
                           per window).
=========================  ================================================================

With ``data_path`` given and ``corpus`` left at ``wikitext-2``, the kind is detected from the
path. Documents are split into ``train`` and ``eval`` by a hash of their title (WikiText),
path (``code``) or content; windows are cut from each split's own tokens and cached
(:func:`load_windows`).

Importing this package imports neither torch nor transformers nor the kinds' modules;
``datasets`` is imported only when the hub is read.
"""

from __future__ import annotations

from drrl_env.data.documents import (
    Article,
    CorpusFormatError,
    DataNotFoundError,
    Document,
    parse_jsonl,
    read_text_file,
    read_text_folder,
    split_plain_text,
)
from drrl_env.data.registry import (
    check_corpus_name,
    corpus_class,
    corpus_names,
    corpus_spellings,
    register_corpus,
    unregister_corpus,
)
from drrl_env.data.sources import (
    LOCAL_KINDS,
    Source,
    detect_kind,
    read_documents,
    resolve_source,
    source_fingerprint,
)
from drrl_env.data.split import SPLITS, split_articles, split_documents
from drrl_env.data.wikitext import (
    CORPORA,
    DATA_DIR_ENV,
    HUB_DATASET,
    HUB_TIMEOUT_S,
    SHARED_DATA_DIR,
    find_local_corpus,
    load_articles,
    parse_wikitext,
)
from drrl_env.data.windows import (
    Tokenizer,
    WindowSet,
    load_windows,
    make_windows,
    tokenizer_fingerprint,
)
from drrl_env.hub import hub_reachable

__all__ = [
    "CORPORA",
    "CORPUS_SPELLINGS",
    "DATA_DIR_ENV",
    "HUB_DATASET",
    "HUB_TIMEOUT_S",
    "LOCAL_KINDS",
    "SHARED_DATA_DIR",
    "SPLITS",
    "Article",
    "CorpusFormatError",
    "DataNotFoundError",
    "Document",
    "Source",
    "Tokenizer",
    "WindowSet",
    "check_corpus_name",
    "corpus_class",
    "corpus_names",
    "corpus_spellings",
    "detect_kind",
    "find_local_corpus",
    "hub_reachable",
    "load_articles",
    "load_windows",
    "make_windows",
    "parse_jsonl",
    "parse_wikitext",
    "read_documents",
    "read_text_file",
    "read_text_folder",
    "register_corpus",
    "resolve_source",
    "source_fingerprint",
    "split_articles",
    "split_documents",
    "split_plain_text",
    "tokenizer_fingerprint",
    "unregister_corpus",
]


def __getattr__(name: str) -> tuple[str, ...]:
    """``CORPUS_SPELLINGS``: the spellings of the kinds registered now."""
    if name == "CORPUS_SPELLINGS":
        return corpus_spellings()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_corpus("wikitext-2", "drrl_env.data.kinds.wikitext:WikiTextSource")
register_corpus("wikitext-103", "drrl_env.data.kinds.wikitext:WikiTextSource")
register_corpus("text", "drrl_env.data.kinds.text:TextSource")
register_corpus("jsonl", "drrl_env.data.kinds.jsonl:JsonlSource")
register_corpus("folder", "drrl_env.data.kinds.folder:FolderSource")
register_corpus("hf", "drrl_env.data.kinds.hub:HubSource")
register_corpus("code", "drrl_env.data.kinds.code:CodeSource")
register_corpus("passkey", "drrl_env.data.kinds.passkey:PasskeySource")
register_corpus("passkey-ruler", "drrl_env.data.kinds.passkey:RulerPasskeySource")
register_corpus("mix", "drrl_env.data.kinds.mix:MixSource")
