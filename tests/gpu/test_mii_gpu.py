"""`engine.kind: mii` for real: DeepSpeed's InferenceEngineV2 on CUDA (gpu-marked; skipped without CUDA or
without the `[mii]` extra). Until this has passed on a GPU, the README calls the mii engine experimental."""

from __future__ import annotations

import random

import pytest
import torch

from serving.config import EngineConfig, ModelConfig
from serving.engine.mii_engine import MiiCore, load_fastgen
from serving.engine.types import GenerationRequest, SamplingParams
from serving.models import SMOLLM2_RANDOM, load_model
from tests.support import logit_gap

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: none is visible to torch here"),
]
TOLERANCE = 0.15  # as BF16_LOGIT_TOLERANCE in test_cuda_engine.py: FastGen's kernels are not transformers'


def test_fastgen_sessions_reuse_kv_across_turns(tmp_path):
    pytest.importorskip("deepspeed.inference.v2", reason="the [mii] extra (deepspeed-mii) is not installed")
    loaded = load_model(ModelConfig(name=SMOLLM2_RANDOM, device="cuda", dtype="bfloat16"))
    loaded.model.save_pretrained(tmp_path)  # FastGen loads a Hugging Face checkpoint folder
    loaded.tokenizer.save_pretrained(tmp_path)
    core = MiiCore(load_fastgen(tmp_path, EngineConfig()), loaded.tokenizer, loaded.model, 2048)
    rng = random.Random(0)
    prompt = [rng.randrange(100, 49000) for _ in range(200)]

    def turn(request_id: str, ids: list[int]) -> tuple[list[int], int]:
        core.add_request(GenerationRequest(request_id, ids, SamplingParams(max_new_tokens=8, ignore_eos=True), "s"))
        out, cached = [], -1
        while core.has_work():
            for chunk in core.step():
                out += chunk.token_ids
                cached = chunk.cached_tokens
        return out, cached

    first, cached = turn("t1", prompt)
    assert cached == 0 and logit_gap(loaded, prompt, first) <= TOLERANCE
    second_ids = [*prompt, *first, 5, 6, 7]
    second, cached = turn("t2", second_ids)
    assert cached == len(prompt) + len(first) - 1  # the uid kept its KV: only the new tail was put
    assert logit_gap(loaded, second_ids, second) <= TOLERANCE
    core.close()
