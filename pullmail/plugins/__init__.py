"""
pullmail's plugin package.  Trust policies and delivery hooks are
discovered here with ``twisted.plugin.getPlugins``; like ``twisted.plugins``
its path is extended with every ``pullmail/plugins`` folder on ``sys.path``,
so a plugin is installed by dropping a module into such a folder.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]
__all__: list[str] = []
