"""`sessionserve-http`: the real Ray Serve application over HTTP, driven the way an OpenAI user drives it.

Each turn is `chat.completions.create(stream=True)` from the `openai` client with the `x-session-id` header and
only the new user message; TTFT is the first content byte. Sessions are created (with their initial history)
through `POST /v1/sessions`, untimed. Same model, engine budget, threads and store kind as `sessionserve-local`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx

from benchmarks.systems.base import BenchContext, StreamEvent, Turn
from benchmarks.systems.served import final_event, served_config, split_history, store_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HTTPSystem:
    def __init__(self, name: str, context: BenchContext) -> None:
        self.name = name
        self.context = context
        self.store_dir = store_dir(name)
        self.app_name = f"bench-{name}"
        self.url = ""
        self._owns_ray = False
        self._http: httpx.AsyncClient | None = None
        self._openai: Any = None

    async def start(self) -> None:
        import ray
        from openai import AsyncOpenAI, Timeout
        from ray import serve

        from serving.server import cluster, direct_ingress
        from serving.server.builder import build_app

        config = served_config(self.context, self.store_dir)
        port = self.context.serve_port
        if port is None:  # our own cluster, started as `sessionserve serve` starts it
            port = _free_port()
            if self.context.ingress != "proxy" and ray.is_initialized():
                raise RuntimeError("direct ingress needs a Ray started here, after its variables are set")
            if problem := direct_ingress.prepare_local_ray(self.context.ingress, "127.0.0.1", port):
                raise RuntimeError(problem)
            self._owns_ray = not ray.is_initialized() and cluster.connect(None)
            serve.start(http_options=direct_ingress.http_options(self.context.ingress, "127.0.0.1", port))
        route = f"/{self.app_name}"
        await asyncio.to_thread(serve.run, build_app(config), name=self.app_name, route_prefix=route)
        self.url = f"http://127.0.0.1:{port}{route}"
        timeout = httpx.Timeout(600.0, connect=10.0)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)
        await self._wait_ready()
        self._openai = AsyncOpenAI(  # its own HTTP library (httpx2) takes only its own Timeout
            base_url=f"{self.url}/v1", api_key="unused", timeout=Timeout(600.0, connect=10.0), max_retries=0
        )

    async def _wait_ready(self, timeout_s: float = 300) -> None:
        assert self._http is not None
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (response := await self._http.get("/ready")).status_code != 200:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{self.url} not ready after {timeout_s} s: {response.text[:300]}")
            await asyncio.sleep(0.5)

    async def begin_session(self, session_id: str, history: list[dict[str, str]]) -> None:
        assert self._http is not None, "start() first"
        system_prompt, messages = split_history(history)
        body = {"session_id": session_id, "system_prompt": system_prompt, "messages": messages}
        (await self._http.post("/v1/sessions", json=body)).raise_for_status()

    async def stream(self, session_id: str, turn: Turn) -> AsyncIterator[StreamEvent]:
        assert self._openai is not None, "start() first"
        chunks = await self._openai.chat.completions.create(
            model=self.context.loaded.name,
            messages=[{"role": "user", "content": turn.user}],
            max_tokens=turn.max_new_tokens,
            temperature=0.0,
            stream=True,
            extra_headers={"x-session-id": session_id},
            extra_body={"ignore_eos": self.context.ignore_eos},
        )
        async with chunks:
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield StreamEvent(text=chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    details = chunk.usage.prompt_tokens_details
                    cached = details.cached_tokens if details is not None else None
                    yield final_event(chunk.usage.prompt_tokens, chunk.usage.completion_tokens, cached or 0, None)

    async def end_session(self, session_id: str) -> None:
        if self._http is not None:
            (await self._http.delete(f"/v1/sessions/{session_id}")).raise_for_status()

    async def close(self) -> None:
        from ray import serve

        if self._openai is not None:
            await self._openai.close()
        if self._http is not None:
            await self._http.aclose()
        await asyncio.to_thread(serve.delete, self.app_name)
        if self._owns_ray:
            import ray

            from serving.server import direct_ingress

            serve.shutdown()
            ray.shutdown()
            # a later Ray in this process starts without direct ingress's variables again
            if self.context.ingress != "proxy":
                for name in direct_ingress.local_env(self.context.ingress, 0):
                    os.environ.pop(name, None)
        shutil.rmtree(self.store_dir, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        hops = {
            "proxy": "Ray Serve proxy -> Ingress (FastAPI) -> LLMServer replica",
            "direct": "Ingress replica (FastAPI, direct ingress) -> LLMServer replica",
            "replica": "Ingress replica holding the LLMServer (FastAPI, direct ingress; no hop)",
            "haproxy": "HAProxy -> Ingress replica (FastAPI, direct ingress) -> LLMServer replica",
        }
        return {
            "path": f"openai.AsyncOpenAI stream -> {hops[self.context.ingress]} "
            "-> SessionService (SQLite store) -> PagedEngine",
            "ingress": self.context.ingress,
            "session_header": "x-session-id",
            "store": "sqlite (temporary directory)",
            "ttft_measured": "submit -> first streamed chunk with content",
            "url": self.url,
        }
