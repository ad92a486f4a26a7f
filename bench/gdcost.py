"""
CPU per message of General Delivery end to end against push, A/B: for
each variant (a pullmail source tree), a sender node and two receivers,
one offering GDEL and one not (so nothing restarts between modes).  Each
round submits the same 2 KB messages (STARTTLS+AUTH submission sessions,
as ``bench/run --only gd`` does) for the pull receiver, then for the push
one, variant after variant (A B, then B A), and prints msgs/s and the CPU
per message of each process apart: sender node, its fsync helper,
receiver node, its fsync helper (utime+stime from /proc).

Run inside a private network namespace, after ``sh bench/setup``::

    unshare -n sh -c 'ip link set lo up; .venv/bin/python bench/gdcost.py \\
        --variant base=/tmp/gdcpu-base --variant new=. --rounds 6'

``--profile DIR`` runs the first variant's two pull nodes under cProfile
(reactor thread CPU clock) and prints the top functions of each;
``--sample DIR`` samples them with py-spy instead (no cProfile inflation
of small calls; raw stacks and the top functions by inclusive samples).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench import _submit_load  # noqa: E402
from common import count_files, process_tree, pullmail_node, wait_until  # noqa: E402
from pushcost import parse_variant, run_from_tree, user_system  # noqa: E402

MODES = ("pull", "push")
PARTS = ("sender", "sender helper", "receiver", "receiver helper")
# Printed beside the parts: the system time within each node's own figure.
COLUMNS = ("sender", "sender sys", "sender helper", "receiver", "receiver sys", "receiver helper")


def records(count: int) -> dict:
    """DNS for each variant's three domains (SPF: each node's own address)."""
    zone = {}
    for i in range(count):
        for domain, ip in addresses(i).items():
            zone[domain] = {"A": [ip], "MX": [[10, f"mx.{domain}"]],
                            "TXT": [f"v=spf1 ip4:{ip} -all"]}
            zone[f"mx.{domain}"] = {"A": [ip]}
    return zone


def addresses(i: int) -> dict[str, str]:
    return {f"s{i}.gd": f"127.0.2.{10 * i + 1}", f"g{i}.gd": f"127.0.2.{10 * i + 2}",
            f"p{i}.gd": f"127.0.2.{10 * i + 3}"}


class Trio:
    """A variant's sender and its two receivers ("pull": gdel on, "push": off)."""

    def __init__(self, workdir: Path, dns, i: int, label: str, tree: Path, settings: dict,
                 profile: Path | None = None) -> None:
        self.label = label
        (s, s_ip), (g, g_ip), (p, p_ip) = addresses(i).items()
        self.sender_address = f"alice@{s}"
        self.sender = pullmail_node(workdir, f"{label}-sender", s_ip, s, [self.sender_address],
                                    settings=settings, dns=dns)
        self.receivers = {}
        for mode, domain, ip in (("pull", g, g_ip), ("push", p, p_ip)):
            merged = {k: dict(v) for k, v in settings.items()}
            merged.setdefault("trust", {})["gdel"] = mode == "pull"
            self.receivers[mode] = pullmail_node(workdir, f"{label}-{mode}", ip, domain,
                                                 [f"bob@{domain}"], settings=merged, dns=dns)
        for name, node in (("sender", self.sender), ("pull", self.receivers["pull"]),
                           ("push", self.receivers["push"])):
            run_from_tree(node, tree.resolve(),
                          profile / f"{label}-{name}.pstats" if profile else None)

    def nodes(self):
        return [self.sender, *self.receivers.values()]

    def rcpt(self, mode: str) -> str:
        return f"bob@{self.receivers[mode].domains[0]}"

    def delivered(self, mode: str) -> int:
        return len(self.receivers[mode].delivered_paths(self.rcpt(mode)))

    def run(self, mode: str, count: int, sessions: int) -> dict:
        receiver = self.receivers[mode]
        pids = {"sender": process_tree(self.sender.pid), "receiver": process_tree(receiver.pid)}
        before = {p: user_system(p) for ps in pids.values() for p in ps}
        delivered = self.delivered(mode)
        start = time.monotonic()
        asyncio.run(_submit_load(self.sender, count, sessions, 2048, self.sender_address,
                                 self.rcpt(mode)))
        wait_until(lambda: self.delivered(mode) >= delivered + count, 300, interval=0.02,
                   message=f"{self.label} {mode}: {count} delivered")
        elapsed = time.monotonic() - start
        outbox = self.sender.state_dir / "outbox" / "entries"
        wait_until(lambda: count_files(outbox) == 0, 60, message="sender outbox to empty")
        spent = {}
        for side, ps in pids.items():
            used = [[now - then for now, then in zip(user_system(p), before[p])] for p in ps]
            spent[side] = sum(used[0]) / count * 1000
            spent[f"{side} sys"] = used[0][1] / count * 1000
            spent[f"{side} helper"] = sum(sum(u) for u in used[1:]) / count * 1000
        spent["total"] = sum(spent[part] for part in PARTS)
        spent["msgs"] = count / elapsed
        return spent


def report(results: dict, labels: list[str]) -> None:
    med = statistics.median
    print(f"\n{'variant':10} {'mode':5} {'msgs/s':>16} {'CPU ms/msg':>20} "
          + " ".join(f"{c:>15}" for c in COLUMNS))
    for label in labels:
        for mode in MODES:
            r = results[label][mode]
            print(f"{label:10} {mode:5} {med(r['msgs']):7.0f} ({min(r['msgs']):.0f}–"
                  f"{max(r['msgs']):.0f}) {med(r['total']):6.2f} ({min(r['total']):.2f}–"
                  f"{max(r['total']):.2f}) " + " ".join(f"{med(r[c]):15.3f}" for c in COLUMNS))
        pull, push = results[label]["pull"], results[label]["push"]
        rates = [a / b for a, b in zip(pull["msgs"], push["msgs"])]
        cpus = [a / b for a, b in zip(pull["total"], push["total"])]
        print(f"{label}: pull ÷ push per round, msgs/s " + " ".join(f"{r:.2f}" for r in rates)
              + f" (median {med(rates):.2f}); CPU " + " ".join(f"{c:.2f}" for c in cpus)
              + f" (median {med(cpus):.2f})")
    for other in labels[1:]:
        for mode in MODES:
            pairs = [b / a for a, b in zip(results[labels[0]][mode]["total"],
                                           results[other][mode]["total"])]
            print(f"{other} ÷ {labels[0]}, {mode} CPU per message, per round: "
                  + " ".join(f"{p:.2f}" for p in pairs) + f"; median {med(pairs):.3f}")


def profile(args, workdir: Path, dns, variant) -> None:
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    trio = Trio(workdir, dns, 0, *variant, profile=out)
    for node in trio.nodes():
        node.start(timeout=60)
    try:
        trio.run("pull", 100, args.sessions)
        trio.run("pull", args.count, args.sessions)
    finally:
        for node in trio.nodes():
            node.stop(timeout=30)
    for name in ("sender", "pull"):
        path = out / f"{trio.label}-{name}.pstats"
        wait_until(path.exists, 30, message=f"{path} written")
        print(f"\n### {name} node (pull mode)")
        stats = pstats.Stats(str(path))
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top + 20)


def sample(args, workdir: Path, dns, variant) -> None:
    """py-spy on the sender and the pull receiver while pull load runs."""
    out = Path(args.sample)
    out.mkdir(parents=True, exist_ok=True)
    trio = Trio(workdir, dns, 0, *variant)
    for node in trio.nodes():
        node.start(timeout=60)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            trio.run("pull", 500, args.sessions)

    try:
        trio.run("pull", 300, args.sessions)
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        spies = {name: subprocess.Popen(
            [str(common.BENCH_VENV / "bin" / "py-spy"), "record", "--pid", str(node.pid),
             "--duration", "20", "--rate", "200", "--format", "raw", "--nonblocking",
             "--output", str(out / f"{name}.txt")], stdout=subprocess.DEVNULL)
            for name, node in (("sender", trio.sender), ("receiver", trio.receivers["pull"]))}
        for spy in spies.values():
            spy.wait()
        stop.set()
        thread.join()
    finally:
        for node in trio.nodes():
            node.stop(timeout=30)
    for name in spies:
        print_samples(name, out / f"{name}.txt", args.top)


def print_samples(name: str, raw: Path, top: int) -> None:
    """The top functions of py-spy's raw stacks, by inclusive and own samples (idle aside)."""
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] for f in stack.split(";")]
        if "poll (" in frames[-1] or "doPoll" in frames[-1]:
            continue
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    print(f"\n### {name}: {total} busy samples")
    for title, counter in (("inclusive", inclusive), ("own", own)):
        print(f"top {title}:")
        for frame, count in counter.most_common(top):
            print(f"  {count / total * 100:5.1f}%  {frame}")


@contextlib.contextmanager
def bench_folder(workdir: str | None, prefix: str, zone: dict):
    """A work folder (removed after, unless given) with the bench DNS server on C{zone}."""
    folder = Path(workdir or tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    dns = common.dns_server(folder, zone)
    dns.start()
    try:
        yield folder, dns
    finally:
        dns.stop()
        if not workdir:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[],
                        help="LABEL=TREE[;section.key=value...] (default: this tree)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--count", type=int, default=1000, help="messages per round and mode")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--profile", default=None, help="folder: cProfile the first variant")
    parser.add_argument("--sample", default=None, help="folder: py-spy the first variant")
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant or ["this=."]]
    with bench_folder(args.workdir, "pullmail-gdcost-", records(len(variants))) as (workdir, dns):
        if args.profile or args.sample:
            (profile if args.profile else sample)(args, workdir, dns, variants[0])
            return
        trios = [Trio(workdir, dns, i, *v) for i, v in enumerate(variants)]
        for trio in trios:
            for node in trio.nodes():
                node.start(timeout=60)
        try:
            for trio in trios:          # warm-up: fresh folders cost more (bench/README.md)
                for mode in MODES:
                    trio.run(mode, args.count // 2, args.sessions)
            results = {t.label: {m: {} for m in MODES} for t in trios}
            for rnd in range(args.rounds):
                for trio in trios if rnd % 2 == 0 else trios[::-1]:
                    for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
                        r = trio.run(mode, args.count, args.sessions)
                        for key, value in r.items():
                            results[trio.label][mode].setdefault(key, []).append(value)
                        print(f"[{time.strftime('%H:%M:%S')}] round {rnd + 1} {trio.label} {mode}: "
                              f"{r['msgs']:.0f} msgs/s, {r['total']:.2f} ms/msg ("
                              + ", ".join(f"{c} {r[c]:.2f}" for c in COLUMNS) + ")",
                              file=sys.stderr, flush=True)
        finally:
            for trio in trios:
                for node in trio.nodes():
                    node.stop(timeout=30)
        report(results, [t.label for t in trios])


if __name__ == "__main__":
    main()
