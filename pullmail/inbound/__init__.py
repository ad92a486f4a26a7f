"""
What happens to a message once it is accepted, on any service: the header
fields we add (L{headers}), and the L{router} that sends local recipients to
their mailboxes and the rest to the outbound queue, and decides the reply to
end-of-data.

May import: L{pullmail.smtp}, L{pullmail.storage}, L{pullmail.accounts},
L{pullmail.trust}, L{pullmail.scheduling}.  Also here: L{verdicts} (SPF,
DKIM, DMARC on received mail), L{recent_verdicts} (those on unsigned mail
reused) and L{authresults} (the Authentication-Results field).
"""
