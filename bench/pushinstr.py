"""
Instructions per pushed message, A/B: each variant's node (or the floor
peer) runs under callgrind; after a warm-up its counters are zeroed
(``callgrind_control -z``), ``smtp-source`` pushes ``--count`` messages
(20 sessions, 2 KB, one per connection, as ``pushcost.py``), and the
counters are dumped (``-d``).  User-space instructions of the server
process only: not the kernel's work, not the fsync helper (a child that
runs outside valgrind).  Unlike CPU time, the count hardly moves with the
load of a shared machine (two runs of one tree: 0.2 % apart), so a change
of a few per cent is seen in one run.  About a minute per variant.

    unshare -n sh -c 'ip link set lo up; .venv/bin/python bench/pushinstr.py \\
        --variant base=/tmp/pushcost-base --variant new=. --floor'

Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import pushcost  # noqa: E402
from common import wait_until  # noqa: E402

VALGRIND = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--dump-line=no"]


def counted(server, pid: int, out: Path, args) -> float:
    """Thousands of instructions per message of process C{pid} under callgrind."""
    pushcost.smtp_source(server, args.sessions, args.size, args.warmup, False)
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    stored = server.delivered()
    pushcost.smtp_source(server, args.sessions, args.size, args.count, False)
    wait_until(lambda: server.delivered() >= stored + args.count, 120, message="stored")
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 30
    while not (dumps := sorted(out.glob("cg.*.1"))) and time.monotonic() < deadline:
        time.sleep(0.5)
    total = re.search(rb"^(?:summary|totals):\s+(\d+)", dumps[0].read_bytes(), re.M)
    return int(total.group(1)) / args.count / 1000


def tree_variant(workdir: Path, dns, index: int, text: str, args) -> tuple[str, float]:
    label, tree, settings = pushcost.parse_variant(text)
    out = workdir / f"callgrind-{label}"
    out.mkdir()
    server = pushcost.TreeServer(workdir, dns, label, tree, pushcost.VARIANT_IPS[index], settings)
    plain = server.node.argv
    server.node.argv = lambda: [*VALGRIND, f"--callgrind-out-file={out}/cg.%p", *plain()]
    server.node.start(timeout=600)
    try:
        return label, counted(server, server.node.pid, out, args)
    finally:
        server.node.stop(timeout=120)


def floor_variant(workdir: Path, args) -> tuple[str, float]:
    out = workdir / "callgrind-floor"
    out.mkdir()
    wrapper = workdir / "valgrind-python"
    wrapper.write_text(f"#!/bin/sh\nexec {' '.join(VALGRIND)} --callgrind-out-file={out}/cg.%p "
                       f"{sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    server = common.FloorServer(workdir)
    server.python = wrapper
    server.start()
    try:
        return "floor", counted(server, server.proc.pid, out, args)
    finally:
        server.stop()


def main() -> None:
    parser = pushcost.variant_parser(__doc__)
    parser.add_argument("--count", type=int, default=600, help="messages counted")
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("pushinstr: valgrind is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="pullmail-pushinstr-"))
    workdir.chmod(0o755)
    dns = common.dns_server(workdir)
    dns.start()
    results = []
    try:
        if args.floor:
            results.append(floor_variant(workdir, args))
        for index, text in enumerate(args.variant or ["this=."]):
            results.append(tree_variant(workdir, dns, index, text, args))
    finally:
        dns.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    first = next((k for label, k in results if label != "floor"), None)
    floor = dict(results).get("floor")
    for label, thousands in results:
        versus = [f"÷ floor {thousands / floor:.2f}×" if floor else "",
                  f"÷ first {thousands / first:.3f}" if first and label != "floor" else ""]
        print(f"{label:12} {thousands:8.1f} k instructions/message  " + "  ".join(versus))


if __name__ == "__main__":
    main()
