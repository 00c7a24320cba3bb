"""The synchronous engine core: add requests, abort them, and `step()` = schedule -> run -> update.

Thread safety: one thread calls `step()`; other threads may call add_request / abort / release / fork /
kv_info / stats. A lock covers the bookkeeping (scheduling, updating, session calls) but not the forward pass.
Aborts are applied at the start of the next step, so a request never leaves mid-forward. Blocks freed while a
forward runs (a released session) are only reallocated by the next `schedule()`, after the forward.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from serving.config import EngineConfig
from serving.engine.attention_backend import AttentionBackend
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.disk_kv import FORMAT, DiskKVStore
from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.model_runner import ModelRunner, kv_shape
from serving.engine.request import Request
from serving.engine.sampler import make_generator
from serving.engine.scheduler import Scheduler, SchedulerOutput
from serving.engine.token_ids import eos_token_ids, validate_request
from serving.engine.types import FinishReason, GenerationChunk, GenerationRequest, KVInfo
from serving.models import LoadedModel


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        backend: AttentionBackend | None = None,
        kv_dir: Path | None = None,
    ) -> None:
        self.runner = ModelRunner(loaded, config, backend)
        self.disk: DiskKVStore | None = None
        if kv_dir is not None and config.disk_cache_memory > 0:
            shape = kv_shape(loaded.model.config)  # (layers, kv_heads, head_dim)
            identity = f"{FORMAT}|{loaded.name}|{loaded.dtype}|block={config.block_size}|kv={shape}"
            self.disk = DiskKVStore(kv_dir, config.disk_cache_memory, identity, config.block_size, self.runner)
        windows = [layer.window for layer in self.runner.layers if layer.window is not None]
        self.kv_manager = KVCacheManager(
            self.runner.num_device_blocks,
            self.runner.num_host_blocks,
            config.block_size,
            self.runner,
            self.disk,
            # KV behind the window is freed only where no layer reads it: every layer sliding
            window=max(windows) if len(windows) == len(self.runner.layers) else None,
            grace_s=config.kv_grace_s,
        )
        self.scheduler = Scheduler(
            self.kv_manager, config.max_batch_size, config.max_batch_tokens, max_wait_s=config.max_wait_s
        )
        self.tokenizer = loaded.tokenizer
        self.eos = eos_token_ids(loaded.tokenizer, loaded.model)
        embeddings = loaded.model.get_input_embeddings()
        assert isinstance(embeddings.weight, torch.Tensor)
        self.vocab_size = int(embeddings.weight.shape[0])
        limits: list[int | None] = [self.runner.num_device_blocks * config.block_size]
        limits += [config.max_model_len, getattr(loaded.model.config, "max_position_embeddings", None)]
        self.max_context_tokens = min(int(x) for x in limits if x)
        self.requests: dict[str, Request] = {}
        self.lock = threading.RLock()
        self._aborts: set[str] = set()
        self.counters = {"steps": 0, "step_s": 0.0, "tokens": 0, "prompt_tokens": 0, "cached_tokens": 0}
        self.counters |= {"generated_tokens": 0, "preemptions": 0}

    # ------------------------------------------------------------------------------------------ requests

    def add_request(self, spec: GenerationRequest) -> None:
        """Queue a request; raises ValueError for one that can never run."""
        validate_request(spec, self.max_context_tokens, self.vocab_size)
        ids, params = list(spec.prompt_token_ids), spec.params
        request = Request(
            spec.request_id, ids, params, cache_key=spec.cache_key, kv_policy=spec.kv_policy, timing=spec.timing
        )
        request.arrival_s = time.monotonic()
        request.max_tokens = min(len(ids) + params.max_new_tokens, self.max_context_tokens)
        request.generator = make_generator(params, self.runner.device)
        request.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop, prompt_ids=ids)
        with self.lock:
            if spec.request_id in self.requests:
                raise ValueError(f"request id {spec.request_id!r} is already running")
            self.requests[spec.request_id] = request
            self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        """Cancel at the next step (a queued request never runs); its stream ends with 'cancelled'."""
        with self.lock:
            if request_id in self.requests:
                self._aborts.add(request_id)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
        self.runner.close()

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborts)

    def step(self) -> list[GenerationChunk]:
        started = time.monotonic()  # the clock of Request.arrival_s, so a request's queueing ends here
        with self.lock:
            outputs = self._apply_aborts()
            out = self.scheduler.schedule()
        if not out.is_empty:
            scheduled = time.monotonic()
            tokens = self.runner.execute(out)
            self._time_step(out, started, scheduled - started)
            with self.lock:
                outputs += self._update(out, tokens)
        self._count(out, started)
        return outputs

    def fail_all(self) -> list[str]:
        """After an error in a step: end every request (their KV up to the last good step is kept)."""
        with self.lock:
            ids = list(self.requests)
            for request_id in ids:
                self._finish(self.requests[request_id], "cancelled")
            self._aborts.clear()
            return ids

    # ------------------------------------------------------------------------------------------ sessions

    def release(self, cache_key: str) -> None:
        with self.lock:
            self.kv_manager.release(cache_key)

    def fork(self, source_key: str, target_key: str) -> None:
        with self.lock:
            self.kv_manager.fork(source_key, target_key)

    def cache_keys(self) -> list[str]:
        with self.lock:
            keys = list(self.kv_manager.sessions)
        return list(dict.fromkeys(keys + (self.disk.keys() if self.disk else [])))

    def persist(self, timeout_s: float) -> bool:
        """Write every idle session's KV to the disk tier and wait (up to timeout_s) until it is on disk."""
        if self.disk is None:
            return True
        with self.lock:
            self.kv_manager.persist()
        return self.disk.flush(timeout_s)

    def kv_info(self, cache_key: str) -> KVInfo:
        with self.lock:
            tier, tokens = self.kv_manager.session_info(cache_key)
        return KVInfo(tier=tier, tokens=tokens)

    def stats(self) -> dict[str, float]:
        with self.lock:
            tiers = [s.tier if s.request is None else "busy" for s in self.kv_manager.sessions.values()]
            return {
                **self.counters,
                **self.runner.timings,
                **self.kv_manager.counters,
                **(self.disk.counters if self.disk else {}),
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "device_blocks_used": self.kv_manager.device.num_used,
                "device_blocks_total": self.kv_manager.device.num_blocks,
                "host_blocks_used": self.kv_manager.host.num_used,
                "host_blocks_total": self.kv_manager.host.num_blocks,
                "block_size": self.kv_manager.block_size,
                **{f"sessions_{tier}": tiers.count(tier) for tier in ("device", "host", "disk", "none", "busy")},
            }

    # ------------------------------------------------------------------------------------------ internals

    def _apply_aborts(self) -> list[GenerationChunk]:
        outputs = []
        for request_id in sorted(self._aborts):
            request = self.requests[request_id]
            assert request.detokenizer is not None, "set by add_request"
            text = request.detokenizer.flush()
            outputs.append(self._output(request, [], text, "cancelled"))
            self._finish(request, "cancelled")
        self._aborts.clear()
        return outputs

    def _update(self, out: SchedulerOutput, tokens: dict[str, int]) -> list[GenerationChunk]:
        outputs = []
        for request in self.scheduler.update(out):
            token = tokens[request.request_id]
            if request.request_id in self._aborts:
                continue  # cancelled during the forward pass: ends at the next step, without this token
            request.all_token_ids.append(token)
            finish: FinishReason | None = None
            detok = request.detokenizer
            assert detok is not None, "set by add_request"
            detok_started = time.perf_counter()
            if token in self.eos and not request.params.ignore_eos:
                text, finish = detok.flush(), "stop"
            else:
                text = detok.add(token)
                if detok.stopped:
                    finish = "stop"
                elif request.num_tokens >= request.max_tokens:
                    text, finish = text + detok.flush(), "length"
            if request.timing is not None:
                request.timing.detok_s += time.perf_counter() - detok_started
            outputs.append(self._output(request, [token], text, finish))
            if finish is not None:
                self._finish(request, finish)
        return outputs

    def _output(
        self, request: Request, token_ids: list[int], text: str, finish: FinishReason | None
    ) -> GenerationChunk:
        return GenerationChunk(
            request.request_id,
            token_ids,
            text,
            finish,
            request.num_prompt_tokens,
            request.num_cached_tokens,
            request.kv_source,
            request.kv_stale,
        )

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.finish_reason = reason
        self.scheduler.remove(request)
        del self.requests[request.request_id]
        self.counters["prompt_tokens"] += request.num_prompt_tokens
        self.counters["cached_tokens"] += request.num_cached_tokens
        self.counters["generated_tokens"] += request.num_output_tokens

    def _time_step(self, out: SchedulerOutput, started: float, schedule_s: float) -> None:
        """Charge this step's phases to every timed request in it (a batched step costs each of them in full)."""
        prepare_s, forward_s, sample_s = self.runner.last_step
        for request in out.requests:
            timing = request.timing
            if timing is None:
                continue
            if not request.started:
                request.started = True
                timing.queue_s = started - request.arrival_s
            timing.schedule_s += schedule_s
            timing.prepare_s += prepare_s
            timing.forward_s += forward_s
            timing.sample_s += sample_s

    def _count(self, out: SchedulerOutput, started: float) -> None:
        if out.is_empty:
            return
        self.counters["steps"] += 1
        self.counters["step_s"] += time.monotonic() - started
        self.counters["tokens"] += out.total_tokens
        self.counters["preemptions"] += len(out.preempted_ids)
