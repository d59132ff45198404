"""Tests for drrl_env.data with WikiText: parsing, local lookup, article splits, token windows."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import pytest

from drrl_env import data, hub
from drrl_env.data import (
    CORPORA,
    SPLITS,
    Article,
    DataNotFoundError,
    WindowSet,
    find_local_corpus,
    load_articles,
    load_windows,
    make_windows,
    parse_wikitext,
    split_articles,
    wikitext,
)

REAL_FILE = wikitext.SHARED_DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"

CANONICAL = (
    " = Alpha = \n"
    " \n"
    " Alpha is the first letter . \n"
    " \n"
    " = = History = = \n"
    " \n"
    " It came from Phoenician . \n"
    " \n"
    " = = = Early = = = \n"
    " Old forms . \n"
    " \n"
    " =  Beta Ray ( film )  = \n"
    " \n"
    " Beta follows alpha . \n"
    " \n"
)
EXPECTED = [
    Article(
        "Alpha",
        "Alpha is the first letter .\n= = History = =\nIt came from Phoenician .\n"
        "= = = Early = = =\nOld forms .",
    ),
    Article("Beta Ray ( film )", "Beta follows alpha ."),
]


class ByteTokenizer:
    """UTF-8 bytes as token ids."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))


def _crlf_no_blanks(text: str) -> str:
    return "".join(line + "\r\n" for line in text.split("\n") if line.strip())


def _articles(n: int, words: int = 20) -> list[Article]:
    return [Article(f"Title {i}", " ".join([f"w{i}"] * words)) for i in range(n)]


def _stream(articles: list[Article]) -> list[int]:
    tok = ByteTokenizer()
    return [t for a in articles for t in tok.encode(f"{a.title}\n{a.text}")]


def _write_corpus(folder: Path, name: str = "wiki.test.raw", titles: tuple = ("A", "B")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(f" = {t} = \n body of {t} . \n" for t in titles), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Window caches go to a fresh folder per test."""
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def no_shared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No environment folder and no shared folder."""
    monkeypatch.delenv("DRRL_DATA_DIR", raising=False)
    monkeypatch.setattr(wikitext, "SHARED_DATA_DIR", tmp_path / "no-shared")


@pytest.fixture
def real_articles() -> list[Article]:
    if not REAL_FILE.is_file():
        pytest.skip("shared WikiText-2 test file not present")
    return load_articles(data_path=REAL_FILE)


# --- parsing -------------------------------------------------------------------------------


def test_parse_canonical_layout() -> None:
    assert parse_wikitext(CANONICAL) == EXPECTED


def test_parse_crlf_without_blank_lines_is_identical() -> None:
    variant = _crlf_no_blanks(CANONICAL)
    assert "\r\n" in variant and "\r\n\r\n" not in variant
    assert parse_wikitext(variant) == parse_wikitext(CANONICAL)


def test_parse_sections_are_not_boundaries() -> None:
    text = " = Only = \n = = Section one = = \n a \n = = Section two = = \n b \n"
    (article,) = parse_wikitext(text)
    assert article.title == "Only"
    assert article.text == "= = Section one = =\na\n= = Section two = =\nb"


def test_parse_leading_whitespace_ignored_and_empty_text() -> None:
    assert parse_wikitext("\n \r\n = T = \n") == [Article("T", "")]
    assert parse_wikitext("") == []


def test_parse_rejects_text_before_first_title() -> None:
    with pytest.raises(ValueError, match="before the first"):
        parse_wikitext("preamble\n = T = \n body\n")


def test_parse_lines_that_merely_start_with_equals_are_body() -> None:
    (article,) = parse_wikitext(" = T = \n = Qualified for the next round \n x = \n")
    assert article.text == "= Qualified for the next round\nx ="


# --- split ---------------------------------------------------------------------------------


def test_split_disjoint_cover_and_size() -> None:
    arts = _articles(10)
    train, ev = split_articles(arts, "train"), split_articles(arts, "eval")
    assert len(ev) == 2 and len(train) == 8
    assert {a.title for a in train}.isdisjoint(a.title for a in ev)
    assert sorted(train + ev, key=arts.index) == arts
    assert train == [a for a in arts if a in train]  # original order kept


def test_split_independent_of_order() -> None:
    arts = _articles(25)
    shuffled = random.Random(0).sample(arts, len(arts))
    for split in SPLITS:
        assert set(split_articles(arts, split)) == set(split_articles(shuffled, split))


def test_split_ties_on_title_broken_by_text() -> None:
    arts = [Article("Same", "one"), Article("Same", "two"), Article("Other", "x")]
    ev = split_articles(arts, "eval", eval_fraction=0.3)
    assert ev == split_articles(arts[::-1], "eval", eval_fraction=0.3)
    assert len(ev) == 1


def test_split_keeps_one_train_article() -> None:
    assert len(split_articles(_articles(2), "train", eval_fraction=0.99)) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="eval_fraction"):
        split_articles(_articles(5), "eval", eval_fraction=fraction)


def test_split_rejects_unknown_split_and_tiny_corpus() -> None:
    with pytest.raises(ValueError, match="'train', 'eval'"):
        split_articles(_articles(5), "test")
    with pytest.raises(ValueError, match="at least 2"):
        split_articles(_articles(1), "train")


# --- windows -------------------------------------------------------------------------------


def test_make_windows_are_consecutive_slices() -> None:
    arts = _articles(3)
    stream = _stream(arts)
    seq_len = 16
    windows = make_windows(arts, ByteTokenizer(), seq_len)
    n = len(stream) // seq_len
    assert len(stream) % seq_len != 0  # a tail exists and is dropped
    assert windows.shape == (n, seq_len) and windows.dtype == np.int64
    np.testing.assert_array_equal(windows.ravel(), stream[: n * seq_len])


def test_make_windows_max_windows_keeps_first() -> None:
    arts = _articles(3)
    full = make_windows(arts, ByteTokenizer(), 8)
    first = make_windows(arts, ByteTokenizer(), 8, max_windows=3)
    np.testing.assert_array_equal(first, full[:3])
    assert make_windows(arts, ByteTokenizer(), 8, max_windows=10_000).shape == full.shape
    with pytest.raises(ValueError, match="max_windows"):
        make_windows(arts, ByteTokenizer(), 8, max_windows=0)


def test_make_windows_too_short_and_bad_seq_len() -> None:
    arts = [Article("T", "abc")]  # "T\nabc" is 5 bytes
    with pytest.raises(ValueError, match=r"seq_len=6.*5 tokens"):
        make_windows(arts, ByteTokenizer(), 6)
    assert make_windows(arts, ByteTokenizer(), 5).shape == (1, 5)
    with pytest.raises(ValueError, match="seq_len"):
        make_windows(arts, ByteTokenizer(), 1)


def test_load_windows_from_folder(tmp_path: Path, no_shared: None) -> None:
    _write_corpus(tmp_path / "wikitext-2-raw", titles=tuple(f"T{i}" for i in range(10)))
    arts = load_articles(data_path=tmp_path)
    for split in SPLITS:
        ws = load_windows(ByteTokenizer(), 4, split=split, data_path=tmp_path, max_windows=5)
        assert isinstance(ws, WindowSet) and len(ws) == 5
        assert (ws.corpus, ws.split, ws.seq_len) == ("wikitext-2", split, 4)
        expected = make_windows(split_articles(arts, split), ByteTokenizer(), 4, max_windows=5)
        np.testing.assert_array_equal(ws.tokens, expected)
    with pytest.raises(ValueError, match="unknown split"):
        load_windows(ByteTokenizer(), 4, split="valid", data_path=tmp_path)


# --- local lookup --------------------------------------------------------------------------


def test_find_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _write_corpus(tmp_path / "explicit")
    env_file = _write_corpus(tmp_path / "env" / "wikitext-2-raw")
    shared_file = _write_corpus(tmp_path / "shared" / "wikitext-2-raw")
    monkeypatch.setattr(wikitext, "SHARED_DATA_DIR", tmp_path / "shared")
    monkeypatch.setenv("DRRL_DATA_DIR", str(tmp_path / "env"))
    assert find_local_corpus(data_path=tmp_path / "explicit") == explicit
    assert find_local_corpus(data_path=str(explicit)) == explicit
    assert find_local_corpus() == env_file
    monkeypatch.setenv("DRRL_DATA_DIR", str(tmp_path / "empty-env"))
    assert find_local_corpus() == shared_file
    monkeypatch.delenv("DRRL_DATA_DIR")
    assert find_local_corpus() == shared_file
    assert find_local_corpus("wikitext-103") is None


def test_find_corpus_specific_subfolder(tmp_path: Path, no_shared: None) -> None:
    big = _write_corpus(tmp_path / "wikitext-103-raw")
    small = _write_corpus(tmp_path / "wikitext-2-raw")
    assert find_local_corpus("wikitext-103", tmp_path) == big
    assert find_local_corpus("wikitext-2", tmp_path) == small
    assert find_local_corpus() is None


def test_find_explicit_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError, match="nowhere"):
        find_local_corpus(data_path=missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="empty"):
        find_local_corpus(data_path=tmp_path / "empty")


def test_unknown_corpus_lists_corpora(tmp_path: Path) -> None:
    for call in (find_local_corpus, load_articles):
        with pytest.raises(ValueError, match="wikitext-103"):
            call("wikitext-7", tmp_path)
    with pytest.raises(ValueError, match="wikitext-2"):
        load_windows(ByteTokenizer(), 8, corpus="ptb")
    assert set(CORPORA) == {"wikitext-2", "wikitext-103"}


# --- load_articles -------------------------------------------------------------------------


def test_load_articles_picks_hub_split_file(tmp_path: Path, no_shared: None) -> None:
    _write_corpus(tmp_path, "wiki.test.raw", ("Test",))
    _write_corpus(tmp_path, "wiki.valid.raw", ("Valid",))
    assert [a.title for a in load_articles(data_path=tmp_path)] == ["Test"]
    assert [a.title for a in load_articles(data_path=tmp_path, hub_split="validation")] == ["Valid"]
    assert [a.title for a in load_articles(data_path=tmp_path, hub_split="train")] == ["Test"]
    explicit = load_articles(data_path=tmp_path / "wiki.test.raw", hub_split="validation")
    assert [a.title for a in explicit] == ["Test"]
    with pytest.raises(ValueError, match="hub_split"):
        load_articles(data_path=tmp_path, hub_split="dev")


def test_load_articles_crlf_file(tmp_path: Path) -> None:
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(_crlf_no_blanks(CANONICAL).encode("utf-8"))
    assert load_articles(data_path=path) == EXPECTED


def test_load_articles_empty_corpus(tmp_path: Path) -> None:
    path = tmp_path / "wiki.test.raw"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="wiki.test.raw is empty"):
        load_articles(data_path=path)


def test_offline_without_local_data_fails_fast(
    no_shared: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataNotFoundError) as info:
        load_articles()
    assert time.monotonic() - start < 5
    assert "data_path" in str(info.value) and "DRRL_DATA_DIR" in str(info.value)


def test_unreachable_hub_fails_without_load_dataset(
    no_shared: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(hub, "hub_reachable", lambda *args: False)
    monkeypatch.setattr(datasets, "load_dataset", pytest.fail)
    with pytest.raises(DataNotFoundError, match="DRRL_DATA_DIR"):
        load_articles("wikitext-103")


def test_datasets_offline_var_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    monkeypatch.setattr(hub, "_probe", pytest.fail)
    assert not data.hub_reachable()


# --- real corpus ---------------------------------------------------------------------------


def test_real_file_has_62_articles(real_articles: list[Article]) -> None:
    assert len(real_articles) == 62
    assert real_articles[0].title == "Robert Boulter"
    assert len({a.title for a in real_articles}) == 62
    assert all(a.text and "\r" not in a.text for a in real_articles)


def test_real_split_deterministic_disjoint_order_free(real_articles: list[Article]) -> None:
    train, ev = (split_articles(real_articles, s) for s in SPLITS)
    assert len(ev) == math.ceil(0.2 * 62) == 13 and len(train) == 49
    assert set(train).isdisjoint(ev) and set(train) | set(ev) == set(real_articles)
    assert ev == split_articles(real_articles, "eval")
    shuffled = random.Random(1).sample(real_articles, len(real_articles))
    assert set(split_articles(shuffled, "eval")) == set(ev)
    assert set(split_articles(shuffled, "train")) == set(train)


def test_real_windows_never_cross_split(real_articles: list[Article]) -> None:
    seq_len = 256
    for split in SPLITS:
        ws = load_windows(ByteTokenizer(), seq_len, split=split, data_path=REAL_FILE)
        own = split_articles(real_articles, split)
        stream = _stream(own)
        assert ws.tokens.shape == (len(stream) // seq_len, seq_len)
        np.testing.assert_array_equal(ws.tokens.ravel(), stream[: len(ws) * seq_len])
    train_titles = {a.title for a in split_articles(real_articles, "train")}
    assert train_titles.isdisjoint(a.title for a in split_articles(real_articles, "eval"))


def test_hub_rows_are_parsed(no_shared: None, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple] = []

    def fake_load_dataset(name: str, config: str, split: str) -> dict[str, list[str]]:
        calls.append((name, config, split))
        return {"text": [line + "\n" for line in CANONICAL.split("\n")[:-1]]}

    monkeypatch.setattr(hub, "hub_reachable", lambda *args: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_articles("wikitext-103", hub_split="validation") == EXPECTED
    assert calls == [("Salesforce/wikitext", "wikitext-103-raw-v1", "validation")]
