"""
Mail leaving the node (SPEC 7): the delivery service that notifies or
pushes each outbox entry (L{delivery}) and the delivery status
notifications it writes (L{bounce}).

May import: L{pullmail.smtp}, L{pullmail.storage}, L{pullmail.scheduling},
L{pullmail.net}, L{pullmail.inbound.headers}.
"""
