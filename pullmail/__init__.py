"""
pullmail: a mail transfer agent for a small domain, with pull-based General
Delivery (GDEL/RETR) beside classic SMTP.

Beside the packages, a few leaf modules any package may import: L{config},
L{ids}, L{interfaces}, L{logsafe} (peer text made safe to log) and
L{testing}.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
