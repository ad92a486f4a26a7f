"""
The PostgreSQL backend (SPEC 11.3): the outbox, the push queue, the pending
notifications and the retrieved-id records of every node of a cluster in
one database, message bodies included.
"""
