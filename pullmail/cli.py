"""
The ``pullmail`` operator command.

    pullmail checkconfig [--config FILE]
    pullmail adduser [--config FILE] ADDRESS     (password from stdin when piped)
    pullmail queue [--config FILE] [--flush | --delete ID | --json]
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import time
from typing import Sequence, TextIO

from pullmail import config as configuration
from pullmail.accounts import AccountsError, add_user, read_aliases, read_users
from pullmail.control import SOCKET_NAME, offline_delete, offline_listing

__all__ = ["main"]


def _load(args) -> configuration.Config:
    from pullmail.tap import load_config

    overrides = []
    for assignment in args.set or ():
        option, equals, value = assignment.partition("=")
        if not equals:
            raise configuration.ConfigError(option, "--set needs section.key=value")
        overrides.append((option.strip(), value.strip()))
    return load_config(args.config, overrides)


def checkconfig(args, out: TextIO) -> int:
    config = _load(args)
    read_users(config.accounts.users)
    read_aliases(config.accounts.aliases)
    print(
        f"config ok: {config.node.hostname} for {', '.join(config.node.domains)}; "
        f"state in {config.state_dir}",
        file=out,
    )
    return 0


def read_password(stdin: TextIO) -> str:
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise AccountsError("passwords do not match")
        return first
    return stdin.readline().rstrip("\r\n")


def adduser(args, out: TextIO) -> int:
    config = _load(args)
    domain = args.address.rpartition("@")[2].lower()
    if domain not in config.node.domains:
        raise AccountsError(f"{args.address}: {domain!r} is not one of node.domains")
    password = read_password(sys.stdin)
    if not password:
        raise AccountsError("empty password")
    address = add_user(config.accounts.users, args.address, password)
    print(f"user {address} saved in {config.accounts.users}", file=out)
    return 0


def _control(config: configuration.Config, request: dict) -> dict | None:
    """Ask the running node; None when no node answers on the socket."""
    path = config.state_dir / SOCKET_NAME
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    try:
        client.connect(str(path))
    except OSError:
        client.close()
        return None
    with client, client.makefile("rwb") as stream:
        stream.write(json.dumps(request).encode("utf-8") + b"\n")
        stream.flush()
        return json.loads(stream.readline())


def _age(seconds: float) -> str:
    """3725 -> '1h2m': the two largest units, like Postfix's mailq."""
    seconds = int(max(0, seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2])


_TITLES = {
    "outbox": "Outbox (notified, waiting for retrieval; next = expiry)",
    "push": "Push queue (waiting for an attempt)",
    "pending": "Pending notifications (to retrieve)",
}


def print_rows(rows: list[dict], out: TextIO) -> None:
    for kind, title in _TITLES.items():
        chosen = [r for r in rows if r["kind"] == kind]
        print(f"{title}: {len(chosen)}", file=out)
        for row in chosen:
            who = row.get("sender") or row.get("origin") or "<>"
            recipients = ",".join(row.get("recipients") or ["(at retrieval)"])
            line = (
                f"  {row['id']}  age {_age(row['age'])}  {row['state']}"
                f"  attempts {row['attempts']}  next in {_age(row['next'])}"
                f"  from <{who}> to {recipients}"
            )
            if row.get("last_error"):
                line += f"  ({row['last_error'][:80]})"
            print(line, file=out)


def queue(args, out: TextIO) -> int:
    config = _load(args)
    if args.delete:
        answer = _control(config, {"command": "delete", "id": args.delete})
        deleted = answer["ok"] if answer is not None else offline_delete(
            config.state_dir, args.delete
        )
        if not deleted:
            print(f"pullmail queue: no entry {args.delete}", file=sys.stderr)
            return 1
        print(f"deleted {args.delete}", file=out)
        return 0
    if args.flush:
        if _control(config, {"command": "flush"}) is None:
            print("pullmail queue: no node running; everything due is tried at start",
                  file=sys.stderr)
            return 1
        print("flushed: every queued entry and pending notification is due now", file=out)
        return 0
    answer = _control(config, {"command": "list"})
    rows = answer["rows"] if answer is not None else offline_listing(
        config.state_dir, time.time()
    )
    if args.json:
        print(json.dumps(rows, indent=1), file=out)
    else:
        print_rows(rows, out)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pullmail", description="pullmail operator commands")
    commands = top.add_subparsers(dest="command", required=True)

    def command(name: str, function, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--config", "-c", help="the TOML config (default: embedded default)")
        sub.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                         help="override one config key")
        sub.set_defaults(function=function)
        return sub

    command("checkconfig", checkconfig, "validate the configuration")
    command("adduser", adduser, "add a user or change a password").add_argument("address")
    queue_command = command("queue", queue, "list, flush or delete queued mail and notifications")
    queue_command.add_argument("--flush", action="store_true", help="try everything now")
    queue_command.add_argument("--delete", metavar="ID", help="drop one entry, no bounce")
    queue_command.add_argument("--json", action="store_true", help="machine-readable list")
    return top


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = parser().parse_args(argv)
    try:
        return args.function(args, out)
    except (configuration.ConfigError, AccountsError) as e:
        print(f"pullmail {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
