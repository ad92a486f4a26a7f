"""
The SMTP protocol itself (RFC 5321 and its extensions): replies, address
syntax, the envelope, the sans-IO server machine and DATA framing, the
client dialogues, and the thin Twisted glue that moves bytes for them.

May import: the standard library, Twisted, zope.interface, and
L{pullmail.accounts} (who may send as whom) and L{pullmail.ids}.  Nothing
here stores mail, checks trust or knows about General Delivery.
"""
