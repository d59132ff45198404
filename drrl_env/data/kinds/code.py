"""``code[:<glob>]``: the source files of a folder, one document per file.

``data_path`` is the folder (default: the running interpreter's standard library,
``sysconfig.get_paths()["stdlib"]``, present on every machine); the option is a glob relative
to it, ``**/*.py`` by default (``corpus="code:**/*.rs"`` reads Rust). Files are sorted by
their relative path (POSIX spelling) and split into train and eval by a hash of that path, so
editing a file never moves it to the other split. What is tokenised is the file's text alone,
trailing whitespace dropped.

Folders whose name starts with ``.`` and ``__pycache__`` are never entered. For the standard
library default, ``site-packages``, ``dist-packages`` (installed packages, not the library)
and the test suites (folders named ``test``, ``tests``, ``idle_test``) are skipped too; an
explicit ``data_path`` reads every match. Files holding only whitespace are skipped; files that
are not UTF-8 text (binary, or another encoding) are skipped with one warning that counts them.
"""

from __future__ import annotations

import os
import sysconfig
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from drrl_env.data.documents import CorpusFormatError, DataNotFoundError, Document, decode_text
from drrl_env.data.sources import (
    CorpusRequest,
    Source,
    digest_fingerprint,
    file_identity,
    local_path,
)

DEFAULT_GLOB = "**/*.py"
ALWAYS_SKIPPED = ("__pycache__",)
"""Folder names never entered (besides hidden folders, whose name starts with ``.``)."""
STDLIB_SKIPPED = ("site-packages", "dist-packages", "test", "tests", "idle_test")
"""Folder names skipped when reading the standard library by default."""
SHOWN_SKIPPED = 5


def stdlib_folder() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def glob_parts(pattern: str) -> tuple[str, ...]:
    """The components of a relative glob pattern.

    Raises:
        ValueError: If the pattern is empty, absolute or climbs out (``..``).
    """
    parts = tuple(pattern.split("/"))
    if not pattern or pattern.startswith("/") or ".." in parts or "" in parts:
        raise ValueError(
            f"glob {pattern!r} must be a relative pattern such as '**/*.py' (no leading '/', "
            "no '..', no empty component)"
        )
    return parts


def glob_match(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether a relative path's ``parts`` match the glob components ``pattern``.

    As ``Path.glob`` on files: ``**`` (a whole component) matches zero or more folders; other
    components match one name each with :func:`fnmatch.fnmatchcase` (``*``, ``?``,
    ``[...]``; ``*`` matches names starting with ``.`` too).
    """
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(glob_match(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], head) and glob_match(rest, parts[1:])


@dataclass(frozen=True)
class SourceFile(Document):
    """One source file: its title is its relative path (the split key), not tokenised."""

    @property
    def content(self) -> str:
        """The file's text and a newline."""
        return f"{self.text}\n"


@dataclass(frozen=True)
class CodeSource(Source):
    """Source files of a folder matching a glob; see the module docstring.

    Attributes:
        glob: The pattern, relative to ``path``.
        skipped: Folder names not entered, besides hidden folders and ``__pycache__``.
    """

    glob: str = DEFAULT_GLOB
    skipped: tuple[str, ...] = ()

    spelling = "code[:<glob>]"
    takes_option = True
    rule = "source files: each file matching the glob is a document"

    @classmethod
    def resolve(cls, request: CorpusRequest) -> Source:
        """The folder (default: the standard library) and the glob (default ``**/*.py``).

        Raises:
            ValueError: If the glob is empty, absolute or climbs out of the folder.
            DataNotFoundError: If ``data_path`` is not a folder.
        """
        corpus, option, data_path, text_field = request
        pattern = DEFAULT_GLOB if option is None else option
        try:
            glob_parts(pattern)
        except ValueError as error:
            raise ValueError(f"corpus={corpus!r}: {error}") from None
        if data_path is None:
            folder, skipped = stdlib_folder(), STDLIB_SKIPPED
            return cls(corpus, "code", folder, text_field, glob=pattern, skipped=skipped)
        path = local_path("code", data_path, True, f"folder of {pattern} files")
        return cls(corpus, "code", path, text_field, glob=pattern)

    def describe(self) -> str:
        return f"{self.path} (glob {self.glob!r})"

    def files(self) -> list[tuple[str, Path]]:
        """``(relative POSIX path, path)`` of every matching file, sorted by relative path.

        Raises:
            DataNotFoundError: If no file matches (the message names the folder and glob).
        """
        assert self.path is not None
        pattern = glob_parts(self.glob)
        depth = None if "**" in pattern else len(pattern) - 1  # deepest folder level to enter
        never = {*ALWAYS_SKIPPED, *self.skipped}
        found = []
        for folder, subfolders, names in os.walk(self.path):
            base = Path(folder)
            inside = base.relative_to(self.path).parts
            subfolders[:] = [
                d
                for d in subfolders
                if not d.startswith(".")
                and d not in never
                and (depth is None or len(inside) < depth)
            ]
            for name in names:
                if glob_match(pattern, (*inside, name)) and (base / name).is_file():
                    found.append(("/".join((*inside, name)), base / name))
        if not found:
            skipped = f", folders {sorted(never)} and hidden folders skipped" if never else ""
            raise DataNotFoundError(
                f"corpus={self.corpus!r}: no file in {self.path} matches the glob "
                f"{self.glob!r}{skipped}; pass data_path= another folder or corpus='code:<glob>'"
            )
        return sorted(found)

    def fingerprint(self) -> str:
        parts: list = [["glob", self.glob], ["skipped", list(self.skipped)]]
        parts += [[relative, *file_identity(path)] for relative, path in self.files()]
        return digest_fingerprint(self.kind, parts)

    def read(self) -> list[Document]:
        documents: list[Document] = []
        unreadable: list[str] = []
        files = self.files()
        for relative, path in files:
            try:
                text = decode_text(path, path.read_bytes()).rstrip()
            except CorpusFormatError:
                unreadable.append(relative)
                continue
            if text.strip():
                documents.append(SourceFile(relative, text))
        if unreadable:
            shown = ", ".join(unreadable[:SHOWN_SKIPPED])
            extra = len(unreadable) - SHOWN_SKIPPED
            more = f" and {extra} more" if extra > 0 else ""
            warnings.warn(
                f"corpus={self.corpus!r}: skipped {len(unreadable)} of {len(files)} files in "
                f"{self.path} that are not UTF-8 text: {shown}{more}",
                stacklevel=2,
            )
        return documents
