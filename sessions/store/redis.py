"""Redis history store: several nodes share sessions through one Redis (`redis://[:password@]host:port/db`).

Key layout (all under a prefix, default `sessionserve:`, set with `?prefix=` on the URL):

    {prefix}s:{id}          hash   the record: created_at, last_active_at, metadata (JSON), system_prompt and owner
                                   (absent = None), lease_holder and lease_until while a turn holds the lease,
                                   kv_tier, kv_tokens, kv_replica and kv_usage (JSON) once a KV report is stored
                                   (absent = KVReport()), kv_policy unless pinned (absent = pinned), history_id
                                   (new at create and clear; absent in sessions stored before it: none)
    {prefix}m:{id}          list   the messages, oldest first, each a JSON array [role, content]
    {prefix}active          zset   every session id, scored by last_active_at (count, idle expiry)
    {prefix}owner:{owner}   zset   the owner's session ids, scored by last_active_at (list); owner-none for no owner

Idle expiry is the server's: both per-session keys get PEXPIRE idle_ttl_s after every change, and PERSIST while a
turn holds the lease (so a session never disappears mid-turn); releasing the lease starts the countdown again.
The sorted sets may keep ids the server expired: count() and list() drop those before answering, expire_idle()
reports and drops them. Every call that touches more than one key is one Lua script (see redis_scripts.py), so lease
checks, message order and TTLs are atomic. Needs Redis >= 6.2, standalone or a Sentinel primary (not Cluster).
"""

from __future__ import annotations

import builtins  # the stores have a `list` method, so their annotations say builtins.list
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as RetryOnLoop
from redis.backoff import NoBackoff
from redis.retry import Retry

from sessions.errors import InvalidRequest, StoreUnavailable
from sessions.messages import Message
from sessions.store import base, loop_io
from sessions.store import redis_scripts as lua
from sessions.store.base import MAX_OFFSET, HistoryPrefix, Lease, SessionRecord
from sessions.store.values import (
    UNCHANGED,
    Holder,
    KVReport,
    KVUpdate,
    Metadata,
    Owner,
    Prompt,
    TokenUsage,
    Unchanged,
    new_history_id,
)

DEFAULT_PREFIX = "sessionserve:"
_CLOCK_SKEW_S = 5.0  # how far the hosts' clocks may disagree when deciding which index entries might have expired


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {key: value for key, value in query if key in ("prefix", "timeout")}
    rest = urlencode([(key, value) for key, value in query if key not in ours])
    return urlunsplit(parts._replace(query=rest)), ours


def _record(session_id: str, fields: dict[str, str]) -> SessionRecord:
    return SessionRecord(
        session_id,
        fields.get("system_prompt"),
        json.loads(fields.get("metadata", "{}")),
        float(fields["created_at"]),
        float(fields["last_active_at"]),
        fields.get("owner"),
        _kv_report(fields),
        fields.get("kv_policy", "pinned"),
        fields.get("history_id", ""),
    )


def _kv_report(fields: dict[str, str]) -> KVReport:
    """From a record's fields, or the scripts' kv_fields (absent fields: nothing reported)."""
    return KVReport(
        fields.get("kv_tier", "none"),
        int(fields.get("kv_tokens", "0")),
        fields.get("kv_replica", ""),
        TokenUsage.from_json(fields.get("kv_usage")),
    )


def _pairs(flat: builtins.list[str]) -> dict[str, str]:
    """HGETALL's answer (field, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _only(owner: Owner) -> tuple[str, str]:
    """A script's owner arguments: ('1', owner) for that owner's sessions only, ('0', '') for any."""
    return ("0", "") if owner is None else ("1", owner)


def _first(window: int | None) -> int:
    """LRANGE's start for the last `window` messages (0: all)."""
    return 0 if window is None else -min(window, 2**62)


def _decode(rows: builtins.list[str]) -> builtins.list[Message]:
    decoded = json.loads("[" + ",".join(rows) + "]")  # one parse for the whole history, not one per message
    return [Message(role, content) for role, content in decoded]


def _scripts(client: Any) -> dict[str, Any]:
    return {name: client.register_script(getattr(lua, name)) for name in lua.NAMES}


class _Client(NamedTuple):
    """A redis-py client and the Lua scripts registered on it: the blocking one, or (under loop_io.run) the asyncio
    one of that loop, whose commands return coroutines."""

    redis: Any  # redis.Redis | redis.asyncio.Redis
    scripts: dict[str, Any]


class RedisStore:
    """redis-py client with a connection pool; every call is bounded by `timeout_s` (URL `?timeout=`). Under
    loop_io.run the same methods use redis-py's asyncio client on that loop instead.

    Commands are never retried by the client: a timed-out script may have run, and running an append twice would
    duplicate messages. A connection that died while pooled is reconnected by redis-py before it is used.
    """

    runs_on_loop = True

    def __init__(
        self,
        url: str,
        *,
        idle_ttl_s: float = 86400.0,
        timeout_s: float = 5.0,
        prefix: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        url, ours = _split_url(url)
        self.prefix = prefix if prefix is not None else ours.get("prefix", DEFAULT_PREFIX)
        if idle_ttl_s <= 0:
            raise ValueError(f"idle_ttl_s must be > 0 seconds, got {idle_ttl_s}")
        self.idle_ttl_s = idle_ttl_s
        self._ttl_ms = max(1, int(idle_ttl_s * 1000))
        self._clock = clock
        timeout_s = float(ours.get("timeout", timeout_s))
        parts = urlsplit(url)
        self.where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        self._password = parts.password or ""
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "health_check_interval": 0,
        }
        self._url, self._options = url, options
        self._redis: redis.Redis = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)
        self._client = _Client(self._redis, _scripts(self._redis))
        self._clients_on_loops = loop_io.PerLoop(self._open_client_on_loop)

    # ---- plumbing ----------------------------------------------------------------------------------
    def _unavailable(self, error: Exception) -> StoreUnavailable:
        detail = " ".join(str(error).split()) or type(error).__name__
        if self._password:
            detail = detail.replace(self._password, "***")
        return StoreUnavailable(f"the Redis history store at {self.where} is unreachable: {detail}; retry later")

    async def _open_client_on_loop(self) -> _Client:
        client = redis.asyncio.Redis.from_url(self._url, retry=RetryOnLoop(NoBackoff(), 0), **self._options)
        return _Client(client, _scripts(client))

    def _call(self, fn: Callable[[_Client], Any]) -> Any:
        """`fn` on the blocking client, or under loop_io.run on the loop's asyncio client (the one I/O seam)."""
        try:
            if loop_io.inside():
                return loop_io.wait(fn(self._clients_on_loops.get()))
            return fn(self._client)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise self._unavailable(error) from None

    def _run(self, name: str, *args: str | int | float) -> Any:
        return self._call(lambda client: client.scripts[name](args=[self.prefix, *args]))

    def _cutoff(self) -> float:
        """Index entries idle since before this may have been expired by the server."""
        return self._clock() - self.idle_ttl_s + _CLOCK_SKEW_S

    @staticmethod
    def _refused(session_id: str, outcome: str) -> NoReturn:
        if outcome == "busy":
            raise base.busy(session_id)
        raise base.not_found(session_id)

    # ---- records -----------------------------------------------------------------------------------
    def create(self, record: SessionRecord, *, limit: int | None = None) -> None:
        fields: list[str] = ["metadata", json.dumps(record.metadata)]
        if record.system_prompt is not None:
            fields += ["system_prompt", record.system_prompt]
        if record.kv != KVReport():  # absent fields: nothing reported
            kv = record.kv
            fields += ["kv_tier", kv.tier, "kv_tokens", str(kv.tokens), "kv_replica", kv.replica]
            fields += ["kv_usage", kv.usage.to_json()]
        if record.kv_policy != "pinned":
            fields += ["kv_policy", record.kv_policy]
        fields += ["history_id", record.history_id]
        owner = ("1", record.owner) if record.owner is not None else ("0", "")
        outcome = self._run(
            "CREATE",
            record.session_id,
            self._clock(),
            self._ttl_ms,
            *owner,
            repr(record.created_at),
            repr(record.last_active_at),
            "" if limit is None else limit,
            repr(self._cutoff()),
            *fields,
        )
        if outcome == "exists":
            raise base.exists(record.session_id)
        if outcome == "full":
            assert limit is not None  # the script answers 'full' only when given a limit
            raise base.full(limit)

    def get(self, session_id: str) -> SessionRecord | None:
        fields: dict[str, str] = self._call(lambda client: client.redis.hgetall(f"{self.prefix}s:{session_id}"))
        return _record(session_id, fields) if fields else None

    def delete(self, session_id: str, *, holder: Holder = None, owner: Owner = None) -> SessionRecord | None:
        outcome = self._run("DELETE", session_id, holder or "", self._clock(), self._ttl_ms, *_only(owner))
        if outcome == "busy":
            raise base.busy(session_id)
        if outcome == "missing":
            return None
        return _record(session_id, _pairs(outcome))

    def update(
        self,
        session_id: str,
        now: float,
        *,
        system_prompt: Prompt = UNCHANGED,
        metadata: Metadata = None,
        holder: Holder = None,
        owner: Owner = None,
    ) -> tuple[SessionRecord, KVReport | None]:
        if isinstance(system_prompt, Unchanged):
            mode, prompt = "keep", ""
        else:
            mode, prompt = ("clear", "") if system_prompt is None else ("set", system_prompt)
        encoded = "" if metadata is None else json.dumps(metadata)
        outcome = self._run(
            "UPDATE", session_id, holder or "", self._clock(), self._ttl_ms, mode, prompt, encoded, repr(now),
            *_only(owner),
        )  # fmt: skip
        if isinstance(outcome, str):
            self._refused(session_id, outcome)
        reset, fields = outcome
        return _record(session_id, _pairs(fields)), None if reset is None else _kv_report(_pairs(reset))

    def touch(self, session_id: str, now: float) -> None:
        if self._run("TOUCH", session_id, self._clock(), self._ttl_ms, repr(now)) != "ok":
            raise base.not_found(session_id)

    def count(self) -> int:
        return int(self._run("COUNT", repr(self._cutoff())))

    def list(self, owner: str | None, limit: int = 50, offset: int = 0) -> builtins.list[SessionRecord]:
        return self._page(("1", owner) if owner is not None else ("0", ""), limit, offset)

    def recent(self, limit: int = 50, offset: int = 0) -> builtins.list[SessionRecord]:
        return self._page(("all", ""), limit, offset)

    def _page(self, owned: tuple[str, str], limit: int, offset: int) -> builtins.list[SessionRecord]:
        """`owned`: the LIST script's owner flag and owner (an owner's index, the ownerless one, or all)."""
        base.check_page(limit, offset)
        flat = self._run("LIST", repr(self._cutoff()), *owned, min(offset, MAX_OFFSET), limit)
        records, index = [], 0
        while index < len(flat):
            session_id, size = flat[index], int(flat[index + 1])
            fields = flat[index + 2 : index + 2 + size]
            index += 2 + size
            if fields:  # expired between the trim and the read: skip
                records.append(_record(session_id, dict(zip(fields[::2], fields[1::2], strict=True))))
        return records

    def missing(self, session_ids: Sequence[str]) -> builtins.list[str]:
        if not session_ids:
            return []

        def exists_all(client: _Client) -> Any:
            pipe = client.redis.pipeline(transaction=False)
            for session_id in session_ids:
                pipe.exists(f"{self.prefix}s:{session_id}")
            return pipe.execute()  # which resets the pipeline, whatever happens

        found = self._call(exists_all)
        return [session_id for session_id, hit in zip(session_ids, found, strict=True) if not hit]

    # ---- messages ----------------------------------------------------------------------------------
    def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        now: float,
        *,
        holder: Holder = None,
        kv: KVUpdate = None,
        owner: Owner = None,
        release: bool = False,
    ) -> None:
        batch = [json.dumps([m.role, m.content]) for m in base.check_messages(messages)]
        base.check_release(holder, release)
        report = ("0", "", 0, "", "") if kv is None else ("1", kv.tier, kv.tokens, kv.replica, kv.usage.to_json())
        outcome = self._run(
            "APPEND", session_id, holder or "", self._clock(), self._ttl_ms, repr(now), *report,
            "1" if release else "0", *_only(owner), *batch,
        )  # fmt: skip
        if outcome != "ok":
            self._refused(session_id, outcome)

    def load(
        self,
        session_id: str,
        window: int | None = None,
        *,
        owner: Owner = None,
        lease: Lease | None = None,
        after: HistoryPrefix | None = None,
    ) -> tuple[SessionRecord, builtins.list[Message]]:
        """One round trip: both reads in one MULTI/EXEC; with `lease`, one script (LEASED_LOAD)."""
        base.check_window(window)
        base.check_after(after, window, lease)
        if lease is not None:
            base.check_lease(*lease)
            now = self._clock()
            held = ("", 0) if after is None else after
            outcome = self._run(
                "LEASED_LOAD", session_id, lease.holder, now, self._ttl_ms, repr(now + lease.ttl_s), *_only(owner),
                _first(window), *held,
            )  # fmt: skip
            if isinstance(outcome, str):
                self._refused(session_id, outcome)
            fields, rows = outcome
            return _record(session_id, _pairs(fields)), _decode(rows)

        def read(client: _Client) -> Any:
            pipe = client.redis.pipeline(transaction=True)
            pipe.hgetall(f"{self.prefix}s:{session_id}")
            pipe.lrange(f"{self.prefix}m:{session_id}", _first(window), -1)
            return pipe.execute()  # which resets the pipeline, whatever happens

        fields, rows = self._call(read)
        record = base.visible(_record(session_id, fields) if fields else None, session_id, owner)
        return record, _decode(rows)

    def messages(self, session_id: str, window: int | None = None) -> builtins.list[Message]:
        base.check_window(window)
        rows = self._run("MESSAGES", session_id, _first(window))
        if rows == 0:
            raise base.not_found(session_id)
        return _decode(rows)

    def clear(self, session_id: str, now: float, *, holder: Holder = None, owner: Owner = None) -> KVReport:
        outcome = self._run(
            "CLEAR", session_id, holder or "", self._clock(), self._ttl_ms, repr(now), *_only(owner), new_history_id()
        )
        if isinstance(outcome, str):
            self._refused(session_id, outcome)
        return _kv_report(_pairs(outcome))

    # ---- leases and expiry -------------------------------------------------------------------------
    def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> None:
        base.check_lease(holder, ttl_s)
        now = self._clock()
        outcome = self._run("ACQUIRE", session_id, holder, now, self._ttl_ms, repr(now + ttl_s))
        if outcome != "ok":
            self._refused(session_id, outcome)

    def release_lease(self, session_id: str, holder: str) -> None:
        if not holder:
            raise InvalidRequest("a lease holder must be a non-empty string")
        self._run("RELEASE", session_id, holder, self._clock(), self._ttl_ms)

    def expire_idle(self, before: float) -> builtins.list[str]:
        return list(self._run("EXPIRE_IDLE", repr(before), self._clock()))

    def ping(self) -> None:
        self._call(lambda client: client.redis.ping())

    def close(self) -> None:
        self._redis.close()
        self._clients_on_loops.close_all(lambda client: client.redis.aclose())
