"""What a run needs installed, checked before any work starts: specdsl's optional extras.

``pip install specdsl`` installs only what ``validate`` and ``plan`` need. Running work needs more, and
what depends on the plan: a local model needs torch and transformers (extra ``local``), training TRL
(``train``), a provider litellm (``litellm``), the position probe's plot matplotlib (``report``).

Every registered object (op, backend, training target, executor, probe) may carry a class attribute
``requires``: a sequence of ``(module, extra)`` pairs, e.g. ``(("torch", "local"), ("transformers",
"local"))``. ``module`` is a top-level import name; ``extra`` is one of specdsl's extras (``EXTRAS``),
or, for a plugin's own dependencies, any pip requirement (``"spacy>=3"``), put verbatim on the install
line. Whether a module is there is asked with :func:`importlib.util.find_spec`, which imports nothing.

:func:`check_requirements` is called by the runner before the first node: it gathers what every node
that will run needs (cached nodes need nothing) and raises one :class:`~specdsl.errors.RunError` that
lists every missing module and the one ``pip install`` line that brings them all.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from specdsl.errors import RunError

# specdsl's extras, in the order an install line names them (pyproject.toml defines them).
EXTRAS = ("run", "local", "train", "litellm", "report", "ray", "all")
# The extras each extra already installs: a hint that needs `local` and `run` says only `local`.
# tests/test_extras.py checks this table against pyproject.toml.
EXTRA_INCLUDES: Mapping[str, frozenset[str]] = {
    "local": frozenset({"run"}),
    "train": frozenset({"run", "local"}),
    "litellm": frozenset({"run"}),
    "ray": frozenset({"run"}),
    "all": frozenset(EXTRAS) - {"all"},
}
# The run store writes every node's table as Parquet, and reads cached inputs back from it: whatever
# runs needs pyarrow, whichever backend it uses.
STORE_REQUIRES = (("pyarrow", "run"),)


@dataclass(frozen=True)
class MissingModule:
    """A module a run needs and cannot import, the extra (or pip requirement) that brings it, and what
    needs it (``"step 'sft' (training target cpu)"``, ``"the run store"``)."""

    module: str
    extra: str
    needed_by: tuple[str, ...]

    def render(self) -> str:
        shown = ", ".join(self.needed_by[:4])
        if len(self.needed_by) > 4:
            shown += f" and {len(self.needed_by) - 4} more"
        return f"{self.module} ({_extra_label(self.extra)}), needed by {shown}"


def requirements_of(obj: Any) -> tuple[tuple[str, str], ...]:
    """An object's ``requires`` pairs; a malformed attribute counts as none (a plugin bug must not crash a run)."""
    raw = getattr(obj, "requires", None) or ()
    pairs = []
    try:
        for module, extra in raw:
            if isinstance(module, str) and module and isinstance(extra, str) and extra:
                pairs.append((module, extra))
    except (TypeError, ValueError):
        return ()
    return tuple(pairs)


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a dotted name imports its parents)."""
    top = module.partition(".")[0]
    try:
        if importlib.util.find_spec(top) is None:
            return False
        return top == module or importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import; a module whose __spec__ is None
        return False


def install_hint(extras: Iterable[str]) -> str:
    """The one ``pip install`` line for ``extras``: specdsl's extras folded into ``specdsl[...]``
    (an extra another one already installs is left out), anything else named as it is."""
    wanted = set(extras)
    ours = {e for e in wanted if e in EXTRAS}
    ours = {e for e in ours if not any(e in EXTRA_INCLUDES.get(other, ()) for other in ours if other != e)}
    parts = []
    if ours:
        parts.append('"specdsl[' + ",".join(e for e in EXTRAS if e in ours) + ']"')
    parts += [f'"{req}"' for req in sorted(wanted - set(EXTRAS))]
    return "pip install " + " ".join(parts)


def missing_requirements(plan: Any, registry: Any, *, nodes: Sequence[Any] | None = None,
                         cached: Callable[[Any], bool] | None = None,
                         executor: Any = None) -> list[MissingModule]:
    """Every module the nodes that would run need and that is not installed.

    ``nodes`` defaults to the whole plan; ``cached(node)`` tells which of them will come from the store
    (they need nothing). A node needs its op's requirements, those of the backends of the models it uses
    (a trained model generates through ``transformers``), a train node those of its training target, an
    evaluate node those of its probes; anything that runs needs the store's (pyarrow) and the executor's.
    Unknown ops, backends or targets are left to the runner, which reports them by name.
    """
    extra_of: dict[str, str] = {}              # module -> the first extra named for it
    users: dict[str, dict[str, list[str]]] = {}  # module -> who needs it -> why (op, backend, ...)

    def need(obj: Any, who: str, why: str = "") -> None:
        for module, extra in requirements_of(obj):
            extra_of.setdefault(module, extra)
            reasons = users.setdefault(module, {}).setdefault(who, [])
            if why and why not in reasons:
                reasons.append(why)

    running = [n for n in (plan.nodes if nodes is None else nodes) if not (cached and cached(n))]
    for node in running:
        who = f"step '{node.id}'"
        need(registry.ops.get(node.op), who, f"op {node.op}")
        for backend in sorted({_backend_of(plan, ref) for ref in _model_refs(node)} - {None}):
            need(registry.backends.get(backend), who, f"backend {backend}")
        params = node.params if node.op in ("train", "evaluate") else {}
        if node.op == "train":
            for target in _training_targets(registry, params.get("target", "auto")):
                need(target, who, f"training target {target.name}")
        if node.op == "evaluate":
            for probe in params.get("probes") or []:
                name = probe.get("probe") if isinstance(probe, Mapping) else None
                need(registry.probes.get(name), who, f"probe {name}")
    if running:
        need(_Store, "the run store (Parquet tables)")
        if executor is not None:
            need(executor, f"the {getattr(executor, 'name', '?')} executor")
    return [MissingModule(module, extra_of[module],
                          tuple(f"{who} ({', '.join(why)})" if why else who for who, why in users[module].items()))
            for module in users if not is_installed(module)]


def check_requirements(plan: Any, registry: Any, **kwargs: Any) -> None:
    """Raise one RunError naming every missing module and the install line, before any work (see
    :func:`missing_requirements` for the arguments)."""
    missing = missing_requirements(plan, registry, **kwargs)
    if not missing:
        return
    lines = "\n".join(f"    {m.render()}" for m in missing)
    raise RunError(f"this run needs packages that are not installed:\n{lines}",
                   hint=install_hint(m.extra for m in missing) + "  (nothing was run)")


def describe_requirements(obj: Any) -> list[dict[str, Any]]:
    """``[{module, extra, installed}]`` for an object's ``requires`` (what ``specdsl plugins`` shows)."""
    return [{"module": module, "extra": extra, "installed": is_installed(module)}
            for module, extra in requirements_of(obj)]


class _Store:
    requires = STORE_REQUIRES


def _extra_label(extra: str) -> str:
    return f"specdsl[{extra}]" if extra in EXTRAS else extra


def _model_refs(node: Any) -> list[str]:
    """The models a node asks for: its model params, its trained-model inputs, and for an evaluate
    node the models its probes' conditions and tokenizer name."""
    refs = list(node.model_names) + [ref for _, ref in node.models]
    if node.op == "evaluate":
        for probe in node.params.get("probes") or []:
            if not isinstance(probe, Mapping):
                continue
            refs += [c.get("model") for c in probe.get("conditions") or [] if isinstance(c, Mapping)]
            refs.append(probe.get("tokenizer"))
    return [r for r in refs if isinstance(r, str)]


def _backend_of(plan: Any, ref: str) -> str | None:
    if plan.has(ref) and plan.node(ref).op == "train":
        return "transformers"  # a trained model generates through the local backend
    try:
        return plan.model(ref).backend
    except KeyError:
        return None


def _training_targets(registry: Any, name: str) -> list[Any]:
    """The targets whose requirements a train step needs: the one it names, or for ``auto`` none when
    some registered target has everything installed, else the built-in ones it would fall back to."""
    targets = registry.targets
    if name != "auto":
        return [targets[name]] if name in targets else []
    if any(all(is_installed(m) for m, _ in requirements_of(t)) for t in targets.values()):
        return []
    builtin = [targets[n] for n in ("cpu",) if n in targets]
    return builtin or list(targets.values())


def plugin_requirements(registry: Any, info: Any) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{kind: {name: [{module, extra, installed}]}}`` for what one plugin registered (objects that
    require nothing are left out)."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for kind, names in info.provides.items():
        table = getattr(registry, kind, {})
        for name in names:
            described = describe_requirements(table.get(name))
            if described:
                out.setdefault(kind, {})[name] = described
    return out
