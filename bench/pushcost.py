"""
pullmail's CPU per pushed message, A/B: one or more pullmail source trees
(or config variants of one), and optionally the "floor" peer (a minimal
Twisted ESMTP server that stores each message the way pullmail must: tmp/,
write, fsync, rename into new/, fsync the directory, all in the reactor
thread), each loaded in turn by ``smtp-source`` (20 sessions, 2 KB, several
messages per session), interleaved A B A B ... over the rounds.  CPU is
utime+stime from /proc of the server's processes (for pullmail the node and
its fsync helper, shown apart too): the machine is shared, so CPU time, not
wall time, is what compares.

Run inside a private network namespace, after ``sh bench/setup``::

    unshare -n sh -c 'ip link set lo up; .venv/bin/python bench/pushcost.py \\
        --variant base=/tmp/pushcost-base --variant new=. --floor --rounds 6'

A variant is ``LABEL=TREE`` (a pullmail checkout: ``git worktree add`` or
``git archive`` of another commit) with optional config settings after
``;``, e.g. ``"nometrics=.;metrics.enabled=false"``.  ``--profile DIR``
runs the first variant once more under cProfile (twistd ``--profiler``)
and prints its top functions.

``--dkim`` feeds every variant the bench section's 2 KB message from
``dkim.bench`` (``common.dkim_messages``: key records in the bench DNS
server), unsigned and signed (RSA-2048 + Ed25519) in turn within each
round, and prints each variant's extra CPU for a signed message: signed
minus unsigned, paired within the round.  With ``--profile``, it profiles
the signed message (``--unsigned``: the unsigned one).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (  # noqa: E402
    Server,
    count_files,
    process_tree,
    pullmail_node,
    wait_until,
)

VARIANT_IPS = [f"127.0.1.{20 + i}" for i in range(10)]


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- pullmail from a given source tree -----------------------------------------------------

def run_from_tree(node, tree: Path, profile: Path | None = None) -> None:
    """
    Make C{node} run pullmail from C{tree} (imports, fsync helper and all);
    with C{profile}, under cProfile, the stats written there at shutdown.
    """
    tree_path = str(tree)
    plain_argv, plain_env = node.argv, node.environment

    def argv() -> list[str]:
        command = plain_argv()
        # python -c puts the working directory (the harness's repository)
        # first on sys.path: put the tree before it.
        command[2] = f"import sys; sys.path.insert(0, {tree_path!r})\n" + command[2]
        if profile is not None:
            # Timed by the reactor thread's CPU clock (user + system), not
            # the wall clock: a shared machine's waits are not our cost.
            command[2] = command[2].replace("sys.exit(run())", (
                "import cProfile, time\n"
                "from twisted.internet import reactor\n"
                "profiler = cProfile.Profile(time.thread_time)\n"
                # twistd ends by re-raising the signal that stopped it:
                # the profile is written at the reactor's shutdown.
                "reactor.addSystemEventTrigger('after', 'shutdown', lambda: ("
                f"profiler.disable(), profiler.dump_stats({str(profile)!r})))\n"
                "profiler.enable()\n"
                "run()"))
        return command

    def environment() -> dict:
        env = plain_env()
        env["PYTHONPATH"] = tree_path + os.pathsep + env["PYTHONPATH"]
        return env

    node.argv, node.environment = argv, environment


class TreeServer(Server):
    """A pullmail node whose code comes from C{tree} (L{run_from_tree})."""

    def __init__(self, workdir: Path, dns, label: str, tree: Path, address: str,
                 settings: dict, profile: Path | None = None) -> None:
        self.name, self.address, self.tree = label, address, tree.resolve()
        self.rcpt = "sink@bench.test"
        self.node = pullmail_node(workdir, f"node-{label}", address, "bench.test", [self.rcpt],
                                  settings=settings, dns=dns)
        run_from_tree(self.node, self.tree, profile)

    def start(self):
        self.node.start(timeout=60)

    def stop(self):
        self.node.stop(timeout=30)

    def pids(self):
        return process_tree(self.node.pid) if self.node.pid else []

    def delivered(self):
        return count_files(self.node.maildir(self.rcpt) / "new")


# -- measuring ------------------------------------------------------------------------------

def parse_variant(text: str) -> tuple[str, Path, dict]:
    head, *sets = text.split(";")
    label, _, tree = head.partition("=")
    settings: dict = {}
    for item in sets:
        key, _, value = item.partition("=")
        section, _, name = key.strip().partition(".")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value      # a bare string
        settings.setdefault(section, {})[name] = parsed
    return label, Path(tree or "."), settings


def user_system(pid: int) -> tuple[float, float]:
    """utime and stime of C{pid}, seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) / common.CLK, int(fields[12]) / common.CLK


def measure(server: Server, sessions: int, size: int, count: int, reuse: bool,
            path: Path | None = None) -> dict:
    pids = server.pids()
    before = {p: user_system(p) for p in pids}
    delivered = server.delivered()
    elapsed = smtp_source(server, sessions, size, count, reuse, path)
    wait_until(lambda: server.delivered() >= delivered + count, 60, message=f"{server.name} stored")
    after = {p: user_system(p) for p in pids}
    per_message = lambda seconds: seconds / count * 1000
    main = pids[0] if pids else None
    spent = {p: (after[p][0] - before[p][0], after[p][1] - before[p][1]) for p in pids}
    node_user, node_system = spent.get(main, (0.0, 0.0))
    user = sum(u for u, _ in spent.values())
    system = sum(s for _, s in spent.values())
    return {"msgs": count / elapsed, "cpu": per_message(user + system),
            "node": per_message(node_user + node_system), "node user": per_message(node_user),
            "node sys": per_message(node_system),
            "helper user": per_message(user - node_user),
            "helper sys": per_message(system - node_system)}


def smtp_source(server: Server, sessions: int, size: int, count: int, reuse: bool,
                path: Path | None = None) -> float:
    """
    common.smtp_source (the file C{path}, else C{size} octets); with
    C{reuse}, every session sends several messages (-d).
    """
    return common.smtp_source(server, sessions, size, count, path=path,
                              options=("-d",) if reuse else ())


COLUMNS = ("node", "node user", "node sys", "helper user", "helper sys")


def report(results: dict, servers: list) -> None:
    """Medians (min–max) per server; CPU in ms per message; each variant ÷ the first."""
    floor = results.get("floor")
    print(f"\n{'server':12} {'msgs/s':>16} {'CPU ms/msg':>20} "
          + " ".join(f"{c:>11}" for c in COLUMNS) + "  ÷ floor")
    rows = [(s.name, s.name, "") for s in servers]
    rows += [(s.name, f"{s.name} signed", "signed ") for s in servers
             if "signed cpu" in results[s.name]]
    for name, row, prefix in rows:
        r = {key[len(prefix):]: values for key, values in results[name].items()
             if key.startswith(prefix) and (prefix or not key.startswith("signed "))}
        med = lambda k: statistics.median(r[k])
        spread = f"({min(r['cpu']):.3f}–{max(r['cpu']):.3f})"
        vs = f"{med('cpu') / statistics.median(floor['cpu']):.2f}×" if floor else ""
        print(f"{row:12} {med('msgs'):8.0f} ({min(r['msgs']):.0f}–{max(r['msgs']):.0f})"
              f" {med('cpu'):6.3f} {spread:13} " + " ".join(f"{med(c):11.3f}" for c in COLUMNS)
              + f"  {vs}")
    labels = [s.name for s in servers if s.name != "floor"]
    if labels and "signed cpu" in results[labels[0]]:
        for column, what in (("cpu", "node + fsync helper"), ("node", "node alone")):
            print(f"\nextra CPU ms for a signed message ({what}; signed − unsigned, paired per "
                  "round): median (min–max); per round")
            for label in labels:
                r = results[label]
                extra = [s - u for s, u in zip(r[f"signed {column}"], r[column])]
                print(f"{label:12} {statistics.median(extra):6.3f} ({min(extra):.3f}–"
                      f"{max(extra):.3f}); " + " ".join(f"{e:.3f}" for e in extra))
    for other in labels[1:]:
        pairs = [b / a for a, b in zip(results[labels[0]]["cpu"], results[other]["cpu"])]
        print(f"{other} ÷ {labels[0]}, CPU per message, per round: "
              + " ".join(f"{p:.2f}" for p in pairs) + f"; median {statistics.median(pairs):.3f}")


def profile(args, workdir, dns, variant, path: Path | None = None) -> None:
    label, tree, settings = variant
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    stats_path = out / f"{label}.pstats"
    stats_path.unlink(missing_ok=True)
    server = TreeServer(workdir, dns, f"{label}-prof", tree, VARIANT_IPS[-1], settings,
                        profile=stats_path)
    server.start()
    try:
        smtp_source(server, args.sessions, args.size, args.count, args.reuse, path)
        smtp_source(server, args.sessions, args.size, args.count * 2, args.reuse, path)
    finally:
        server.stop()
    wait_until(lambda: stats_path.exists(), 30, message="profile written")
    stats = pstats.Stats(str(stats_path))
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top + 15)


def variant_parser(description: str) -> argparse.ArgumentParser:
    """The options this tool shares with pushinstr.py: variants, the floor, the load."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[],
                        help="LABEL=TREE[;section.key=value...] (default: this tree)")
    parser.add_argument("--floor", action="store_true", help="measure the floor peer too")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    return parser


def main() -> None:
    parser = variant_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000, help="messages per round")
    parser.add_argument("--reuse", action="store_true",
                        help="several messages per session (smtp-source -d)")
    parser.add_argument("--dkim", action="store_true",
                        help="feed dkim.bench's message, unsigned and signed; print the difference")
    parser.add_argument("--unsigned", action="store_true",
                        help="with --dkim --profile: profile the unsigned message")
    parser.add_argument("--profile", default=None, help="folder: cProfile the first variant")
    parser.add_argument("--top", type=int, default=30, help="functions the profile shows")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant or ["this=."]]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pullmail-pushcost-"))
    workdir.chmod(0o755)
    dns = common.dns_server(workdir)
    dns.start()
    try:
        files = common.dkim_messages(workdir, dns)[0] if args.dkim else {}
        if args.profile:
            profile(args, workdir, dns, variants[0],
                    files.get("unsigned" if args.unsigned else "signed"))
            return
        servers: list[Server] = [TreeServer(workdir, dns, label, tree, VARIANT_IPS[i], settings)
                                 for i, (label, tree, settings) in enumerate(variants)]
        if args.floor:
            servers.append(common.FloorServer(workdir))   # bench/peers/floor_twisted.py
        for s in servers:
            s.start()
        try:
            inputs = [files.get("unsigned"), files.get("signed")] if args.dkim else [None]
            for s in servers:   # warm-up: fresh folders cost more (bench/README.md)
                for path in inputs:
                    smtp_source(s, args.sessions, args.size, 2 * args.count, args.reuse, path)
            results: dict = {}
            for rnd in range(args.rounds):
                for s in servers if rnd % 2 == 0 else servers[::-1]:
                    for path in inputs if rnd % 2 == 0 or s.name == "floor" else inputs[::-1]:
                        if path is not None and path == files["signed"] and s.name == "floor":
                            continue        # the floor verifies nothing
                        r = measure(s, args.sessions, args.size, args.count, args.reuse, path)
                        signed = path is not None and path == files["signed"]
                        for key, value in r.items():
                            key = f"signed {key}" if signed else key
                            results.setdefault(s.name, {}).setdefault(key, []).append(value)
                        log(f"round {rnd + 1} {s.name}{' signed' if signed else ''}: "
                            f"{r['msgs']:.0f} msgs/s, {r['cpu']:.3f} ms/msg (node {r['node']:.3f})")
        finally:
            for s in servers:
                s.stop()
        report(results, servers)
    finally:
        dns.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
