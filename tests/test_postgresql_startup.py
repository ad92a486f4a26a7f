"""
Tests for L{pullmail.storage.postgresql.startup}: a node of a cluster
starts while its database is out of reach, refuses at once what needs the
store, and connects (schema checked, stores loaded once each) when the
database answers; an unknown schema still stops it.  Against the private
PostgreSQL cluster of the C{postgres} fixture, on an injected clock.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pullmail import maillog
from pullmail.storage.postgresql.database import Database, StoreUnavailable
from pullmail.storage.postgresql.startup import RETRY_CONNECT, StoreStartup
from tests.integration.harness import free_port


class InlineDatabase(Database):
    """Its blocking calls run at once (the node runs them in its threads)."""

    def run(self, function, *args, **kwargs):
        return defer.maybeDeferred(function, *args, **kwargs)


def _unreachable() -> InlineDatabase:
    database = InlineDatabase(f"postgresql://pullmail@127.0.0.1:{free_port()}/pullmail",
                              timeout=0.5)
    database.open()
    return database


def _events(logged_events, event: maillog.Event) -> list[dict]:
    return [e for e in logged_events if e.get("event") == event.name]


@pytest.fixture
def database():
    made = _unreachable()
    yield made
    made.close()


def test_waits_for_the_database_then_loads_once(database, pg_dsn, logged_events) -> None:
    """
    Out of reach: nothing loaded, every transaction refused at once (the
    client's 451 4.3.0), the outage logged once; once it answers, the
    steps run in order and the database is used.
    """
    clock, done, refused = Clock(), [], []
    startup = StoreStartup(database, clock, [lambda: done.append("outbox"),
                                             lambda: done.append("pending")], refused.append)
    startup.start()
    assert done == [] and not database.ready
    with pytest.raises(StoreUnavailable, match="not connected yet"):
        with database.transaction():
            pass
    clock.advance(RETRY_CONNECT)
    assert done == [] and len(_events(logged_events, maillog.DATABASE_UNREACHABLE)) == 1
    database.dsn = pg_dsn
    clock.advance(RETRY_CONNECT)
    assert done == ["outbox", "pending"] and database.ready and refused == []
    assert len(_events(logged_events, maillog.DATABASE_CONNECTED)) == 1
    assert clock.getDelayedCalls() == []


def test_a_step_that_loses_the_database_is_tried_again_alone(database, pg_dsn) -> None:
    clock, done, failures = Clock(), [], [StoreUnavailable("gone")]

    def flaky() -> None:
        if failures:
            raise failures.pop()
        done.append("pending")

    database.dsn = pg_dsn
    startup = StoreStartup(database, clock, [lambda: done.append("outbox"), flaky,
                                             lambda: done.append("watch")], print)
    startup.start()
    assert done == ["outbox"] and not database.ready
    clock.advance(RETRY_CONNECT)
    assert done == ["outbox", "pending", "watch"] and database.ready


def test_an_unknown_schema_once_connected_stops_the_node(database, postgres,
                                                         logged_events) -> None:
    """SPEC 11.3: the schema check still happens, when the database first answers."""
    import psycopg

    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        connection.execute("DROP DATABASE IF EXISTS pullmail_startup")
        connection.execute("CREATE DATABASE pullmail_startup")
    clock, done, refused = Clock(), [], []
    startup = StoreStartup(database, clock, [lambda: done.append("outbox")],
                           lambda: refused.append(True))
    startup.start()
    database.dsn = postgres.dsn.rsplit("/", 1)[0] + "/pullmail_startup"
    clock.advance(RETRY_CONNECT)
    assert refused == [True] and done == [] and not database.ready
    [event] = _events(logged_events, maillog.DATABASE_SCHEMA_REFUSED)
    assert "pullmail initdb" in event["error"]
    assert clock.getDelayedCalls() == []


def test_stopping_ends_the_attempts(database) -> None:
    clock = Clock()
    startup = StoreStartup(database, clock, [], print)
    startup.start()
    startup.stop()
    assert clock.getDelayedCalls() == []


def test_the_node_starts_with_its_database_out_of_reach(tmp_path) -> None:
    """The options no longer refuse a database they cannot reach (only a bad schema)."""
    from pullmail.node.tap import Options

    config = tmp_path / "pullmail.toml"
    config.write_text(f'[node]\nstate_dir = "var"\n[store]\nbackend = "postgresql"\n'
                      f'dsn = "postgresql://pullmail@127.0.0.1:{free_port()}/pullmail"\n')
    options = Options()
    options.parseOptions(["--config", str(config)])
    assert options["node_config"].store.backend == "postgresql"


def test_a_database_that_answers_is_loaded_before_the_node_listens(pg_dsn) -> None:
    """The first attempt blocks the start (no thread): a RETR right after the greeting finds the stores."""
    class NoThreads(Database):
        def run(self, function, *args, **kwargs):
            raise AssertionError("the first attempt runs in the start, not in a thread")

    database = NoThreads(pg_dsn)
    database.open()
    try:
        done = []
        StoreStartup(database, Clock(), [lambda: done.append("outbox")], print).start()
        assert done == ["outbox"] and database.ready
    finally:
        database.close()
