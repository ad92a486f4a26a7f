"""
The slowloris flood (issue "hostile peers, round two", item 7): many
connections that each send one octet every few seconds, half of them inside
a command line and half inside DATA.  What matters is that every slot is
released within its deadline (``[limits] command_timeout``, ``data_timeout``
plus ``min_data_rate``), however patient the attacker.  Prints the spread of
the time each connection was held, against its deadline.
"""

from __future__ import annotations

import asyncio
import time

CLIENT_NET = "127.0.3."      # sources 127.0.3.1 .. 127.0.3.200 (spread over one /24)


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line or line[3:4] != b"-":
            return line


async def _loris(address: str, port: int, source: str, in_data: bool, interval: float,
                 held: list, refused: list, ready: list) -> None:
    """
    One slow client; appends C{source} to C{ready} once it trickles, and
    (how long it was held, in_data) to C{held} when the node hangs up.
    """
    try:
        reader, writer = await asyncio.open_connection(address, port, local_addr=(source, 0))
    except OSError:
        refused.append(source)
        return
    opened = time.monotonic()
    try:
        greeting = await _read_reply(reader)
        if not greeting.startswith(b"220"):
            refused.append(source)
            return
        if in_data:
            for command in (b"EHLO loris.test", b"MAIL FROM:<a@loris.test>",
                            b"RCPT TO:<sink@bench.test>", b"DATA"):
                writer.write(command + b"\r\n")
                await writer.drain()
                await _read_reply(reader)
        ready.append(source)
        trickle = asyncio.ensure_future(_trickle(writer, interval))
        try:
            await reader.read()      # until the node hangs up
        finally:
            trickle.cancel()         # also when this client is cancelled
        held.append((time.monotonic() - opened, in_data))
    except OSError:
        held.append((time.monotonic() - opened, in_data))
    finally:
        writer.close()


async def _trickle(writer: asyncio.StreamWriter, interval: float) -> None:
    while True:
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(interval)


SOURCES = [f"{CLIENT_NET}{n}" for n in range(1, 201)]


def start(address: str, port: int, connections: int, interval: float, held: list,
          refused: list, ready: list) -> list[asyncio.Task]:
    """The slow clients as tasks of the running loop (cancel them to end the flood)."""
    return [
        asyncio.ensure_future(_loris(address, port, SOURCES[n % len(SOURCES)], n % 2 == 1,
                                     interval, held, refused, ready))
        for n in range(connections)
    ]


async def flood(address: str, port: int, connections: int, interval: float) -> tuple:
    """Until the node has hung up on every slow client: (held, refused, seconds)."""
    held: list = []
    refused: list = []
    started = time.monotonic()
    await asyncio.gather(*start(address, port, connections, interval, held, refused, []))
    return held, refused, time.monotonic() - started
