"""
The twistd plugin: ``twistd -n pullmail --config FILE``.

Only a ServiceMaker lives here, so that ``twistd --help`` need not import
pullmail itself.
"""

from twisted.application.service import ServiceMaker

pullmail = ServiceMaker(
    "pullmail",
    "pullmail.node.tap",
    "A small-domain MTA with pull-based General Delivery",
    "pullmail",
)
