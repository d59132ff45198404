"""``wikitext-2`` and ``wikitext-103``: WikiText articles from a local raw file or the hub.

With ``data_path`` given and ``corpus`` left at ``wikitext-2`` (the default) the kind of the
path is detected (:func:`drrl_env.data.sources.detect_kind`) and another kind may answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from drrl_env.data.documents import Document
from drrl_env.data.sources import (
    DEFAULT_CORPUS,
    CorpusRequest,
    Source,
    detect_kind,
    digest_fingerprint,
    file_identity,
    hub_fingerprint,
    resolve_source,
)
from drrl_env.data.wikitext import CORPORA, HUB_DATASET, load_articles, local_wikitext_file

WIKITEXT_SPLIT = "test"  # the WikiText file or hub split the train/eval split is cut from


@dataclass(frozen=True)
class WikiTextSource(Source):
    """WikiText-2 or -103: a local ``.raw`` file (``data_path``, ``$DRRL_DATA_DIR``,
    ``shared/data``), else the hub's ``test`` split; one document per article."""

    rule = "WikiText articles start at title lines ' = Title = '"

    @classmethod
    def resolve(cls, request: CorpusRequest) -> Source:
        corpus, option, data_path, text_field = request
        if data_path is not None and corpus == DEFAULT_CORPUS:
            kind = detect_kind(data_path)
            if kind != "wikitext":
                return resolve_source(kind, data_path, text_field)
        path = local_wikitext_file(corpus, data_path)
        if path is not None:
            return cls(corpus, "wikitext", path, text_field)
        return cls(corpus, "wikitext", None, "text", HUB_DATASET, CORPORA[corpus], WIKITEXT_SPLIT)

    def fingerprint(self) -> str:
        if self.path is None:
            return hub_fingerprint(self)
        return digest_fingerprint(self.kind, [file_identity(self.path)])

    def read(self) -> list[Document]:
        return load_articles(self.corpus, self.path)
