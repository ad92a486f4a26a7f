"""
The ``pullmail`` operator command.

    pullmail checkconfig [--config FILE]
    pullmail adduser [--config FILE] ADDRESS     (password from stdin when piped)
    pullmail queue [--config FILE] [--json] [hold ID | release ID | delete ID | flush | shape]
    pullmail sendmail [--config FILE] [-t] [-i] [-f SENDER] [-F NAME] [RECIPIENT...]
    pullmail doctor [--config FILE]
    pullmail spf-record [--config FILE]
    pullmail dkim-keygen [--config FILE] [DOMAIN ...]
    pullmail initdb [--config FILE]              ([store] backend = "postgresql")
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
import socket
import sys
from typing import Sequence, TextIO

from pullmail import config as configuration
from pullmail.accounts.users import (
    AccountsError,
    add_user,
    normalise_local_address,
    read_aliases,
    read_users,
)
from pullmail.interfaces import IDeliveryHook, ITrustPolicy
from pullmail.node import doctor, queuetools, sendmail
from pullmail.node.control import SOCKET_NAME, cluster_control
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
    configuration.check_dkim_keys(config)
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
    # RFC 6531: a UTF-8 address is kept NFC-normalised, its domain as A-labels.
    domain = normalise_local_address(args.address).rpartition("@")[2]
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


def queue(args, out: TextIO) -> int:
    config = _load(args)
    if config.store.backend == "postgresql":   # SPEC 11.3: the cluster's queue, from any node
        return queuetools.run(config, args, out, cluster_control(
            config, lambda request: _control(config, request)))
    return queuetools.run(config, args, out, lambda request: _control(config, request))


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


def dkim_keygen(args, out: TextIO) -> int:
    """
    SPEC 11.1: make each missing key pair (RSA 2048, Ed25519) of the
    domains (default: node.domains) and print every key's DNS record, one
    zone-file line each.  An existing key is kept, never overwritten.
    """
    from pullmail.trust.dkim_keys import dns_record, ensure_keys, load_keys

    config = _load(args)
    try:
        domains = [configuration._domain(d) for d in args.domains] or list(config.node.domains)
    except ValueError as e:
        raise configuration.ConfigError("DOMAIN", str(e)) from None
    try:
        made = {(k.domain, k.algorithm) for k in ensure_keys(config.dkim, domains)}
    except OSError as e:
        raise configuration.ConfigError("dkim.key_dir", str(e)) from None
    for domain, keys in load_keys(config.dkim, domains).items():
        for key in keys:
            state = "new" if (domain, key.algorithm) in made else "existing"
            print(f"; {state} {key.algorithm} key {config.dkim.key_path(domain, key.algorithm)}",
                  file=sys.stderr)
            print(dns_record(key), file=out)
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
    keygen = command("dkim-keygen", dkim_keygen,
                     "make missing DKIM keys and print the DNS records to publish")
    keygen.add_argument("domains", nargs="*", metavar="DOMAIN")
    queue_command = command("queue", queue, "list, hold, release, delete or flush queued "
                            "mail and notifications; shape: counts per domain and age")
    queue_command.add_argument("action", nargs="?", default="list",
                               choices=["list", "hold", "release", "delete", "flush", "shape"])
    queue_command.add_argument("target", nargs="?", metavar="ID",
                               help="the entry for hold, release or delete")
    queue_command.add_argument("--flush", action="store_true", help="try everything now")
    queue_command.add_argument("--delete", metavar="ID", help="drop one entry, no bounce")
    queue_command.add_argument("--json", action="store_true",
                               help="one JSON document (schema in pullmail.node.queuetools)")
    queue_command.add_argument("--queue", choices=["outbox", "push", "pending"],
                               help="shape: only this queue (default: outbox and push)")
    doctor_command = command("doctor", doctor.doctor,
                             "check the DNS records of the local domains")
    doctor_command.add_argument("--address", action="append", metavar="IP",
                                help="this node's public address (default: from the config)")
    return top


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sendmail"]:       # Postfix's command line, not argparse's
        return sendmail.main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.function(args, out)
    except (configuration.ConfigError, AccountsError) as e:
        print(f"pullmail {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
