"""
General Delivery (SPEC 1-5), both sides: the GDEL and RETR verbs on the
server machine (L{verbs}), the SMTA answering a RETR from its outbox
(L{serve}), and the RMTA taking notifications and retrieving the messages
they announce (L{retrieve}, its connections in L{fetch}, its due work in a
cluster in L{cluster}, and the marks that keep a delivery to an LMTP
store once across crashes in L{handover}).

May import: L{pullmail.smtp}, L{pullmail.storage}, L{pullmail.scheduling},
L{pullmail.trust}, L{pullmail.net}, L{pullmail.outbound.mx} (pure), L{pullmail.logsafe}.
"""
