"""Fixtures shared by every test module."""

from __future__ import annotations

import gc

import pytest
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher


@pytest.fixture
def logged_events():
    """Every twisted.logger event emitted during the test, in order."""
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


@pytest.fixture
def no_logged_failures(logged_events):
    """
    Fail the test if it logged a failure or dropped a failed Deferred
    unhandled: the check trial's TestCase makes after every test.  Opt in
    with C{pytestmark = pytest.mark.usefixtures("no_logged_failures")}.
    """
    gc.collect()  # what earlier tests left is not this test's
    start = len(logged_events)
    yield
    gc.collect()  # an unhandled failed Deferred is logged when collected
    failures = [event["log_failure"] for event in logged_events[start:] if "log_failure" in event]
    assert not failures, "\n".join(failure.getTraceback() for failure in failures)


@pytest.fixture(scope="session")
def dkim_keys(tmp_path_factory):
    """
    An RSA and an Ed25519 signing key of example.org (made once), and the
    TXT records publishing them: (keys by domain, {record name: value}).
    """
    from pullmail.config import DKIMConfig
    from pullmail.trust.dkim_keys import ensure_keys, load_keys

    config = DKIMConfig(key_dir=tmp_path_factory.mktemp("dkim"))
    ensure_keys(config, ["example.org"])
    keys = load_keys(config, ["example.org"])
    records = {k.record_name.rstrip("."): k.record_value for k in keys["example.org"]}
    return keys, records


# -- a private PostgreSQL cluster (the postgresql backend, SPEC 11.3) --------------


@pytest.fixture(scope="session")
def postgres():
    """
    A PostgreSQL cluster of the session's own, with pullmail's schema;
    skipped, loudly, when Debian's postgresql package is not installed.
    """
    from tests.integration.harness import free_port
    from tests.pg import PostgresCluster, find_binaries

    binaries = find_binaries()
    if binaries is None:
        pytest.skip("!!! PostgreSQL binaries not found (apt-get install postgresql; tests/run "
                    "does it as root): the postgresql backend is NOT TESTED !!!")
    cluster = PostgresCluster(binaries, free_port("127.0.0.1"))
    try:
        cluster.create()
        import psycopg

        from pullmail.storage.postgresql.schema import initdb

        with psycopg.connect(cluster.dsn, autocommit=True) as connection:
            initdb(connection)
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_dsn(postgres):
    """The session's database, emptied for this test."""
    import psycopg

    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        connection.execute("TRUNCATE outbox, messages, pending")
    return postgres.dsn


@pytest.fixture
def pg_database(pg_dsn):
    """A L{Database} over the emptied test database (no threads: blocking calls)."""
    from pullmail.storage.postgresql.database import Database

    database = Database(pg_dsn)
    database.open()
    yield database
    database.close()
