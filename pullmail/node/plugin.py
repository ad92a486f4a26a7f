"""Finding the plugins the config enables by name (SPEC 9)."""

from __future__ import annotations

from typing import Sequence

from twisted.plugin import getPlugins

import pullmail.plugins
from pullmail.config import ConfigError

__all__ = ["enabled_plugins"]


def enabled_plugins(interface, names: Sequence[str], option: str, package=None) -> list:
    """
    The plugins providing C{interface} named in C{names}, in that order.

    @raise ConfigError: naming C{option} when a name matches no plugin.
    """
    if not names:
        return []
    found = {}
    for plugin in getPlugins(interface, package or pullmail.plugins):
        found.setdefault(getattr(plugin, "name", None), plugin)
    chosen = []
    for name in names:
        if name not in found:
            known = ", ".join(sorted(n for n in found if n)) or "none"
            raise ConfigError(option, f"no plugin named {name!r} (installed: {known})")
        chosen.append(found[name])
    return chosen
