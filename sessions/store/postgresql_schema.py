"""The PostgreSQL store's schema and its migrations, applied at start-up under an advisory lock.

`sessionserve_schema` holds one row with the version the database is at. A later change appends a version to
MIGRATIONS (never edits a released one); every replica that starts brings the database up to its own version, in one
transaction, while the advisory lock keeps replicas starting at the same time from racing.
"""

from __future__ import annotations

from typing import Any

import psycopg

SCHEMA_VERSION = 5
_LOCK_KEY = 0x5E55_10_5E  # pg_advisory_xact_lock key for schema changes ("sessionse")
# version -> statements that take a database from version-1 to version. Append, never edit, once released.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE sessionserve_sessions (
            session_id     text COLLATE "C" PRIMARY KEY,
            system_prompt  text,
            metadata       jsonb NOT NULL,
            owner          text COLLATE "C",
            created_at     double precision NOT NULL,
            last_active_at double precision NOT NULL,
            next_seq       bigint NOT NULL DEFAULT 0,  -- ordinal of the next message appended
            lease_holder   text,                       -- the turn holding the lease, or NULL
            lease_until    double precision            -- lease expiry, the caller's wall clock
        )""",
        "CREATE INDEX sessionserve_sessions_idle ON sessionserve_sessions (last_active_at)",
        "CREATE INDEX sessionserve_sessions_owner"
        " ON sessionserve_sessions (owner, last_active_at DESC, session_id DESC)",
        """CREATE TABLE sessionserve_messages (
            session_id text COLLATE "C" NOT NULL REFERENCES sessionserve_sessions ON DELETE CASCADE,
            seq        bigint NOT NULL,
            role       text NOT NULL,
            content    text NOT NULL,
            PRIMARY KEY (session_id, seq)
        )""",
    ),
    # The KV report of the last turn committed with one (sessions.store.KVReport; the defaults: nothing reported).
    # Constant defaults: PostgreSQL >= 11 adds these columns without rewriting the table.
    2: (
        "ALTER TABLE sessionserve_sessions"
        " ADD COLUMN kv_tier text NOT NULL DEFAULT 'none',"  # device | host | none
        " ADD COLUMN kv_tokens bigint NOT NULL DEFAULT 0,"
        " ADD COLUMN kv_replica text NOT NULL DEFAULT ''",  # the replica holding it, '' if unknown
    ),
    # The KV report's token usage (sessions.store.TokenUsage as JSON text) and the session's KV policy.
    3: (
        "ALTER TABLE sessionserve_sessions"
        " ADD COLUMN kv_usage text NOT NULL DEFAULT '{}',"
        " ADD COLUMN kv_policy text NOT NULL DEFAULT 'pinned'",  # pinned | evictable | none
    ),
    # The session count, kept by triggers, so count() and max_sessions' check after each create read 16 rows instead
    # of counting every session. Each statement that inserts or deletes sessions adds its net change to one stripe
    # picked at random: concurrent creates rarely wait on the same row lock, a statement never holds two stripes (no
    # lock-order deadlock between two idle-expiry sweeps), and the sum over the stripes is the exact count. The
    # triggers come before the backfill: CREATE TRIGGER's table lock waits out and then holds off other writers
    # until this transaction commits, so the backfill counts every session and no write escapes both.
    4: (
        "CREATE TABLE sessionserve_count (stripe smallint PRIMARY KEY, sessions bigint NOT NULL DEFAULT 0)",
        "INSERT INTO sessionserve_count (stripe) SELECT generate_series(0, 15)",
        """CREATE FUNCTION sessionserve_count_sessions() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            change bigint;
            chosen smallint := floor(random() * 16);  -- once: random() in the WHERE would be drawn per row
        BEGIN
            IF TG_OP = 'INSERT' THEN
                SELECT count(*) INTO change FROM added;
            ELSE
                SELECT -count(*) INTO change FROM gone;
            END IF;
            IF change <> 0 THEN
                UPDATE sessionserve_count SET sessions = sessions + change WHERE stripe = chosen;
            END IF;
            RETURN NULL;
        END $$""",
        "CREATE TRIGGER sessionserve_count_inserts AFTER INSERT ON sessionserve_sessions"
        " REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION sessionserve_count_sessions()",
        "CREATE TRIGGER sessionserve_count_deletes AFTER DELETE ON sessionserve_sessions"
        " REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION sessionserve_count_sessions()",
        # an operator's TRUNCATE fires no DELETE trigger
        "CREATE FUNCTION sessionserve_count_reset() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN UPDATE sessionserve_count SET sessions = 0; RETURN NULL; END $$",
        "CREATE TRIGGER sessionserve_count_truncates AFTER TRUNCATE ON sessionserve_sessions"
        " FOR EACH STATEMENT EXECUTE FUNCTION sessionserve_count_reset()",
        "UPDATE sessionserve_count SET sessions = (SELECT count(*) FROM sessionserve_sessions) WHERE stripe = 0",
        # create(record, limit=) in one round trip: insert, commit, then count what is committed and take the session
        # back past the limit (optimistic admission, see PostgreSQLStore.create). A procedure may COMMIT when CALLed
        # outside a transaction block, as the store's autocommit connections do.
        """CREATE PROCEDURE sessionserve_create(
            p_session_id text, p_system_prompt text, p_metadata jsonb, p_created_at double precision,
            p_last_active_at double precision, p_owner text, p_kv_tier text, p_kv_tokens bigint, p_kv_replica text,
            p_kv_usage text, p_kv_policy text, p_limit bigint, INOUT outcome text DEFAULT NULL)
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO sessionserve_sessions (session_id, system_prompt, metadata, created_at, last_active_at, owner,
                kv_tier, kv_tokens, kv_replica, kv_usage, kv_policy)
            VALUES (p_session_id, p_system_prompt, p_metadata, p_created_at, p_last_active_at, p_owner, p_kv_tier,
                p_kv_tokens, p_kv_replica, p_kv_usage, p_kv_policy)
            ON CONFLICT (session_id) DO NOTHING;
            IF NOT FOUND THEN
                outcome := 'exists';
            ELSIF p_limit IS NULL THEN
                outcome := 'ok';
            ELSE
                COMMIT;
                IF (SELECT sum(sessions) FROM sessionserve_count) > p_limit THEN
                    DELETE FROM sessionserve_sessions WHERE session_id = p_session_id;
                    outcome := 'full';
                ELSE
                    outcome := 'ok';
                END IF;
            END IF;
        END $$""",
    ),
    # The history id (SessionRecord.history_id): the record's own at create, a fresh one whenever a statement deletes
    # a session's messages (clear, whichever sessionserve version runs it), so a replica holding a prefix of the
    # history never resumes after a clear. Rows from before it keep '' (none); the column's default gives one to the
    # sessions that replicas still on version 4 create during a rolling upgrade, through the procedure they know
    # (kept: create's takes the id as well, an overload).
    5: (
        "ALTER TABLE sessionserve_sessions ADD COLUMN history_id text NOT NULL DEFAULT ''",
        "ALTER TABLE sessionserve_sessions"
        " ALTER COLUMN history_id SET DEFAULT md5(random()::text || clock_timestamp())",
        """CREATE PROCEDURE sessionserve_create(
            p_session_id text, p_system_prompt text, p_metadata jsonb, p_created_at double precision,
            p_last_active_at double precision, p_owner text, p_kv_tier text, p_kv_tokens bigint, p_kv_replica text,
            p_kv_usage text, p_kv_policy text, p_history_id text, p_limit bigint, INOUT outcome text DEFAULT NULL)
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO sessionserve_sessions (session_id, system_prompt, metadata, created_at, last_active_at, owner,
                kv_tier, kv_tokens, kv_replica, kv_usage, kv_policy, history_id)
            VALUES (p_session_id, p_system_prompt, p_metadata, p_created_at, p_last_active_at, p_owner, p_kv_tier,
                p_kv_tokens, p_kv_replica, p_kv_usage, p_kv_policy, p_history_id)
            ON CONFLICT (session_id) DO NOTHING;
            IF NOT FOUND THEN
                outcome := 'exists';
            ELSIF p_limit IS NULL THEN
                outcome := 'ok';
            ELSE
                COMMIT;
                IF (SELECT sum(sessions) FROM sessionserve_count) > p_limit THEN
                    DELETE FROM sessionserve_sessions WHERE session_id = p_session_id;
                    outcome := 'full';
                ELSE
                    outcome := 'ok';
                END IF;
            END IF;
        END $$""",
        """CREATE FUNCTION sessionserve_new_history() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE sessionserve_sessions SET history_id = md5(random()::text || clock_timestamp())
            WHERE session_id IN (SELECT DISTINCT session_id FROM gone);
            RETURN NULL;
        END $$""",
        "CREATE TRIGGER sessionserve_new_history AFTER DELETE ON sessionserve_messages"
        " REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION sessionserve_new_history()",
    ),
}


def migrate(conn: psycopg.Connection[Any], where: str) -> None:
    """Create or upgrade the schema in one transaction; RuntimeError if the database is newer than this code."""
    with conn.transaction():
        conn.execute("SET LOCAL statement_timeout = '10min'")  # a migration may rewrite big tables
        conn.execute("SET LOCAL lock_timeout = '10min'")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS sessionserve_schema ("
            " id boolean PRIMARY KEY DEFAULT true CHECK (id), version integer NOT NULL,"
            " migrated_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT version FROM sessionserve_schema").fetchone()
        current = 0 if row is None else int(row[0])
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"the PostgreSQL history store at {where} has schema version {current}, newer than this "
                f"sessionserve's {SCHEMA_VERSION}: upgrade sessionserve"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO sessionserve_schema (id, version) VALUES (true, %s)"
            " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, migrated_at = now()"
            " WHERE sessionserve_schema.version <> EXCLUDED.version",
            (SCHEMA_VERSION,),
        )
