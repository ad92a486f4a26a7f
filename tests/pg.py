"""
A private PostgreSQL cluster for the tests, from Debian's ``postgresql``
package: ``initdb`` and ``pg_ctl`` run as an unprivileged user (initdb
refuses root) in a folder of its own, listening on a loopback port.
Nothing about the database is mocked.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PostgresCluster", "find_binaries"]

# The user the server runs as when the tests run as root.
SERVER_USER = "nobody"
SUPERUSER = "pullmail"
DATABASE = "pullmail"


def find_binaries() -> Path | None:
    """The newest /usr/lib/postgresql/N/bin holding initdb and pg_ctl, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if not found:
        on_path = shutil.which("initdb")
        return Path(on_path).parent if on_path else None
    return Path(found[-1]).parent


class PostgresCluster:
    def __init__(self, binaries: Path, port: int, host: str = "127.0.0.1",
                 durable: bool = False) -> None:
        """C{durable}: fsync as a production server does (benchmarks)."""
        self.durable = durable
        self.binaries = binaries
        self.port = port
        self.host = host
        self.folder = Path(tempfile.mkdtemp(prefix="pullmail-pg-"))
        self.data = self.folder / "data"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            user = pwd.getpwnam(SERVER_USER)
            os.chmod(self.folder, 0o755)
            os.chown(self.folder, user.pw_uid, user.pw_gid)

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{DATABASE}"

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self.binaries / command[0]), *command[1:]]
        if self._as_root:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        return subprocess.run(argv, check=check, capture_output=True, text=True,
                              cwd=self.folder, timeout=120)

    def create(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '{self.host}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.folder}'\nmax_connections = 200\n"
            )
            if not self.durable:
                # A test cluster: no need to survive a power cut of the test machine.
                conf.write("fsync = off\nfull_page_writes = off\n")
        self.start()
        self._run("createdb", "-h", self.host, "-p", str(self.port), "-U", SUPERUSER, DATABASE)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)
