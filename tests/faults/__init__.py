r"""
The fault suite: pullmail nodes under SIGKILL, DNS outages, a full disk,
peers that vanish mid-dialogue, and byte-level fuzz; plus the hypothesis
properties in ``tests/test_properties.py``.

Short form (what CI runs as part of ``sh tests/run``): 2 SIGKILL rounds and a
few hundred fuzz connections, under three minutes.

Long form, by one command (20 SIGKILL rounds, 1500 fuzz connections,
3000 examples per hypothesis property; about five minutes)::

    PULLMAIL_FAULT_ROUNDS=20 PULLMAIL_FUZZ_CONNECTIONS=1500 PULLMAIL_PROPERTY_EXAMPLES=3000 \
        sh tests/run tests/faults tests/test_properties.py

(with an existing venv: the same variables before
``.venv/bin/python -m pytest -q tests/faults tests/test_properties.py``).

Every random choice is seeded; the seed is printed (``pytest -s`` or in the
failure report).  Replay a run with ``PULLMAIL_FAULT_SEED=<seed>``.

Every node and server started here uses 127.0.2.1 - 127.0.2.60 only; the DNS
servers listen on free ports of 127.0.2.1.
"""
