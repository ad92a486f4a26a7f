"""
Whom to believe (SPEC 6): the built-in trust check (allow and deny lists,
DNSBL, SPF) in L{policy}, SPF through pyspf in L{spf}, and the L{throttle}
that slows and blocks peers that keep failing.

May import: L{pullmail.smtp} (replies, envelope, address), L{pullmail.net},
L{pullmail.scheduling}, L{pullmail.config} and L{pullmail.logsafe}.
"""
