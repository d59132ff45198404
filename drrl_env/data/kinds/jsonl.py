"""``jsonl``: a JSON Lines file, one object per line; ``text_field`` holds the text."""

from __future__ import annotations

from dataclasses import dataclass

from drrl_env.data.documents import Document, parse_jsonl, read_text_file
from drrl_env.data.sources import Source, digest_fingerprint, file_identity


@dataclass(frozen=True)
class JsonlSource(Source):
    """A JSON Lines file (:func:`~drrl_env.data.documents.parse_jsonl` reads it)."""

    rule = "JSON Lines: one object per line, each a document"

    reads_folder = False

    def fingerprint(self) -> str:
        parts = [file_identity(self.path), ["text_field", self.text_field]]
        return digest_fingerprint(self.kind, parts)

    def read(self) -> list[Document]:
        return parse_jsonl(read_text_file(self.path), str(self.path), self.text_field)
