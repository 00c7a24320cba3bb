"""Python clients with one set of methods: SessionClient (HTTP) and LocalClient (in-process, no Ray).

`query` also takes DeepSpeed-MII's call shape, `query({"query": text}, session_id=..., max_new_tokens=...)`,
so MII session code works unchanged. SessionClient imports only httpx and the wire protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import queue
import threading
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from serving.server import protocol

if TYPE_CHECKING:
    from serving.config import Config
    from serving.server.api import SessionAPI

Prompt = str | dict[str, Any]
TurnEvent = str | protocol.QueryResponse  # stream_events: text pieces, then the turn's result


def _validated(model: type, **fields: Any) -> Any:
    """Build a request model, turning pydantic's error into the same 422 the server gives."""
    try:
        return model(**fields)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
        raise protocol.APIError(422, "invalid_request", f"invalid request: {problems}") from None


def _query_request(prompt: Prompt, stream: bool, params: dict[str, Any]) -> protocol.QueryRequest:
    if isinstance(prompt, dict):  # DeepSpeed-MII: {"query": text}
        if "query" not in prompt:
            raise protocol.APIError(422, "invalid_request", "a dict prompt needs a 'query' key (DeepSpeed-MII shape)")
        prompt = prompt["query"]
    return _validated(protocol.QueryRequest, prompt=prompt, stream=stream, **params)


def _create_request(
    session_id: str | None,
    system_prompt: str | None,
    messages: Sequence[dict],
    metadata: dict | None,
    kv: protocol.KVPolicyName | None,
) -> protocol.CreateSessionRequest:
    return _validated(
        protocol.CreateSessionRequest,
        session_id=session_id,
        system_prompt=system_prompt,
        messages=list(messages),
        metadata=metadata or {},
        kv=kv,
    )


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP  # update_session: leave this field as it is


class _SessionMethods:
    """What both clients validate the same way before their transport sends it."""

    def create_session(
        self,
        session_id: str | None = None,
        *,
        system_prompt: str | None = None,
        messages: Sequence[dict] = (),
        metadata: dict | None = None,
        kv: protocol.KVPolicyName | None = None,
    ) -> str:
        """`kv`: pinned, evictable or none (see protocol.CreateSessionRequest); None: the server's default."""
        return self._create(_create_request(session_id, system_prompt, messages, metadata, kv)).session_id

    def list_sessions(self, *, limit: int = 50, offset: int = 0) -> protocol.SessionList:
        """The caller's sessions, most recently active first; `next_offset` of the result pages on."""
        if not 1 <= limit <= 1000 or offset < 0:
            raise protocol.APIError(422, "invalid_request", "limit must be 1..1000 and offset >= 0")
        return self._list(limit, offset)

    def update_session(
        self, session_id: str, *, system_prompt: str | _Keep | None = KEEP, metadata: dict | None = None
    ) -> protocol.SessionInfo:
        """Set the system prompt (None clears it) and/or replace the metadata; what is left out stays."""
        fields: dict[str, Any] = {} if metadata is None else {"metadata": metadata}
        if not isinstance(system_prompt, _Keep):
            fields["system_prompt"] = system_prompt
        return self._update(session_id, _validated(protocol.UpdateSessionRequest, **fields))

    def stream(self, prompt: Prompt, *, session_id: str, **params: Any) -> Iterator[str]:
        """Yield the reply's text pieces as they are generated; leaving the loop early cancels the turn."""
        with contextlib.closing(self.stream_events(prompt, session_id=session_id, **params)) as events:
            for event in events:
                if isinstance(event, str):
                    yield event

    def stream_events(self, prompt: Prompt, *, session_id: str, **params: Any) -> Generator[TurnEvent, None, None]:
        """Text pieces, then the turn's QueryResponse (usage: cached tokens; timing: TTFT)."""
        raise NotImplementedError

    def _create(self, body: protocol.CreateSessionRequest) -> protocol.SessionInfo:
        raise NotImplementedError

    def _list(self, limit: int, offset: int) -> protocol.SessionList:
        raise NotImplementedError

    def _update(self, session_id: str, body: protocol.UpdateSessionRequest) -> protocol.SessionInfo:
        raise NotImplementedError


class SessionClient(_SessionMethods):
    """HTTP client for a sessionserve server."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 600):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise self._error(response)
        return response

    @staticmethod
    def _error(response: httpx.Response) -> protocol.APIError:
        try:
            detail = response.json()["error"]
            return protocol.APIError(response.status_code, detail["code"], detail["message"])
        except (ValueError, KeyError, TypeError):
            return protocol.APIError(response.status_code, "http_error", response.text[:500])

    def _create(self, body: protocol.CreateSessionRequest) -> protocol.SessionInfo:
        response = self._request("POST", "/v1/sessions", json=body.model_dump(exclude_none=True))
        return protocol.SessionInfo.model_validate(response.json())

    def _list(self, limit: int, offset: int) -> protocol.SessionList:
        response = self._request("GET", "/v1/sessions", params={"limit": limit, "offset": offset})
        return protocol.SessionList.model_validate(response.json())

    def _update(self, session_id: str, body: protocol.UpdateSessionRequest) -> protocol.SessionInfo:
        response = self._request("PATCH", f"/v1/sessions/{session_id}", json=body.model_dump(exclude_unset=True))
        return protocol.SessionInfo.model_validate(response.json())

    def session_info(self, session_id: str) -> protocol.SessionInfo:
        return protocol.SessionInfo.model_validate(self._request("GET", f"/v1/sessions/{session_id}").json())

    def destroy_session(self, session_id: str) -> None:
        self._request("DELETE", f"/v1/sessions/{session_id}")

    def fork(self, session_id: str, new_session_id: str | None = None) -> str:
        body = protocol.ForkSessionRequest(session_id=new_session_id).model_dump(exclude_none=True)
        response = self._request("POST", f"/v1/sessions/{session_id}/fork", json=body)
        return protocol.SessionInfo.model_validate(response.json()).session_id

    def query(self, prompt: Prompt, *, session_id: str, **params: Any) -> protocol.QueryResponse:
        body = _query_request(prompt, False, params)
        response = self._request("POST", f"/v1/sessions/{session_id}/query", json=body.model_dump())
        return protocol.QueryResponse.model_validate(response.json())

    def stream_events(self, prompt: Prompt, *, session_id: str, **params: Any) -> Generator[TurnEvent, None, None]:
        """Text pieces as the server streams them (Server-Sent Events), then the turn's QueryResponse."""
        body = _query_request(prompt, True, params)
        with self._http.stream("POST", f"/v1/sessions/{session_id}/query", json=body.model_dump()) as response:
            if response.status_code >= 400:
                response.read()
                raise self._error(response)
            event = ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                    if event == "delta":
                        yield data["text"]
                    elif event == "done":
                        yield protocol.QueryResponse.model_validate(data)
                    elif event == "error":
                        raise protocol.APIError(500, data["error"]["code"], data["error"]["message"])

    def warm(self, session_id: str) -> protocol.WarmResponse:
        """Bring the session's KV to the device ahead of its next turn; says from where and how long it took."""
        return protocol.WarmResponse.model_validate(self._request("POST", f"/v1/sessions/{session_id}/warm").json())

    def history(self, session_id: str, window: int | None = None) -> list[protocol.MessageOut]:
        params = {"window": window} if window is not None else {}
        response = self._request("GET", f"/v1/sessions/{session_id}/messages", params=params)
        return protocol.MessagesResponse.model_validate(response.json()).messages

    def append(self, session_id: str, messages: Sequence[dict]) -> list[protocol.MessageOut]:
        """Add messages without generating; the messages as stored (content parts joined), not the whole history."""
        body = _validated(protocol.AppendRequest, messages=list(messages))
        response = self._request("POST", f"/v1/sessions/{session_id}/messages", json=body.model_dump())
        return protocol.MessagesResponse.model_validate(response.json()).messages

    def clear(self, session_id: str) -> None:
        self._request("DELETE", f"/v1/sessions/{session_id}/messages")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SessionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalClient(_SessionMethods):
    """The same methods, in-process: loads the model here and runs the engine on a private event loop."""

    def __init__(self, config: Config | None = None) -> None:
        from serving.bootstrap import build_service
        from serving.config import Config
        from serving.server.api import SessionAPI

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sessionserve-local", daemon=True)
        self._thread.start()
        self.api: SessionAPI = SessionAPI(build_service(config or Config()))

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _create(self, body: protocol.CreateSessionRequest) -> protocol.SessionInfo:
        return self._run(self.api.create_session(body))

    def _list(self, limit: int, offset: int) -> protocol.SessionList:
        return self._run(self.api.list_sessions(limit, offset))

    def _update(self, session_id: str, body: protocol.UpdateSessionRequest) -> protocol.SessionInfo:
        return self._run(self.api.update_session(session_id, body))

    def session_info(self, session_id: str) -> protocol.SessionInfo:
        return self._run(self.api.get_session(session_id))

    def destroy_session(self, session_id: str) -> None:
        self._run(self.api.destroy_session(session_id))

    def fork(self, session_id: str, new_session_id: str | None = None) -> str:
        return self._run(
            self.api.fork_session(session_id, protocol.ForkSessionRequest(session_id=new_session_id))
        ).session_id

    def query(self, prompt: Prompt, *, session_id: str, **params: Any) -> protocol.QueryResponse:
        return self._run(self.api.query(session_id, _query_request(prompt, False, params)))

    def stream_events(self, prompt: Prompt, *, session_id: str, **params: Any) -> Generator[TurnEvent, None, None]:
        """Text pieces as they are generated, then the turn's QueryResponse; leaving early cancels the turn."""
        request = _query_request(prompt, True, params)
        pieces: queue.Queue[Any] = queue.Queue()
        done = object()

        async def pump(events: AsyncIterator[TurnEvent]) -> None:
            try:
                async for event in events:
                    pieces.put(event)
            except BaseException as error:  # handed to the consuming thread
                pieces.put(error)
            finally:
                pieces.put(done)

        task = asyncio.run_coroutine_threadsafe(pump(self.api.query_stream(session_id, request)), self._loop)
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()

    def warm(self, session_id: str) -> protocol.WarmResponse:
        """Bring the session's KV to the device ahead of its next turn; says from where and how long it took."""
        return self._run(self.api.warm(session_id))

    def history(self, session_id: str, window: int | None = None) -> list[protocol.MessageOut]:
        if window is not None and window < 1:
            raise protocol.APIError(422, "invalid_request", "window must be at least 1")
        return self._run(self.api.messages(session_id, window)).messages

    def append(self, session_id: str, messages: Sequence[dict]) -> list[protocol.MessageOut]:
        """Add messages without generating; the messages as stored (content parts joined), not the whole history."""
        body = _validated(protocol.AppendRequest, messages=list(messages))
        return self._run(self.api.append(session_id, body)).messages

    def clear(self, session_id: str) -> None:
        self._run(self.api.clear(session_id))

    def close(self) -> None:
        self._run(self.api.service.shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
