"""
The node's users: who exists, their aliases and what they may send as
(L{users}), and the AUTH login of the submission services (L{login}).

May import: L{pullmail.smtp.address} and L{pullmail.storage.durable}.
"""
