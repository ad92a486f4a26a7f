"""
Features on against off (issue 17 item 7): push receive of a 2 KB message,
20 sessions (smtp-source), into two pullmail nodes side by side, rounds
interleaved:

- all on: the message arrives DKIM-signed (RSA-2048 + Ed25519, keys in the
  bench DNS) and is verified, DMARC enforced (`[trust] dmarc`), a DNSBL zone
  asked per connection (`[trust] dnsbl`, not listed), the metrics endpoint
  served (`[metrics] listen`, scraped once a round), MTA-STS and signing on
  for outbound mail (`[delivery] mta_sts`, `[dkim] sign`; they cost nothing on
  the receive path, which is the point of listing them);
- all off: DMARC off, no DNSBL, no metrics endpoint, MTA-STS and signing
  off, fed the same signed message.  DKIM verification has no switch
  (SPEC 11.1: every message gets its dkim results), so the off node
  verifies the signatures too: the target's ratio compares the two nodes
  on the same input.  The off node fed the message unsigned is measured
  as well, so that the cost of verifying a signed message shows beside it
  (the ``dkim`` section measures that cost alone).
"""

from __future__ import annotations

import urllib.request

import common
from common import PullmailServer, fmt, ratio, ratio_value, table

METRICS_PORT = 9125

ON = {
    "trust": {"dmarc": "enforce", "dnsbl": ["dnsbl.bench"]},
    "metrics": {"listen": f"tcp:{METRICS_PORT}:interface={common.FEATURES_IP}"},
    "delivery": {"mta_sts": True},
    "dkim": {"sign": True},
}
OFF = {
    "trust": {"dmarc": "off", "dnsbl": []},
    "metrics": {"listen": ""},
    "delivery": {"mta_sts": False},
    "dkim": {"sign": False},
}


def _scrape() -> int:
    """One GET /metrics of the features-on node: the size of the answer."""
    url = f"http://{common.FEATURES_IP}:{METRICS_PORT}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return len(answer.read())


def run(args, workdir, dns, log) -> None:
    files, *_ = common.dkim_messages(workdir, dns)
    on = PullmailServer(workdir, dns, name="features-on", address=common.FEATURES_IP, settings=ON)
    off = PullmailServer(workdir, dns, name="features-off", settings=OFF)
    servers = {"on": (on, files["signed"]), "off": (off, files["signed"]),
               "off, unsigned input": (off, files["unsigned"])}
    modes = list(servers)
    count = args.n2k
    rate: dict = {mode: [] for mode in modes}
    cpu: dict = {mode: [] for mode in modes}
    scraped = []
    for server in (on, off):
        server.start()
    try:
        for server, path in servers.values():      # warm-up, as in push
            common.smtp_source(server, 20, 2048, args.warmup * count, path=path)
        for rnd in range(args.rounds):
            for mode in (modes if rnd % 2 == 0 else modes[::-1]):
                server, path = servers[mode]
                one = common.measure_push(server, 20, 2048, count, path=path)
                rate[mode].append(one["msgs"])
                cpu[mode].append(one["cpu"])
                log(f"features {mode} round {rnd + 1}: {one['msgs']:.0f} msg/s, "
                    f"cpu {one['cpu']:.2f} ms/msg")
            scraped.append(_scrape())
        head = servers["on"][0].node.delivered_paths(servers["on"][0].rcpt)[-1].read_bytes()
        head = head.split(b"\r\n\r\n")[0]
        if head.count(b"dkim=pass") != 2 or b"dmarc=pass" not in head:
            raise RuntimeError(f"features on: the message was not verified as expected:\n{head!r}")
    finally:
        for server in (on, off):
            server.stop()
    args.results["features"] = (ratio_value(rate["on"], rate["off"]), ratio_value(cpu["on"], cpu["off"]))
    table(f"1c. Push receive 2 KB × 20 sessions, all features on beside all off, {count} msgs/run, "
          f"{args.rounds} rounds interleaved (on: DMARC enforce, DNSBL, metrics served and scraped "
          f"({fmt(scraped)} B), MTA-STS, signing; both verify the signed input's two signatures)",
          ["features", "msgs/s", "server CPU ms/msg"],
          [[mode, fmt(rate[mode]), fmt(cpu[mode], 2)] for mode in modes])
    unsigned = "off, unsigned input"
    table("1c. Ratios", ["ratio", "measured"],
          [["msgs/s, on / off (the same signed input)", ratio(rate["on"], rate["off"])],
           ["CPU per message, on / off", ratio(cpu["on"], cpu["off"])],
           ["msgs/s, on / off fed the message unsigned (verification's cost included)",
            ratio(rate["on"], rate[unsigned])],
           ["CPU per message, on / off fed the message unsigned", ratio(cpu["on"], cpu[unsigned])]])
