# -*- test-case-name: tests.test_postgresql -*-
"""
The database schema, versioned: C{pullmail initdb} applies the migrations
a database lacks, in order, each in the transaction that records its
version (so running it again changes nothing); a node refuses to start on
a version it does not know (L{check}).

Times are seconds since the epoch by the nodes' clocks (the clock injected
everywhere else), so leases compare the same way on every node; the clocks
of a cluster must agree (NTP), as with any lease.
"""

from __future__ import annotations

import psycopg

__all__ = ["SCHEMA_VERSION", "SchemaError", "check", "initdb", "version_of"]

# Each migration takes the schema from version N to N+1 (index N).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE pullmail_schema (
        version integer NOT NULL
    );
    -- One row per message; entries of one message (one per recipient domain)
    -- share it.  The body is at most [limits] message_size.
    CREATE TABLE messages (
        id bigserial PRIMARY KEY,
        body bytea NOT NULL
    );
    -- The outbox and the push queue (SPEC 2, 4, 7): one row per entry, keyed
    -- by its General Delivery id.  "record" is the entry as the files
    -- backend writes it (versioned JSON).  A row is taken for due work
    -- ('work': a push, a notification, an expiry) or for a RETR transfer
    -- ('retr') by one node until lease_until; every write that completes
    -- the work names the generation its taking returned (fencing).
    CREATE TABLE outbox (
        id text PRIMARY KEY,
        message bigint NOT NULL REFERENCES messages (id),
        record jsonb NOT NULL,
        due double precision,
        taken text CHECK (taken IN ('work', 'retr')),
        taken_by text,
        lease_until double precision,
        generation bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX outbox_message ON outbox (message);
    CREATE INDEX outbox_due ON outbox (due);
    -- Pending notifications and retrieved-id records (SPEC 3, 4, 5), shared
    -- by the receiving nodes: one node retrieves each id.
    CREATE TABLE pending (
        key text PRIMARY KEY,
        gdel_id text NOT NULL,
        peer text NOT NULL,
        record jsonb NOT NULL,
        due double precision,
        taken_by text,
        lease_until double precision,
        generation bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX pending_due ON pending (due);
    CREATE INDEX pending_peer ON pending (peer);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# Serialises concurrent initdb runs (an advisory lock, any number).
_INITDB_LOCK = 0x70756C6C


class SchemaError(Exception):
    """The database has no schema, or one this version does not know."""


def version_of(cursor: psycopg.Cursor) -> int:
    """The schema version recorded in the database; 0 when there is none."""
    cursor.execute("SELECT to_regclass('pullmail_schema') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return 0
    cursor.execute("SELECT max(version) FROM pullmail_schema")
    return cursor.fetchone()[0] or 0


def initdb(connection: psycopg.Connection) -> tuple[int, int]:
    """
    Create or upgrade the schema; idempotent.  Returns (version before,
    version after).

    @raise SchemaError: the database is newer than this version knows.
    """
    with connection.transaction(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_INITDB_LOCK,))
        before = version_of(cursor)
        if before > SCHEMA_VERSION:
            raise SchemaError(_too_new(before))
        for version in range(before, SCHEMA_VERSION):
            cursor.execute(MIGRATIONS[version])
            cursor.execute("DELETE FROM pullmail_schema")
            cursor.execute("INSERT INTO pullmail_schema (version) VALUES (%s)", (version + 1,))
    return before, SCHEMA_VERSION


def check(cursor: psycopg.Cursor) -> None:
    """
    At start-up: the schema must be the one this version writes.

    @raise SchemaError: with a message saying what to do.
    """
    version = version_of(cursor)
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        raise SchemaError("the database has no pullmail schema: run "
                          "`pullmail initdb --config FILE` first")
    if version > SCHEMA_VERSION:
        raise SchemaError(_too_new(version))
    raise SchemaError(f"the database schema is version {version}, this pullmail needs "
                      f"{SCHEMA_VERSION}: run `pullmail initdb --config FILE` to upgrade it")


def _too_new(version: int) -> str:
    return (f"the database schema is version {version}, newer than this pullmail knows "
            f"({SCHEMA_VERSION}): upgrade pullmail on this node")
