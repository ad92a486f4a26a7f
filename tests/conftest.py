"""Fixtures shared by every test module."""

from __future__ import annotations

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
