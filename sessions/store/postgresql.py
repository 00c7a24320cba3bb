"""PostgreSQL history store: several nodes share sessions through one database (`postgresql://user:pass@host/db`).

Every mutation is one conditional statement (or one short transaction) whose WHERE clause carries the lease check,
so it is atomic against concurrent turns on other replicas: PostgreSQL re-checks an UPDATE's WHERE on the newest row
version after waiting for its row lock. Message ordinals come from the session row's `next_seq` counter, bumped by
that same UPDATE, so concurrent appends never share, skip or reorder an ordinal.

The schema is created (and later migrated) at start-up in one transaction under an advisory lock, so replicas that
start together do not race; its version is the row in `sessionserve_schema`. Timeouts bound every call: connect,
pool checkout, statement and lock waits; a pooled connection the server closed is replaced before use, so after a
server restart the same store object recovers without raising for connections that died meanwhile.
"""

from __future__ import annotations

import builtins  # the stores have a `list` method, so their annotations say builtins.list
import math
import select
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from sessions.errors import InvalidRequest, StoreUnavailable
from sessions.messages import Message
from sessions.store import base, loop_io
from sessions.store.base import MAX_OFFSET, HistoryPrefix, Lease, SessionRecord
from sessions.store.postgresql_schema import migrate
from sessions.store.values import UNCHANGED, Holder, KVReport, KVUpdate, Metadata, Owner, Prompt, TokenUsage, Unchanged

_COLUMNS = (
    "session_id, system_prompt, metadata, created_at, last_active_at, owner, kv_tier, kv_tokens, kv_replica,"
    " kv_usage, kv_policy, history_id"
)
_FREE = "(lease_holder IS NULL OR lease_holder = %(holder)s OR lease_until <= %(now)s)"  # mutation allowed
_OWNED = "(%(owner)s::text IS NULL OR owner = %(owner)s)"  # the caller's session (NULL: any caller)
_NO_KV = {"kv_tier": "'none'", "kv_tokens": "0", "kv_replica": "''", "kv_usage": "'{}'"}  # column -> KVReport()
# SET clauses: the KV report reset (clear), reset when update() changes the system prompt, set by append() if given.
_RESET_KV = ", ".join(f"{column} = {value}" for column, value in _NO_KV.items())
_RESET_KV_IF_NEW_PROMPT = ", ".join(
    f"{column} = CASE WHEN NOT %(keep)s AND system_prompt IS DISTINCT FROM %(prompt)s THEN {value} ELSE {column} END"
    for column, value in _NO_KV.items()
)
_SET_KV_IF_GIVEN = ", ".join(f"{column} = COALESCE(%({column})s, {column})" for column in _NO_KV)
# The row as it was before an UPDATE changes it (PostgreSQL before 18 has no RETURNING OLD): a self-join on the row,
# locked, so it is the version the UPDATE changes; renamed, so the UPDATE's own column names stay unambiguous.
_PRIOR = (
    "(SELECT session_id AS prior_id, system_prompt AS prior_prompt, kv_tier AS prior_tier, kv_tokens AS prior_tokens,"
    " kv_replica AS prior_replica, kv_usage AS prior_usage FROM sessionserve_sessions WHERE session_id = %(id)s"
    " FOR UPDATE) AS prior"
)
_PRIOR_KV = "prior_tier, prior_tokens, prior_replica, prior_usage"
_OPTIONS = ("timeout", "pool_size")  # our own URL query parameters, not libpq's
# Joined into a lease write: its commit does not wait for the WAL flush (set_config(..., true) lasts until the
# statement's own transaction ends, after its commit record). Leases lapse by themselves, as the SQLite store's are
# written without fsync: one a server crash loses frees the session early, and a turn's commit still checks it. The
# turn's append, committed durably, flushes the WAL past every lease write before it.
_NO_FLUSH_WAIT = "(SELECT set_config('synchronous_commit', 'off', true)) AS no_flush_wait"


# append(release=True): the lease given back in the append's own UPDATE (its WHERE clause allowed the caller's lease).
_RELEASE_IF_ASKED = ", ".join(
    f"{column} = CASE WHEN %(release)s THEN NULL ELSE {column} END" for column in ("lease_holder", "lease_until")
)
# Append a batch: the session row's UPDATE takes its row lock, checks the lease (and the owner, if given) and
# reserves the batch's ordinals; the INSERT writes the batch at them. No row back: refused (see _refused).
_APPEND = (
    "WITH bumped AS ("
    "  UPDATE sessionserve_sessions SET next_seq = next_seq + %(n)s, last_active_at = %(active)s,"
    f"  {_SET_KV_IF_GIVEN}, {_RELEASE_IF_ASKED}"
    f"  WHERE session_id = %(id)s AND {_FREE} AND {_OWNED}"
    "  RETURNING next_seq - %(n)s AS first),"
    " inserted AS ("
    "  INSERT INTO sessionserve_messages (session_id, seq, role, content)"
    "  SELECT %(id)s, bumped.first + t.ord - 1, t.role, t.content FROM bumped,"
    "  unnest(%(roles)s::text[], %(contents)s::text[]) WITH ORDINALITY AS t(role, content, ord))"
    " SELECT first FROM bumped"
)
# Clear in one statement: reset the row and delete the messages the statement's snapshot saw, which are all of them
# only if nothing changed the session between the snapshot and the row lock. Every write to a session's messages
# also updates its row, so the UPDATE requires the row version the snapshot saw (PostgreSQL re-checks it on the
# newest version after waiting for a concurrent writer's lock). The answer: the KV report it reset and whether it
# cleared; a visible session that was not cleared (leased, or changed under the statement) takes clear()'s
# transaction path.
_CLEAR = (
    "WITH seen AS (SELECT xmin AS version, kv_tier, kv_tokens, kv_replica, kv_usage FROM sessionserve_sessions"
    f"  WHERE session_id = %(id)s AND {_OWNED}),"
    f" reset AS (UPDATE sessionserve_sessions SET {_RESET_KV}, last_active_at = %(active)s FROM seen"
    f"  WHERE session_id = %(id)s AND {_FREE} AND sessionserve_sessions.xmin = seen.version RETURNING 1),"
    " gone AS (DELETE FROM sessionserve_messages WHERE session_id = %(id)s AND EXISTS (SELECT 1 FROM reset))"
    " SELECT kv_tier, kv_tokens, kv_replica, kv_usage, EXISTS (SELECT 1 FROM reset) FROM seen"
)
_CLEAR_LOCKED = (  # clear()'s transaction path: the row reset under its lock, then its messages deleted
    f"UPDATE sessionserve_sessions SET {_RESET_KV}, last_active_at = %(active)s FROM {_PRIOR}"
    f" WHERE session_id = prior_id AND {_FREE} AND {_OWNED} RETURNING {_PRIOR_KV}"
)
_UPDATE = (  # the new record, whether the system prompt changed, and the KV report that change reset
    "UPDATE sessionserve_sessions SET"
    " system_prompt = CASE WHEN %(keep)s THEN system_prompt ELSE %(prompt)s END,"
    f" metadata = COALESCE(%(metadata)s, metadata), last_active_at = %(active)s, {_RESET_KV_IF_NEW_PROMPT}"
    f" FROM {_PRIOR} WHERE session_id = prior_id AND {_FREE} AND {_OWNED}"
    f" RETURNING {_COLUMNS}, NOT %(keep)s AND prior_prompt IS DISTINCT FROM %(prompt)s, {_PRIOR_KV}"
)
_LAST_OF = (  # the last %(window)s messages (NULL: all) that pass {since}, newest first: order them by seq to read them
    "(SELECT seq, role, content FROM sessionserve_messages WHERE session_id = %(id)s{since} ORDER BY seq DESC"
    " LIMIT %(window)s) AS last"
)
_HISTORY = f"SELECT role, content FROM {_LAST_OF.format(since='')} ORDER BY seq"
# Where load's messages start: past the caller's held prefix of %(known)s messages if the session's history is still
# the one named %(history)s (load's `after`), else at the first. A history's ordinals are consecutive from its first
# message's (appends take them from next_seq; the trigger of schema 5 gives a cleared session a new history id).
_FROM_START = (
    " AND seq >= (SELECT CASE WHEN history_id <> '' AND history_id = %(history)s THEN"
    " (SELECT min(seq) FROM sessionserve_messages WHERE session_id = %(id)s) + %(known)s ELSE 0 END"
    " FROM sessionserve_sessions WHERE session_id = %(id)s)"
)
# load()'s answer as rows, not one array: a row (-1, the record's columns, NULL, NULL), then one (seq, NULLs, role,
# content) per message of the last %(window)s, by seq. Plain rows cost the server and the driver less than building
# and parsing an array (0.44 against 0.86 ms for 200 messages here): a session's first turn on a replica reads its
# whole history.
_RECORD_ROW = "SELECT -1::bigint, {}, NULL::text, NULL::text"
_NULLS = ", ".join("NULL" for _ in _COLUMNS.split(","))
_MESSAGE_ROWS = " UNION ALL SELECT seq, {nulls}, role, content FROM {last} ORDER BY 1"
_RECORD_OF_ID = _RECORD_ROW.format(_COLUMNS) + " FROM sessionserve_sessions WHERE session_id = %(id)s"
_LOAD = _RECORD_OF_ID + _MESSAGE_ROWS.format(nulls=_NULLS, last=_LAST_OF.format(since=""))
_AFTER_ROWS = _MESSAGE_ROWS.format(nulls=_NULLS, last=_LAST_OF.format(since=_FROM_START))  # a turn's: see load()
_LOAD_AFTER = _RECORD_OF_ID + _AFTER_ROWS
# load(lease=...) in one statement: the lease taken only on the row version the statement's snapshot saw (the
# xmin check, as in _CLEAR; PostgreSQL re-checks it on the newest version after waiting for a writer's lock), so the
# messages read from that snapshot are all of them. No record row if missing (or another owner's); its columns NULL
# if leased by another holder or changed under the statement (load then takes the lease, then reads).
_LEASED_LOAD = (
    f"WITH seen AS (SELECT xmin AS version FROM sessionserve_sessions WHERE session_id = %(id)s AND {_OWNED}),"
    " leased AS (UPDATE sessionserve_sessions SET lease_holder = %(holder)s, lease_until = %(until)s"
    f"  FROM seen, {_NO_FLUSH_WAIT} WHERE session_id = %(id)s AND {_FREE}"
    f"  AND sessionserve_sessions.xmin = seen.version RETURNING {_COLUMNS}) "
    + _RECORD_ROW.format("leased.*")
    + " FROM seen LEFT JOIN leased ON true"
    + _AFTER_ROWS
)
_SELECT_RECORD = f"SELECT {_COLUMNS} FROM sessionserve_sessions WHERE session_id = %s"
_CREATE = (  # the record's columns in _COLUMNS' order, then the limit (NULL: none)
    "CALL sessionserve_create(%s::text, %s::text, %s::jsonb, %s::float8, %s::float8, %s::text, %s::text, %s::int8,"
    " %s::text, %s::text, %s::text, %s::text, %s::int8, NULL)"
)


def _record(row: tuple[Any, ...]) -> SessionRecord:
    session_id, prompt, metadata, created_at, last_active_at, owner, tier, tokens, replica, usage, policy, history = row
    kv = _kv_report((tier, tokens, replica, usage))
    return SessionRecord(session_id, prompt, metadata, created_at, last_active_at, owner, kv, policy, history)


def _kv_report(columns: tuple[Any, ...]) -> KVReport:
    tier, tokens, replica, usage = columns
    return KVReport(tier, tokens, replica, TokenUsage.from_json(usage))


def _loaded(rows: builtins.list[tuple[Any, ...]], session_id: str) -> tuple[tuple[Any, ...], builtins.list[Message]]:
    """The rows of a load's statement as the record's columns and the messages; SessionNotFound without a record."""
    if not rows or rows[0][0] != -1:
        raise base.not_found(session_id)
    return rows[0][1:-2], [Message(row[-2], row[-1]) for row in rows[1:]]


def _limit(window: int | None) -> int | None:
    """A history window as _HISTORY's LIMIT (NULL: all); past bigint it means all anyway."""
    return None if window is None else min(window, 2**63 - 1)


def _kv_params(kv: KVReport | None) -> dict[str, Any]:
    """The parameters of _SET_KV_IF_GIVEN: None (keep the column) for each field when no report is given."""
    values = (None,) * len(_NO_KV) if kv is None else (kv.tier, kv.tokens, kv.replica, kv.usage.to_json())
    return dict(zip(_NO_KV, values, strict=True))


def _refuse_nul(*texts: str | None) -> None:
    """PostgreSQL text cannot hold NUL characters; say so instead of failing inside the driver."""
    if any(text is not None and "\x00" in text for text in texts):
        raise InvalidRequest("text containing NUL characters (\\u0000) cannot be stored by the PostgreSQL store")


def _check_idle_connection(conn: psycopg.Connection[Any]) -> None:
    """The pool's check before lending a connection, without a round trip in the common case.

    An idle connection has nothing to read; if its socket is readable the server closed it or sent a FATAL (restart,
    admin shutdown), so only then pay the full check (which raises, and the pool replaces the connection).
    """
    if _idle_connection_spoke(conn):
        ConnectionPool.check_connection(conn)


async def _check_idle_connection_on_loop(conn: psycopg.AsyncConnection[Any]) -> None:
    """_check_idle_connection for the pool on the event loop."""
    if _idle_connection_spoke(conn):
        await AsyncConnectionPool.check_connection(conn)


def _idle_connection_spoke(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether a pooled connection's socket is readable (it needs the full check); raises if it is closed."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("connection is closed")
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    return bool(readable)


class _CursorOnLoop:
    """An asyncio cursor seen as a blocking one from inside loop_io.run."""

    def __init__(self, cursor: psycopg.AsyncCursor[tuple[Any, ...]]) -> None:
        self._cursor = cursor

    def fetchall(self) -> builtins.list[tuple[Any, ...]]:
        return loop_io.wait(self._cursor.fetchall())

    def fetchone(self) -> tuple[Any, ...] | None:
        return loop_io.wait(self._cursor.fetchone())


class _ConnectionOnLoop:
    """An asyncio connection seen as a blocking one from inside loop_io.run: the part of it the store calls."""

    def __init__(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: dict[str, Any] | Sequence[Any] = ()) -> _CursorOnLoop:
        return _CursorOnLoop(loop_io.wait(self._conn.execute(sql, params)))

    def transaction(self) -> AbstractContextManager[Any]:
        return loop_io.entered(self._conn.transaction())


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {key: value for key, value in query if key in _OPTIONS}
    # percent-encoded as libpq decodes a URI (a space as %20: libpq reads '+' as itself)
    rest = urlencode([(key, value) for key, value in query if key not in _OPTIONS], quote_via=quote)
    return urlunsplit(parts._replace(query=rest)), ours


class PostgreSQLStore:
    """A psycopg connection pool; autocommit, so a single statement is its own transaction (one round trip). Under
    loop_io.run the same methods use an asyncio pool on that loop instead (opened there on first use).

    `timeout_s` (URL `?timeout=`) bounds connecting, waiting for a pooled connection, and each statement.
    `idle_ttl_s` is accepted for a uniform constructor (the manager drives expiry); `clock` is the lease clock.
    """

    runs_on_loop = True

    def __init__(
        self,
        url: str,
        *,
        idle_ttl_s: float = 86400.0,
        timeout_s: float = 5.0,
        pool_size: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        url, ours = _split_url(url)
        timeout_s = float(ours.get("timeout", timeout_s))
        pool_size = int(ours.get("pool_size", pool_size))
        params = conninfo_to_dict(url)
        self.where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
        self._password = str(params.get("password") or "")
        self.idle_ttl_s = idle_ttl_s
        self._clock = clock
        timeout_ms = max(1, int(timeout_s * 1000))
        defaults = {  # settings in the URL win
            "connect_timeout": max(2, math.ceil(timeout_s)),  # libpq's minimum is 2 s
            "tcp_user_timeout": timeout_ms,  # data sent but unacknowledged this long: the peer is gone
            "keepalives": 1,  # a peer silent while we wait for a reply: given up on after a few seconds
            "keepalives_idle": max(1, math.ceil(timeout_s)),
            "keepalives_interval": 1,
            "keepalives_count": 3,
        }
        params = {**defaults, **params}
        options = [str(params["options"])] if params.get("options") else []
        options += [f"-c statement_timeout={timeout_ms}", f"-c lock_timeout={timeout_ms}"]
        params["options"] = " ".join([*options, "-c idle_in_transaction_session_timeout=60000"])
        conninfo = make_conninfo("", **params)
        try:  # one direct connection first: its error says why (refused, bad password), a pool would just time out
            with psycopg.connect(conninfo, autocommit=True) as conn:
                migrate(conn, self.where)
        except psycopg.OperationalError as error:
            raise self._unavailable(error) from None
        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max(1, pool_size),
            timeout=timeout_s,
            kwargs={"autocommit": True},
            check=_check_idle_connection,  # a connection that died while pooled is replaced, not raised
            open=False,
            name="sessionserve-history",
        )
        self._pool_size, self._timeout_s, self._conninfo = max(1, pool_size), timeout_s, conninfo
        self._pools_on_loops = loop_io.PerLoop(self._open_pool_on_loop)
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except PoolTimeout as error:
            self._pool.close()
            raise self._unavailable(error) from None
        except BaseException:
            self._pool.close()
            raise

    # ---- plumbing ----------------------------------------------------------------------------------
    def _unavailable(self, error: Exception) -> StoreUnavailable:
        detail = " ".join(str(error).split()) or type(error).__name__
        if self._password:
            detail = detail.replace(self._password, "***")
        return StoreUnavailable(f"the PostgreSQL history store at {self.where} is unreachable: {detail}; retry later")

    async def _open_pool_on_loop(self) -> AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]]:
        pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] = AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=self._pool_size,
            timeout=self._timeout_s,
            kwargs={"autocommit": True},
            check=_check_idle_connection_on_loop,
            open=False,
            name="sessionserve-history-loop",
        )
        try:
            await pool.open(wait=True, timeout=self._timeout_s)
        except BaseException:
            await pool.close()
            raise
        return pool

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[tuple[Any, ...]] | _ConnectionOnLoop]:
        """A pooled connection: the blocking pool's, or under loop_io.run the loop's pool's (the one I/O seam)."""
        try:
            if loop_io.inside():
                with loop_io.entered(self._pools_on_loops.get().connection()) as conn:
                    yield _ConnectionOnLoop(conn)
            else:
                with self._pool.connection() as conn:
                    yield conn
        except (psycopg.OperationalError, PoolTimeout) as error:  # includes statement/lock timeouts
            raise self._unavailable(error) from None

    def _all(self, sql: str, params: dict[str, Any] | Sequence[Any] = ()) -> builtins.list[tuple[Any, ...]]:
        with self._conn() as conn:
            return conn.execute(sql, params).fetchall()

    def _exec(self, sql: str, params: dict[str, Any] | Sequence[Any] = ()) -> None:
        with self._conn() as conn:
            conn.execute(sql, params)

    def _one(self, sql: str, params: dict[str, Any] | Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _visible(self, session_id: str, owner: Owner) -> bool:
        """The session exists and, for `owner`, is theirs."""
        row = self._one("SELECT owner FROM sessionserve_sessions WHERE session_id = %s", (session_id,))
        return row is not None and (owner is None or row[0] == owner)

    def _refused(self, session_id: str, owner: Owner = None) -> Exception:
        """Why a conditional mutation touched no row: the session is missing (or, for `owner`, another owner's), or
        another holder leases it."""
        return base.busy(session_id) if self._visible(session_id, owner) else base.not_found(session_id)

    # ---- records -----------------------------------------------------------------------------------
    def create(self, record: SessionRecord, *, limit: int | None = None) -> None:
        """Admission under `limit` is optimistic, so creates never wait for each other: insert and commit, then count
        what is committed (this session included) and take the session back if that passes the limit. Of any
        sessions that together pass it, the last to commit counts all of them, so a create that succeeds never
        passes the limit; creates racing at the boundary may all step back (429, and a retry finds room). All of it
        is one CALL (schema v4's sessionserve_create), one round trip."""
        _refuse_nul(record.session_id, record.system_prompt, record.owner, record.kv.replica)
        values = (*base.record_row(record, Jsonb(record.metadata)), limit)
        try:
            outcome = (self._one(_CREATE, values) or (None,))[0]
        except psycopg.errors.UntranslatableCharacter as error:  # "\u0000" inside jsonb
            raise _unstorable(error) from None
        if outcome == "exists":
            raise base.exists(record.session_id)
        if outcome == "full" and limit is not None:
            raise base.full(limit)
        if outcome != "ok":
            raise RuntimeError(f"sessionserve_create answered {outcome!r}, not ok, exists or full")

    def get(self, session_id: str) -> SessionRecord | None:
        row = self._one(_SELECT_RECORD, (session_id,))
        return None if row is None else _record(row)

    def delete(self, session_id: str, *, holder: Holder = None, owner: Owner = None) -> SessionRecord | None:
        params = {"id": session_id, "holder": holder, "now": self._clock(), "owner": owner}
        row = self._one(
            f"DELETE FROM sessionserve_sessions WHERE session_id = %(id)s AND {_FREE} AND {_OWNED}"
            f" RETURNING {_COLUMNS}",
            params,
        )
        if row is not None:
            return _record(row)
        if not self._visible(session_id, owner):
            return None
        raise base.busy(session_id)

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
        prompt = None if isinstance(system_prompt, Unchanged) else system_prompt
        _refuse_nul(prompt)
        params = {
            "keep": isinstance(system_prompt, Unchanged),
            "prompt": prompt,
            "metadata": None if metadata is None else Jsonb(metadata),
            "active": now,
            "id": session_id,
            "holder": holder,
            "now": self._clock(),
            "owner": owner,
        }
        try:
            row = self._one(_UPDATE, params)
        except psycopg.errors.UntranslatableCharacter as error:
            raise _unstorable(error) from None
        if row is None:
            raise self._refused(session_id, owner)
        record, new_prompt, prior_kv = row[:-5], row[-5], row[-4:]
        return _record(record), _kv_report(prior_kv) if new_prompt else None

    def touch(self, session_id: str, now: float) -> None:
        if not self._one(
            "UPDATE sessionserve_sessions SET last_active_at = %s WHERE session_id = %s RETURNING 1", (now, session_id)
        ):
            raise base.not_found(session_id)

    def count(self) -> int:
        (count,) = self._one("SELECT sum(sessions) FROM sessionserve_count") or (0,)  # kept by triggers (schema v4)
        return int(count)

    def list(self, owner: str | None, limit: int = 50, offset: int = 0) -> builtins.list[SessionRecord]:
        return self._page("owner IS NULL" if owner is None else "owner = %(owner)s", owner, limit, offset)

    def recent(self, limit: int = 50, offset: int = 0) -> builtins.list[SessionRecord]:
        return self._page("TRUE", None, limit, offset)

    def _page(self, where: str, owner: str | None, limit: int, offset: int) -> builtins.list[SessionRecord]:
        base.check_page(limit, offset)
        rows = self._all(
            f"SELECT {_COLUMNS} FROM sessionserve_sessions WHERE {where}"
            " ORDER BY last_active_at DESC, session_id DESC LIMIT %(limit)s OFFSET %(offset)s",
            {"owner": owner, "limit": limit, "offset": min(offset, MAX_OFFSET)},
        )
        return [_record(row) for row in rows]

    def missing(self, session_ids: Sequence[str]) -> builtins.list[str]:
        if not session_ids:
            return []
        rows = self._all(
            "SELECT session_id FROM sessionserve_sessions WHERE session_id = ANY(%s)", (list(session_ids),)
        )
        present = {session_id for (session_id,) in rows}
        return [session_id for session_id in session_ids if session_id not in present]

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
        batch = base.check_messages(messages)
        base.check_release(holder, release)
        _refuse_nul(*(m.content for m in batch), None if kv is None else kv.replica)
        params = {
            "n": len(batch),
            "release": release,
            "active": now,
            "id": session_id,
            "holder": holder,
            "owner": owner,
            "now": self._clock(),
            "roles": [m.role for m in batch],
            "contents": [m.content for m in batch],
            **_kv_params(kv),
        }
        if self._one(_APPEND, params) is None:
            raise self._refused(session_id, owner)

    def load(
        self,
        session_id: str,
        window: int | None = None,
        *,
        owner: Owner = None,
        lease: Lease | None = None,
        after: HistoryPrefix | None = None,
    ) -> tuple[SessionRecord, builtins.list[Message]]:
        """One statement, so one snapshot for both (and half the driver's work of a pipeline of two); with `lease`,
        taken in that statement too (_LEASED_LOAD) unless the session is leased or changed under it."""
        base.check_window(window)
        base.check_after(after, window, lease)
        params: dict[str, Any] = {"id": session_id, "window": _limit(window), "history": None, "known": 0}
        if after is not None:
            params |= {"history": after.history_id, "known": after.length}
        if lease is None:
            return self._load(params, owner)
        base.check_lease(*lease)
        now = self._clock()
        params |= {"owner": owner, "holder": lease.holder, "until": now + lease.ttl_s, "now": now}
        record, messages = _loaded(self._all(_LEASED_LOAD, params), session_id)
        if record[0] is not None:
            return _record(record), messages
        self.acquire_lease(session_id, *lease)  # SessionBusy if another holder's; else it changed: read after the lease
        try:
            return self._load(params, owner)
        except BaseException:
            self.release_lease(session_id, lease.holder)
            raise

    def _load(self, params: dict[str, Any], owner: Owner) -> tuple[SessionRecord, builtins.list[Message]]:
        record, messages = _loaded(self._all(_LOAD_AFTER if params["history"] else _LOAD, params), params["id"])
        return base.visible(_record(record), params["id"], owner), messages

    def messages(self, session_id: str, window: int | None = None) -> builtins.list[Message]:
        base.check_window(window)
        rows = self._all(_HISTORY, {"id": session_id, "window": _limit(window)})
        if not rows and self.get(session_id) is None:
            raise base.not_found(session_id)
        return [Message(role, content) for role, content in rows]

    def clear(self, session_id: str, now: float, *, holder: Holder = None, owner: Owner = None) -> KVReport:
        """One statement (see _CLEAR); when the session changed under it, or to tell a lease from a missing session,
        a transaction whose UPDATE holds the row lock (so the lease check holds) until the messages are gone."""
        params = {"id": session_id, "holder": holder, "now": self._clock(), "owner": owner, "active": now}
        row = self._one(_CLEAR, params)
        if row is None:
            raise base.not_found(session_id)
        if row[-1]:
            return _kv_report(row[:-1])
        with self._conn() as conn, conn.transaction():
            prior = conn.execute(_CLEAR_LOCKED, params).fetchone()
            if prior is None:
                raise self._refused(session_id, owner)
            conn.execute("DELETE FROM sessionserve_messages WHERE session_id = %(id)s", params)
        return _kv_report(prior)

    # ---- leases and expiry -------------------------------------------------------------------------
    def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> None:
        base.check_lease(holder, ttl_s)
        now = self._clock()
        if not self._one(
            "UPDATE sessionserve_sessions SET lease_holder = %(holder)s, lease_until = %(until)s"
            f" FROM {_NO_FLUSH_WAIT} WHERE session_id = %(id)s AND {_FREE} RETURNING 1",
            {"holder": holder, "until": now + ttl_s, "id": session_id, "now": now},
        ):
            raise self._refused(session_id)

    def release_lease(self, session_id: str, holder: str) -> None:
        self._exec(
            "UPDATE sessionserve_sessions SET lease_holder = NULL, lease_until = NULL"
            f" FROM {_NO_FLUSH_WAIT} WHERE session_id = %s AND lease_holder = %s",
            (session_id, holder),
        )

    def expire_idle(self, before: float) -> builtins.list[str]:
        rows = self._all(
            "DELETE FROM sessionserve_sessions WHERE last_active_at < %(before)s"
            " AND (lease_holder IS NULL OR lease_until <= %(now)s) RETURNING session_id, last_active_at",
            {"before": before, "now": self._clock()},
        )
        return [session_id for session_id, _ in sorted(rows, key=lambda row: (row[1], row[0]))]

    def ping(self) -> None:
        self._exec("SELECT 1")

    def close(self) -> None:
        self._pool.close()
        self._pools_on_loops.close_all(lambda pool: pool.close())


def _unstorable(error: Exception) -> InvalidRequest:
    return InvalidRequest(f"the PostgreSQL store cannot store this metadata: {' '.join(str(error).split())}")
