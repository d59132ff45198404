"""The deterministic train/eval split of a corpus, by document."""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence

from drrl_env.data.documents import Document

SPLITS = ("train", "eval")


def check_split(split: str) -> None:
    """Raise ValueError if ``split`` is not ``train`` or ``eval``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


def check_eval_fraction(eval_fraction: float) -> None:
    """Raise ValueError unless ``eval_fraction`` is a number in the open interval (0, 1)."""
    if (
        isinstance(eval_fraction, bool)
        or not isinstance(eval_fraction, numbers.Real)
        or not 0.0 < eval_fraction < 1.0
    ):
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")


def rank_key(document: Document) -> tuple[str, str]:
    """Where a document ranks: sha256 of its title, ties broken by sha256 of its text.

    Documents without a title (plain text, JSON Lines, folders, hub datasets) are thus ranked
    by their content.
    """
    title = hashlib.sha256(document.title.encode("utf-8")).hexdigest()
    return title, hashlib.sha256(document.text.encode("utf-8")).hexdigest()


def n_eval_documents(n: int, eval_fraction: float) -> int:
    """``ceil(eval_fraction * n)``, at most ``n - 1`` so that train keeps a document."""
    return min(math.ceil(eval_fraction * n - 1e-9), n - 1)


def split_documents(
    documents: Sequence[Document], split: str, eval_fraction: float = 0.2
) -> list[Document]:
    """Return the documents of ``split``, in their original order.

    Documents are ranked by :func:`rank_key`, so the result does not depend on their order;
    the first ``ceil(eval_fraction * n)`` (at most ``n - 1``) form ``eval``, the rest
    ``train``.

    Raises:
        ValueError: On an unknown split, a fraction outside (0, 1) or fewer than 2 documents.
    """
    check_split(split)
    check_eval_fraction(eval_fraction)
    n = len(documents)
    if n < 2:
        raise ValueError(f"need at least 2 documents to split into train and eval, got {n}")
    ranked = sorted(range(n), key=lambda i: rank_key(documents[i]))
    eval_ids = set(ranked[: n_eval_documents(n, eval_fraction)])
    want_eval = split == "eval"
    return [d for i, d in enumerate(documents) if (i in eval_ids) == want_eval]


split_articles = split_documents  # the WikiText name
