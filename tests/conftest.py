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
