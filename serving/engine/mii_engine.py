"""`engine.kind: mii` (experimental): DeepSpeed-MII's FastGen engine behind the same `Engine` protocol.

FastGen's engine is DeepSpeed's `InferenceEngineV2` (what `mii.pipeline` wraps): `put(uids, tokens)` runs one
ragged forward and returns each sequence's last logits; a uid's KV stays in the engine until `flush(uid)`. MII's
pipeline flushes when a request ends; `MiiCore` does not for a session: each session (cache key) keeps one uid,
and the next turn puts only the tokens past those already put (`plan_put`), so the KV carries across turns.
When the new prompt does not extend them (history edited) the uid is flushed and the prompt put whole; when the
KV pool is full, the least recently used idle session is flushed (its next turn re-prefills). `fork` gives the
target no KV (its first turn re-prefills): FastGen has no copy-on-write.

`PagedEngine` drives a `MiiCore` from its thread like it drives `LLMEngine`: same streaming, cancel and failure
handling. deepspeed-mii is the optional extra `[mii]`, imported when an engine is built; without CUDA the
build fails with a message naming what is needed. Sampling and stop handling are the paged engine's own.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from serving.config import EngineConfig, ModelConfig
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.paged_engine import PagedEngine
from serving.engine.sampler import make_generator, sample
from serving.engine.token_ids import common_prefix_length, eos_token_ids, validate_request
from serving.engine.types import FinishReason, GenerationChunk, GenerationRequest, KVInfo, SamplingParams

REQUIREMENT = "engine.kind mii needs a CUDA GPU and DeepSpeed-MII: pip install 'sessionserve[mii]'"


def plan_put(seen: list[int], prompt: list[int]) -> tuple[bool, list[int]]:
    """(flush first, tokens to put) for a turn whose uid already holds the KV of `seen`: only the new tail when
    the prompt extends `seen`; otherwise (edited history, or nothing new to compute) flush and put it whole."""
    if seen and len(prompt) > len(seen) and common_prefix_length(seen, prompt) == len(seen):
        return False, prompt[len(seen) :]
    return bool(seen), list(prompt)


@dataclass(slots=True)
class _Session:
    uid: int
    seen: list[int] = field(default_factory=list)  # tokens whose KV the uid holds, in order
    busy: bool = False


@dataclass(slots=True)
class _Active:
    spec: GenerationRequest
    uid: int
    pending: list[int]  # tokens to put at the next step (the prompt's uncached tail, then the last sampled token)
    cached: int
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    generated: int = 0
    aborted: bool = False


def finish_reason(
    token: int, detokenizer_stopped: bool, generated: int, context: int, params: SamplingParams, eos: frozenset[int],
    max_context: int,
) -> FinishReason | None:  # fmt: skip
    """Why a request ends after sampling `token` (None: it goes on): the paged engine's rules."""
    if token in eos and not params.ignore_eos:
        return "stop"
    if detokenizer_stopped:
        return "stop"
    if generated >= params.max_new_tokens or context >= max_context:
        return "length"
    return None


def load_fastgen(model_path: str | Path, config: EngineConfig) -> Any:
    """DeepSpeed's InferenceEngineV2 for a Hugging Face checkpoint folder (raises RuntimeError naming the need)."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"{REQUIREMENT} (no CUDA device is visible here)")
    try:
        from deepspeed.inference.v2 import RaggedInferenceEngineConfig, build_hf_engine
    except ImportError as error:
        raise RuntimeError(f"{REQUIREMENT} ({error})") from error
    engine_config = RaggedInferenceEngineConfig(
        state_manager={
            "max_ragged_batch_size": config.max_batch_tokens,
            "max_ragged_sequence_count": config.max_batch_size,
            "max_tracked_sequences": max(config.max_batch_size, 64) * 4,  # sessions hold uids between turns
        }
    )
    return build_hf_engine(str(model_path), engine_config)


def build_mii_engine(model: ModelConfig, config: EngineConfig) -> tuple[PagedEngine, Any]:
    """The served engine for `engine.kind: mii`, and the model's tokenizer (FastGen loads the weights itself)."""
    from transformers import AutoConfig

    from serving.model_files import load_tokenizer
    from serving.models import model_source

    fastgen = load_fastgen(model_source(model.name), config)
    tokenizer = load_tokenizer(model.name)
    hf_config = AutoConfig.from_pretrained(model_source(model.name))
    limits = [config.max_model_len, getattr(hf_config, "max_position_embeddings", None)]
    max_context = min(int(x) for x in limits if x)
    return PagedEngine(None, core=MiiCore(fastgen, tokenizer, hf_config, max_context)), tokenizer


class MiiCore:
    """The synchronous core (`StepCore`) over an InferenceEngineV2; `PagedEngine(None, core=MiiCore(...))`."""

    def __init__(self, engine: Any, tokenizer: Any, model: Any, max_context_tokens: int, device: str = "cuda") -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.eos = eos_token_ids(tokenizer, model)
        self.vocab_size = len(tokenizer)
        self.max_context_tokens = max_context_tokens
        self.device = device
        self.lock = threading.RLock()
        self.requests: dict[str, _Active] = {}
        self.sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self._uids = itertools.count(1)
        self.counters = {"steps": 0, "prompt_tokens": 0, "cached_tokens": 0, "flushed_sessions": 0}

    # ------------------------------------------------------------------------------------------ requests

    def add_request(self, spec: GenerationRequest) -> None:
        validate_request(spec, self.max_context_tokens, self.vocab_size)
        prompt = list(spec.prompt_token_ids)
        with self.lock:
            if spec.cache_key is None:
                uid, flush, pending = next(self._uids), False, prompt
            else:
                session = self.sessions.setdefault(spec.cache_key, _Session(next(self._uids)))
                if session.busy:
                    raise ValueError(f"session {spec.cache_key!r} already has a request running")
                self.sessions.move_to_end(spec.cache_key)
                flush, pending = plan_put(session.seen, prompt)
                if flush:
                    self.engine.flush(session.uid)
                    session.seen = []
                session.busy, uid = True, session.uid
            self.requests[spec.request_id] = _Active(
                spec, uid, pending, len(prompt) - len(pending),
                IncrementalDetokenizer(self.tokenizer, spec.params.stop, prompt_ids=prompt),
                make_generator(spec.params, self.device),
            )  # fmt: skip

    def abort(self, request_id: str) -> None:
        with self.lock:
            if request_id in self.requests:
                self.requests[request_id].aborted = True

    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[GenerationChunk]:
        with self.lock:
            outputs = [self._end(a, "cancelled", [], "") for a in list(self.requests.values()) if a.aborted]
            batch = self._schedule()
        if not batch:
            return outputs
        tokens = [torch.tensor(a.pending, dtype=torch.long) for a in batch]
        logits = self.engine.put([a.uid for a in batch], tokens)
        sampled = sample(logits.float(), [a.spec.params for a in batch], [a.generator for a in batch]).tolist()
        with self.lock:
            self.counters["steps"] += 1
            for active, token in zip(batch, sampled, strict=True):
                outputs.append(self._advance(active, token))
        return outputs

    def _schedule(self) -> list[_Active]:
        """Requests that fit this step: decodes first, then prefills, flushing idle sessions for room."""
        chosen: list[_Active] = []
        for active in sorted(self.requests.values(), key=lambda a: len(a.pending)):
            uids = [a.uid for a in (*chosen, active)]
            lengths = [len(a.pending) for a in (*chosen, active)]
            while not self._fits(uids, lengths) and self._flush_idle():
                pass
            if self._fits(uids, lengths):
                chosen.append(active)
        return chosen

    def _fits(self, uids: list[int], lengths: list[int]) -> bool:
        return str(self.engine.can_schedule(uids, lengths)).endswith("Success")

    def _flush_idle(self) -> bool:
        for key, session in self.sessions.items():
            if not session.busy and session.seen:
                self.engine.flush(session.uid)
                session.seen = []
                self.counters["flushed_sessions"] += 1
                self.sessions.move_to_end(key)
                return True
        return False

    def _advance(self, active: _Active, token: int) -> GenerationChunk:
        session = self.sessions.get(active.spec.cache_key or "")
        if session is not None and session.uid == active.uid:
            session.seen += active.pending
        active.generated += 1
        context = len(active.spec.prompt_token_ids) + active.generated
        detok = active.detokenizer
        stopping_eos = token in self.eos and not active.spec.params.ignore_eos
        text = detok.flush() if stopping_eos else detok.add(token)
        reason = finish_reason(
            token, detok.stopped, active.generated, context, active.spec.params, self.eos, self.max_context_tokens
        )
        if reason == "length":
            text += detok.flush()
        active.pending = [token]
        if reason is not None:
            return self._end(active, reason, [token], text)
        return self._chunk(active, [token], text, None)

    def _chunk(self, active: _Active, ids: list[int], text: str, reason: FinishReason | None) -> GenerationChunk:
        prompt = len(active.spec.prompt_token_ids)
        return GenerationChunk(active.spec.request_id, ids, text, reason, prompt, active.cached)

    def _end(self, active: _Active, reason: FinishReason, ids: list[int], text: str) -> GenerationChunk:
        del self.requests[active.spec.request_id]
        session = self.sessions.get(active.spec.cache_key or "")
        if session is not None and session.uid == active.uid:
            session.busy = False  # keeps its uid, and so its KV, for the next turn
        else:
            self.engine.flush(active.uid)  # a stateless request: free its KV now
        self.counters["prompt_tokens"] += len(active.spec.prompt_token_ids)
        self.counters["cached_tokens"] += active.cached
        return self._chunk(active, ids, text, reason)

    def fail_all(self) -> list[str]:
        with self.lock:
            ids = list(self.requests)
            for active in list(self.requests.values()):
                self._end(active, "cancelled", [], "")
            return ids

    # ------------------------------------------------------------------------------------------ sessions

    def release(self, cache_key: str) -> None:
        with self.lock:
            session = self.sessions.pop(cache_key, None)
            if session is not None:
                self.engine.flush(session.uid)

    def fork(self, source_key: str, target_key: str) -> None:
        with self.lock:
            self.release(target_key)  # FastGen has no copy-on-write: the fork's first turn re-prefills

    def cache_keys(self) -> list[str]:
        with self.lock:
            return [key for key, session in self.sessions.items() if session.seen]

    def kv_info(self, cache_key: str) -> KVInfo:
        with self.lock:
            session = self.sessions.get(cache_key)
            return KVInfo("device", len(session.seen)) if session and session.seen else KVInfo("none", 0)

    def stats(self) -> dict[str, float]:
        with self.lock:
            return {**self.counters, "running": len(self.requests), "sessions": len(self.cache_keys())}

    def persist(self, timeout_s: float) -> bool:
        """Nothing to write: this core has no disk tier (its KV lives in DeepSpeed's cache only)."""
        return True

    def close(self) -> None:
        with self.lock:
            for session in self.sessions.values():
                self.engine.flush(session.uid)
            self.sessions.clear()
