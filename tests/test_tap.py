"""Tests for L{pullmail.node.tap}: the parts of node assembly that run in-process."""

from __future__ import annotations

import gc

from twisted.logger import globalLogPublisher

from pullmail.node.tap import freeze_start_up_heap


def test_start_up_heap_is_frozen_out_of_full_collections() -> None:
    loaded = [{"entry": i} for i in range(1000)]      # what a start-up reads
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        freeze_start_up_heap()
        frozen = gc.get_freeze_count()
        tracked = {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()
        globalLogPublisher.removeObserver(events.append)
    assert frozen >= len(loaded)
    assert not tracked & {id(o) for o in loaded}       # a collection no longer walks them
    [event] = [e for e in events if e.get("event") == "heap-frozen"]
    assert event["objects"] >= len(loaded)     # (frozen objects may be freed since)
