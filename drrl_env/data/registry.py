"""The registry of corpus kinds: one class per kind, registered under the name ``corpus=`` uses.

A corpus kind is a :class:`~drrl_env.data.sources.Source` subclass in a module of its own
(under :mod:`drrl_env.data.kinds`) plus one :func:`register_corpus` line in
:mod:`drrl_env.data`. Registration stores an import path, so listing and validating names
imports none of the kinds' modules::

    from drrl_env.data import corpus_names, load_windows

    corpus_names()  # ('wikitext-2', 'wikitext-103', 'text', 'jsonl', 'folder', 'hf', ...)
    windows = load_windows(tokenizer, 1024, corpus="code")

A ``corpus`` string is ``NAME`` or ``NAME:OPTION``: the registered name, then an option the
kind reads (``hf:<dataset>``, ``code:<glob>``, ``passkey:<seed>``). Kinds that take no option
refuse one.

Adding a kind: write a ``Source`` subclass with ``resolve`` (a classmethod turning a
``CorpusRequest``: corpus, option, ``data_path``, ``text_field``, into an instance),
``fingerprint`` and ``read``
(its documents), or ``build_windows`` for windows that are not cut from documents; then
``register_corpus("mine", "my_package.my_module:MySource")`` (or ``register_corpus("mine",
MySource)``). ``load_windows(..., corpus="mine")`` and ``gym.make(..., corpus="mine")`` then
work.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from drrl_env.data.sources import Source

OPTION_SEPARATOR = ":"
_REGISTRY: dict[str, Any] = {}


def register_corpus(name: str, target: type | str, *, replace: bool = False) -> None:
    """Register a corpus kind class (or its ``"module:Class"`` import path) under ``name``.

    Raises:
        ValueError: ``name`` is taken (unless ``replace``), not a non-empty string, or holds
            the option separator ``:``.
    """
    if not isinstance(name, str) or not name or OPTION_SEPARATOR in name:
        raise ValueError(f"corpus name must be a non-empty string without ':', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"corpus {name!r} is already registered")
    _REGISTRY[name] = target


def unregister_corpus(name: str) -> None:
    """Remove ``name`` from the registry (tests registering toy kinds clean up with it)."""
    _REGISTRY.pop(name, None)


def corpus_names() -> tuple[str, ...]:
    """The registered corpus names, in registration order (imports no kind module)."""
    return tuple(_REGISTRY)


def split_corpus(corpus: str) -> tuple[str, str | None]:
    """``(name, option)`` of a ``corpus`` string: ``"code:**/*.pyi"`` -> ``("code", "**/*.pyi")``.

    The option is None when ``corpus`` has no ``:``, and may be empty (``"hf:"``).
    """
    name, separator, option = corpus.partition(OPTION_SEPARATOR)
    return name, (option if separator else None)


def corpus_class(name: str) -> type[Source]:
    """The class registered under ``name`` (imported on first use).

    Raises:
        ValueError: ``name`` is not registered (the message lists the spellings).
    """
    check_corpus_name(name)
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        _REGISTRY[name] = target
    return target


def corpus_spellings() -> tuple[str, ...]:
    """How each registered kind is written in ``corpus=`` (imports the kinds' modules)."""
    return tuple(_spelling(name) for name in _REGISTRY)


def _spelling(name: str) -> str:
    try:
        return corpus_class(name).spelling or name
    except (ImportError, AttributeError):  # a broken registration still gets listed
        return name


def check_corpus_name(name: str) -> str:
    """``name`` if registered, else ValueError listing the registered spellings."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown corpus {name!r}; expected one of {list(corpus_spellings())}")
    return name
