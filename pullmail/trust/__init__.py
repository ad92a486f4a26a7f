"""
Whom to believe (SPEC 6): the built-in trust check (allow and deny lists,
DNSBL, SPF) in L{policy}, SPF through pyspf in L{spf}, and the L{throttle}
that slows and blocks peers that keep failing.  Mail authentication (SPEC
11.1): DKIM signing, sealing and verifying in L{dkim}, its keys in
L{dkim_keys}, DMARC in L{dmarc}, the header facts both need in L{message}.

May import: L{pullmail.smtp} (replies, envelope, address), L{pullmail.net},
L{pullmail.scheduling}, L{pullmail.config} and L{pullmail.logsafe}.
"""
