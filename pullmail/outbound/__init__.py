"""
Mail leaving the node (SPEC 7): the delivery service that notifies or
pushes each outbox entry (L{delivery}, glue), the entry's life as a pure
function (L{lifecycle}), the sessions to a domain's mail hosts
(L{session}), the choice of hosts and addresses (L{mx}), MTA-STS (L{sts}),
and the delivery status notifications it writes (L{bounce} builds them,
L{bouncer} sends them).

May import: L{pullmail.smtp}, L{pullmail.storage}, L{pullmail.scheduling},
L{pullmail.net}, L{pullmail.inbound.headers}.
"""
