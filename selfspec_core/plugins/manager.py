"""The plugin manager: the core's defaults first, then every ``selfspec`` entry point.

Hooks are called through :func:`results` / :func:`first_result` rather than ``pm.hook`` so that a
plugin that raises or returns the wrong type is named in the error the user sees.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import pluggy

from selfspec_core import __version__, hookspecs
from selfspec_core.errors import SelfspecError
from selfspec_core.plugins import defaults
from selfspec_core.records import Domain

ENTRY_POINT_GROUP = "selfspec"


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("selfspec")
    manager.add_hookspecs(hookspecs)
    manager.register(defaults, name="core")
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if manager.has_plugin(entry_point.name):
            continue
        try:
            plugin = entry_point.load()
        except Exception as exc:  # any import failure must name the plugin, not crash
            dist = entry_point.dist.name if entry_point.dist else entry_point.value
            raise SelfspecError(
                f"plugin {entry_point.name!r} ({entry_point.value}) failed to import: "
                f"{type(exc).__name__}: {exc}. Reinstall it or `pip uninstall {dist}`"
            ) from exc
        manager.register(plugin, name=entry_point.name)
    return manager


def results(hook: str, **kwargs) -> list[tuple[str, Any]]:
    """Call every implementation of ``hook`` in pluggy's order; ``(plugin name, result)`` pairs."""
    manager = get_plugin_manager()
    answers = []
    for impl in reversed(getattr(manager.hook, hook).get_hookimpls()):
        value = _call(impl, hook, kwargs)
        if value is not None:
            answers.append((impl.plugin_name, value))
    return answers


def plugin_result(plugin: str, hook: str, **kwargs) -> Any:
    """What ``plugin``'s own implementation of ``hook`` answers; ``None`` when it has none."""
    for impl in getattr(get_plugin_manager().hook, hook).get_hookimpls():
        if impl.plugin_name == plugin:
            return _call(impl, hook, kwargs)
    return None


def _call(impl: pluggy.HookImpl, hook: str, kwargs: dict) -> Any:
    try:
        return impl.function(**{name: kwargs[name] for name in impl.argnames})
    except SelfspecError:
        raise
    except Exception as exc:
        raise SelfspecError(f"plugin {impl.plugin_name!r} failed in hook {hook}: {type(exc).__name__}: {exc}") from exc


def first_result(hook: str, expected: type | tuple, **kwargs) -> tuple[str, Any] | tuple[None, None]:
    """The first non-``None`` answer (later-registered plugins first), type-checked."""
    for plugin, value in results(hook, **kwargs):
        check_type(plugin, hook, value, expected)
        return plugin, value
    return None, None


def check_type(plugin: str, hook: str, value: Any, expected: type | tuple) -> None:
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise SelfspecError(f"plugin {plugin!r}: hook {hook} returned {type(value).__name__}, expected {names}")


def domains() -> dict[str, Domain]:
    """Every installed domain by name, with the plugin that provides it."""
    found: dict[str, Domain] = {}
    manager = get_plugin_manager()
    for impl in reversed(manager.hook.register_domains.get_hookimpls()):

        def register(domain: Domain, _plugin=impl.plugin_name) -> None:
            check_type(_plugin, "register_domains", domain, Domain)
            if domain.name in found:
                raise SelfspecError(
                    f"domain {domain.name!r} is provided by both {found[domain.name].plugin!r} and {_plugin!r}; uninstall one"
                )
            found[domain.name] = replace(
                domain,
                task_families=tuple(domain.task_families),
                input_task_types=tuple(domain.input_task_types),
                plugin=_plugin,
            )

        try:
            impl.function(register=register)
        except SelfspecError:
            raise
        except Exception as exc:
            raise SelfspecError(f"plugin {impl.plugin_name!r} failed in hook register_domains: {exc}") from exc
    return dict(sorted(found.items()))


def get_domain(name: str) -> Domain:
    installed = domains()
    if name not in installed:
        names = ", ".join(installed) or "none"
        raise SelfspecError(
            f"unknown domain {name!r}; installed domains: {names}. Install a domain plugin "
            f"(e.g. `pip install -e plugins/{name}`) or scaffold one with `selfspec new-domain {name}`"
        )
    return installed[name]


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin as ``selfspec plugins`` lists it."""

    name: str
    package: str
    version: str
    domains: tuple[str, ...]
    hooks: tuple[str, ...]


def installed_plugins(include_core: bool = False) -> list[PluginInfo]:
    """Every registered plugin by name: its distribution, the domains it registers, the hooks it implements."""
    manager = get_plugin_manager()
    dists = {ep.name: ep.dist for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    registered: dict[str, list[str]] = {}
    for domain in domains().values():
        registered.setdefault(domain.plugin, []).append(domain.name)
    found = []
    for name, plugin in sorted(manager.list_name_plugin()):
        if name == "core" and not include_core:
            continue
        dist = dists.get(name)
        package, version = (
            (dist.name, dist.version) if dist else ("selfspec", __version__) if name == "core" else ("", "")
        )
        hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin) or ())
        found.append(PluginInfo(name, package, version, tuple(registered.get(name, ())), tuple(hooks)))
    return found
