"""
The node's log observer: text lines with millisecond timestamps, or one
JSON object per line for log shippers (``[node] log_format``).

twistd builds its own observer unless the application carries an
L{ILogObserver} component; L{NodeService} sets one, writing where twistd
would have written (``--logfile``, standard output under ``-n``).  With
``--syslog`` or ``--logger`` twistd's own observer stays.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Mapping

from twisted.application import service
from twisted.internet import defer
from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.python import logfile
from zope.interface import implementer

from pullmail.maillog import VOCABULARY
from pullmail.node.listeners import Listener
from pullmail.node.lock import record_pid

__all__ = ["NodeService", "log_observer", "format_text", "format_json"]


def _timestamp(event: Mapping) -> str:
    moment = datetime.datetime.fromtimestamp(event.get("log_time", 0), datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _level(event: Mapping) -> str:
    level = event.get("log_level")
    return level.name if level is not None else "info"


def _message(event: Mapping) -> str:
    failure = event.get("log_failure")
    if failure is not None:
        return formatEvent(event) + "\n" + failure.getTraceback()
    mail_event = VOCABULARY.get(event.get("event"))
    if mail_event is not None and mail_event.format == event.get("log_format"):
        # A mail event's format names plain fields, which it always has
        # (maillog.Event checks): str.format_map reads them as
        # twisted.logger's pure-Python formatter would, at a fraction of
        # the cost, on a line that every message writes.
        try:
            return mail_event.format.format_map(event)
        except (KeyError, AttributeError, IndexError, TypeError, ValueError):
            pass
    return formatEvent(event)


def format_text(event: Mapping) -> str:
    """``2026-12-05T03:47:44.123Z [pullmail.smtp#info] message``."""
    text = _message(event).replace("\n", "\n\t")
    return f"{_timestamp(event)} [{event.get('log_namespace', '-')}#{_level(event)}] {text}\n"


def _plain(value: object) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float))
                                                    for v in value)


def format_json(event: Mapping) -> str:
    """One JSON object per line: time, level, namespace, message, and the event's own fields."""
    record = {
        "time": _timestamp(event), "level": _level(event),
        "namespace": event.get("log_namespace", "-"), "message": _message(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in record and _plain(value):
            record[key] = list(value) if isinstance(value, tuple) else value
    return json.dumps(record, ensure_ascii=False) + "\n"


# What the log shows: info and above (as a LogLevelFilterPredicate at info
# would pass them), found by a set lookup: every log event of the node
# comes through here, debug ones (for the metrics) by the thousand a
# second, and the predicate's comparisons of levels cost more than that.
_SHOWN_LEVELS = frozenset(
    level for level in LogLevel.iterconstants() if not level < LogLevel.info)


@implementer(ILogObserver)
class _FileObserver:
    def __init__(self, stream: IO[str], format) -> None:
        self.stream = stream
        self.format = format

    def __call__(self, event: Mapping) -> None:
        if event.get("log_level") not in _SHOWN_LEVELS or not event.get("log_namespace"):
            return
        self.stream.write(self.format(event))
        self.stream.flush()


def log_observer(log_format: str, stream: IO[str]) -> ILogObserver:
    """Events at info and above, in C{log_format} (``text`` or ``json``), to C{stream}."""
    return _FileObserver(stream, format_json if log_format == "json" else format_text)


def twistd_stream(twistd_options: Mapping | None) -> IO[str] | None:
    """
    Where twistd would log (its C{_getLogObserver}): None when it logs
    elsewhere (syslog, a custom --logger), so its observer stays.
    """
    if twistd_options is None or twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    name = twistd_options.get("logfile") or ""
    if name == "-" or (not name and twistd_options.get("nodaemon")):
        return sys.stdout
    return logfile.LogFile.fromFullPath(name or "twistd.log")


class NodeService(service.MultiService):
    """
    The node: a MultiService that, once twistd gives it its application,
    sets the application's log observer, and holds the state dir's lock;
    stopped, it drains its connections before its stores stop.
    """

    log_observer: ILogObserver | None = None
    lock: int | None = None          # pullmail.node.lock's descriptor
    metrics = None                   # pullmail.node.metrics.Metrics, when served
    drain = None                     # pullmail.smtp.drain.Drain: what a stop waits for

    def stopService(self) -> defer.Deferred:
        """
        A graceful stop (L{pullmail.smtp.drain}): the listeners close, the
        connections finish the requests in flight (bounded), then every
        service stops as before.
        """
        first = [defer.maybeDeferred(child.stopService) for child in reversed(list(self))
                 if isinstance(child, Listener)]
        if self.drain is not None:
            first.append(self.drain.stop())
        d = defer.DeferredList(first, consumeErrors=True)
        d.addCallback(lambda _: super(NodeService, self).stopService())
        return d

    def startService(self) -> None:
        if self.lock is not None:    # a daemon's pid is known only now
            record_pid(self.lock)
        super().startService()

    def setServiceParent(self, parent) -> None:
        super().setServiceParent(parent)
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
