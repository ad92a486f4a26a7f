"""
The PostgreSQL backend (SPEC 11.3): the outbox, the push queue, the pending
notifications and the retrieved-id records of every node of a cluster in
one database, message bodies included: the connections (L{database}), the
versioned schema (L{schema}), the shared outbox and pending notifications
(L{outbox}, L{pending}), the wake-ups (L{watch}), and a node's start with
or without its database (L{startup}).
"""
