"""
Whom to believe (SPEC 6): the built-in trust check (allow and deny lists,
DNSBL, SPF) in L{policy}, SPF through pyspf in L{spf}, and the L{throttle}
that slows and blocks peers that keep failing.  Mail authentication (SPEC
11.1): DKIM signing and verifying in L{dkim}, its keys in L{dkim_keys},
the key records verification looks up, kept parsed for their TTL, in
L{dkim_records}, ARC validation and sealing in L{arc}, what signing and
sealing share in L{signing}, DMARC in L{dmarc}, the header facts and the
parsed message they all need in L{message}.

May import: L{pullmail.smtp} (replies, envelope, address), L{pullmail.net},
L{pullmail.scheduling}, L{pullmail.config} and L{pullmail.logsafe}.
"""
