"""Tests for the corpus-kind registry and the ``code`` and ``passkey`` kinds.

The pinned table below holds what the code before the registry built for every existing kind
(window counts, a digest of the token ids, the source fingerprint): cached windows and
rollouts are keyed on them, so they must never move.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import sysconfig
import types
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from drrl_env import hub
from drrl_env.data import (
    CorpusFormatError,
    DataNotFoundError,
    Document,
    Source,
    check_corpus_name,
    corpus_class,
    corpus_names,
    corpus_spellings,
    load_windows,
    read_documents,
    register_corpus,
    resolve_source,
    source_fingerprint,
    split_documents,
    unregister_corpus,
    wikitext,
)
from drrl_env.data.kinds import code, passkey
from drrl_env.lm.models import ByteTokenizer

SENTENCES = [f"Sentence {i} is about item {i * 7 % 13} and colour {i % 5}." for i in range(40)]


class WordTokenizer:
    """Words, spaces and punctuation as ids (a tokenizer whose tokens span several bytes)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        pieces = re.findall(r"\s+|\w+|[^\w\s]", text)
        return [zlib.crc32(piece.encode()) % 50000 for piece in pieces]


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Own cache folder, no WikiText found by default, hub never really contacted."""
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DRRL_DATA_DIR", raising=False)
    monkeypatch.setattr(wikitext, "SHARED_DATA_DIR", tmp_path / "no-shared")
    monkeypatch.setattr(hub, "_probe", lambda url, timeout: "no network in tests")
    hub.clear_hub_cache()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _digest(tokens: np.ndarray) -> str:
    return hashlib.sha256(tokens.tobytes()).hexdigest()[:16]


def _wiki_text(n: int = 20) -> str:
    return "".join(
        f" = Title {i} = \n \n {s} \n \n = = Part = = \n more {s} \n"
        for i, s in enumerate(SENTENCES[:n])
    )


# --- the registry --------------------------------------------------------------------------


def test_every_kind_is_registered_in_order() -> None:
    assert corpus_names() == (
        "wikitext-2",
        "wikitext-103",
        "text",
        "jsonl",
        "folder",
        "hf",
        "code",
        "passkey",
        "passkey-ruler",
        "mix",
    )
    spellings = corpus_spellings()
    assert spellings[5:] == (
        "hf:<dataset>[:<config>][@<split>]",
        "code[:<glob>]",
        "passkey[:<seed>|seed=S,needles=N]",
        "passkey-ruler[:<seed>|seed=S,needles=N]",
        "mix[:<seed>]",
    )
    for name in corpus_names():
        assert issubclass(corpus_class(name), Source)


def test_registry_refuses_bad_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_corpus("text", "x:Y")
    with pytest.raises(ValueError, match="without ':'"):
        register_corpus("a:b", "x:Y")
    with pytest.raises(ValueError, match="non-empty"):
        register_corpus("", "x:Y")
    with pytest.raises(ValueError, match=r"unknown corpus 'ptb'.*'code\[:<glob>\]'"):
        check_corpus_name("ptb")
    assert check_corpus_name("code") == "code"


def test_options_only_where_a_kind_takes_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'text' takes no ':' option"):
        resolve_source("text:x", tmp_path)
    known = r"'passkey\[:<seed>\|seed=S,needles=N\]'"
    with pytest.raises(ValueError, match=rf"unknown corpus 'ptb:3'.*{known}"):
        resolve_source("ptb:3")


@dataclass(frozen=True)
class CountingSource(Source):
    """A toy kind: ``toy:N`` is N generated documents; its windows carry their first token."""

    n: int = 6

    spelling = "toy[:<n>]"
    takes_option = True
    rule = "toy: generated documents"

    @classmethod
    def resolve(cls, request) -> Source:
        return cls(request.corpus, "toy", n=int(request.option or 6))

    def describe(self) -> str:
        return f"{self.n} toy documents"

    def fingerprint(self) -> str:
        return f"toy:{self.n}"

    def read(self) -> list[Document]:
        return [Document("", f"toy document number {i}") for i in range(self.n)]

    def build_windows(self, tokenizer, seq_len, split, eval_fraction):
        tokens, _ = super().build_windows(tokenizer, seq_len, split, eval_fraction)
        return tokens, {"first": tokens[:, 0].copy(), "label": np.array(["w"] * len(tokens))}


@pytest.fixture
def toy_kind():
    register_corpus("toy", CountingSource)
    yield
    unregister_corpus("toy")


def test_a_toy_kind_builds_cached_windows_with_metadata(toy_kind: None, tmp_path: Path) -> None:
    assert "toy" in corpus_names() and "toy[:<n>]" in corpus_spellings()
    windows = load_windows(ByteTokenizer(), 8, corpus="toy:9", cache_dir=tmp_path / "c")
    documents = split_documents(CountingSource("toy:9", "toy", n=9).read(), "train")
    stream = "".join(d.content for d in documents).encode()
    expected = np.frombuffer(stream[: len(stream) // 8 * 8], np.uint8).reshape(-1, 8)
    np.testing.assert_array_equal(windows.tokens, expected.astype(np.int64))
    assert windows.corpus == "toy:9" and source_fingerprint("toy:9") == "toy:9"
    np.testing.assert_array_equal(windows.metadata["first"], windows.tokens[:, 0])
    again = load_windows(
        ByteTokenizer(), 8, corpus="toy:9", cache_dir=tmp_path / "c", max_windows=2
    )
    assert len(list((tmp_path / "c" / "windows").iterdir())) == 1  # served from the cache
    assert list(again.metadata["label"]) == ["w", "w"]
    np.testing.assert_array_equal(again.metadata["first"], windows.metadata["first"][:2])
    with pytest.raises(CorpusFormatError, match=r"holds 1 document\(s\) as corpus='toy:1'"):
        load_windows(ByteTokenizer(), 8, corpus="toy:1", use_cache=False)


def test_metadata_of_the_wrong_length_is_refused(toy_kind: None) -> None:
    class Broken(CountingSource):
        def build_windows(self, tokenizer, seq_len, split, eval_fraction):
            tokens, _ = Source.build_windows(self, tokenizer, seq_len, split, eval_fraction)
            return tokens, {"first": tokens[:1, 0]}

    register_corpus("toy", Broken, replace=True)
    with pytest.raises(ValueError, match="metadata 'first' has shape"):
        load_windows(ByteTokenizer(), 8, corpus="toy", use_cache=False)


# --- existing kinds: windows and fingerprints pinned to the code before the registry ---------

PINNED = {
    "wikitext-folder/ByteTokenizer/train": ("wikitext-2", 108, "817e0644a233912e"),
    "wikitext-folder/ByteTokenizer/eval": ("wikitext-2", 27, "da259a0e94f3aadb"),
    "wikitext-folder/WordTokenizer/train": ("wikitext-2", 53, "0effc5e0e91b899a"),
    "wikitext-folder/WordTokenizer/eval": ("wikitext-2", 13, "3def50d9d204d705"),
    "wikitext-folder/fingerprint": "wikitext:1a2870a281306c7719f5e7fbdeab5046",
    "wikitext-file-103/ByteTokenizer/train": ("wikitext-103", 108, "817e0644a233912e"),
    "wikitext-file-103/ByteTokenizer/eval": ("wikitext-103", 27, "da259a0e94f3aadb"),
    "wikitext-file-103/WordTokenizer/train": ("wikitext-103", 53, "0effc5e0e91b899a"),
    "wikitext-file-103/WordTokenizer/eval": ("wikitext-103", 13, "3def50d9d204d705"),
    "wikitext-file-103/fingerprint": "wikitext:1a2870a281306c7719f5e7fbdeab5046",
    "text-lines/ByteTokenizer/train": ("text", 83, "e00c25d11a47965a"),
    "text-lines/ByteTokenizer/eval": ("text", 21, "36520c031fb1758d"),
    "text-lines/WordTokenizer/train": ("text", 38, "fe78a10197b10314"),
    "text-lines/WordTokenizer/eval": ("text", 9, "29552cb52dbc3a23"),
    "text-lines/fingerprint": "text:f8b1f28f84815a79243249be159d044e",
    "text-paras/ByteTokenizer/train": ("text", 79, "c8818118ab8baa1c"),
    "text-paras/ByteTokenizer/eval": ("text", 23, "b2aae900f5ae0846"),
    "text-paras/WordTokenizer/train": ("text", 35, "99704f6c5ed94c35"),
    "text-paras/WordTokenizer/eval": ("text", 10, "082715eae210da32"),
    "text-paras/fingerprint": "text:730177ad1a29327de8f86a03b7ec8b2e",
    "jsonl/ByteTokenizer/train": ("jsonl", 83, "e00c25d11a47965a"),
    "jsonl/ByteTokenizer/eval": ("jsonl", 21, "36520c031fb1758d"),
    "jsonl/WordTokenizer/train": ("jsonl", 38, "fe78a10197b10314"),
    "jsonl/WordTokenizer/eval": ("jsonl", 9, "29552cb52dbc3a23"),
    "jsonl/fingerprint": "jsonl:f7cb6e6058e80fc159cc3cdeb2e20478",
    "jsonl-body/ByteTokenizer/train": ("jsonl", 83, "cb5b328b1fd5e6ce"),
    "jsonl-body/ByteTokenizer/eval": ("jsonl", 21, "7be36ab7043f9c13"),
    "jsonl-body/WordTokenizer/train": ("jsonl", 38, "28e480fbbd120ff3"),
    "jsonl-body/WordTokenizer/eval": ("jsonl", 9, "cab0601f0f257b5a"),
    "jsonl-body/fingerprint": "jsonl:6ce95d559c6c5c4584406ebb498bc9c4",
    "folder/ByteTokenizer/train": ("folder", 31, "50fac07f5f981e3f"),
    "folder/ByteTokenizer/eval": ("folder", 10, "dffae9fb8f0a6c9b"),
    "folder/WordTokenizer/train": ("folder", 14, "36a56065f8e8f670"),
    "folder/WordTokenizer/eval": ("folder", 4, "719b95077a98ea88"),
    "folder/fingerprint": "folder:ad805cf6198e4bcf943203edaa6b0e48",
    "hf/ByteTokenizer/train": ("hf:me/news:en@validation", 49, "cfa68c0306542c38"),
    "hf/ByteTokenizer/eval": ("hf:me/news:en@validation", 13, "8998819b7d1a2464"),
    "hf/WordTokenizer/train": ("hf:me/news:en@validation", 22, "6c3d5bb696fae85e"),
    "hf/WordTokenizer/eval": ("hf:me/news:en@validation", 5, "2483a17b88e92233"),
    "hf/fingerprint": "hub:me/news:en@validation#content",
    "wikitext-hub/ByteTokenizer/train": ("wikitext-2", 49, "e83aa85a80ebb432"),
    "wikitext-hub/ByteTokenizer/eval": ("wikitext-2", 12, "07267495cb843eb4"),
    "wikitext-hub/WordTokenizer/train": ("wikitext-2", 22, "bb659aa5143ff18d"),
    "wikitext-hub/WordTokenizer/eval": ("wikitext-2", 5, "75e34f2ac4c83997"),
    "wikitext-hub/fingerprint": "hub:Salesforce/wikitext:wikitext-2-raw-v1@test#text",
}


def _pinned_cases(root: Path) -> list[tuple[str, dict]]:
    """The synthetic corpora of the pinned table, written under ``root``."""
    _write(root / "wiki" / "wikitext-2-raw" / "wiki.test.raw", _wiki_text())
    _write(root / "lines.txt", "\n".join(SENTENCES) + "\n")
    paragraphs = ("\n".join(SENTENCES[i : i + 3]) for i in range(0, 39, 3))
    _write(root / "paras.txt", "\n\n".join(paragraphs) + "\n")
    rows = (json.dumps({"text": s, "body": s.upper()}) for s in SENTENCES)
    _write(root / "rows.jsonl", "\n".join(rows) + "\n")
    for i, sentence in enumerate(SENTENCES[:16]):
        _write(root / "docs" / f"d{i:02d}.txt", f"\n{sentence}\n")
    return [
        ("wikitext-folder", {"data_path": root / "wiki"}),
        (
            "wikitext-file-103",
            {"corpus": "wikitext-103", "data_path": root / "wiki/wikitext-2-raw/wiki.test.raw"},
        ),
        ("text-lines", {"data_path": root / "lines.txt"}),
        ("text-paras", {"corpus": "text", "data_path": root / "paras.txt"}),
        ("jsonl", {"data_path": root / "rows.jsonl"}),
        ("jsonl-body", {"corpus": "jsonl", "data_path": root / "rows.jsonl", "text_field": "body"}),
        ("folder", {"data_path": root / "docs"}),
        ("hf", {"corpus": "hf:me/news:en@validation", "text_field": "content"}),
        ("wikitext-hub", {}),
    ]


class _HubRows:
    """What the stand-in ``load_dataset`` returns: WikiText lines, or rows of a column."""

    column_names = ["content", "text"]

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, column: str) -> list:
        if self.name == "Salesforce/wikitext":
            return [
                line
                for i, s in enumerate(SENTENCES[:20])
                for line in (f" = Title {i} = \n", f" {s} \n")
            ]
        return {"content": [*SENTENCES[:24], "", None], "text": ["x"] * 26}[column]


def test_existing_kinds_build_the_pinned_windows_and_fingerprints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: _HubRows(name))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(hub, "hub_reachable", lambda *args: True)
    seen = {}
    for name, kwargs in _pinned_cases(tmp_path / "corpora"):
        for tokenizer in (ByteTokenizer(), WordTokenizer()):
            for split in ("train", "eval"):
                ws = load_windows(tokenizer, 16, split=split, use_cache=False, **kwargs)
                label = f"{name}/{type(tokenizer).__name__}/{split}"
                seen[label] = (ws.corpus, len(ws), _digest(ws.tokens))
                assert ws.metadata == {}
        seen[f"{name}/fingerprint"] = source_fingerprint(**kwargs)
    assert seen == PINNED


REAL_FILE = wikitext.SHARED_DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"
REAL_PINNED = {
    ("ByteTokenizer", "train"): (1033, "d4a3ae3c15280134"),
    ("ByteTokenizer", "eval"): (217, "7b4df884a7ab0583"),
    ("WordTokenizer", "train"): (396, "20bf4af654d493a5"),
    ("WordTokenizer", "eval"): (82, "6fd8176505a5233b"),
}


def test_real_wikitext_windows_are_pinned() -> None:
    if not REAL_FILE.is_file():
        pytest.skip("shared WikiText-2 test file not present")
    seen = {}
    for tokenizer in (ByteTokenizer(), WordTokenizer()):
        for split in ("train", "eval"):
            ws = load_windows(tokenizer, 1024, split=split, data_path=REAL_FILE, use_cache=False)
            seen[type(tokenizer).__name__, split] = (len(ws), _digest(ws.tokens))
    assert seen == REAL_PINNED
    assert source_fingerprint(data_path=REAL_FILE) == "wikitext:e1bf0710645d0ddb12e00c730e76955d"


# --- code ----------------------------------------------------------------------------------


def _code_tree(root: Path) -> dict[str, str]:
    """A small package; returns the texts of the files ``**/*.py`` reads, by relative path."""
    files = {
        "setup.py": "from setuptools import setup\n\nsetup()\n\n\n",
        "pkg/__init__.py": '"""The package."""\n',
        "pkg/core.py": "def add(a, b):\n    return a + b\n",
        "pkg/sub/deep.py": "VALUE = 3  # café\n",
        "pkg/sub/z_last.py": "print('last')\n",
        "tests/test_core.py": "def test_add():\n    assert True\n",
        "a_first.py": "import os\n",
    }
    for relative, text in files.items():
        _write(root / relative, text)
    _write(root / "pkg" / "empty.py", " \n\n")  # only whitespace: skipped
    _write(root / "README.md", "# not code\n")
    _write(root / ".venv" / "lib" / "hidden.py", "x = 1\n")  # hidden folders are not entered
    _write(root / "pkg" / "__pycache__" / "core.py", "x = 2\n")
    return {k: v.rstrip() for k, v in sorted(files.items())}


def test_code_documents_sorted_by_relative_path(tmp_path: Path) -> None:
    expected = _code_tree(tmp_path / "repo")
    source = resolve_source("code", tmp_path / "repo")
    assert (source.corpus, source.kind, source.glob) == ("code", "code", "**/*.py")
    documents = read_documents(source)
    assert [d.title for d in documents] == list(expected)
    assert [d.text for d in documents] == list(expected.values())
    assert documents[0].content == "import os\n"  # the path is the split key, not tokenised
    rows = read_documents(resolve_source("code:pkg/*.py", tmp_path / "repo"))
    assert [d.title for d in rows] == ["pkg/__init__.py", "pkg/core.py"]
    markdown = resolve_source("code:**/*.md", tmp_path / "repo").read()
    assert len(markdown) == 1 and markdown[0].text == "# not code"


def test_code_split_is_by_path_and_windows_hold_the_sources(tmp_path: Path) -> None:
    expected = _code_tree(tmp_path / "repo")
    n_eval = math.ceil(0.2 * len(expected))
    by_path = sorted(expected, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    held_out = set(by_path[:n_eval])
    for split in ("train", "eval"):
        ws = load_windows(
            ByteTokenizer(), 8, split=split, corpus="code", data_path=tmp_path / "repo"
        )
        own = [t for p, t in expected.items() if (p in held_out) == (split == "eval")]
        stream = "".join(t + "\n" for t in own).encode()
        flat = np.frombuffer(stream[: len(stream) // 8 * 8], np.uint8).astype(np.int64)
        np.testing.assert_array_equal(ws.tokens, flat.reshape(-1, 8))
        assert ws.corpus == "code"
    # editing a file does not move it to the other split
    _write(tmp_path / "repo" / "pkg" / "core.py", "def add(a, b):\n    return b + a\n")
    documents = read_documents(resolve_source("code", tmp_path / "repo"))
    titles = {d.title for d in split_documents(documents, "eval")}
    assert titles == held_out


def test_code_skips_files_that_are_not_utf8_with_a_warning(tmp_path: Path) -> None:
    _code_tree(tmp_path / "repo")
    (tmp_path / "repo" / "latin.py").write_bytes("x = 'café'\n".encode("latin-1"))
    (tmp_path / "repo" / "pkg" / "blob.py").write_bytes(b"\x00\x01binary")
    with pytest.warns(UserWarning, match=r"skipped 2 of 10 files .* not UTF-8 text: latin.py, pkg"):
        documents = read_documents(resolve_source("code", tmp_path / "repo"))
    assert "latin.py" not in {d.title for d in documents} and len(documents) == 7


def test_code_without_a_match_names_the_folder_and_glob(tmp_path: Path) -> None:
    _code_tree(tmp_path / "repo")
    with pytest.raises(DataNotFoundError) as info:
        load_windows(ByteTokenizer(), 8, corpus="code:**/*.rs", data_path=tmp_path / "repo")
    message = str(info.value)
    assert str(tmp_path / "repo") in message and "'**/*.rs'" in message
    for bad in ("code:", "code:/etc/*.py", "code:../*.py", "code:a//b.py"):
        with pytest.raises(ValueError, match="must be a relative pattern"):
            resolve_source(bad, tmp_path / "repo")
    with pytest.raises(DataNotFoundError, match="needs data_path= a folder"):
        resolve_source("code", tmp_path / "repo" / "setup.py")


def test_code_glob_matches_like_path_glob(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for relative in ("a.py", "b.txt", "x/c.py", "x/y/d.py", "x/y/e.pyi", "z/x/f.py", ".h.py"):
        _write(root / relative, "pass\n")
    for pattern in ("**/*.py", "*.py", "x/**/*.py", "x/*", "**/x/*.py", "?.py", "**/*.py[!c]"):
        expected = sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
        got = [r for r, _ in code.CodeSource("c", "code", root, glob=pattern).files()]
        assert got == expected, pattern


def test_code_fingerprint_follows_the_files(tmp_path: Path) -> None:
    _code_tree(tmp_path / "repo")
    repo = tmp_path / "repo"
    before = source_fingerprint("code", repo)
    assert before.startswith("code:") and before == source_fingerprint("code", repo)
    os.utime(repo / "pkg" / "core.py", ns=(1, 1))  # touching keeps it
    assert source_fingerprint("code", repo) == before
    _write(repo / "pkg" / "core.py", "def add(a, b):\n    return a - b\n")
    changed = source_fingerprint("code", repo)
    assert changed != before
    _write(repo / "pkg" / "new.py", "pass\n")
    assert source_fingerprint("code", repo) not in (before, changed)
    assert source_fingerprint("code:pkg/*.py", repo) != source_fingerprint("code", repo)
    (repo / "pkg" / "new.py").rename(repo / "pkg" / "renamed.py")
    assert source_fingerprint("code", repo) not in (before, changed)


def test_code_defaults_to_the_standard_library() -> None:
    source = resolve_source("code")
    assert source.path == Path(sysconfig.get_paths()["stdlib"])
    relatives = [r for r, _ in source.files()]
    assert "json/decoder.py" in relatives and "os.py" in relatives
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert not any(skipped & set(r.split("/")[:-1]) for r in relatives)
    assert relatives == sorted(relatives)
    assert source_fingerprint("code") == source.fingerprint()
    ws = load_windows(ByteTokenizer(), 4096, split="eval", corpus="code", max_windows=2)
    assert ws.tokens.shape == (2, 4096)


# --- passkey -------------------------------------------------------------------------------


@pytest.fixture
def filler(tmp_path: Path) -> Path:
    """A WikiText file of 40 articles, the filler of the passkey windows."""
    body = "".join(
        f" = Article {i} = \n {' '.join(SENTENCES[(i + j) % 40] for j in range(8))} \n"
        for i in range(40)
    )
    return _write(tmp_path / "filler" / "wiki.test.raw", body)


def _encode(text: str) -> list[int]:
    return ByteTokenizer().encode(text)


@pytest.mark.parametrize(
    ("corpus", "seed", "needles"),
    [
        ("passkey", 0, 1),
        ("passkey:7", 7, 1),
        ("passkey-ruler", 0, 1),
        ("passkey-ruler:7", 7, 1),
        ("passkey:needles=2", 0, 2),
        ("passkey-ruler:needles=3, seed=7", 7, 3),
    ],
)
def test_passkey_windows_are_exact(filler: Path, corpus: str, seed: int, needles: int) -> None:
    seq_len = 600
    ws = load_windows(ByteTokenizer(), seq_len, split="eval", corpus=corpus, data_path=filler)
    prose = load_windows(ByteTokenizer(), seq_len, split="eval", data_path=filler)
    assert len(prose) >= 2
    assert ws.tokens.shape == (needles * len(prose), seq_len) and ws.tokens.dtype == np.int64
    assert ws.corpus == corpus
    ruler = corpus.startswith("passkey-ruler")
    meta = ws.metadata
    assert set(meta) == {"answer", "key", "depth", "needle_start", "needle_end"}
    for i, row in enumerate(ws.tokens):
        answer, key = str(meta["answer"][i]), str(meta["key"][i])
        if ruler:
            assert re.fullmatch(r"[a-z]+-[a-z]+", key) and re.fullmatch(r"[1-9]\d{6}", answer)
            needle = f"One of the special magic numbers for {key} is: {answer}."
            question = (
                f"What is the special magic number for {key} mentioned in the provided text? "
                f"The special magic number for {key} mentioned in the provided text is"
            )
            header = passkey.RULER_HEADER
        else:
            assert key == answer and re.fullmatch(r"[1-9]\d{4}", answer)
            needle = f"The pass key is {answer}. Remember it. {answer} is the pass key."
            question = "What is the pass key? The pass key is"
            header = (
                "There is an important info hidden inside a lot of irrelevant text. Find it and "
                "memorize them. I will quiz you about the important information there."
            )
        head, tail = _encode(header + "\n"), _encode("\n" + question)
        middle = _encode("\n" + needle + "\n")
        start, end = int(meta["needle_start"][i]), int(meta["needle_end"][i])
        assert row[: len(head)].tolist() == head and row[-len(tail) :].tolist() == tail
        assert row[start:end].tolist() == middle and end - start == len(middle)
        room = seq_len - len(head) - len(middle) - len(tail)
        depth = float(meta["depth"][i])
        assert depth == passkey.needle_depth(seed, "eval", i) and 0 <= depth <= 1
        assert start - len(head) == round(depth * room)
        filler_tokens = np.concatenate([row[len(head) : start], row[end : -len(tail)]])
        np.testing.assert_array_equal(filler_tokens, prose.tokens[i // needles, :room])
    # windows of one filler window share a text group (their statistics resample together)
    groups = resolve_source(corpus, filler).text_groups(len(ws))
    assert groups.tolist() == [i // needles for i in range(len(ws))]
    assert len(set(meta["answer"])) == len(ws)  # every needle of a filler window is new


def test_passkey_depths_spread_and_keys_vary(filler: Path) -> None:
    ws = load_windows(ByteTokenizer(), 256, corpus="passkey", data_path=filler)
    assert len(ws) > 20
    depths = ws.metadata["depth"]
    assert depths.min() < 0.25 and depths.max() > 0.75
    assert len(set(ws.metadata["answer"])) == len(ws)


def test_passkey_windows_are_reproducible(filler: Path, tmp_path: Path) -> None:
    def build(corpus: str, split: str = "train", path: Path = filler, **kw) -> object:
        return load_windows(
            ByteTokenizer(), 400, split=split, corpus=corpus, data_path=path, use_cache=False, **kw
        )

    first, again = build("passkey:3"), build("passkey:3")
    np.testing.assert_array_equal(first.tokens, again.tokens)
    for name in first.metadata:
        np.testing.assert_array_equal(first.metadata[name], again.metadata[name])
    # key and depth depend only on (seed, split, index): not on the filler nor on max_windows
    other = _write(tmp_path / "other.raw", filler.read_text().replace("Sentence", "Phrase"))
    for ws in (build("passkey:3", path=other), build("passkey:3", max_windows=2)):
        n = len(ws)
        for name in ("answer", "depth"):
            np.testing.assert_array_equal(ws.metadata[name], first.metadata[name][:n])
    assert list(build("passkey:4").metadata["answer"]) != list(first.metadata["answer"])
    held = build("passkey:3", split="eval")
    assert list(held.metadata["answer"][:3]) != list(first.metadata["answer"][:3])
    ruler = build("passkey-ruler:3")
    np.testing.assert_array_equal(ruler.metadata["depth"], first.metadata["depth"])


def test_passkey_metadata_comes_back_from_the_cache(filler: Path, tmp_path: Path) -> None:
    kwargs = {"corpus": "passkey-ruler", "data_path": filler, "cache_dir": tmp_path / "c"}
    built = load_windows(ByteTokenizer(), 500, **kwargs)
    cached = load_windows(ByteTokenizer(), 500, max_windows=3, **kwargs)
    assert len(list((tmp_path / "c" / "windows").iterdir())) == 1
    np.testing.assert_array_equal(cached.tokens, built.tokens[:3])
    for name, values in built.metadata.items():
        np.testing.assert_array_equal(cached.metadata[name], values[:3])
    assert cached.metadata["answer"].dtype.kind == "U"


def test_passkey_fingerprint_and_errors(filler: Path) -> None:
    base = source_fingerprint("passkey", filler)
    assert base.startswith("passkey:")
    assert source_fingerprint("passkey:0", filler) == base
    assert source_fingerprint("passkey:1", filler) != base
    # named values: the plain spelling's windows keep their fingerprint, more needles do not
    assert source_fingerprint("passkey:seed=0,needles=1", filler) == base
    assert source_fingerprint("passkey:seed=1", filler) == source_fingerprint("passkey:1", filler)
    assert source_fingerprint("passkey:needles=2", filler) != base
    assert "2 needles per filler window" in resolve_source("passkey:needles=2", filler).describe()
    for option, message in [
        ("needles=0", "needles must be an integer >= 1, got '0'"),
        ("seed=-1", "seed must be an integer >= 0, got '-1'"),
        ("needles=two", "needles must be an integer >= 1, got 'two'"),
        ("depth=0.5", "names: seed, needles; got 'depth=0.5'"),
        ("seed=1,seed=2", "seed is given twice"),
        ("needles", "the option is a seed"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            resolve_source(f"passkey:{option}", filler)
    assert source_fingerprint("passkey-ruler", filler).startswith("passkey-ruler:")
    filler.write_text(filler.read_text().replace("item", "thing"), encoding="utf-8")
    assert source_fingerprint("passkey", filler) != base
    with pytest.raises(ValueError, match="the option is a seed"):
        resolve_source("passkey:x", filler)
    with pytest.raises(ValueError, match=r"seq_len=64 is too small .* take \d+ tokens"):
        load_windows(ByteTokenizer(), 64, corpus="passkey-ruler", data_path=filler)
    with pytest.raises(ValueError, match="one window needs 100000 tokens"):
        load_windows(ByteTokenizer(), 100_000, corpus="passkey", data_path=filler)


def test_passkey_reads_the_default_wikitext(monkeypatch: pytest.MonkeyPatch, filler: Path) -> None:
    monkeypatch.setenv("DRRL_DATA_DIR", str(filler.parent))
    source = resolve_source("passkey")
    assert source.filler.path == filler and source.filler.corpus == "wikitext-2"
    assert read_documents(source)[0].title == "Article 0"


# --- environments --------------------------------------------------------------------------


@pytest.mark.slow
def test_gym_make_reads_code_and_passkey(filler: Path, tmp_path: Path) -> None:
    gym = pytest.importorskip("gymnasium")
    import drrl_env  # noqa: F401 (registers the ids)

    for corpus, data_path in (("code:json/*.py", None), ("passkey", str(filler))):
        env = gym.make(
            "DRRL-Tiny-v0",
            corpus=corpus,
            data_path=data_path,
            seq_len=512,
            segment_length=128,
            method="gram",
            backend="live",
            max_windows=1,
            cache_dir=str(tmp_path / "cache"),
        )
        observation, _ = env.reset(seed=0)
        assert env.observation_space.contains(observation)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env.step(env.action_space.sample())
        env.close()
