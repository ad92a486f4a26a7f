"""
The ``pullmail`` operator command.

    pullmail checkconfig [--config FILE]
    pullmail adduser [--config FILE] ADDRESS     (password from stdin when piped)
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Sequence, TextIO

from pullmail import config as configuration
from pullmail.accounts import AccountsError, add_user, read_aliases, read_users

__all__ = ["main"]


def _load(args) -> configuration.Config:
    from pullmail.tap import load_config

    return load_config(args.config, [tuple(s.split("=", 1)) for s in args.set or ()])


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
