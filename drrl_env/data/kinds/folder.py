"""``folder``: the ``.txt`` files directly inside a folder, one document each, sorted by name."""

from __future__ import annotations

from dataclasses import dataclass

from drrl_env.data.documents import Document, read_text_folder, text_files
from drrl_env.data.sources import Source, digest_fingerprint, file_identity


@dataclass(frozen=True)
class FolderSource(Source):
    """A folder of ``.txt`` files (:func:`~drrl_env.data.documents.read_text_folder`)."""

    rule = "a folder: each .txt file is a document"

    reads_folder = True

    def fingerprint(self) -> str:
        parts = [[p.name, *file_identity(p)] for p in text_files(self.path)]
        return digest_fingerprint(self.kind, parts)

    def read(self) -> list[Document]:
        return read_text_folder(self.path)
