"""The typed facade over gmesh's pluggy plugin manager: core code calls these methods, never `pm.hook`.

Plugins load from the `gmesh` entry-point group — built-ins too, so they are plugins in
every sense. Nothing is created at import time: `Plugins.load()` builds a manager.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, cast

import pluggy

from gmesh import hookspecs
from gmesh.config.kinds import KindRegistry
from gmesh.errors import InvalidArgument

if TYPE_CHECKING:
    import click

    from gmesh.chain.compose import PluginFactory
    from gmesh.chain.filter import FilterFactory
    from gmesh.stats.edits import TelemetryEdits

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "gmesh"
DISABLE_ENV = "GMESH_DISABLE_PLUGINS"

#: Built-in plugins: entry-point name -> module. Loaded through the entry-point group;
#: registered directly too when gmesh runs from a source tree without its metadata.
BUILTINS: dict[str, str] = {
    "service": "gmesh.plugins.service",
    "balancer": "gmesh.plugins.balancer",
    "router": "gmesh.plugins.router",
    "retry": "gmesh.plugins.retry",
    "stats": "gmesh.plugins.stats",
    "breaker": "gmesh.plugins.breaker",
    "metrics": "gmesh.plugins.metrics",
    "tracing": "gmesh.plugins.tracing",
    "accesslog": "gmesh.plugins.accesslog",
    "tap": "gmesh.plugins.tap",
    "redact": "gmesh.plugins.redact",
    "ratelimit": "gmesh.plugins.ratelimit",
}
#: Built-ins gmesh cannot work without; GMESH_DISABLE_PLUGINS cannot remove them.
ESSENTIAL = frozenset({"service", "balancer"})


#: What `Plugins.load` found, per (entry points, disabled): installed distributions do not
#: change while a process runs, and scanning them costs ~50 ms each time.
_LOADED: dict[tuple[bool, frozenset[str]], Plugins] = {}


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool
    hooks: tuple[str, ...]


class Plugins:
    """All loaded plugins, with one typed method per hook gmesh calls."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._kinds: KindRegistry | None = None

    @classmethod
    def load(cls, *, entry_points: bool = True, disabled: frozenset[str] | None = None) -> Plugins:
        """A plugin manager with the built-ins and every installed `gmesh` entry point.

        `disabled` (default: the comma-separated names in GMESH_DISABLE_PLUGINS) are not
        loaded; naming an essential built-in there is an error. With entry points, the manager
        is made once per process and shared (installed distributions do not change while a
        process runs); without, a new one each time.
        """
        if disabled is None:
            disabled = frozenset(n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip())
        cache_key = (entry_points, disabled)
        found = _LOADED.get(cache_key) if entry_points else None
        if found is not None:
            return found
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        refused = disabled & ESSENTIAL
        if refused:
            raise InvalidArgument(
                f"{DISABLE_ENV}: built-in plugin(s) {', '.join(sorted(refused))} cannot be disabled"
            )
        for name in disabled:
            pm.set_blocked(name)
        if entry_points:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for name, module in BUILTINS.items():
            if pm.get_plugin(name) is None and not pm.is_blocked(name):
                pm.register(importlib.import_module(module), name=name)
        plugins = cls(pm)
        if entry_points:
            _LOADED[cache_key] = plugins
        return plugins

    @classmethod
    def builtin_only(cls) -> Plugins:
        return cls.load(entry_points=False, disabled=frozenset())

    # -- hooks -------------------------------------------------------------------------

    def config_kinds(self) -> KindRegistry:
        """Every config kind, from `gmesh_register_config_kinds` (built once, then cached)."""
        if self._kinds is None:
            kinds = KindRegistry()
            # Call order (tryfirst, then last-registered first, trylast built-ins at the end),
            # one plugin at a time so each kind records which plugin gave it.
            for impl in reversed(self.pm.hook.gmesh_register_config_kinds.get_hookimpls()):
                kinds.plugin = impl.plugin_name
                impl.function(*[{"kinds": kinds}[arg] for arg in impl.argnames])
            kinds.plugin = ""
            self._kinds = kinds
        return self._kinds

    def filter_factories(self) -> list[PluginFactory]:
        """Every filter factory with the plugin that gave it, in plugin call order (the chain
        sorts them by phase)."""
        from gmesh.chain.compose import PluginFactory

        factories: list[PluginFactory] = []
        for impl in self.pm.hook.gmesh_filter_factories.get_hookimpls()[::-1]:
            given = cast("list[FilterFactory]", impl.function())
            factories.extend(PluginFactory(impl.plugin_name, f) for f in given or ())
        return factories

    def filters_by_plugin(self) -> dict[str, list[FilterFactory]]:
        """Plugin name -> the filter factories it gives (for `gmesh plugins`; never per request)."""
        by_plugin: dict[str, list[FilterFactory]] = {}
        for impl in self.pm.hook.gmesh_filter_factories.get_hookimpls():
            given = cast("list[FilterFactory]", impl.function())
            by_plugin.setdefault(impl.plugin_name, []).extend(given)
        return by_plugin

    def telemetry_edits(self) -> TelemetryEdits:
        """Every plugin's metadata redactors and access log fields, in plugin call order."""
        from gmesh.stats.edits import TelemetryEdits

        redact = [f for found in self.pm.hook.gmesh_redact_metadata()[::-1] for f in found or ()]
        fields = [f for found in self.pm.hook.gmesh_access_log_fields()[::-1] for f in found or ()]
        bodies = [f for found in self.pm.hook.gmesh_redact_bodies()[::-1] for f in found or ()]
        return TelemetryEdits(tuple(redact), tuple(fields), tuple(bodies))

    def register_commands(self, cli: click.Group) -> None:
        self.pm.hook.gmesh_register_commands(cli=cli)

    # -- introspection -----------------------------------------------------------------

    def describe(self) -> list[PluginInfo]:
        """Name, distribution, version and hooks of every loaded plugin."""
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist = dists.get(id(plugin))
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            infos.append(
                PluginInfo(
                    name=name,
                    distribution=dist.project_name if dist else _distribution_of(plugin),
                    version=dist.version if dist else "",
                    builtin=name in BUILTINS and getattr(plugin, "__name__", "") == BUILTINS[name],
                    hooks=hooks,
                )
            )
        return sorted(infos, key=lambda i: (not i.builtin, i.name))


def _distribution_of(plugin: object) -> str:
    module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
    top = module.split(".")[0]
    names = importlib.metadata.packages_distributions().get(top, [])
    return names[0] if names else "(not installed)"
