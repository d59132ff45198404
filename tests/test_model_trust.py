"""The model is never trusted: full-content fingerprints, config against weights, hub downloads.

Every model here is a tiny random one saved with ``save_pretrained`` into a temporary folder,
with a small word-level tokenizer; the hub and the embedded GGUF are stand-ins.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from drrl_env import hub
from drrl_env.lm import models
from drrl_env.lm.models import EMBEDDED_MODEL, ModelNotAvailableError, load_model, tiny_config

LAYER_KEY = {"tiny-gpt2": "n_layer", "tiny-llama": "num_hidden_layers"}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over single letters, built without any download."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"[UNK]": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def tiny_model(name: str = "tiny-gpt2") -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(name)).eval()


def save_tiny(folder: Path, name: str = "tiny-gpt2") -> PreTrainedModel:
    """A tiny random model and the word tokenizer, saved into ``folder``; the model."""
    model = tiny_model(name)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return model


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def flip_middle_byte(path: Path) -> None:
    """Change one byte in the middle of ``path``: same size, modification time restored."""
    before = path.stat()
    time.sleep(0.02)  # the edit's ctime lies on a later tick of the kernel's coarse clock
    with path.open("r+b") as handle:
        handle.seek(before.st_size // 2)
        byte = handle.read(1)[0]
        handle.seek(before.st_size // 2)
        handle.write(bytes([byte ^ 0x01]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.fixture(autouse=True)
def _offline_and_forgetful(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches the network; every test starts with no memoised digest."""
    monkeypatch.setattr(hub, "_probe", lambda url, timeout: "no network in tests")
    hub.clear_hub_cache()
    models.clear_digests()


# --- fingerprints hash full contents, once per process -------------------------------------


def test_same_size_mid_file_edit_with_mtime_restored_changes_fingerprint(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    save_tiny(folder)
    weights = folder / "model.safetensors"
    assert weights.stat().st_size > 4 * (1 << 16)  # the edit lies outside any head/tail sample
    before = models.model_fingerprint(str(folder))
    flip_middle_byte(weights)
    after = models.model_fingerprint(str(folder))  # same process: the memo must not hide it
    assert after != before
    models.clear_digests()  # a new process
    assert models.model_fingerprint(str(folder)) == after


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_valid_model_loads_and_its_fingerprint_is_stable_and_memoised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    folder = tmp_path / name
    reference = save_tiny(folder, name)
    if name == "tiny-llama":  # an old checkpoint's rotary buffer, which transformers ignores
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(32)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(str(folder))  # tied lm_head and rotary buffers are no mismatch
    expected = reference.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    ids = torch.randint(1, 27, (1, 10))
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)

    hashed: list[Path] = []
    real_hash = models._hash_file

    def counting_hash(path: Path, algorithm: str) -> str:
        hashed.append(path)
        return real_hash(path, algorithm)

    monkeypatch.setattr(models, "_hash_file", counting_hash)
    first = models.model_fingerprint(str(folder))
    files = {p for p in folder.iterdir() if p.suffix in (".json", ".safetensors")}
    assert {p.name for p in hashed} == {p.name for p in files}
    assert len(hashed) == len(files)  # each file read once
    assert models.model_fingerprint(str(folder)) == first
    assert len(hashed) == len(files)  # the second call hashed nothing


# --- config.json against the weights -------------------------------------------------------


def test_config_with_more_layers_than_the_weights_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    save_tiny(folder)  # 2 layers
    edit_config(folder, n_layer=3)
    with pytest.raises(ValueError) as info:
        load_model(str(folder))
    message = str(info.value)
    assert "12 tensor(s) the config needs are missing from the weights" in message
    assert "transformer.h.2.attn.c_attn.bias" in message and "(12 in all)" in message
    assert "randomly initialised" in message and "config.json" in message
    assert str(folder) in message


def test_config_with_fewer_layers_than_the_weights_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    save_tiny(folder)
    edit_config(folder, n_layer=1)
    with pytest.raises(ValueError) as info:
        load_model(str(folder))
    message = str(info.value)
    # 12 tensors per GPT-2 layer; GPT-2's ignore pattern "attn.bias" also hides c_attn.bias.
    assert re.search(r"1[12] tensor\(s\) in the weights have no place", message)
    assert "transformer.h.1." in message and "dropped" in message
    assert "missing" not in message
    assert "Check config.json" in message


def test_config_with_other_shapes_than_the_weights_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    save_tiny(folder)
    edit_config(folder, vocab_size=300)
    with pytest.raises(ValueError, match=r"another shape.*transformer\.wte\.weight \(256, 64\)"):
        load_model(str(folder))


# --- Hugging Face ids: downloaded before fingerprinting when online ------------------------


class StandInHub:
    """``snapshot_download`` over a folder standing in for a hub repository.

    The cache starts with only ``config.json`` (as an earlier config lookup leaves it); a
    download copies the repository's files that the patterns select.
    """

    def __init__(self, repository: Path, cache: Path) -> None:
        self.repository = repository
        self.snapshot = cache / "snapshots" / "0123abcd"
        self.snapshot.mkdir(parents=True)
        shutil.copy(repository / "config.json", self.snapshot)
        self.downloads: list[dict] = []

    def __call__(self, repo_id: str, *, local_files_only: bool = False, **options) -> str:
        if local_files_only:
            return str(self.snapshot)
        self.downloads.append({"repo_id": repo_id, **options})
        names = sorted(p.name for p in self.repository.iterdir() if p.is_file())
        names.append("onnx/model.onnx")  # a subfolder the download must leave alone
        allow, ignore = options.get("allow_patterns"), options.get("ignore_patterns")
        for selected in filter_repo_objects(names, allow_patterns=allow, ignore_patterns=ignore):
            shutil.copy(self.repository / selected, self.snapshot)
        return str(self.snapshot)


def test_uncached_hub_id_is_downloaded_when_online(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    save_tiny(repository)
    stand_in = StandInHub(repository, tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", stand_in)
    monkeypatch.setattr(hub, "hub_reachable", lambda *args: True)
    name = "someone/tiny-model"

    first = models.model_fingerprint(name)
    assert [d["repo_id"] for d in stand_in.downloads] == [name]
    assert "*.safetensors" in stand_in.downloads[0]["allow_patterns"]
    assert (stand_in.snapshot / "model.safetensors").is_file()
    monkeypatch.setattr(hub, "hub_reachable", lambda *args: False)  # now cached: no hub needed
    assert models.model_fingerprint(name) == first
    loaded = load_model(name)
    assert loaded.name == name and len(stand_in.downloads) == 1
    assert models.model_folder(name) == stand_in.snapshot


def test_failed_download_is_a_model_not_available_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(repo_id: str, *, local_files_only: bool = False, **options) -> str:
        raise OSError("not cached") if local_files_only else OSError("401 gated repository")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(hub, "hub_reachable", lambda *args: True)
    with pytest.raises(ModelNotAvailableError, match="could not be downloaded.*401 gated"):
        models.model_fingerprint("someone/gated-model")


def test_uncached_hub_id_offline_fails_fast_with_the_clear_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def cache_miss(repo_id: str, *, local_files_only: bool = False, **options) -> str:
        if not local_files_only:
            pytest.fail("offline: nothing may be downloaded")
        raise OSError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_miss)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    name = "someone/absent-model"
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as info:
        models.model_fingerprint(name)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert repr(name) in message and "unreachable" in message
    assert EMBEDDED_MODEL in message and "save_pretrained" in message and "download" in message


# --- the embedded model's fp32 copy is verified against its manifest -----------------------


@pytest.fixture
def stand_in_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A fake GGUF file and a fast stand-in for its dequantization; the file and the builds."""
    gguf = tmp_path / "package" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(bytes(range(256)) * 64)
    builds: list[Path] = []

    def dequantize(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
        builds.append(path)
        return tiny_model(), word_tokenizer()

    monkeypatch.setattr(models, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_dequantize_gguf", dequantize)
    return gguf, builds


def test_embedded_copy_is_reused_when_intact_and_rebuilt_when_edited_or_outdated(
    stand_in_gguf: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    gguf, builds = stand_in_gguf
    cache = tmp_path / "cache"
    copy = cache / "models" / EMBEDDED_MODEL
    reference = tiny_model()
    ids = torch.randint(1, 27, (1, 8))

    def logits_match() -> bool:
        loaded = load_model(EMBEDDED_MODEL, cache_dir=cache)
        logits = loaded.model(input_ids=ids).logits
        return torch.allclose(logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-6)

    assert logits_match() and len(builds) == 1
    assert (copy / models._MANIFEST).is_file()
    assert logits_match() and len(builds) == 1  # an intact copy is reused
    other = models.BLAKE2B if models.default_algorithm() == models.XXH3 else models.XXH3
    with pytest.MonkeyPatch.context() as patch:  # checked with the manifest's own hash
        patch.setattr(models, "default_algorithm", lambda: other)
        assert logits_match() and len(builds) == 1

    flip_middle_byte(copy / "model.safetensors")
    assert logits_match() and len(builds) == 2  # an edited copy is rebuilt, not served

    before = models.model_fingerprint(EMBEDDED_MODEL)
    flip_middle_byte(gguf)  # a new package release
    assert models.model_fingerprint(EMBEDDED_MODEL) != before
    assert logits_match() and len(builds) == 3  # a copy of another GGUF is rebuilt

    (copy / models._MANIFEST).unlink()  # a copy written before manifests existed
    assert logits_match() and len(builds) == 4
    assert sorted(p.name for p in copy.parent.iterdir()) == [
        EMBEDDED_MODEL,
        EMBEDDED_MODEL + ".lock",
    ]
