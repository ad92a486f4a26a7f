"""
The targets table of issue 17, printed at the end of every run: each
measure, its figure from this run, its target and whether it was met.
Sections put their figures into one results dict (``args.results``) under
the keys below; a row whose section did not run says so.  Printed, never
asserted.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from common import table


class Target(NamedTuple):
    measure: str
    section: str                              # the section that measures it
    key: str                                  # its key in the results dict
    target: str
    show: Callable[[object], str]             # the figure, as printed
    met: Callable[[object], bool | None]      # None: cannot be judged from this run


def _x(value) -> str:
    return f"{value:.2f}×"


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


def _at_least(limit: float) -> Callable[[float], bool]:
    return lambda value: value >= limit


def _best_aiosmtpd(value) -> str:
    ratio, name = value
    return f"{ratio:.2f}× ({name.removeprefix('aiosmtpd-')})"


def _latency(value) -> str:
    p50, p99, n = value
    return f"{p50:.0f} / {p99:.0f} ms ({n} msgs)"


def _startup(value) -> str:
    entries, seconds, per_entry = value
    memory = f", {per_entry:,.0f} B per entry" if per_entry is not None else ""
    return f"{seconds:.1f} s at {entries:,} entries{memory}"


def _startup_met(value) -> bool | None:
    entries, seconds, _ = value
    return seconds <= 10.0 if entries >= 1_000_000 else None


def _flood(value) -> str:
    ratio, caused = value
    return f"{ratio:.2f}×, {caused} connections caused"


TARGETS = [
    Target("push 2 KB, CPU per message ÷ floor peer", "push", "push_2k_cpu_floor", "≤ 1.3×",
           _x, _at_most(1.3)),
    Target("push 2 KB, msgs/s ÷ best aiosmtpd", "push", "push_2k_aiosmtpd", "≥ 1.5×",
           _best_aiosmtpd, lambda v: v[0] >= 1.5),
    Target("push 2 KB, msgs/s ÷ Postfix", "push", "push_2k_postfix", "≥ 2.0×", _x, _at_least(2.0)),
    Target("push 100 KB, msgs/s ÷ Postfix", "push", "push_100k_postfix", "≥ 1.5×", _x,
           _at_least(1.5)),
    Target("General Delivery end to end ÷ push", "gd", "gd_ratio", "≥ 0.8×", _x, _at_least(0.8)),
    Target("latency at light load, pull p50 / p99", "latency", "latency_pull",
           "≤ 30 ms / ≤ 100 ms", _latency, lambda v: v[0] <= 30 and v[1] <= 100),
    Target("wire bytes, pull ÷ push, 10 KB", "wire", "wire_bytes_10k", "≤ 1.10×", _x,
           _at_most(1.10)),
    Target("TCP connections per pulled message, 1 MB", "wire", "wire_conns_1m", "≤ 1.05",
           lambda v: f"{v:.2f}", _at_most(1.05)),
    Target("start-up, 1M-entry outbox", "scale", "startup", "≤ 10 s", _startup, _startup_met),
    Target("legitimate throughput during the flood ÷ quiet", "flood", "flood",
           "≥ 0.7×, 0 connections caused", _flood, lambda v: v[0] >= 0.7 and v[1] == 0),
    Target("push 2 KB, all features on ÷ all off", "features", "features", "≥ 0.85×",
           lambda v: f"{v[0]:.2f}× (CPU per message {v[1]:.2f}×)", lambda v: v[0] >= 0.85),
]


def rows(results: dict, sections: list[str]) -> list[list[str]]:
    out = []
    for t in TARGETS:
        value = results.get(t.key)
        if value is None:
            figure = "not run" if t.section not in sections else "no figure (peer left out, or failed)"
            out.append([t.measure, figure, t.target, "not run" if t.section not in sections else "—"])
            continue
        met = t.met(value)
        verdict = {True: "met", False: "NOT MET", None: "— (judged at 1M: --scale-max 1000000)"}[met]
        out.append([t.measure, t.show(value), t.target, verdict])
    return out


def print_targets(results: dict, sections: list[str]) -> None:
    table("Targets (issue 17): medians of this run; printed, not asserted",
          ["measure", "figure", "target", "met?"], rows(results, sections))
