"""
pullmail: a mail transfer agent for a small domain, with pull-based General
Delivery (GDEL/RETR) beside classic SMTP.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
