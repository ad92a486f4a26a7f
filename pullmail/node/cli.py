"""
The ``pullmail`` operator command.

    pullmail checkconfig [--config FILE]
    pullmail adduser [--config FILE] ADDRESS     (password from stdin when piped)
    pullmail queue [--config FILE] [--flush | --delete ID | --json]
    pullmail spf-record [--config FILE]
    pullmail initdb [--config FILE]              ([store] backend = "postgresql")
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
import socket
import sys
import time
from typing import Sequence, TextIO

from pullmail import config as configuration
from pullmail.accounts.users import AccountsError, add_user, read_aliases, read_users
from pullmail.interfaces import IDeliveryHook, ITrustPolicy
from pullmail.node.control import SOCKET_NAME, cluster_queue, offline_delete, offline_listing
from pullmail.node.plugin import enabled_plugins

__all__ = ["main"]


def _load(args) -> configuration.Config:
    overrides = []
    for assignment in args.set or ():
        option, equals, value = assignment.partition("=")
        if not equals:
            raise configuration.ConfigError(option, "--set needs section.key=value")
        overrides.append((option.strip(), value.strip()))
    return configuration.load_config(args.config, overrides)


def checkconfig(args, out: TextIO) -> int:
    config = _load(args)
    read_users(config.accounts.users)
    read_aliases(config.accounts.aliases)
    enabled_plugins(ITrustPolicy, config.trust.policies, "trust.policies")
    enabled_plugins(IDeliveryHook, config.delivery.hooks, "delivery.hooks")
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
    if config.store.backend == "postgresql":   # SPEC 11.3: the cluster's queue, from any node
        return cluster_queue(config, args, out, print_rows)
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


def initdb(args, out: TextIO) -> int:
    """SPEC 11.3: create or upgrade the cluster's schema; running it again changes nothing."""
    from pullmail.storage.postgresql import schema
    from pullmail.storage.postgresql.database import Database, StoreUnavailable

    config = _load(args)
    if config.store.backend != "postgresql":
        print('pullmail initdb: [store] backend is not "postgresql"; nothing to do',
              file=sys.stderr)
        return 1
    try:
        with Database(config.store.dsn).connect() as connection:
            before, after = schema.initdb(connection)
    except (schema.SchemaError, StoreUnavailable) as e:
        print(f"pullmail initdb: {e}", file=sys.stderr)
        return 1
    if before == after:
        print(f"schema is up to date (version {after})", file=out)
    else:
        print(f"schema {'upgraded from version ' + str(before) if before else 'created'}:"
              f" version {after}", file=out)
    return 0


def outbound_addresses(config: configuration.Config) -> list[str]:
    """
    The addresses this node sends from: the bind address, else the
    interfaces its MX service listens on (unspecified ones say nothing).
    """
    candidates = [config.delivery.bind_address] if config.delivery.bind_address else []
    if not candidates:
        for description in config.listen.smtp:
            for part in description.split(":"):
                if part.startswith("interface="):
                    candidates.append(part.removeprefix("interface=").replace("\\:", ":"))
    found = []
    for text in candidates:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if not address.is_unspecified and str(address) not in found:
            found.append(str(address))
    return found


def spf_record(args, out: TextIO) -> int:
    """Print the TXT record each local domain should publish (RFC 7208)."""
    config = _load(args)
    addresses = outbound_addresses(config)
    if addresses:
        mechanisms = " ".join(
            f"ip6:{a}" if ":" in a else f"ip4:{a}" for a in addresses
        )
    else:
        mechanisms = "mx"
        print("; no fixed outbound address configured ([delivery] bind_address):"
              " authorising the domain's MX hosts", file=out)
    for domain in config.node.domains:
        print(f'{domain}.\tIN\tTXT\t"v=spf1 {mechanisms} -all"', file=out)
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
    command("initdb", initdb, "create or upgrade the PostgreSQL schema ([store])")
    command("spf-record", spf_record, "print the SPF record the local domains should publish")
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
