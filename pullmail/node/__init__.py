"""
The node as an operator meets it: the twistd service maker that builds
every part into one MultiService (L{tap}), the ``pullmail`` command
(L{cli}), the control socket (L{control}) and plugin loading (L{plugin}).

The top of the import graph: it may import everything, and nothing outside
it imports it.  Only L{tap} touches the global reactor.
"""
