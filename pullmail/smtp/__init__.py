"""
The SMTP protocol itself (RFC 5321 and its extensions): replies, address
syntax, the envelope, the sans-IO server machine, the sans-IO framing of
the byte stream (``connection``: command lines, DATA, exact-count chunks),
the per-session budgets against hostile peers (``conduct``), the client
dialogues, the thin Twisted glue that moves bytes for them (sent at once where
the socket takes them: ``writes``), and what a graceful stop waits for
(``drain``).

May import: the standard library, Twisted, zope.interface, and
L{pullmail.accounts} (who may send as whom), L{pullmail.ids} and
L{pullmail.logsafe}.  Nothing
here stores mail, checks trust or knows about General Delivery.
"""
