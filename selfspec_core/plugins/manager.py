"""The plugin manager: the core's defaults first, then every ``selfspec`` entry point (only those
named by ``SELFSPEC_PLUGINS`` or ``--plugins`` when given).

Hooks are called through pluggy, so ``firstresult``, hook wrappers and tracing apply: a first-result
hook as ``pm.hook.NAME(...)`` (:func:`first_answer`), and a hook whose every answer is wanted through
one caller per plugin (``pm.subset_hook_caller``, :func:`results`), so each answer is checked with the
plugin that gave it named. The manager's hook-call monitoring names the plugin whose implementation
raised, from the traceback, in every call; ``SELFSPEC_TRACE_HOOKS=1`` turns on pluggy's tracing.

One broken plugin never stops the others: a plugin that fails to import, raises in a hook or answers
the wrong type is reported once in one line (``plugin 'law' is broken: ...; selfspec check-plugin
law``) and left out of every later hook call of the command. Only a plugin the command depends on
(:func:`require`: the plugin of the domain it works on, or the one ``check-plugin`` checks) stops it,
since carrying on without it would quietly run something else.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, TypeVar

import pluggy

from selfspec_core import __version__, hookspecs
from selfspec_core.errors import SelfspecError, did_you_mean, one_line, print_warning
from selfspec_core.plugins import defaults
from selfspec_core.records import Domain

ENTRY_POINT_GROUP = "selfspec"
# Comma-separated entry-point names to load (simonw/llm's LLM_LOAD_PLUGINS); unset loads every one,
# empty loads none but the core.
PLUGINS_ENV = "SELFSPEC_PLUGINS"
# Set (to anything but empty): pluggy's tracing writes every hook call, its arguments and its result
# to stderr, for a plugin author asking why a hook was or was not answered.
TRACE_ENV = "SELFSPEC_TRACE_HOOKS"
T = TypeVar("T")


class PluginBroken(SelfspecError):
    """A plugin failed: ``hook`` (``None`` at import) and ``detail`` say how, the message says what to run."""

    def __init__(self, plugin: str, detail: str, hook: str | None = None):
        self.plugin, self.hook = plugin, hook
        self.detail = one_line(detail)
        where = f"hook {hook}: " if hook else ""
        super().__init__(f"plugin {plugin!r} is broken: {where}{self.detail}; selfspec check-plugin {plugin}")


class SelfspecPluginManager(pluggy.PluginManager):
    """pluggy's manager, plus which plugins broke (by name, with their line), which the command needs,
    and what is worked out from the plugins in use (:func:`memoized`), forgotten whenever they change."""

    def __init__(self) -> None:
        super().__init__("selfspec")
        self.broken: dict[str, str] = {}
        self.required: set[str] = {"core"}
        self.memo: dict[str, Any] = {}

    def register(self, plugin: object, name: str | None = None) -> str | None:
        self.memo.clear()
        return super().register(plugin, name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any | None:
        name = name or (self.get_name(plugin) if plugin is not None else None)
        removed = super().unregister(plugin, name)
        self.broken.pop(name or "", None)
        self.required.discard(name or "")
        self.memo.clear()
        return removed


def selected_plugins() -> set[str] | None:
    """The entry-point names ``SELFSPEC_PLUGINS`` selects; ``None`` when it is not set (load every one)."""
    value = os.environ.get(PLUGINS_ENV)
    return None if value is None else {name.strip() for name in value.split(",") if name.strip()}


def load_only(names: str) -> None:
    """Load only the plugins ``names`` lists (comma-separated) from now on: the ``--plugins`` option.

    It is passed on as ``SELFSPEC_PLUGINS``, so processes this one starts load the same plugins.
    """
    os.environ[PLUGINS_ENV] = names
    if get_plugin_manager.cache_info().currsize:  # what the old manager worked out goes with it
        get_plugin_manager().memo.clear()
    get_plugin_manager.cache_clear()


@lru_cache(maxsize=1)
def get_plugin_manager() -> SelfspecPluginManager:
    manager = SelfspecPluginManager()
    manager.add_hookspecs(hookspecs)
    manager.add_hookcall_monitoring(_before_hook_call, _name_the_raising_plugin)
    if os.environ.get(TRACE_ENV):
        manager.trace.root.setwriter(sys.stderr.write)
        manager.enable_tracing()
    manager.register(defaults, name="core")
    wanted = selected_plugins()
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for entry_point in entry_points:
        if manager.has_plugin(entry_point.name) or (wanted is not None and entry_point.name not in wanted):
            continue
        try:
            manager.register(entry_point.load(), name=entry_point.name)
        except Exception as exc:  # an import failure or a hook pluggy refuses: name the plugin, load the rest
            dist = entry_point.dist.name if entry_point.dist else entry_point.value
            _set_aside(
                manager,
                PluginBroken(
                    entry_point.name,
                    f"failed to load {entry_point.value} ({type(exc).__name__}: {exc}); "
                    f"reinstall it or `pip uninstall {dist}`",
                ),
            )
    installed = sorted(entry_point.name for entry_point in entry_points)
    for name in sorted((wanted or set()) - set(installed)):
        print_warning(
            f"{PLUGINS_ENV} names {name!r}, which is not installed{did_you_mean(name, installed)}; "
            f"installed plugins: {', '.join(installed) or 'none'}"
        )
    return manager


def _before_hook_call(hook_name: str, hook_impls: object, kwargs: object) -> None:
    """Nothing to do before a call; pluggy's monitoring takes a pair."""


def _name_the_raising_plugin(outcome: pluggy.Result, hook_name: str, hook_impls: list, kwargs: object) -> None:
    """Turn an exception raised inside a plugin's implementation into :class:`PluginBroken` naming it.

    pluggy reports a hook call's outcome, not which implementation raised; the traceback says:
    the first frame that runs one of the call's implementations is the plugin's.
    """
    error = outcome.exception
    if not isinstance(error, Exception) or isinstance(error, PluginBroken):  # none, named, or Ctrl-C
        return
    codes = {getattr(impl.function, "__code__", None): impl for impl in hook_impls}
    frame = error.__traceback__
    while frame is not None and frame.tb_frame.f_code not in codes:
        frame = frame.tb_next
    if frame is None:  # raised by pluggy itself (a missing argument): a bug in the caller
        return
    culprit = codes[frame.tb_frame.f_code].plugin_name
    detail = str(error) if isinstance(error, SelfspecError) else f"raised {type(error).__name__}: {error}"
    outcome.force_exception(PluginBroken(culprit, detail, hook_name))


def require(plugin: str) -> None:
    """The command depends on ``plugin``: its failures stop the command instead of being skipped."""
    manager = get_plugin_manager()
    if plugin in manager.broken:
        raise SelfspecError(manager.broken[plugin])
    manager.required.add(plugin)


def require_domain(name: str) -> None:
    """What is asked about domain ``name`` depends on its plugin, when one is installed: that plugin's
    failures reach the caller (a plugin author's test of its own tasks, say) instead of being skipped."""
    found = domains().get(name)
    if found is not None:
        require(found.plugin)


def broken_plugins() -> dict[str, str]:
    """The plugins set aside in this command, each with the line that says why."""
    return dict(get_plugin_manager().broken)


def set_aside(failure: PluginBroken) -> None:
    """Leave the failed plugin out from now on (see the module's docstring): for what breaks outside a
    hook call, such as a plugin's task files."""
    _set_aside(get_plugin_manager(), failure)


def plugin_names() -> list[str]:
    """The plugins in use (registered and not set aside), the core's defaults left out."""
    manager = get_plugin_manager()
    return sorted(name for name, _ in manager.list_name_plugin() if name != "core" and name not in manager.broken)


def _set_aside(manager: SelfspecPluginManager, failure: PluginBroken) -> None:
    """Leave the failed plugin out of every later hook call, saying so once; stop if the command needs it."""
    if failure.plugin in manager.required:
        raise failure
    if failure.plugin not in manager.broken:
        manager.broken[failure.plugin] = str(failure)
        manager.memo.clear()  # its domains and tasks go with it
        print_warning(str(failure))


def _caller(manager: SelfspecPluginManager, hook: str, only: str | None = None):
    """pluggy's caller of ``hook`` without the broken plugins (with ``only``: without every plugin but
    that one, wrappers kept)."""
    impls = getattr(manager.hook, hook).get_hookimpls()
    left_out = {
        impl.plugin_name
        for impl in impls
        if impl.plugin_name in manager.broken
        or (only is not None and impl.plugin_name != only and not (impl.wrapper or impl.hookwrapper))
    }
    return manager.subset_hook_caller(hook, [manager.get_plugin(name) for name in left_out])


def _answerers(manager: SelfspecPluginManager, hook: str) -> list[str]:
    """The plugins implementing ``hook``, in pluggy's call order (the last registered first)."""
    impls = getattr(manager.hook, hook).get_hookimpls()
    return [
        impl.plugin_name
        for impl in reversed(impls)
        if not (impl.wrapper or impl.hookwrapper) and impl.plugin_name not in manager.broken
    ]


def plugin_result(plugin: str, hook: str, **kwargs) -> Any:
    """What ``plugin``'s own implementation of ``hook`` answers (``None`` when it has none), through
    pluggy with the hook's wrappers; :class:`PluginBroken` when it raises."""
    manager = get_plugin_manager()
    if plugin not in _answerers(manager, hook):
        return None
    answer = _caller(manager, hook, only=plugin)(**kwargs)
    if getattr(manager.hook, hook).spec.opts.get("firstresult"):
        return answer
    return answer[0] if answer else None


def results(hook: str, expected: type | tuple = object, each: type | tuple | None = None, **kwargs) -> list:
    """Every plugin's non-``None`` answer to ``hook`` in pluggy's order, as ``(plugin, answer)`` pairs.

    An answer must be an ``expected``, and with ``each`` a list, tuple or set holds only ``each``; a plugin that
    raises or answers otherwise is set aside (see the module's docstring) and its answer dropped.
    """
    manager = get_plugin_manager()
    answers = []
    for plugin in _answerers(manager, hook):
        try:
            answer = plugin_result(plugin, hook, **kwargs)
            if answer is not None:
                check_type(plugin, hook, answer, expected, each)
                answers.append((plugin, answer))
        except PluginBroken as failure:
            _set_aside(manager, failure)
    return answers


def first_answer(hook: str, expected: type | tuple, each: type | tuple | None = None, **kwargs) -> Any:
    """The first non-``None`` answer to a ``firstresult`` hook (later-registered plugins first), by
    ``pm.hook.NAME``, type-checked as in :func:`results`; a broken plugin is set aside and the rest asked."""
    manager = get_plugin_manager()
    while True:
        try:
            answer = _caller(manager, hook)(**kwargs)
            if answer is not None:
                _check_first(manager, hook, answer, expected, each, kwargs)
            return answer
        except PluginBroken as failure:
            _set_aside(manager, failure)


def _check_first(manager, hook: str, answer: Any, expected, each, kwargs: dict) -> None:
    """Check a first-result answer; only when it is wrong, ask which plugin gave it, to name it."""
    if _type_problem(answer, expected, each) is not None:
        check_type(answering_plugin(hook, **kwargs) or "core", hook, answer, expected, each)


def answering_plugin(hook: str, **kwargs) -> str | None:
    """Which plugin's answer :func:`first_answer` takes (each asked in turn until one answers): to name it
    in an error about that answer."""
    manager = get_plugin_manager()
    return next((p for p in _answerers(manager, hook) if plugin_result(p, hook, **kwargs) is not None), None)


def check_type(plugin: str, hook: str, value: Any, expected: type | tuple, each: type | tuple | None = None) -> None:
    """:class:`PluginBroken` when ``value`` is not an ``expected`` (of ``each``, with ``each``)."""
    problem = _type_problem(value, expected, each)
    if problem is not None:
        raise PluginBroken(plugin, problem, hook)


def _type_problem(value: Any, expected: type | tuple, each: type | tuple | None) -> str | None:
    if not isinstance(value, expected):
        return f"returned {type(value).__name__}, expected {_type_names(expected)}"
    if each is not None and isinstance(value, (list, tuple, set, frozenset)):
        wrong = next((item for item in value if not isinstance(item, each)), None)
        if wrong is not None:
            return f"returned a {type(wrong).__name__} in its {type(value).__name__}, expected {_type_names(each)}"
    return None


def _type_names(types: type | tuple) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def memoized(key: str, compute: Callable[[], T]) -> T:
    """``compute()``, worked out once while the plugins in use stay the same (a plugin registered,
    unregistered or set aside forgets it): a command asks for the domains and the plugins' task files
    once per domain."""
    manager = get_plugin_manager()
    if key not in manager.memo:
        value = compute()  # may set a plugin aside, which forgets the rest, not this
        manager.memo[key] = value
        return value
    return manager.memo[key]


def domains() -> dict[str, Domain]:
    """Every installed domain by name, with the plugin that provides it; a plugin whose registration
    fails, or that claims a domain a plugin registered before it provides, is set aside with all its domains."""
    return dict(memoized("domains", _registered_domains))


def _registered_domains() -> dict[str, Domain]:
    manager = get_plugin_manager()
    found: dict[str, Domain] = {}
    for plugin in reversed(_answerers(manager, "register_domains")):
        registered: list[Domain] = []
        try:
            plugin_result(plugin, "register_domains", register=registered.append)
            for domain in registered:
                check_type(plugin, "register_domains", domain, Domain)
                if domain.name in found:
                    raise PluginBroken(
                        plugin,
                        f"registers domain {domain.name!r}, which plugin {found[domain.name].plugin!r} "
                        "provides already; uninstall one",
                        "register_domains",
                    )
        except PluginBroken as failure:
            _set_aside(manager, failure)
            continue
        for domain in registered:
            found[domain.name] = replace(
                domain,
                task_families=tuple(domain.task_families),
                input_task_types=tuple(domain.input_task_types),
                plugin=plugin,
            )
    return dict(sorted(found.items()))


def get_domain(name: str) -> Domain:
    """The domain a command works on; its plugin is :func:`require` d from here on."""
    installed = domains()
    if name not in installed:
        names = ", ".join(installed) or "none"
        broken = "".join(f"; {line}" for line in get_plugin_manager().broken.values())
        raise SelfspecError(
            f"unknown domain {name!r}{did_you_mean(name, installed)}; installed domains: {names}{broken}. "
            f"Install a domain plugin (e.g. `pip install -e plugins/{name}`) or scaffold one with "
            f"`selfspec new-domain {name}`"
        )
    require(installed[name].plugin)
    return installed[name]


@dataclass(frozen=True)
class PluginInfo:
    """One plugin as ``selfspec plugins`` lists it; ``broken`` says why it was set aside ("" when fine)."""

    name: str
    package: str
    version: str
    domains: tuple[str, ...]
    hooks: tuple[str, ...]
    broken: str = ""


def installed_plugins(include_core: bool = False) -> list[PluginInfo]:
    """Every plugin by name, a broken one too: its distribution, the domains it registers, the hooks it
    implements."""
    manager = get_plugin_manager()
    dists = {ep.name: ep.dist for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    registered: dict[str, list[str]] = {}
    for domain in domains().values():
        registered.setdefault(domain.plugin, []).append(domain.name)
    names = {name for name, _ in manager.list_name_plugin()} | set(manager.broken)
    found = []
    for name in sorted(names - ({"core"} if not include_core else set())):
        dist = dists.get(name)
        package, version = (
            (dist.name, dist.version) if dist else ("selfspec", __version__) if name == "core" else ("", "")
        )
        plugin = manager.get_plugin(name)
        hooks = sorted(caller.name for caller in (manager.get_hookcallers(plugin) or ()) if plugin is not None)
        found.append(
            PluginInfo(
                name, package, version, tuple(registered.get(name, ())), tuple(hooks), manager.broken.get(name, "")
            )
        )
    return found
