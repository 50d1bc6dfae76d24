"""The plugin package of mailguard's inspector protocols.

Any installed distribution can add a protocol by shipping a module in a
directory ``mailguard/plugins/`` on ``sys.path`` that binds a name to an
object providing ``twisted.plugin.IPlugin`` and
`mailguard.interfaces.IInspectorFactory`.  That distribution must *not*
ship ``mailguard/__init__.py`` or ``mailguard/plugins/__init__.py``: the
lines below (the "``__init__`` dance" of ``twisted.plugins``) add every such
directory without an ``__init__.py`` to this package's ``__path__``, so
``twisted.plugin.getPlugins`` sees them all.  Nothing else belongs in this
file, and ``dropin.cache`` (the cache ``getPlugins`` writes beside the
modules) is never shipped.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
