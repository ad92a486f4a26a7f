"""
The node's configuration: one TOML file parsed into frozen dataclasses.

``parse(mapping, base)`` is pure and does all validation; ``load(path)`` only
reads the file.  Every error names the offending key, so that ``pullmail
checkconfig`` can print one clear line.  Nothing here reads the wall clock,
the hostname or the environment: the embedded default is a literal (only
``load_config`` looks at ``$PULLMAIL_CONFIG`` and /etc/pullmail, to find the file).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.internet import endpoints

from pullmail.smtp.address import AddressError, a_label_domain

__all__ = [
    "Config",
    "ConfigError",
    "parse",
    "load",
    "load_config",
    "embedded_default",
    "parse_duration",
    "parse_size",
    "check_dkim_keys",
]


class ConfigError(ValueError):
    """A configuration value is wrong; ``option`` names the key."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
# SI prefixes are decimal, IEC ones binary, as their standards define them.
_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
    "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3,
}
_SIZE = re.compile(r"(\d+)\s*([KMG]I?B|B)?", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """``"90s"``, ``"10m"``, ``"1h30m"``, ``"5d"`` -> seconds."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"duration must be a string like '10m', not {text!r}")
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(
            f"bad duration {text!r} (use e.g. '0s', '10m', '48h', '5d')"
        )
    return total


def parse_size(text: str | int) -> int:
    """``"25MB"`` -> 25000000; ``"1MiB"`` -> 1048576; a bare int is bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"bad size {text!r} (use e.g. '25MB', '512KiB')")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()]


# Server endpoints touch their reactor only when they listen, so a
# description is checked by building its endpoint around no reactor at all.
_NOT_LISTENING = object()
_PORT_FIRST = {"tcp", "tcp6", "ssl"}


def _endpoint(text: str) -> str:
    """Check that a server endpoint string parses, without listening."""
    try:
        endpoints.serverFromString(_NOT_LISTENING, text)
    except Exception as e:  # parsers raise anything, e.g. OSError for ssl: files
        raise ValueError(f"bad endpoint {text!r}: {e}") from None
    # The parser takes any integer as a TCP port; listening would fail later.
    kind, _, arguments = text.partition(":")
    if kind.lower() in _PORT_FIRST:
        port = arguments.split(":", 1)[0].removeprefix("port=")
        if not 0 <= int(port) < 65536:
            raise ValueError(f"bad endpoint {text!r}: port {port} out of range")
    return text


def _hostport(text: str, default_port: int) -> tuple[str, int]:
    """``"127.0.0.1:5353"`` / ``"[::1]:53"`` / ``"10.0.0.1"`` -> (host, port)."""
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = int(rest.removeprefix(":"))
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    if not host or not 0 < port < 65536:
        raise ValueError(f"bad host:port {text!r}")
    return host, port


def _path(text: str) -> Path:
    if "\0" in text:
        raise ValueError("a path cannot contain a NUL character")
    return Path(text)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


_DOMAIN = re.compile(
    r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _domain(text: str) -> str:
    """A domain name; an internationalised one as its A-labels (IDNA 2008)."""
    if isinstance(text, str):
        try:
            text = a_label_domain(text)
        except AddressError as e:
            raise ValueError(f"bad domain name {text!r}: {e}") from None
    if not isinstance(text, str) or not _DOMAIN.fullmatch(text):
        raise ValueError(f"bad domain name {text!r}")
    return text.lower()


# -- the sections -------------------------------------------------------------
# Each field's metadata holds its TOML type and a converter; the defaults are
# those of SPEC section 10.


def _opt(default: Any, kind: type | tuple, convert: Callable | None = None):
    return field(default=default, metadata={"kind": kind, "convert": convert})


def _list(default: list, convert: Callable | None = None):
    # Defaults are written as in the file and converted like file values.
    return field(
        default=tuple(convert(item) if convert else item for item in default),
        metadata={"kind": list, "convert": convert, "each": True},
    )


@dataclass(frozen=True)
class NodeConfig:
    hostname: str = _opt("localhost", str, _domain)
    domains: tuple[str, ...] = _list(["example.org"], _domain)
    state_dir: Path = _opt(Path("var"), str, _path)
    log_commands: bool = _opt(False, bool)
    log_format: str = _opt("text", str, lambda v: _one_of({"text", "json"})(v))


@dataclass(frozen=True)
class ListenConfig:
    smtp: tuple[str, ...] = _list(["tcp:2525:interface=127.0.0.1"], _endpoint)
    submission: tuple[str, ...] = _list(["tcp:2587:interface=127.0.0.1"], _endpoint)
    submissions: tuple[str, ...] = _list([], _endpoint)


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path = _opt(Path("var/tls/cert.pem"), str, _path)
    key: Path = _opt(Path("var/tls/key.pem"), str, _path)
    generate: bool = _opt(True, bool)


@dataclass(frozen=True)
class AccountsConfig:
    users: Path = _opt(Path("users"), str, _path)
    aliases: Path = _opt(Path("aliases"), str, _path)


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[tuple[str, int], ...] = _list([], lambda s: _hostport(s, 53))
    timeout: float = _opt(5.0, str, parse_duration)


_SPF_RESULTS = {"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"}
_PUSH_POLICIES = ("accept", "spf-pass", "allow-only", "refuse")


def _one_of(choices) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(sorted(choices))}")
        return value

    return check


def _network_or_domain(text: str):
    try:
        return _network(text)
    except ValueError:
        return _domain(text)


@dataclass(frozen=True)
class TrustConfig:
    spf_accept: tuple[str, ...] = _list(["pass"], _one_of(_SPF_RESULTS))
    allow: tuple = _list([], _network_or_domain)
    deny: tuple = _list([], _network_or_domain)
    dnsbl: tuple[str, ...] = _list([], _domain)
    policies: tuple[str, ...] = _list([], str)
    push: str = _opt("accept", str, _one_of(_PUSH_POLICIES))
    bare_gdel: bool = _opt(True, bool)
    gdel: bool = _opt(True, bool)
    # SPEC 11.1: the Authentication-Results name (empty: [node] hostname) and
    # what a failing DMARC policy does (RFC 7489 6.6.4).
    authserv_id: str = _opt("", str, lambda text: _domain(text) if text else "")
    dmarc: str = _opt("enforce", str, _one_of({"enforce", "report", "off"}))


def _optional_hostport(text: str):
    return _hostport(text, 25) if text else None


def _optional_address(text: str) -> str:
    if text:
        ipaddress.ip_address(text)
    return text


# Never connected to (see etc/pullmail.toml): from the IANA IPv4 and IPv6
# Special-Purpose Address Registries (RFC 6890), the ranges no mail server
# can be on.  Loopback and the private ranges are left to the operator.
DEFAULT_BLOCKED_NETWORKS = (
    "0.0.0.0/8",        # "this network", RFC 791 3.2 / RFC 1122 3.2.1.3
    "169.254.0.0/16",   # link-local, RFC 3927 (cloud metadata services live here)
    "198.18.0.0/15",    # benchmarking, RFC 2544
    "224.0.0.0/4",      # multicast, RFC 5771
    "240.0.0.0/4",      # reserved, RFC 1112 4; holds 255.255.255.255, RFC 919 7
    "::/128",           # unspecified, RFC 4291 2.5.2
    "100::/64",         # discard-only, RFC 6666
    "fe80::/10",        # link-local, RFC 4291 2.5.6
    "ff00::/8",         # multicast, RFC 4291 2.7
)


def _local_delivery(text: str) -> str:
    """
    ``"maildir"``, or ``"lmtp:"`` and a Twisted client endpoint string
    (RFC 2033 service), checked by building its endpoint around no reactor.
    """
    if text == "maildir":
        return text
    kind, colon, description = text.partition(":")
    if kind != "lmtp" or not colon:
        raise ValueError(f"{text!r} is neither 'maildir' nor 'lmtp:<endpoint>'")
    try:
        endpoints.clientFromString(_NOT_LISTENING, description)
    except Exception as e:  # parsers raise anything: KeyError for a missing port
        raise ValueError(f"bad LMTP endpoint {description!r}: {e!r}") from None
    endpoint_kind, _, path = description.partition(":")
    if endpoint_kind == "unix" and not path.removeprefix("path=").startswith("/"):
        raise ValueError(f"the LMTP socket path in {description!r} must be absolute")
    return text


_DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
# A selector is a DNS label (RFC 6376 3.1); "-rsa"/"-ed25519" are appended.
_SELECTOR = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,50}[A-Za-z0-9])?")


def _selector(text: str) -> str:
    if not _SELECTOR.fullmatch(text):
        raise ValueError(f"bad selector {text!r} (letters, digits and '-', at most 52)")
    return text.lower()


@dataclass(frozen=True)
class DKIMConfig:
    """SPEC 11.1: signing keys, one per local domain and algorithm."""

    sign: bool = _opt(True, bool)
    generate: bool = _opt(True, bool)
    selector: str = _opt("pm1", str, _selector)
    key_dir: Path = _opt(Path("dkim"), str, _path)
    algorithms: tuple[str, ...] = _list(list(_DKIM_ALGORITHMS), _one_of(_DKIM_ALGORITHMS))

    def selector_for(self, algorithm: str) -> str:
        """A selector holds one key record: ``pm1-rsa``, ``pm1-ed25519``."""
        return f"{self.selector}-{algorithm.partition('-')[0]}"

    def key_path(self, domain: str, algorithm: str) -> Path:
        """``<key_dir>/<domain>.<selector>-rsa.pem`` (SPEC 11.1)."""
        return self.key_dir / f"{domain}.{self.selector_for(algorithm)}.pem"


@dataclass(frozen=True)
class DeliveryConfig:
    remote_port: int = _opt(25, int)
    bind_address: str = _opt("", str, _optional_address)
    push_fallback: bool = _opt(True, bool)
    smarthost: tuple[str, int] | None = _opt(None, str, _optional_hostport)
    outbox_lifetime: float = _opt(48 * 3600.0, str, parse_duration)
    delay_warning: float = _opt(0.0, str, parse_duration)
    push_retry: tuple[float, ...] = _list(["5m", "15m", "1h", "4h"], parse_duration)
    push_lifetime: float = _opt(5 * 86400.0, str, parse_duration)
    tls: str = _opt("opportunistic", str, _one_of({"opportunistic", "verify"}))
    tls_ca: Path | None = _opt(None, str, lambda text: _path(text) if text else None)
    connect_timeout: float = _opt(30.0, str, parse_duration)
    # An outbound or retrieval connection left idle, open for the next
    # message to or from the same peer (Postfix's connection cache).
    connection_cache_time: float = _opt(2.0, str, parse_duration)
    hooks: tuple[str, ...] = _list([], str)
    # Addresses (and MX hosts) tried per attempt; Postfix's smtp_mx_address_limit.
    mx_limit: int = _opt(5, int)
    blocked_networks: tuple = _list(list(DEFAULT_BLOCKED_NETWORKS), _network)
    local: str = _opt("maildir", str, _local_delivery)
    mta_sts: bool = _opt(False, bool)
    mta_sts_port: int = _opt(443, int)


@dataclass(frozen=True)
class RetrievalConfig:
    schedule: tuple[float, ...] = _list(["0s", "10m", "1h", "6h", "24h"], parse_duration)


@dataclass(frozen=True)
class LimitsConfig:
    message_size: int = _opt(25_000_000, (str, int), parse_size)
    recipients: int = _opt(100, int)
    idle_timeout: float = _opt(300.0, str, parse_duration)
    connections: int = _opt(1000, int)
    connections_per_ip: int = _opt(20, int)
    retr_fail_limit: int = _opt(10, int)
    retr_fail_window: float = _opt(3600.0, str, parse_duration)
    retr_block: float = _opt(3600.0, str, parse_duration)
    retr_tarpit_max: float = _opt(30.0, str, parse_duration)
    auth_fail_limit: int = _opt(5, int)
    auth_fail_window: float = _opt(3600.0, str, parse_duration)
    auth_block: float = _opt(900.0, str, parse_duration)
    auth_tarpit_max: float = _opt(10.0, str, parse_duration)
    pending_per_origin: int = _opt(10000, int)
    retrievals_per_minute: int = _opt(600, int)
    # Against hostile peers (issue 18): RFC 5321 4.5.3.2 timeouts, RFC 2920
    # 3.1 pipelining, and Postfix-like error budgets; 0 switches one off.
    tls_handshake_timeout: float = _opt(30.0, str, parse_duration)
    command_timeout: float = _opt(300.0, str, parse_duration)
    data_timeout: float = _opt(300.0, str, parse_duration)
    min_data_rate: int = _opt(1024, (str, int), parse_size)
    improper_pipelining: str = _opt("reject", str, _one_of({"reject", "allow"}))
    pregreet_wait: float = _opt(0.0, str, parse_duration)
    max_errors: int = _opt(20, int)
    max_junk_commands: int = _opt(100, int)
    # Throttles count per network, not per address (Postfix's anvil, mox).
    ipv4_prefix: int = _opt(24, int)
    ipv6_prefix: int = _opt(64, int)
    # RFC 5321 6.3: more Received: fields than this is a loop (554 5.4.6).
    max_received: int = _opt(100, int)


def _optional_endpoint(text: str) -> str:
    return _endpoint(text) if text else ""


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = _opt("", str, _optional_endpoint)


@dataclass(frozen=True)
class SendmailConfig:
    trusted_users: tuple[str, ...] = _list(["root"], str)


_BACKENDS = ("files", "postgresql")


@dataclass(frozen=True)
class StoreConfig:
    """SPEC 11.3: where the outbox, push queue and pending notifications live."""

    backend: str = _opt("files", str, _one_of(_BACKENDS))
    dsn: str = _opt("", str)
    lease: float = _opt(300.0, str, parse_duration)


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration; paths are absolute."""

    node: NodeConfig = field(default_factory=NodeConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    accounts: AccountsConfig = field(default_factory=AccountsConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sendmail: SendmailConfig = field(default_factory=SendmailConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    base: Path = Path(".")

    @property
    def state_dir(self) -> Path:
        return self.node.state_dir

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.node.domains

    @property
    def own_addresses(self) -> frozenset:
        """
        The node's own IP addresses, as far as the config names them: every
        listener's ``interface=`` and ``[delivery] bind_address``.  Their
        address literals are local domains (issue 18).
        """
        found = set()
        texts = [self.delivery.bind_address] + [
            match.group(1).replace("\\:", ":")
            for description in self.listen.smtp + self.listen.submission + self.listen.submissions
            for match in [_INTERFACE.search(description)] if match
        ]
        for text in texts:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if not ip.is_unspecified:
                found.add(ip)
        return frozenset(found)


_INTERFACE = re.compile(r"(?:^|:)interface=((?:\\:|[^:])+)")


_SECTIONS = {f.name: f.default_factory for f in fields(Config) if f.name != "base"}


def _convert(option: str, spec, raw: Any) -> Any:
    kind, convert = spec.metadata["kind"], spec.metadata["convert"]
    if spec.metadata.get("each"):
        if not isinstance(raw, list):
            raise ConfigError(option, f"must be a list, not {raw!r}")
        # Every list in the file is a list of strings.
        return tuple(_convert_one(option, str, convert, item) for item in raw)
    return _convert_one(option, kind, convert, raw)


def _convert_one(option: str, kind, convert, raw: Any) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(raw, kinds) or (isinstance(raw, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds).replace("str", "string")
        raise ConfigError(option, f"must be a {names}, not {raw!r}")
    if convert is None:
        return raw
    try:
        return convert(raw)
    except (ValueError, TypeError) as e:
        raise ConfigError(option, str(e)) from None


def _check(config: Config) -> None:
    """Cross-field rules that no single value shows."""
    if not config.node.domains:
        raise ConfigError("node.domains", "at least one local domain is needed")
    positive = [
        ("limits.recipients", config.limits.recipients),
        ("limits.connections", config.limits.connections),
        ("limits.connections_per_ip", config.limits.connections_per_ip),
        ("limits.message_size", config.limits.message_size),
        ("limits.idle_timeout", config.limits.idle_timeout),
        ("limits.pending_per_origin", config.limits.pending_per_origin),
        ("limits.retrievals_per_minute", config.limits.retrievals_per_minute),
        ("limits.retr_fail_limit", config.limits.retr_fail_limit),
        ("limits.auth_fail_limit", config.limits.auth_fail_limit),
        ("limits.tls_handshake_timeout", config.limits.tls_handshake_timeout),
        ("limits.command_timeout", config.limits.command_timeout),
        ("limits.data_timeout", config.limits.data_timeout),
        ("limits.max_received", config.limits.max_received),
    ]
    for option, value in positive:
        if value <= 0:
            raise ConfigError(option, "must be greater than zero")
    for option in ("max_errors", "max_junk_commands"):
        if getattr(config.limits, option) < 0:
            raise ConfigError(f"limits.{option}", "must be zero (off) or more")
    if config.delivery.mx_limit <= 0:
        raise ConfigError("delivery.mx_limit", "must be greater than zero")
    for option, value, bits in [("limits.ipv4_prefix", config.limits.ipv4_prefix, 32),
                                ("limits.ipv6_prefix", config.limits.ipv6_prefix, 128)]:
        if not 0 < value <= bits:
            raise ConfigError(option, f"must be a prefix length from 1 to {bits}")
    for option, port in [("delivery.remote_port", config.delivery.remote_port),
                         ("delivery.mta_sts_port", config.delivery.mta_sts_port)]:
        if not 0 < port < 65536:
            raise ConfigError(option, "must be a port number (1-65535)")
    if config.store.backend == "postgresql" and not config.store.dsn.strip():
        raise ConfigError("store.dsn", 'is needed with backend = "postgresql"')
    if config.store.lease <= 0:
        raise ConfigError("store.lease", "must be greater than zero")
    if not config.retrieval.schedule:
        raise ConfigError("retrieval.schedule", "needs at least one attempt")
    if not config.delivery.push_retry:
        raise ConfigError("delivery.push_retry", "needs at least one delay")
    if config.delivery.tls_ca and not config.delivery.tls_ca.is_file():
        raise ConfigError("delivery.tls_ca", f"file {str(config.delivery.tls_ca)!r} does not exist")
    if len(set(config.dkim.algorithms)) != len(config.dkim.algorithms):
        raise ConfigError("dkim.algorithms", "names an algorithm twice")
    if config.dkim.sign and not config.dkim.algorithms:
        raise ConfigError("dkim.algorithms", "needs at least one algorithm when dkim.sign is on")
    if not config.tls.generate:
        for option, path in [("tls.certificate", config.tls.certificate),
                             ("tls.key", config.tls.key)]:
            if not path.is_file():
                raise ConfigError(
                    option, f"file {str(path)!r} does not exist (and tls.generate is off)"
                )


def check_dkim_keys(config: Config) -> None:
    """
    SPEC 11.1: with ``sign`` on and ``generate`` off, every local domain
    needs its keys (``checkconfig`` and the node's start ask; other
    commands, and ``dkim-keygen`` that makes them, do not).
    """
    if config.dkim.sign and not config.dkim.generate:
        for domain in config.node.domains:
            for algorithm in config.dkim.algorithms:
                path = config.dkim.key_path(domain, algorithm)
                if not path.is_file():
                    raise ConfigError("dkim.generate", (
                        f"no {algorithm} key for {domain} at {str(path)!r} (and "
                        "dkim.generate is off; run `pullmail dkim-keygen`)"))


def _absolute(config: Config) -> Config:
    def resolve(path: Path) -> Path:
        return path if path.is_absolute() else (config.base / path).resolve()

    return replace(
        config,
        node=replace(config.node, state_dir=resolve(config.node.state_dir)),
        tls=replace(config.tls, certificate=resolve(config.tls.certificate),
                    key=resolve(config.tls.key)),
        accounts=replace(config.accounts, users=resolve(config.accounts.users),
                         aliases=resolve(config.accounts.aliases)),
        dkim=replace(config.dkim, key_dir=resolve(config.dkim.key_dir)),
        delivery=replace(config.delivery, tls_ca=resolve(config.delivery.tls_ca)
                         if config.delivery.tls_ca else None),
    )


def parse(mapping: Mapping[str, Any], base: Path) -> Config:
    """
    Validate a TOML mapping into a L{Config}.  Relative paths are taken
    relative to C{base}, the folder of the config file.

    @raise ConfigError: naming the first bad key.
    """
    sections = {}
    for name, raw_section in mapping.items():
        if name not in _SECTIONS:
            raise ConfigError(name, "unknown section")
        if not isinstance(raw_section, Mapping):
            raise ConfigError(name, "must be a table ([%s])" % name)
        specs = {f.name: f for f in fields(_SECTIONS[name]())}
        values = {}
        for key, raw in raw_section.items():
            option = f"{name}.{key}"
            if key not in specs:
                raise ConfigError(option, "unknown key")
            values[key] = _convert(option, specs[key], raw)
        sections[name] = _SECTIONS[name](**values)
    config = _absolute(Config(**sections, base=Path(base).resolve()))
    _check(config)
    return config


def load(path: str | Path) -> Config:
    """Read and validate the TOML file at C{path}."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError("config", f"cannot read {str(path)!r}: {e.strerror}") from None
    try:
        mapping = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("config", f"{path}: not valid TOML: {e}") from None
    return parse(mapping, path.parent)


# The node run without --config: loopback high ports, everything under ./var.
EMBEDDED_DEFAULT: Mapping[str, Any] = {
    "node": {"hostname": "localhost", "domains": ["example.org"], "state_dir": "var"},
    "accounts": {"users": "var/users", "aliases": "var/aliases"},
    "dkim": {"key_dir": "var/dkim"},
}


def embedded_default(base: str | Path = ".") -> Config:
    """The embedded default configuration, with paths under C{base}."""
    return parse(EMBEDDED_DEFAULT, Path(base))


def override(config: Config, option: str, value: str) -> Config:
    """
    Apply one ``--set section.key=value`` from the command line; C{value}
    is TOML (a bare word is taken as a string).
    """
    section, _, key = option.partition(".")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    if section not in _SECTIONS:
        raise ConfigError(option, "unknown key")
    specs = {f.name: f for f in fields(_SECTIONS[section]())}
    if key not in specs:
        raise ConfigError(option, "unknown key")
    converted = _convert(option, specs[key], parsed)
    new_section = replace(getattr(config, section), **{key: converted})
    result = _absolute(replace(config, **{section: new_section}))
    _check(result)
    return result


SYSTEM_CONFIG = Path("/etc/pullmail/pullmail.toml")


def config_path(path: str | None, environ: Mapping[str, str],
                system: Path = SYSTEM_CONFIG) -> str | None:
    """
    Which file to read (SPEC 11.4): C{--config}, else C{$PULLMAIL_CONFIG},
    else C{/etc/pullmail/pullmail.toml} when it exists; None means the
    embedded default.
    """
    if path:
        return path
    if environ.get("PULLMAIL_CONFIG"):
        return environ["PULLMAIL_CONFIG"]
    return str(system) if system.is_file() else None


def load_config(path: str | None, overrides=(), environ: Mapping[str, str] | None = None,
                system: Path = SYSTEM_CONFIG) -> Config:
    """
    The file L{config_path} chooses, then each C{--set section.key=value}
    override: what every command and twistd run.
    """
    path = config_path(path, os.environ if environ is None else environ, system)
    config = load(path) if path else embedded_default(Path.cwd())
    for option, value in overrides:
        config = override(config, option, value)
    return config
