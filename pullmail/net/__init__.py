"""
The network seams every part shares: one DNS resolver aimed at
``[dns] nameservers`` (L{dns}), the questions it asks on the wire without
a thread (L{nameserver}), and the TLS certificates and contexts (L{tls}).

May import: the standard library, Twisted, dnspython and
L{pullmail.storage.durable}.
"""
