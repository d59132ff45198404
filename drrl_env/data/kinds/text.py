"""``text``: a plain UTF-8 file; blank lines separate documents, else one document per line."""

from __future__ import annotations

from dataclasses import dataclass

from drrl_env.data.documents import Document, read_text_file, split_plain_text
from drrl_env.data.sources import Source, digest_fingerprint, file_identity


@dataclass(frozen=True)
class TextSource(Source):
    """A plain text file (:func:`~drrl_env.data.documents.split_plain_text` splits it)."""

    rule = "plain text: separate documents by blank lines, or put one document per line"

    reads_folder = False

    def fingerprint(self) -> str:
        return digest_fingerprint(self.kind, [file_identity(self.path)])

    def read(self) -> list[Document]:
        return split_plain_text(read_text_file(self.path))
