"""
Everything that must survive a crash: fsynced files (L{durable}),
versioned records (L{record}), the maildirs (L{maildir}), the outbox
(L{outbox}) with the snapshot that makes its start-up quick (L{snapshot},
its columns in L{columns}, kept fresh while running by L{refresh}), the RMTA's pending notifications (L{pending}), and the ways
blocking disk work leaves the reactor thread: the fsync helper process
(L{fsync_helper} in the node, L{fsync_process} in the helper) and a few
disk threads (L{disk_threads}).

May import: the standard library, Twisted, L{pullmail.ids} and
L{pullmail.interfaces}.  Storage decides nothing about mail.
"""
