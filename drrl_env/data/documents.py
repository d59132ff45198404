"""Documents and the readers of local text: plain text, JSON Lines and folders of ``.txt`` files.

Every reader names the file it could not read and why: missing, empty, binary, not UTF-8,
or (JSON Lines) a line that is not an object holding the text field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIX = ".txt"
_BINARY_PROBE = b"\x00"


class DataNotFoundError(RuntimeError):
    """Raised when no corpus can be read locally or from the hub."""


class CorpusFormatError(ValueError):
    """Raised when a corpus file cannot be read as the kind it was given or detected as."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus, the unit of the train/eval split.

    Attributes:
        title: The WikiText article title (without ``=`` marks); empty for other sources.
        text: The document's text; for WikiText the article's lines joined by ``\\n``.
    """

    title: str
    text: str

    @property
    def content(self) -> str:
        """What is tokenised: ``title + "\\n" + text`` with a title, else ``text + "\\n"``."""
        return f"{self.title}\n{self.text}" if self.title else f"{self.text}\n"


Article = Document  # WikiText articles are documents with a title


def decode_text(path: Path, data: bytes) -> str:
    """UTF-8 text of ``data`` read from ``path`` (a leading byte-order mark is dropped).

    Raises:
        CorpusFormatError: If the bytes hold NUL bytes (binary) or are not UTF-8.
    """
    nul = data.find(_BINARY_PROBE)
    if nul >= 0:
        raise CorpusFormatError(
            f"{path} looks binary (a NUL byte at offset {nul}); data files must be UTF-8 text"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CorpusFormatError(
            f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}); convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file that holds some non-blank text.

    Raises:
        DataNotFoundError: If ``path`` is not a file.
        CorpusFormatError: If the file is empty (or only whitespace), binary or not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{path} is not a file")
    text = decode_text(path, path.read_bytes())
    if not text.strip():
        raise CorpusFormatError(f"{path} is empty: it holds no text")
    return text


def _lines(text: str) -> list[str]:
    """Lines of ``text`` (LF, CRLF or CR), trailing whitespace dropped."""
    return [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]


def split_plain_text(text: str) -> list[Document]:
    """Split plain text into documents.

    The rule: blank lines at the start and end are ignored; if a blank line (empty or only
    whitespace) remains, blank lines separate documents and a document is its lines joined
    by ``\\n``; otherwise every line is a document. Trailing whitespace of lines is dropped.
    """
    lines = _lines(text)
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    if "" not in lines:
        return [Document("", line) for line in lines]
    documents: list[Document] = []
    block: list[str] = []
    for line in [*lines, ""]:
        if line:
            block.append(line)
        elif block:
            documents.append(Document("", "\n".join(block)))
            block = []
    return documents


def _line_object(line: str, where: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusFormatError(f"{where} is not valid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise CorpusFormatError(f"{where} is a JSON {type(value).__name__}, not an object")
    return value


def parse_jsonl(text: str, source: str, text_field: str = "text") -> list[Document]:
    """Documents of JSON Lines text: one object per non-blank line, its ``text_field`` string.

    Objects whose text is empty or only whitespace are skipped; surrounding whitespace of a
    text is dropped.

    Args:
        text: The file's content.
        source: The file's name, for error messages.
        text_field: The key holding the document text.

    Raises:
        CorpusFormatError: On a line that is not a JSON object, lacks ``text_field`` (the
            message gives the line number and the fields present) or holds a non-string.
    """
    documents: list[Document] = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        row = _line_object(line, where)
        if text_field not in row:
            raise CorpusFormatError(
                f"{where} has no field {text_field!r}; its fields are {sorted(row)}. "
                "Pass text_field= the field that holds the text"
            )
        value = row[text_field]
        if not isinstance(value, str):
            raise CorpusFormatError(
                f"{where}: field {text_field!r} holds a {type(value).__name__}, not a string"
            )
        if value.strip():
            documents.append(Document("", value.strip()))
    return documents


def text_files(folder: str | os.PathLike) -> list[Path]:
    """The ``.txt`` files directly inside ``folder`` (not its subfolders), sorted by name."""
    found = (p for p in Path(folder).iterdir() if p.suffix.lower() == TEXT_SUFFIX and p.is_file())
    return sorted(found, key=lambda p: p.name)


def read_text_folder(folder: str | os.PathLike) -> list[Document]:
    """Documents of a folder: each ``.txt`` file (sorted by name) is one document.

    Files holding only whitespace are skipped; surrounding whitespace of a text is dropped.

    Raises:
        DataNotFoundError: If ``folder`` is not a folder or holds no ``.txt`` file.
        CorpusFormatError: If a file is binary or not UTF-8 (the message names it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataNotFoundError(f"{folder} is not a folder")
    paths = text_files(folder)
    if not paths:
        raise DataNotFoundError(f"{folder} holds no {TEXT_SUFFIX} files")
    documents = []
    for path in paths:
        text = decode_text(path, path.read_bytes()).strip()
        if text:
            documents.append(Document("", text))
    return documents
