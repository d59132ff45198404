"""Tests for drrl_env.data sources: kinds, detection, split, windows, cache and errors."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from drrl_env import hub
from drrl_env.data import (
    CorpusFormatError,
    DataNotFoundError,
    Document,
    detect_kind,
    load_windows,
    read_documents,
    resolve_source,
    source_fingerprint,
    split_documents,
    split_plain_text,
    tokenizer_fingerprint,
    wikitext,
)
from drrl_env.lm.models import ByteTokenizer

SENTENCES = [f"Sentence {i} is about item {i * 7 % 13} and colour {i % 5}." for i in range(40)]


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


def _lines_file(tmp_path: Path, name: str = "corpus.txt") -> Path:
    return _write(tmp_path / name, "\n".join(SENTENCES) + "\n")


def _eval_texts(texts: list[str], eval_fraction: float = 0.2) -> set[str]:
    """The documented rule for untitled documents: the lowest sha256 of the text are eval."""
    k = min(math.ceil(eval_fraction * len(texts) - 1e-9), len(texts) - 1)
    return set(sorted(texts, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:k])


def _windows_of(texts: list[str], seq_len: int) -> np.ndarray:
    stream = np.frombuffer("".join(t + "\n" for t in texts).encode(), dtype=np.uint8)
    n = len(stream) // seq_len
    return stream[: n * seq_len].astype(np.int64).reshape(n, seq_len)


def _counting_tokenizer() -> tuple[ByteTokenizer, list[str]]:
    """The project's byte tokenizer (same fingerprint), recording the texts it encodes."""
    tokenizer, calls = ByteTokenizer(), []
    encode = tokenizer.encode

    def counted(text: str, add_special_tokens: bool = False) -> list[int]:
        calls.append(text)
        return encode(text, add_special_tokens)

    tokenizer.encode = counted  # type: ignore[method-assign]
    return tokenizer, calls


# --- each kind builds windows --------------------------------------------------------------


def test_plain_text_one_document_per_line(tmp_path: Path) -> None:
    path = _lines_file(tmp_path)
    for split in ("train", "eval"):
        ws = load_windows(ByteTokenizer(), 16, split=split, data_path=path)
        assert (ws.corpus, ws.split, ws.seq_len) == ("text", split, 16)
        held_out = _eval_texts(SENTENCES)
        own = [s for s in SENTENCES if (s in held_out) == (split == "eval")]
        np.testing.assert_array_equal(ws.tokens, _windows_of(own, 16))
        assert ws.tokens.dtype == np.int64


def test_plain_text_blank_lines_separate_documents(tmp_path: Path) -> None:
    paragraphs = ["\n".join(SENTENCES[i : i + 3]) for i in range(0, 30, 3)]
    path = _write(tmp_path / "paras.txt", "\n\n".join(paragraphs) + "\n\n\n")
    source = resolve_source("text", path)
    assert [d.text for d in read_documents(source)] == paragraphs
    ws = load_windows(ByteTokenizer(), 32, corpus="text", data_path=path)
    own = [p for p in paragraphs if p not in _eval_texts(paragraphs)]
    np.testing.assert_array_equal(ws.tokens, _windows_of(own, 32))


def test_plain_text_rule_details() -> None:
    assert split_plain_text("\n\n a\r\nb  \r\n\n\n") == [Document("", " a"), Document("", "b")]
    assert split_plain_text("a\nb\n \t\nc\n") == [Document("", "a\nb"), Document("", "c")]
    assert split_plain_text("a\rb\r") == [Document("", "a"), Document("", "b")]


def test_jsonl_with_default_and_custom_field(tmp_path: Path) -> None:
    rows = [{"text": s, "body": s.upper(), "id": i} for i, s in enumerate(SENTENCES)]
    rows.insert(3, {"text": "   ", "body": "", "id": -1})  # blank texts are skipped
    lines = [json.dumps(r) for r in rows]
    path = _write(tmp_path / "rows.jsonl", "\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]))
    assert detect_kind(path) == "jsonl"
    ws = load_windows(ByteTokenizer(), 16, data_path=path)
    assert ws.corpus == "jsonl"
    own = [s for s in SENTENCES if s not in _eval_texts(SENTENCES)]
    np.testing.assert_array_equal(ws.tokens, _windows_of(own, 16))
    upper = load_windows(ByteTokenizer(), 16, corpus="jsonl", data_path=path, text_field="body")
    texts = [s.upper() for s in SENTENCES]
    own = [s for s in texts if s not in _eval_texts(texts)]
    np.testing.assert_array_equal(upper.tokens, _windows_of(own, 16))


def test_folder_of_text_files(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    for i, text in enumerate(SENTENCES[:12]):
        _write(folder / f"doc{i:02d}.txt", f"\n{text}\n")
    _write(folder / "empty.txt", " \n")  # skipped
    _write(folder / "notes.md", "not a document")  # other suffixes are ignored
    _write(folder / "sub" / "deep.txt", "subfolders are not read")
    assert detect_kind(folder) == "folder"
    documents = read_documents(resolve_source("folder", folder))
    assert [d.text for d in documents] == SENTENCES[:12]  # sorted by file name
    ws = load_windows(ByteTokenizer(), 8, split="eval", data_path=folder)
    np.testing.assert_array_equal(ws.tokens, _windows_of(sorted_eval(SENTENCES[:12]), 8))
    assert ws.corpus == "folder"


def sorted_eval(texts: list[str]) -> list[str]:
    held_out = _eval_texts(texts)
    return [t for t in texts if t in held_out]


def test_wikitext_detected_from_title_lines_in_any_file(tmp_path: Path) -> None:
    body = "".join(f" = Title {i} = \n {s} \n" for i, s in enumerate(SENTENCES[:10]))
    path = _write(tmp_path / "wiki.txt", "\ufeff" + body)
    assert detect_kind(path) == "wikitext"
    ws = load_windows(ByteTokenizer(), 8, data_path=path)
    assert ws.corpus == "wikitext-2"
    docs = read_documents(resolve_source(data_path=path))
    assert docs[0] == Document("Title 0", SENTENCES[0])
    _write(tmp_path / "folder" / "wikitext-2-raw" / "wiki.test.raw", body)
    assert detect_kind(tmp_path / "folder") == "wikitext"
    explicit = load_windows(ByteTokenizer(), 8, corpus="wikitext-103", data_path=path)
    np.testing.assert_array_equal(explicit.tokens, ws.tokens)


def test_hub_dataset_spelling_and_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    class Rows:
        column_names = ["content", "label"]

        def __getitem__(self, column: str) -> list:
            return {"content": [*SENTENCES[:20], "", None], "label": [0] * 22}[column]

    def load_dataset(name: str, config: str | None, split: str) -> Rows:
        calls.append((name, config, split, os.environ.get("HF_HUB_ETAG_TIMEOUT")))
        return Rows()

    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(hub, "hub_reachable", lambda *args: True)
    ws = load_windows(ByteTokenizer(), 8, corpus="hf:me/news:en@validation", text_field="content")
    assert ws.corpus == "hf:me/news:en@validation"
    assert calls == [("me/news", "en", "validation", str(math.ceil(hub.REQUEST_TIMEOUT_S)))]
    own = [s for s in SENTENCES[:20] if s not in _eval_texts(SENTENCES[:20])]
    np.testing.assert_array_equal(ws.tokens, _windows_of(own, 8))
    source = resolve_source("hf:plain")
    assert (source.dataset, source.config, source.hub_split) == ("plain", None, "train")
    with pytest.raises(CorpusFormatError, match=r"no column 'text'.*\['content', 'label'\]"):
        load_windows(ByteTokenizer(), 8, corpus="hf:me/news", use_cache=False)
    # windows of a hub source are served from the cache when the hub is gone
    monkeypatch.setattr(hub, "hub_reachable", lambda *args: False)
    again = load_windows(
        ByteTokenizer(), 8, corpus="hf:me/news:en@validation", text_field="content"
    )
    np.testing.assert_array_equal(again.tokens, ws.tokens)
    assert len(calls) == 2


def test_hub_dataset_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=pytest.fail))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataNotFoundError) as info:
        load_windows(ByteTokenizer(), 8, corpus="hf:owner/name:config")
    assert time.monotonic() - start < 1.0
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message and "hf:owner/name:config" in message
    assert "data_path=" in message and ".jsonl" in message and "folder of .txt" in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "hub_reachable", lambda *args: False)
    with pytest.raises(DataNotFoundError, match="Point at local files"):
        load_windows(ByteTokenizer(), 8, corpus="hf:owner/name")


@pytest.mark.parametrize("corpus", ["hf:", "hf::cfg", "hf:name:", "hf:name@", "hf: "])
def test_bad_hub_spelling(corpus: str) -> None:
    with pytest.raises(ValueError, match=r"hf:<dataset>\[:<config>\]\[@<split>\]"):
        resolve_source(corpus)


def test_hub_corpus_rejects_data_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data_path=.*not used with corpus='hf:a/b'"):
        load_windows(ByteTokenizer(), 8, corpus="hf:a/b", data_path=_lines_file(tmp_path))


def test_gym_make_on_a_sentence_per_line_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gym = pytest.importorskip("gymnasium")
    import drrl_env  # noqa: F401 (registers the ids)

    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "corpus.txt", "\n".join(SENTENCES * 4) + "\n")
    env = gym.make("DRRL-Tiny-v0", data_path="corpus.txt", max_windows=1, cache_dir="cache")
    observation, _ = env.reset(seed=0)
    assert env.observation_space.contains(observation)
    env.close()


# --- split ---------------------------------------------------------------------------------


def test_split_deterministic_disjoint_and_order_free(tmp_path: Path) -> None:
    first = _lines_file(tmp_path, "a.txt")
    shuffled = _write(tmp_path / "b.txt", "\n".join(SENTENCES[::-1]) + "\n")
    parts = {}
    for path in (first, shuffled):
        documents = read_documents(resolve_source(data_path=path))
        train, held_out = (split_documents(documents, s, 0.25) for s in ("train", "eval"))
        assert {d.text for d in train}.isdisjoint(d.text for d in held_out)
        assert len(held_out) == math.ceil(0.25 * len(SENTENCES))
        assert train == [d for d in documents if d in train]  # file order kept
        parts[path] = ({d.text for d in train}, {d.text for d in held_out})
    assert parts[first] == parts[shuffled]
    assert parts[first][1] == _eval_texts(SENTENCES, 0.25)


def test_windows_never_cross_the_split(tmp_path: Path) -> None:
    path = _lines_file(tmp_path)
    train = load_windows(ByteTokenizer(), 4, split="train", data_path=path)
    held = load_windows(ByteTokenizer(), 4, split="eval", data_path=path)
    train_text = bytes(train.tokens.ravel().astype(np.uint8)).decode()
    held_text = bytes(held.tokens.ravel().astype(np.uint8)).decode()
    held_out = _eval_texts(SENTENCES)
    assert 0 < len(held_out) < len(SENTENCES)
    for sentence in SENTENCES:
        assert sentence not in (held_text if sentence not in held_out else train_text)


# --- the window cache ----------------------------------------------------------------------


def test_cache_is_hit_and_serves_max_windows(tmp_path: Path) -> None:
    path = _lines_file(tmp_path)
    tokenizer, calls = _counting_tokenizer()
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(ByteTokenizer())
    first = load_windows(tokenizer, 16, data_path=path, max_windows=3, cache_dir=tmp_path / "c")
    built = len(calls)
    assert built == len(SENTENCES) - len(_eval_texts(SENTENCES)) and len(first) == 3
    full = load_windows(tokenizer, 16, data_path=path, cache_dir=tmp_path / "c")
    assert len(calls) == built  # all windows were cached, max_windows only slices
    np.testing.assert_array_equal(full.tokens[:3], first.tokens)
    assert len(full) > 3
    cached = list((tmp_path / "c" / "windows").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"  # no temporary file left
    load_windows(tokenizer, 8, data_path=path, cache_dir=tmp_path / "c")  # other seq_len
    load_windows(tokenizer, 16, data_path=path, eval_fraction=0.3, cache_dir=tmp_path / "c")
    load_windows(tokenizer, 16, split="eval", data_path=path, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c" / "windows").iterdir())) == 4


def test_cache_default_root_and_opt_out(tmp_path: Path) -> None:
    path = _lines_file(tmp_path)
    load_windows(ByteTokenizer(), 16, data_path=path)
    assert len(list((tmp_path / "cache" / "windows").glob("*.npz"))) == 1
    tokenizer, calls = _counting_tokenizer()
    load_windows(tokenizer, 16, data_path=path, use_cache=False, cache_dir=tmp_path / "none")
    assert calls and not (tmp_path / "none").exists()


def test_cache_invalidated_when_content_changes(tmp_path: Path) -> None:
    path = _lines_file(tmp_path)
    tokenizer, calls = _counting_tokenizer()
    before = load_windows(tokenizer, 16, data_path=path)
    fingerprint = source_fingerprint(data_path=path)
    os.utime(path, ns=(1, 1))  # touching alone keeps the fingerprint of a small file
    assert source_fingerprint(data_path=path) == fingerprint
    load_windows(tokenizer, 16, data_path=path)
    n_calls = len(calls)
    path.write_text(path.read_text().replace("Sentence", "Sentencf"), encoding="utf-8")
    assert source_fingerprint(data_path=path) != fingerprint
    after = load_windows(tokenizer, 16, data_path=path)
    assert len(calls) > n_calls and not np.array_equal(after.tokens, before.tokens)


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    path = _lines_file(tmp_path)
    reference = load_windows(ByteTokenizer(), 16, data_path=path)
    (cached,) = (tmp_path / "cache" / "windows").iterdir()
    cached.write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="rebuilding unreadable window cache"):
        rebuilt = load_windows(ByteTokenizer(), 16, data_path=path)
    np.testing.assert_array_equal(rebuilt.tokens, reference.tokens)
    np.savez(cached, key=np.array("{}"), tokens=reference.tokens)
    with pytest.warns(UserWarning, match="another configuration"):
        load_windows(ByteTokenizer(), 16, data_path=path)
    load_windows(ByteTokenizer(), 16, data_path=path)  # rewritten: no warning now


def test_source_fingerprints(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    _write(folder / "a.txt", "alpha")
    _write(folder / "b.txt", "beta")
    before = source_fingerprint(data_path=folder)
    assert before.startswith("folder:")
    _write(folder / "c.txt", "gamma")
    assert source_fingerprint(data_path=folder) != before
    rows = _write(tmp_path / "r.jsonl", '{"text": "a", "body": "b"}\n')
    assert source_fingerprint(data_path=rows) != source_fingerprint(data_path=rows, text_field="x")
    hub_id = source_fingerprint("hf:me/news:en", text_field="content")
    assert hub_id == "hub:me/news:en@train#content"
    assert source_fingerprint() == "hub:Salesforce/wikitext:wikitext-2-raw-v1@test#text"


def test_tokenizer_fingerprints() -> None:
    class Shifted:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [b + 1 for b in text.encode()]

    class Fast:
        class backend_tokenizer:  # noqa: N801 (the Hugging Face attribute name)
            @staticmethod
            def to_str() -> str:
                return '{"model": "bpe"}'

    assert tokenizer_fingerprint(ByteTokenizer()) == "class:drrl_env.lm.models.ByteTokenizer"
    assert tokenizer_fingerprint(Shifted()).startswith("probe:")
    assert tokenizer_fingerprint(Fast()).startswith("hf-fast:")
    with pytest.raises(TypeError, match="encode"):
        tokenizer_fingerprint(object())


# --- errors --------------------------------------------------------------------------------


def test_too_few_tokens_says_how_many(tmp_path: Path) -> None:
    path = _lines_file(tmp_path)
    held_out = _eval_texts(SENTENCES)
    n_train = sum(len(s) + 1 for s in SENTENCES if s not in held_out)
    with pytest.raises(ValueError) as info:
        load_windows(ByteTokenizer(), 4096, data_path=path)
    message = str(info.value)
    assert f"the {n_train} tokens of the 'train' split of {path}" in message
    assert "one window needs 4096 tokens" in message


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b" \n\n\t\n", "is empty"),
        (b"text\x00\x01binary", "looks binary"),
        ("caf\u00e9 au lait\nline two\n".encode("latin-1"), "is not UTF-8 text"),
    ],
)
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".raw"])
def test_unreadable_files_are_named(
    tmp_path: Path, content: bytes, match: str, suffix: str
) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(CorpusFormatError, match=match) as info:
        load_windows(ByteTokenizer(), 8, data_path=path)
    assert str(path) in str(info.value)


def test_unreadable_file_in_a_folder_is_named(tmp_path: Path) -> None:
    _write(tmp_path / "docs" / "a.txt", "fine")
    (tmp_path / "docs" / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(CorpusFormatError, match=r"b\.txt is not UTF-8"):
        load_windows(ByteTokenizer(), 8, data_path=tmp_path / "docs")


def test_jsonl_errors_give_line_and_fields(tmp_path: Path) -> None:
    good = json.dumps({"text": "a b c"})
    path = _write(tmp_path / "rows.jsonl", f"{good}\n\n{json.dumps({'id': 1, 'body': 'x'})}\n")
    with pytest.raises(CorpusFormatError, match=r"line 3 has no field 'text'; .*\['body', 'id'\]"):
        load_windows(ByteTokenizer(), 4, data_path=path)
    for line, match in (("{not json", "line 2 is not valid JSON"), ("[1, 2]", "JSON list")):
        _write(path, f"{good}\n{line}\n")
        with pytest.raises(CorpusFormatError, match=match):
            load_windows(ByteTokenizer(), 4, data_path=path)
    _write(path, f'{good}\n{{"text": 3}}\n')
    with pytest.raises(CorpusFormatError, match="line 2: field 'text' holds a int"):
        load_windows(ByteTokenizer(), 4, data_path=path)


def test_text_without_headings_as_wikitext(tmp_path: Path) -> None:
    path = _lines_file(tmp_path)
    raw = _write(tmp_path / "plain.raw", path.read_text())
    for corpus, data_path in (("wikitext-103", path), ("wikitext-2", raw)):
        with pytest.raises(CorpusFormatError) as info:
            load_windows(ByteTokenizer(), 8, corpus=corpus, data_path=data_path)
        message = str(info.value)
        assert f"{data_path} is not WikiText" in message and "' = Title = '" in message
        assert "corpus='text'" in message and "corpus='jsonl'" in message


@pytest.mark.parametrize("max_windows", [0, -3, 2.5, "4", True])
def test_bad_max_windows(tmp_path: Path, max_windows: object) -> None:
    with pytest.raises(ValueError, match="max_windows"):
        load_windows(ByteTokenizer(), 8, data_path=_lines_file(tmp_path), max_windows=max_windows)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, "0.2", None])
def test_bad_eval_fraction(tmp_path: Path, fraction: object) -> None:
    with pytest.raises(ValueError, match="eval_fraction"):
        load_windows(ByteTokenizer(), 8, data_path=_lines_file(tmp_path), eval_fraction=fraction)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("one.txt", "a single line\n"),
        ("only.raw", " = Only = \n one article \n"),
        ("one.jsonl", '{"text": "x"}'),
    ],
)
def test_fewer_than_two_documents(tmp_path: Path, name: str, text: str) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(CorpusFormatError, match=r"holds 1 document\(s\).*at least 2"):
        load_windows(ByteTokenizer(), 2, data_path=path)


def test_bad_source_arguments(tmp_path: Path) -> None:
    path = _lines_file(tmp_path)
    with pytest.raises(ValueError, match=r"unknown corpus 'ptb'.*'jsonl', 'folder', 'hf:"):
        load_windows(ByteTokenizer(), 8, corpus="ptb", data_path=path)
    with pytest.raises(ValueError, match="corpus='text' needs data_path="):
        load_windows(ByteTokenizer(), 8, corpus="text")
    with pytest.raises(DataNotFoundError, match="corpus='folder' needs data_path= a folder"):
        load_windows(ByteTokenizer(), 8, corpus="folder", data_path=path)
    with pytest.raises(DataNotFoundError, match="missing.txt' does not exist"):
        load_windows(ByteTokenizer(), 8, data_path=tmp_path / "missing.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataNotFoundError, match="neither wiki.test.raw .* nor .txt files"):
        load_windows(ByteTokenizer(), 8, data_path=tmp_path / "nothing")
    with pytest.raises(ValueError, match="text_field"):
        load_windows(ByteTokenizer(), 8, data_path=path, text_field="")
    with pytest.raises(ValueError, match="seq_len"):
        load_windows(ByteTokenizer(), 1, data_path=path)
    with pytest.raises(ValueError, match="unknown split"):
        load_windows(ByteTokenizer(), 8, split="test", data_path=path)
