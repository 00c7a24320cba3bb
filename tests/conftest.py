"""Shared, expensive fixtures: built once per test session."""

from __future__ import annotations

import pytest

from serving.config import ModelConfig
from serving.models import SMOLLM2, TINY_RANDOM, LoadedModel, load_model, prepare_smollm2


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded model converted to safetensors (once per machine, ~20 s)."""
    return prepare_smollm2()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir) -> LoadedModel:
    """The real SmolLM2-135M-Instruct, fp32 on the CPU."""
    return load_model(ModelConfig(name=SMOLLM2, device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def tiny_model(smollm2_dir) -> LoadedModel:
    """A 2-layer random Llama with SmolLM2's tokenizer: fast, for mechanics only."""
    return load_model(ModelConfig(name=TINY_RANDOM, device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
