"""Plugin loading: the built-ins plus every installed ``specdsl`` entry point.

A plugin that fails to import, a hook that raises, or an object that does not keep the contract (see
:mod:`specdsl.contract.conformance`) produces one warning naming the plugin, never a crash: what the
plugin registered correctly still loads, and ``specdsl plugins`` marks it failed with the reason (pytest
treats a failing plugin the same way). ``SPECDSL_PLUGINS`` limits which third-party plugins load: a
comma-separated list of entry-point names, or ``none``. The built-in plugin is loaded by name, like any
other, so nothing here depends on what it provides.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from specdsl.contract import hookspecs
from specdsl.contract.conformance import contract_problems

ENV_ALLOW = "SPECDSL_PLUGINS"
BUILTIN_MODULE = "specdsl.builtin"


@dataclass
class PluginInfo:
    name: str
    module: str
    version: str
    provides: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    rejected: list[str] = field(default_factory=list)  # objects turned away, with the reasons

    def fail(self, reason: str) -> None:
        self.error = reason if self.error is None else f"{self.error}; {reason}"


@dataclass
class Registry:
    """Everything the installed plugins registered, by kind and name."""

    backends: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)
    ops: dict[str, Any] = field(default_factory=dict)
    recipes: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, Any] = field(default_factory=dict)
    executors: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    owner: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin name

    def step_ops(self) -> list[str]:
        """The ops a spec's steps may name (not those only the compiler places, like source), sorted."""
        return sorted(name for name, op in self.ops.items() if getattr(op, "spec_step", True))


_KINDS = (
    ("backends", "register_backends", hookspecs.GenerationBackend),
    ("targets", "register_training_targets", hookspecs.TrainingTarget),
    ("ops", "register_ops", hookspecs.OpDef),
    ("recipes", "register_recipes", hookspecs.RecipeDef),
    ("probes", "register_probes", hookspecs.ProbeDef),
    ("executors", "register_executors", hookspecs.ExecutorDef),
    ("sources", "register_sources", hookspecs.SourceDef),
)


def _allowed() -> set[str] | None:
    raw = os.environ.get(ENV_ALLOW)
    if raw is None:
        return None
    raw = raw.strip()
    if raw.lower() in ("", "none"):
        return set()
    return {part.strip() for part in raw.split(",") if part.strip()}


def build_registry(extra_plugins: tuple[Any, ...] = ()) -> Registry:
    """Load the built-ins, the allowed entry points and ``extra_plugins`` (objects or modules, for tests)."""
    builtin = importlib.import_module(BUILTIN_MODULE)
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs.SpecdslHooks)
    registry = Registry()
    loaded: list[tuple[str, str, str, Any]] = [("builtin", BUILTIN_MODULE, _version("specdsl"), builtin)]
    allowed = _allowed()
    for ep in entry_points(group=hookspecs.PROJECT):
        if allowed is not None and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        version = getattr(dist, "version", "?") if dist else "?"
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take specdsl down
            warnings.warn(f"specdsl plugin '{ep.name}' ({ep.value}) failed to load: {exc!r}; skipping it",
                          RuntimeWarning, stacklevel=2)
            registry.plugins.append(PluginInfo(ep.name, ep.value, version, error=repr(exc)))
            continue
        loaded.append((ep.name, ep.value, version, module))
    for i, obj in enumerate(extra_plugins):
        loaded.append((getattr(obj, "__name__", f"extra{i}"), repr(obj), "test", obj))

    for name, module_name, version, module in loaded:
        info = PluginInfo(name, module_name, version)
        try:
            pm.register(module, name=name)
        except Exception as exc:
            warnings.warn(f"specdsl plugin '{name}' could not be registered: {exc!r}", RuntimeWarning, stacklevel=2)
            info.error = repr(exc)
            registry.plugins.append(info)
            continue
        for kind, hook_name, _protocol in _KINDS:
            table = getattr(registry, kind)
            impls = [impl for impl in getattr(pm.hook, hook_name).get_hookimpls() if impl.plugin is module]
            for impl in impls:
                def register(obj: Any, _kind: str = kind, _table: dict = table, _hook: str = hook_name,
                             _module: Any = module) -> None:
                    # The built-ins' schemas are checked by the test suite, not at every start-up.
                    problems = contract_problems(_kind, obj, check_schemas=_module is not builtin)
                    obj_name = getattr(obj, "name", None)
                    label = f"{_kind[:-1]} '{obj_name}'" if isinstance(obj_name, str) and obj_name else \
                        f"a {_kind[:-1]} ({type(obj).__name__})"
                    if problems:
                        reason = f"{label} rejected: {'; '.join(problems)}"
                        warnings.warn(f"specdsl plugin '{name}': {reason} (in {_hook}); skipping it",
                                      RuntimeWarning, stacklevel=2)
                        info.rejected.append(reason)
                        info.fail(reason)
                        return
                    if obj_name in _table:
                        warnings.warn(f"plugin '{name}' registers {_kind[:-1]} '{obj_name}', already provided by "
                                      f"'{registry.owner[(_kind, obj_name)]}'; keeping the first",
                                      RuntimeWarning, stacklevel=2)
                        return
                    _table[obj_name] = obj
                    registry.owner[(_kind, obj_name)] = name
                    info.provides.setdefault(_kind, []).append(obj_name)
                try:
                    impl.function(register=register)
                except Exception as exc:
                    warnings.warn(f"specdsl plugin '{name}' failed in {hook_name}: {exc!r}; skipping what it "
                                  "registers there", RuntimeWarning, stacklevel=2)
                    info.fail(f"{hook_name} raised {exc!r}")
        registry.plugins.append(info)
    return registry


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "0+unknown"


_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry (plugins load once per process)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = build_registry()
    return _DEFAULT
