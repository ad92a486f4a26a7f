"""
Profile pullmail under the 2 KB push load (smtp-source, 20 sessions) with
py-spy (from the bench venv): a flame graph (SVG) and the top functions by
own and by inclusive samples, from py-spy's raw (collapsed) output.
"""

from __future__ import annotations

import collections
import subprocess
import threading
import time
from pathlib import Path

from common import BENCH_VENV, PullmailServer, smtp_source


def run(args, workdir, dns, log) -> None:
    pyspy = BENCH_VENV / "bin" / "py-spy"
    server = PullmailServer(workdir, dns)
    server.start()
    out = Path(args.profile_out or workdir)
    out.mkdir(parents=True, exist_ok=True)
    raw, svg = out / "pullmail-2k.txt", out / "pullmail-2k.svg"
    try:
        smtp_source(server, 20, 2048, 100)
        seconds = args.profile_seconds
        stop = threading.Event()

        def load():
            while not stop.is_set():
                smtp_source(server, 20, 2048, 1000)

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        time.sleep(0.5)
        pid = str(server.pids()[0])
        for fmt_, path in (("raw", raw), ("flamegraph", svg)):
            subprocess.run([str(pyspy), "record", "--pid", pid, "--duration", str(int(seconds / 2)),
                            "--rate", "250", "--format", fmt_, "--output", str(path), "--nonblocking",
                            "--threads"], check=True, capture_output=True)
        stop.set()
        thread.join()
    finally:
        server.stop()
    own, incl, total = collections.Counter(), collections.Counter(), 0
    idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        count = int(count)
        frames = stack.split(";")
        if not any("MainThread" in f or "process " in f for f in frames[:2]):
            pass
        total += count
        names = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].split("/")[-1] + ")"
                 if " (" in f else f for f in frames]
        if names and ("epoll" in names[-1] or "poll (" in names[-1] or "_doReadOrWrite" in names[-1] and False):
            idle += count
        own[names[-1]] += count
        for name in set(names):
            incl[name] += count
    print(f"\n### Profile: pullmail under 2 KB × 20 sessions (py-spy, {seconds / 2:.0f} s, "
          f"all threads incl. idle; {total} samples)\nflame graph: {svg}\nraw stacks: {raw}\n")
    print("top own (self) samples:")
    for name, count in own.most_common(25):
        print(f"  {count / total * 100:5.1f}%  {name}")
    print("top inclusive samples:")
    for name, count in incl.most_common(40):
        print(f"  {count / total * 100:5.1f}%  {name}")
