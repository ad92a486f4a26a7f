"""Fixtures of the fault suite; see C{__init__} for the long-form command."""

from __future__ import annotations

import os
import time

import pytest

from .faultlib import Network


def pytest_report_header(config):
    return (f"fault suite: PULLMAIL_FAULT_ROUNDS={os.environ.get('PULLMAIL_FAULT_ROUNDS', '2')}"
            f" PULLMAIL_FUZZ_CONNECTIONS={os.environ.get('PULLMAIL_FUZZ_CONNECTIONS', '300')}")


@pytest.fixture
def seed(request):
    """One seed per test: PULLMAIL_FAULT_SEED, else the clock; printed."""
    value = int(os.environ.get("PULLMAIL_FAULT_SEED", time.time_ns() % 10**9))
    print(f"\n{request.node.nodeid}: seed {value} (replay: PULLMAIL_FAULT_SEED={value})")
    return value


@pytest.fixture
def net(tmp_path):
    network = Network(tmp_path)
    try:
        yield network
    finally:
        network.close()
