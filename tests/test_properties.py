"""
Hypothesis properties of the pure parts the fault suite leans on (the
short form runs in CI; every test is derandomized, so runs are repeatable):

  - the command machine (with General Delivery) never raises on any text,
    and answers every line with exactly one well-formed reply, 2xx-5xx;
  - the SMTP protocol never fails on any bytes (nothing logged as a failure)
    and writes only well-formed reply lines;
  - the address parser raises nothing but AddressError;
  - gdel-id validation is exactly SPEC 2's grammar, in is_gdel_id and at GDEL;
  - DATA framing: dot-stuffing round-trips, wherever the chunks split; a
    bare CR or LF never ends the data early and is never accepted;
  - the config loader raises nothing but ConfigError, whatever the mapping.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from pullmail import config as configuration
from pullmail.accounts.users import Accounts
from pullmail.ids import is_gdel_id
from pullmail.pull.verbs import Notify, Retrieve, pull_extension
from pullmail.smtp import replies
from pullmail.smtp.address import (
    AddressError,
    parse_mail_argument,
    parse_mailbox,
    parse_rcpt_argument,
)
from pullmail.smtp.data import DataReader
from pullmail.smtp.envelope import Session
from pullmail.smtp.protocol import ConnectionLimits, SMTPServerFactory
from pullmail.smtp.replies import Reply
from pullmail.smtp.server import (
    Authenticate,
    BeginData,
    CheckPush,
    CheckSender,
    Close,
    Deliver,
    EndTurn,
    ServerMachine,
    ServerPolicy,
    StartTLS,
)

# PULLMAIL_PROPERTY_EXAMPLES raises the count for the long form.
PROPERTY = settings(derandomize=True, deadline=None,
                    max_examples=int(os.environ.get("PULLMAIL_PROPERTY_EXAMPLES", "300")),
                    suppress_health_check=[HealthCheck.too_slow])
DOMAIN = "example.org"
VERBS = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP",
         "STARTTLS", "AUTH", "GDEL", "RETR", "ehlo", "Mail", "BDAT", "ETRN", "ATRN"]
ARGUMENTS = ["FROM:<a@b.example>", "TO:<alice@example.org>", "FROM:<>", "TO:<Postmaster>",
             "FROM:<a@b.example> SIZE=10 BODY=8BITMIME", "TO:<\"a@b\"@example.org>",
             "PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA==", "LOGIN", "client.test",
             "Abcdefghijklmnop0123", "x" * 600, "=", "*"]

REPLY_LINE = re.compile(r"([2-5][0-9][0-9])([ -])([^\r\n]*)")


def accounts() -> Accounts:
    return Accounts(frozenset({DOMAIN}),
                    users={"alice@example.org": "$scrypt$x", "bob@example.org": "$scrypt$x"},
                    aliases={"info@example.org": ("bob@example.org",)})


def policy(service: str, tls_available: bool = True) -> ServerPolicy:
    return ServerPolicy(hostname="mx.example.org", domains=(DOMAIN,), accounts=accounts(),
                        service=service, max_size=10_000, max_recipients=3,
                        tls_available=tls_available)


def check_rendered(data: bytes) -> int:
    """C{data} is exactly one well-formed reply; its code."""
    assert data.endswith(b"\r\n"), data
    lines = data.decode("utf-8").split("\r\n")[:-1]
    codes = set()
    for i, line in enumerate(lines):
        match = REPLY_LINE.fullmatch(line)
        assert match, f"not a reply line: {line!r}"
        codes.add(match.group(1))
        assert match.group(2) == ("-" if i < len(lines) - 1 else " "), lines
    assert len(codes) == 1, lines
    code = int(codes.pop())
    assert 200 <= code < 600
    return code


def run_action(machine: ServerMachine, action: object) -> Reply:
    """Carry out requests the way the glue would, down to the one reply."""
    for _ in range(10):
        if isinstance(action, Reply):
            return action
        if isinstance(action, (Close, StartTLS, EndTurn)):
            if isinstance(action, StartTLS):
                machine.tls_started()
            return action.reply
        if isinstance(action, BeginData):
            assert action.reply.code == 354
            # The reply to DATA is the 354; the message then gets its own.
            machine.data_received([b"Subject: x\r\n\r\nbody\r\n"], 22, None)
            return action.reply
        if isinstance(action, (CheckSender, CheckPush)):
            action = machine.resolve(action, None)
        elif isinstance(action, Authenticate):
            action = machine.resolve(action, action.password == "secret")
        elif isinstance(action, Notify):
            action = machine.resolve(action, Reply(250, "2.0.0", "notification accepted"))
        elif isinstance(action, Retrieve):
            action = machine.resolve(action, replies.S550_NO_SUCH_MESSAGE)
        elif isinstance(action, Deliver):
            action = machine.resolve(action, Reply(250, "2.0.0", "Ok: queued as X"))
        else:
            raise AssertionError(f"unknown action {action!r}")
    raise AssertionError("requests did not end in a reply")


line_text = st.text(alphabet=st.characters(blacklist_characters="\n", codec="utf-8"),
                    max_size=80)
command_lines = st.one_of(
    line_text,
    st.builds(lambda v, a: f"{v} {a}", st.sampled_from(VERBS), st.sampled_from(ARGUMENTS)),
    st.builds(lambda v, a: f"{v} {a}", st.sampled_from(VERBS), line_text),
)


@PROPERTY
@given(service=st.sampled_from(["smtp", "submission", "submissions"]),
       tls=st.booleans(), lines=st.lists(command_lines, max_size=25))
def test_machine_answers_every_line_with_one_reply(service, tls, lines):
    machine = ServerMachine(policy(service), Session("192.0.2.1", service, tls=tls),
                            (pull_extension(),))
    check_rendered(machine.greeting().render())
    for line in lines:
        if len(line.encode("utf-8", "surrogateescape")) + 2 > machine.max_line:
            continue  # the protocol refuses it before the machine sees it
        reply = run_action(machine, machine.handle(line))
        check_rendered(reply.render(enhanced=bool(reply.enhanced)))


def _transport_protocol(service: str):
    performers = {
        Deliver: lambda p, r: Reply(250, "2.0.0", "Ok: queued as X"),
        CheckSender: lambda p, r: None,
        CheckPush: lambda p, r: None,
        Authenticate: lambda p, r: False,
        Notify: lambda p, r: replies.S550_POLICY,
        Retrieve: lambda p, r: replies.S550_NO_SUCH_MESSAGE,
    }
    factory = SMTPServerFactory(policy(service, tls_available=False), Clock(),
                                ConnectionLimits(10, 10), 60.0, performers,
                                extensions=(pull_extension(),))
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=None)
    from twisted.internet.address import IPv4Address
    transport.peerAddress = IPv4Address("TCP", "192.0.2.7", 4321)
    protocol.makeConnection(transport)
    return protocol, transport


fuzz_bytes = st.one_of(
    st.binary(max_size=600),
    st.lists(st.sampled_from([b"EHLO x\r\n", b"MAIL FROM:<a@b.example>\r\n",
                              b"RCPT TO:<alice@example.org>\r\n", b"DATA\r\n", b"body\n",
                              b"\r\n.\r\n", b"GDEL Abcdefghijklmnop0123\r\n", b"\r", b"\n",
                              b"\0", b"\xff", b"RETR Abcdefghijklmnop0123\r\n", b"x" * 700,
                              b"AUTH PLAIN\r\n", b"QUIT\r\n", b"RSET\r\n", b".\r\n"]),
             max_size=30).map(b"".join),
)


@PROPERTY
@given(service=st.sampled_from(["smtp", "submission"]), data=fuzz_bytes,
       cuts=st.lists(st.integers(0, 2000), max_size=5))
def test_protocol_survives_any_bytes(service, data, cuts):
    failures = []

    def observer(event):
        if event.get("log_failure") is not None or event.get("log_level") is not None and \
                event["log_level"].name in ("error", "critical"):
            failures.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        protocol, transport = _transport_protocol(service)
        points = sorted({c for c in cuts if c < len(data)})
        for a, b in zip([0] + points, points + [len(data)]):
            protocol.dataReceived(data[a:b])
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not failures, [e.get("log_format") for e in failures]
    written = transport.value()
    assert written.startswith(b"220 ")
    for line in written.split(b"\r\n")[:-1]:
        assert REPLY_LINE.fullmatch(line.decode("utf-8")), line


addresses = st.one_of(
    st.text(max_size=80),
    st.builds(lambda a, b, c: f"{a}{b}{c}",
              st.sampled_from(["FROM:", "TO:", "from: ", "TO:<", "FROM:<@a,@b:"]),
              st.text(alphabet=string.printable + "\"\\<>@[]é\0", max_size=60),
              st.sampled_from(["", ">", "> SIZE=1", ">>", "> =x", '"> x'])),
)


@PROPERTY
@given(text=addresses)
def test_address_parser_raises_only_address_error(text):
    for parse in (parse_mail_argument, parse_rcpt_argument):
        try:
            parse(text)
        except AddressError:
            pass
    for allow in (False, True):
        try:
            mailbox = parse_mailbox(text, allow_no_domain=allow)
        except AddressError:
            continue
        str(mailbox)  # printable back


SPEC_ID_CHARACTERS = set(string.ascii_letters + string.digits + "-_")


def spec_gdel_id(text: str) -> bool:
    """SPEC 2: gdel-id = 16*128( ALPHA / DIGIT / "-" / "_" )."""
    return 16 <= len(text) <= 128 and set(text) <= SPEC_ID_CHARACTERS


gdel_ids = st.one_of(
    st.text(max_size=140),
    st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=12, max_size=132),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.+/=é٣\n ", min_size=14,
            max_size=130),
)


@PROPERTY
@given(text=gdel_ids)
def test_gdel_id_validation_is_the_spec_grammar(text):
    assert is_gdel_id(text) == spec_gdel_id(text)


@PROPERTY
@given(text=gdel_ids, verb=st.sampled_from(["GDEL", "RETR"]))
def test_gdel_and_retr_refuse_exactly_the_bad_ids(text, verb):
    if "\n" in text or "\r" in text:
        return  # not one command line
    machine = ServerMachine(policy("smtp"), Session("192.0.2.1", "smtp"), (pull_extension(),))
    machine.handle("EHLO client.test")
    action = machine.handle(f"{verb} {text}")
    bad_syntax = isinstance(action, Reply) and (action.code, action.enhanced) == (501, "5.5.4")
    assert bad_syntax == (not spec_gdel_id(text.strip(" "))), (text, action)


content_lines = st.lists(st.binary(max_size=120).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=30)


def stuffed(lines) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def feed(reader: DataReader, wire: bytes, cuts):
    """Feed in pieces; the completion, and where in C{wire} it came."""
    points = sorted({c % (len(wire) + 1) for c in cuts})
    done, position = None, 0
    for a, b in zip([0] + points, points + [len(wire)]):
        if a == b:
            continue
        result = reader.feed(wire[a:b])
        if result is not None:
            assert done is None
            done, position = result, b
            break
    return done, position


@PROPERTY
@given(lines=content_lines, cuts=st.lists(st.integers(0, 10**6), max_size=8),
       rest=st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b.example>\r\nRCPT"]))
def test_dot_stuffing_round_trips(lines, cuts, rest):
    body = b"".join(line + b"\r\n" for line in lines)
    wire = stuffed(lines) + b".\r\n" + rest
    done, position = feed(DataReader(10**7), wire, cuts)
    assert done is not None, "the end of data was not seen"
    assert done.error is None, done.error
    assert b"".join(done.chunks) == body
    assert wire[position - len(done.rest):position] == done.rest if done.rest else True
    assert wire[:position][: position - len(done.rest)] + done.rest + wire[position:] == wire
    assert done.rest + wire[position:] == rest


SMUGGLING = [b"\n", b"\r", b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r.\r", b".\n",
             b"\n.\r", b"\r\n.\r", b"\r\r\n.\r\n"[1:]]


@PROPERTY
@given(lines=content_lines.filter(bool), data=st.data(),
       cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_bare_cr_or_lf_never_ends_data_and_is_refused(lines, data, cuts):
    index = data.draw(st.integers(0, len(lines) - 1))
    line = lines[index]
    at = data.draw(st.integers(0, len(line)))
    insert = data.draw(st.sampled_from(SMUGGLING))
    if at == 0 and insert.startswith(b"."):
        return
    wire_lines = list(lines)
    stuffed_line = b"." + line if line.startswith(b".") else line
    offset = 1 if line.startswith(b".") else 0
    stuffed_line = stuffed_line[: at + offset] + insert + stuffed_line[at + offset:]
    before = stuffed(wire_lines[:index])
    after = stuffed(wire_lines[index + 1:])
    rest = b"NEXT COMMAND\r\n"
    wire = before + stuffed_line + b"\r\n" + after + b".\r\n" + rest
    if wire.find(b"\r\n.\r\n") != -1 and (b"\r\n" + wire).find(b"\r\n.\r\n") < len(
            b"\r\n" + before + stuffed_line + b"\r\n" + after) - 2:
        return  # the insertion spelled a real terminator; not a bare line ending
    done, position = feed(DataReader(10**7), wire, cuts)
    assert done is not None
    assert done.rest + wire[position:] == rest, "the data ended early (smuggling)"
    assert done.error == replies.S550_BARE_LINE_ENDING, done.error
    assert done.chunks == []


# -- the config loader -----------------------------------------------------------------

SECTIONS = {name: [f.name for f in configuration.fields(factory())]
            for name, factory in configuration._SECTIONS.items()}
STRINGS = ["", "var\0x", "0s", "10m", "1h30m", "5x", "-1s", "25MB", "1MiB", "tcp:2525",
           "tcp:99999", "tcp:25:interface=127.0.0.1", "ssl:443", "unix:/nonexistent/x",
           "127.0.0.1:53",
           "[::1]:53", "[", "::1", "a\0b", "/dev/null", "example.org", "-bad-.org", "pass",
           "verify", "accept", "10.0.0.0/8", "\udcff", "é.example", "999999999999999999999d"]
scalars = st.one_of(st.sampled_from(STRINGS), st.sampled_from(STRINGS), st.text(max_size=20),
                    st.integers(),
                    st.booleans(), st.floats(allow_nan=False), st.none())
values = st.recursive(scalars.filter(lambda v: v is not None),
                      lambda inner: st.one_of(st.lists(inner, max_size=4),
                                              st.dictionaries(st.text(max_size=5), inner,
                                                              max_size=3)),
                      max_leaves=8)


@st.composite
def config_mappings(draw):
    mapping = {}
    for section in draw(st.lists(st.sampled_from(list(SECTIONS) + ["bogus", ""]),
                                 max_size=5, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            mapping[section] = draw(values)
            continue
        keys = SECTIONS.get(section, []) + ["unknown_key"]
        mapping[section] = draw(st.dictionaries(st.sampled_from(keys), values, max_size=4))
    return mapping


PATH_KEYS = {("node", "state_dir"), ("tls", "certificate"), ("tls", "key"),
             ("accounts", "users"), ("accounts", "aliases"), ("delivery", "tls_ca")}


@PROPERTY
@given(mapping=config_mappings())
def test_config_parse_raises_only_config_error(mapping):
    base = Path("/nonexistent-pullmail-base")
    try:
        configuration.parse(mapping, base)
    except configuration.ConfigError:
        pass


@pytest.mark.parametrize("section, key", sorted(PATH_KEYS))
def test_config_nul_in_a_path_is_a_config_error(section, key):
    mapping = {section: {key: "var\0x"}}
    if section == "tls":
        mapping[section]["generate"] = False
    with pytest.raises(configuration.ConfigError) as e:
        configuration.parse(mapping, Path("/nonexistent-pullmail-base"))
    assert e.value.option == f"{section}.{key}"


@PROPERTY
@given(option=st.one_of(st.sampled_from([f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]),
                        st.text(max_size=20)),
       value=st.one_of(st.sampled_from(STRINGS + ["[1, 2]", "true", '"x"', "{a = 1}"]),
                       st.text(max_size=30)))
def test_config_override_raises_only_config_error(option, value):
    config = configuration.embedded_default(Path("/nonexistent-pullmail-base"))
    try:
        configuration.override(config, option, value)
    except configuration.ConfigError:
        pass


@PROPERTY
@given(text=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_config_load_raises_only_config_error(text):
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".toml") as f:
        f.write(text)
        f.flush()
        try:
            configuration.load(f.name)
        except configuration.ConfigError:
            pass
