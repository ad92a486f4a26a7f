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
