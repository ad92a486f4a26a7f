"""
Mail leaving the node (SPEC 7): the delivery service that notifies or
pushes each outbox entry (L{delivery}), the delivery status
notifications it writes (L{bounce}), and MTA-STS (L{sts}).

May import: L{pullmail.smtp}, L{pullmail.storage}, L{pullmail.scheduling},
L{pullmail.net}, L{pullmail.inbound.headers}.
"""
