"""
MTA-STS (RFC 8461) for outbound mail, SPEC 11.2: the pure rules
(L{policy}), the HTTPS fetch (L{fetch}), the policy cache that survives
restarts (L{cache}) and the node's glue (L{discovery}: L{MTASTS}).

May import what L{pullmail.outbound} may.
"""

from pullmail.outbound.sts.discovery import MTASTS, PolicyRefused

__all__ = ["MTASTS", "PolicyRefused"]
