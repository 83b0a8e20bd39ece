"""The Python API: everything the CLI does is a function here a notebook can call.

    from specdsl import api
    plan = api.compile_spec("specs/orca_erasure.yaml")
    result = api.run_plan(plan)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from specdsl.errors import ErrorSink, SpecErrors
from specdsl.ir.plan import Plan

SPEC_SUFFIXES = (".yaml", ".yml")


def _registry(registry: Any | None) -> Any:
    if registry is not None:
        return registry
    from specdsl.plugins import default_registry

    return default_registry()


def load_spec(path: str | Path, *, registry: Any | None = None):
    """Load, schema-check and parse a spec file into a typed Spec (recipes expanded)."""
    from specdsl.frontend.load import load_yaml_file
    from specdsl.frontend.parse import parse_spec
    from specdsl.frontend.schema import validate

    registry = _registry(registry)
    path = Path(path)
    display = _display(path)
    doc = load_yaml_file(path, display)
    sink = ErrorSink()
    validate(doc, registry, sink)
    if sink:
        raise SpecErrors(sink.errors, {doc.file: doc.lines})
    spec = parse_spec(doc, path.resolve(), registry, sink)
    if sink or spec is None:
        raise SpecErrors(sink.errors, {doc.file: doc.lines})
    return spec


def compile_spec(path: str | Path, *, registry: Any | None = None, passes: bool = True,
                 identities: bool = True) -> Plan:
    """Load and lower a spec into a Plan (passes applied unless ``passes=False``)."""
    from specdsl.lower.build import lower
    from specdsl.passes import run_passes

    registry = _registry(registry)
    spec = load_spec(path, registry=registry)
    plan = lower(spec, registry, identities=identities)
    return run_passes(plan, registry) if passes else plan


def validate_paths(paths: Iterable[str | Path], *, registry: Any | None = None) -> dict[str, SpecErrors | None]:
    """Check specs (files or folders of *.yaml) without running anything. Returns errors per file."""
    registry = _registry(registry)
    results: dict[str, SpecErrors | None] = {}
    for file in expand_spec_paths(paths):
        try:
            compile_spec(file, registry=registry, identities=False)
            results[str(file)] = None
        except SpecErrors as exc:
            results[str(file)] = exc
    return results


def expand_spec_paths(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix in SPEC_SUFFIXES and ".specdsl" not in f.parts))
        else:
            out.append(p)
    return out


def run_plan(plan: Plan, **kwargs: Any):
    """Execute a plan; see :func:`specdsl.execute.runner.run` for the options.

    Every run but a dry run writes ``report.html`` beside its ``run.json`` (and the store's latest).
    """
    from specdsl.execute.generation import young_collections_rarer
    from specdsl.execute.runner import run
    from specdsl.views.report import write_run_reports

    kwargs.setdefault("on_manifest", write_run_reports)  # never raises: a report never fails a run
    with young_collections_rarer():  # a run builds a few objects per row: see BATCH_GC_THRESHOLD
        return run(plan, **kwargs)


def run_spec(path: str | Path, **kwargs: Any):
    return run_plan(compile_spec(path), **kwargs)


def _display(path: Path) -> str:
    """Show paths relative to the working directory when they are inside it (as editors and CI logs do)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
