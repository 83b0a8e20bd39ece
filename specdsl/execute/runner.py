"""The local executor: runs a plan's nodes in dependency order against the content-addressed store.

* A node whose fingerprint is in the store is a cache hit: no model call, no recomputation.
* Generation goes through the request journal, so a killed run resumes without re-issuing a request.
* A generate node with failed requests is not committed (its failures are retried next run); what it
  did complete stays in the journal. Nodes downstream of it still run, so the user sees everything
  that can be computed, but are not committed either.
* Every run writes a manifest (``run.json``): spec hash, plan, per-node fingerprints, rows, tokens,
  cost, durations, seeds and package versions.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from specdsl.errors import RunError, StopRun
from specdsl.ir.plan import Plan, PlanNode
from specdsl.contract.ops import RunContext
from specdsl.execute.services import Services
from specdsl.execute.store import Store


@dataclass
class NodeReport:
    id: str
    op: str
    fingerprint: str
    status: str                  # cached | ran | incomplete | skipped | would-run | failed | stopped
    rows: int | None = None
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "fingerprint": self.fingerprint, "status": self.status,
                "rows": self.rows, "seconds": round(self.seconds, 3), **self.stats, "note": self.note}


@dataclass
class RunResult:
    plan: Plan
    store: Store
    nodes: list[NodeReport]
    manifest_path: Path | None
    evaluations: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(n.status in ("cached", "ran", "skipped", "would-run", "stopped") for n in self.nodes)

    def rows(self, node_id: str) -> list[dict[str, Any]]:
        return self.store.load(self.plan.node(node_id).fingerprint)

    def report(self, node_id: str) -> NodeReport:
        return next(n for n in self.nodes if n.id == node_id)

    @property
    def failed_requests(self) -> int:
        return sum(n.stats.get("failed", 0) for n in self.nodes)


def default_store_dir(plan: Plan) -> Path:
    spec_dir = Path(plan.spec_file).parent
    return (spec_dir / plan.store) if plan.store else spec_dir / ".specdsl"


def select_nodes(plan: Plan, *, only: str | None = None, until: str | None = None) -> list[PlanNode]:
    for name, value in (("--only", only), ("--until", until)):
        if value is not None and not plan.has(value):
            known = ", ".join(n.id for n in plan.nodes)
            raise RunError(f"{name} {value}: no such node", hint=f"nodes: {known}")
    if until is not None:
        wanted = set(plan.ancestors(until))
        return [n for n in plan.nodes if n.id in wanted]
    if only is not None:
        return [plan.node(only)]
    return list(plan.nodes)


def run(plan: Plan, *, store_dir: str | Path | None = None, only: str | None = None, until: str | None = None,
        dry_run: bool = False, fail_fast: bool = False, registry: Any = None, progress: bool = True,
        console: Any = None, executor: str = "local",
        on_manifest: Callable[[Mapping[str, Any], Path, Path], Any] | None = None) -> RunResult:
    """Execute ``plan``. See the module docstring for the guarantees.

    ``on_manifest(manifest, store_root, run_dir)`` is called once ``run.json`` is written, even when
    the run fails: :func:`specdsl.api.run_plan` writes ``report.html`` beside it (views build on the
    executor, never the other way round).
    """
    if registry is None:
        from specdsl.plugins import default_registry

        registry = default_registry()
    store = Store(Path(store_dir) if store_dir else default_store_dir(plan))
    store.clean_tmp(older_than_s=3600)
    selected = select_nodes(plan, only=only, until=until)
    reports: list[NodeReport] = []
    from specdsl.execute.progress import Display

    display = Display(console=console, enabled=progress)
    if executor not in registry.executors:
        raise RunError(f"unknown executor '{executor}'",
                       hint=f"installed: {', '.join(sorted(registry.executors))} (Ray: pip install 'specdsl[ray]')")
    if not dry_run:  # what the nodes that will run need installed, checked before any of them starts
        from specdsl.requirements import check_requirements

        check_requirements(plan, registry, nodes=selected, executor=registry.executors[executor],
                           cached=lambda n: store.has(n.fingerprint) and only != n.id)
    services = Services(plan, store, registry, progress=display, fail_fast=fail_fast,
                        executor=registry.executors[executor])
    outputs: dict[str, list[dict[str, Any]]] = {}
    tainted: set[str] = set()   # nodes whose output is incomplete: they and their dependents are not committed
    started = time.time()
    evaluations: dict[str, Any] = {}

    def load(node_id: str) -> list[dict[str, Any]]:
        if node_id not in outputs:
            fp = plan.node(node_id).fingerprint
            if not store.has(fp):
                raise RunError(f"input '{node_id}' is not in the store", hint=f"run with --until {node_id} first")
            outputs[node_id] = store.load(fp)
        return outputs[node_id]

    if not dry_run and any(not store.has(n.fingerprint) for n in selected):
        _prepare_models(plan, registry)
    try:
        with display:
            for index, node in enumerate(selected):
                t0 = time.monotonic()
                if store.has(node.fingerprint) and only != node.id:
                    meta = store.meta(node.fingerprint)
                    reports.append(NodeReport(node.id, node.op, node.fingerprint, "cached", meta.get("rows"),
                                              note="; ".join(meta.get("notes", []))))
                    if meta.get("evaluation") is not None:
                        evaluations[node.id] = meta["evaluation"]
                    continue
                if dry_run:
                    reports.append(NodeReport(node.id, node.op, node.fingerprint, "would-run",
                                              note="not in the store"))
                    continue
                upstream_tainted = any(src in tainted for _, src in node.inputs) or \
                    any(ref in tainted for _, ref in node.models)
                display.node_started(node.id, node.op)
                try:
                    report = _run_node(plan, node, store, services, registry, load, outputs)
                except StopRun as stop:
                    # This machine's share is done (see StopRun): nothing is committed, and the later nodes
                    # are another machine's, so they are reported, not run.
                    reports.append(NodeReport(node.id, node.op, node.fingerprint, "stopped",
                                              seconds=time.monotonic() - t0, note=stop.message))
                    reports.extend(NodeReport(n.id, n.op, n.fingerprint, "skipped",
                                              note=f"not run on this machine (stopped at {node.id})")
                                   for n in selected[index + 1:])
                    break
                report.seconds = time.monotonic() - t0
                if report.status == "incomplete" or upstream_tainted:
                    tainted.add(node.id)
                    if report.status == "ran":
                        report.status = "incomplete"
                        report.note = "an upstream node is incomplete"
                if report.stats.get("evaluation") is not None:
                    evaluations[node.id] = report.stats.pop("evaluation")
                reports.append(report)
                display.node_finished(node.id, report.status, report.rows, report.seconds)
    finally:
        manifest = _manifest(plan, store, reports, started, dry_run=dry_run, only=only, until=until,
                             evaluations=evaluations)
        manifest_path = _write_manifest(store, manifest) if not dry_run else None
        if manifest_path is not None and on_manifest is not None:
            on_manifest(manifest, store.root, manifest_path.parent)
    return RunResult(plan, store, reports, manifest_path, evaluations)


def _run_node(plan: Plan, node: PlanNode, store: Store, services: Services, registry: Any, load, outputs) -> NodeReport:
    staging = store.staging(node.fingerprint)
    stats = services.stats.setdefault(node.id, _new_stats())
    try:
        op = registry.ops.get(node.op)
        if op is None:
            raise RunError(f"op '{node.op}' is not installed", node=node.id,
                           hint="install the plugin that provides it (see `specdsl plugins`)")
        inputs = {param: load(src) for param, src in node.inputs}
        ctx = RunContext(node_id=node.id, params=node.params, inputs=inputs, vars=plan.vars, seed=plan.seed,
                         services=services, artifact_dir=staging)
        if getattr(op, "row_parallel", False) and not getattr(services.executor, "in_process", False) \
                and len(inputs) == 1:
            # Stateless per-row ops may run anywhere: hand chunks of rows to the executor.
            fn = functools.partial(run_row_chunk, op, node.id, node.params, plan.vars, plan.seed)
            result = services.executor.map_rows(fn, ctx.rows)
        else:
            result = op.run(ctx)
        meta_extra = {}
        if isinstance(result, tuple):  # (rows, meta) for ops that produce artifacts (train, evaluate)
            rows, meta_extra = result
        else:
            rows = result
        outputs[node.id] = rows
        stats_dict = stats.to_dict() if hasattr(stats, "to_dict") else {}
        incomplete = bool(stats_dict.get("failed"))
        report = NodeReport(node.id, node.op, node.fingerprint, "incomplete" if incomplete else "ran", len(rows),
                            stats=stats_dict)
        if "evaluation" in meta_extra:
            report.stats["evaluation"] = meta_extra["evaluation"]
        if services.notes.get(node.id):
            report.note = "; ".join(services.notes[node.id])
            meta_extra = {**meta_extra, "notes": services.notes[node.id]}
        if incomplete:
            report.note = f"{stats_dict['failed']} request(s) failed; rerun to retry them"
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            return report
        meta = {"node": node.id, "op": node.op, "params": node.params, "columns": list(node.columns),
                "stats": stats_dict, **meta_extra}
        store.commit(node.fingerprint, rows, meta, staging)
        return report
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise


def _prepare_models(plan: Plan, registry: Any) -> None:
    """Let each model's backend fetch what it needs (``prepare(options)``, optional: a named local model
    is pulled once) before the live display starts: a first pull draws its own progress."""
    for m in plan.models:
        prepare = getattr(registry.backends.get(m.backend), "prepare", None)
        if callable(prepare):
            prepare(m.options)


def run_row_chunk(op: Any, node_id: str, params: Mapping[str, Any], variables: Mapping[str, Any], seed: int,
                  rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run a row-parallel op on one chunk of rows (in a worker: no services, no artifacts)."""
    ctx = RunContext(node_id=node_id, params=params, inputs={"from": rows}, vars=variables, seed=seed,
                     services=None, artifact_dir=Path("."))
    return op.run(ctx)


def _new_stats():
    from specdsl.execute.services import NodeStats

    return NodeStats()


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("specdsl", "torch", "transformers", "trl", "datasets", "peft", "accelerate", "litellm", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _manifest(plan: Plan, store: Store, reports: list[NodeReport], started: float, **extra: Any) -> dict[str, Any]:
    return {
        "manifest_format": 1,
        "spec": {"name": plan.name, "file": plan.spec_file, "sha256": plan.spec_hash},
        "started_at": started, "finished_at": time.time(), "seconds": round(time.time() - started, 3),
        "seed": plan.seed, "argv": sys.argv, "versions": _package_versions(),
        "nodes": [r.to_dict() for r in reports],
        "totals": {
            "requests": sum(r.stats.get("requests", 0) for r in reports),
            "cached_requests": sum(r.stats.get("cached_requests", 0) for r in reports),
            "failed_requests": sum(r.stats.get("failed", 0) for r in reports),
            "input_tokens": sum(r.stats.get("input_tokens", 0) for r in reports),
            "output_tokens": sum(r.stats.get("output_tokens", 0) for r in reports),
            "cost": round(sum(r.stats.get("cost", 0.0) for r in reports), 6),
        },
        "plan": plan.to_dict(),
        **extra,
    }


def _write_manifest(store: Store, manifest: Mapping[str, Any]) -> Path:
    # Unique even for two runs of one process in the same second (a cached rerun is that fast).
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(manifest["started_at"])) + f"-{os.getpid()}"
    for n in range(1000):
        run_dir = store.root / "runs" / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            run_dir.mkdir(parents=True)
            break
        except FileExistsError:
            continue
    text = json.dumps(manifest, indent=2, default=str)
    path = run_dir / "run.json"
    path.write_text(text)
    tmp = store.root / "run.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, store.root / "run.json")
    return path
