"""Service plugins of the appliance (installed as ``appliance.plugins``).

Each module here holds ``IServicePlugin`` objects at module level; Twisted's
plugin system finds them.  Third-party distributions extend this package by
shipping modules in their own ``appliance/plugins/`` folder (with no
``__init__.py``): the line below adds those folders to the search path.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
