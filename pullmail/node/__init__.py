"""
The node as an operator meets it: the twistd service maker that builds
every part into one MultiService (L{tap}), the ``pullmail`` command
(L{cli}), the control socket (L{control}) and plugin loading (L{plugin});
the operator's tools of SPEC 11.4: metrics counted from log events
(L{metrics}), ``sendmail`` and its drop folder (L{sendmail}, L{maildrop}),
queue listing, holds and shape (L{queuetools}), DNS checks (L{doctor}), the
log format (L{logs}) and the state dir's lock (L{lock}).

The top of the import graph: it may import everything, and nothing outside
it imports it.  Only L{tap} touches the global reactor (L{metrics_site
<metrics.metrics_site>}, which it calls, imports prometheus_client's twisted
resource, bound to it).
"""
