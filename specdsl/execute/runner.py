"""The local executor: runs a plan's nodes in dependency order against the content-addressed store.

* A node whose fingerprint is in the store is a cache hit: no model call, no recomputation.
* Generation goes through the request journal, so a killed run resumes without re-issuing a request.
* A generate node with failed requests is not committed (its failures are retried next run); what it
  did complete stays in the journal. Transforms downstream of it still run, so the user sees everything
  that can be computed, but are never committed; exports, training and evaluation downstream of it are
  skipped (a partial dataset is never written, a model never trained on part of its data).
* A node is taken from the store only when its inputs are too (:func:`cached_nodes`): a node cached
  while an input is not (a partial result an older version committed) is quarantined and recomputed.
* One run at a time per store (:class:`specdsl.execute.store.RunLock`): a second run refuses at once.
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
from typing import Any, Callable, Iterator, Mapping

from specdsl.errors import RunError, StopRun
from specdsl.ir.plan import Plan, PlanNode
from specdsl.contract.ops import Batch, RunContext
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
    selected = select_nodes(plan, only=only, until=until)
    if executor not in registry.executors:
        raise RunError(f"unknown executor '{executor}'",
                       hint=f"installed: {', '.join(sorted(registry.executors))} (Ray: pip install 'specdsl[ray]')")
    if not dry_run:  # what the nodes that will run need installed, checked before anything is written
        from specdsl.requirements import check_requirements

        cached = cached_nodes(plan, store, registry=registry)
        check_requirements(plan, registry, nodes=selected, executor=registry.executors[executor],
                           cached=lambda n: n.id in cached and only != n.id)
    if dry_run:
        return _run_locked(plan, store, selected, only=only, until=until, dry_run=True, fail_fast=fail_fast,
                           registry=registry, progress=progress, console=console, executor=executor,
                           on_manifest=on_manifest)
    with store.lock():
        store.clean_tmp(older_than_s=3600)  # the lock is ours: no live run owns what a dead one left
        return _run_locked(plan, store, selected, only=only, until=until, dry_run=False, fail_fast=fail_fast,
                           registry=registry, progress=progress, console=console, executor=executor,
                           on_manifest=on_manifest)


def cached_nodes(plan: Plan, store: Store, *, verify: bool = False, registry: Any = None) -> set[str]:
    """The nodes a run may take from ``store``: stored, and every input (steps and trained models) taken
    from it too. A node stored while an input is not was committed from something a run no longer has
    (an incomplete upstream, by an older specdsl): it is not trusted. ``verify`` also reads each table's
    footer (a run does; ``plan`` only looks)."""
    trusted: set[str] = set()
    for node in plan.nodes:  # topological order
        deps = [src for _, src in node.inputs] + [ref for _, ref in node.models]
        if all(d in trusted for d in deps) and store.has(node.fingerprint) and \
                (not verify or store.verify(node.fingerprint)) and \
                (registry is None or is_cached(plan, node, store, registry)):
            trusted.add(node.id)
    return trusted


def _run_locked(plan: Plan, store: Store, selected: list[PlanNode], *, only: str | None, until: str | None,
                dry_run: bool, fail_fast: bool, registry: Any, progress: bool, console: Any, executor: str,
                on_manifest: Callable[[Mapping[str, Any], Path, Path], Any] | None) -> RunResult:
    reports: list[NodeReport] = []
    from specdsl.execute.progress import Display

    display = Display(console=console, enabled=progress)
    cached = cached_nodes(plan, store, verify=not dry_run, registry=registry)
    services = Services(plan, store, registry, progress=display, fail_fast=fail_fast,
                        executor=registry.executors[executor])
    outputs: dict[str, list[dict[str, Any]]] = {}
    tainted: set[str] = set()   # nodes whose output is incomplete: they and their dependents are not committed
    # Fingerprints committed by this run. Two nodes can share one (a matrix variant's helper that does not
    # depend on the varied value, e.g. each seed's tokenize node): the second is taken from the store.
    committed: set[str] = set()
    started = time.time()
    evaluations: dict[str, Any] = {}

    def load(node_id: str) -> list[dict[str, Any]]:
        if node_id not in outputs:
            fp = plan.node(node_id).fingerprint
            if node_id not in cached:
                raise RunError(f"input '{node_id}' is not in the store", hint=f"run with --until {node_id} first")
            outputs[node_id] = store.load(fp)
        return outputs[node_id]

    if not dry_run and any(n.id not in cached for n in selected):
        _prepare_models(plan, registry)
    try:
        with display:
            for index, node in enumerate(selected):
                t0 = time.monotonic()
                if node.fingerprint in committed and only != node.id:
                    cached.add(node.id)
                if node.id in cached and only != node.id:
                    meta = store.meta(node.fingerprint)
                    reports.append(NodeReport(node.id, node.op, node.fingerprint, "cached", meta.get("rows"),
                                              stats=artifacts_of(meta, store.node_dir(node.fingerprint)),
                                              note="; ".join(meta.get("notes", []))))
                    if meta.get("evaluation") is not None:
                        evaluations[node.id] = meta["evaluation"]
                    continue
                if dry_run:
                    reports.append(NodeReport(node.id, node.op, node.fingerprint, "would-run",
                                              note="not in the store"))
                    continue
                upstream_tainted = [src for _, src in node.inputs if src in tainted] + \
                    [ref for _, ref in node.models if ref in tainted]
                if upstream_tainted and _writes_beyond_its_table(node, registry):
                    tainted.add(node.id)
                    reports.append(NodeReport(node.id, node.op, node.fingerprint, "skipped",
                                              note=f"not run: its input '{upstream_tainted[0]}' is incomplete; "
                                                   "rerun to finish it"))
                    continue
                display.node_started(node.id, node.op)
                try:
                    report = _run_node(plan, node, store, services, registry, load, outputs,
                                       commit=not upstream_tainted)
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
                if report.status == "ran" and not upstream_tainted:
                    cached.add(node.id)  # committed this run: later nodes may read it from the store
                    committed.add(node.fingerprint)
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
        try:
            manifest = _manifest(plan, store, reports, started, dry_run=dry_run, only=only, until=until,
                                 evaluations=evaluations)
            manifest_path = _write_manifest(store, manifest) if not dry_run else None
            if manifest_path is not None and on_manifest is not None:
                on_manifest(manifest, store.root, manifest_path.parent)
        finally:
            # After the manifest, which is written even if this fails: the journal, closed and
            # checkpointed, so journal.sqlite alone holds every answer.
            services.close()
    return RunResult(plan, store, reports, manifest_path, evaluations)


def _writes_beyond_its_table(node: PlanNode, registry: Any) -> bool:
    """Exports, training and evaluation: what they write or cost is not worth doing on partial inputs."""
    op = registry.ops.get(node.op)
    return node.kind in ("export", "train", "evaluate") or bool(getattr(op, "sink_op", False))


def _run_node(plan: Plan, node: PlanNode, store: Store, services: Services, registry: Any, load, outputs,
              *, commit: bool = True) -> NodeReport:
    """Run one node; commit its output unless it failed requests or ``commit`` is False (an input is
    incomplete: the output is shown, never stored)."""
    staging = store.staging(node.fingerprint)
    stats = services.stats.setdefault(node.id, _new_stats())
    try:
        op = registry.ops.get(node.op)
        if op is None:
            raise RunError(f"op '{node.op}' is not installed", node=node.id,
                           hint="install the plugin that provides it (see `specdsl plugins`)")
        meta_extra: dict[str, Any] = {}
        written: tuple[int, list[str]] | None = None  # (rows, JSON-text columns) of a table written in batches
        if _streams(op, node, services):
            written = _run_in_batches(plan, node, op, services, staging, store, outputs)
            rows_out = written[0]
        else:
            batches = _input_batches(plan, node, store, outputs) if _reads_input_batches(op, node) else None
            inputs = {param: load(src) for param, src in node.inputs} if batches is None else {}
            ctx = RunContext(node_id=node.id, params=node.params, inputs=inputs, vars=plan.vars, seed=plan.seed,
                             services=services, artifact_dir=staging, batches=batches,
                             input_size=_input_size(plan, node, store, outputs) if batches else None)
            if getattr(op, "row_parallel", False) and not getattr(services.executor, "in_process", False) \
                    and len(inputs) == 1:
                # Stateless per-row ops may run anywhere: hand chunks of rows to the executor.
                fn = functools.partial(run_row_chunk, op, node.id, node.params, plan.vars, plan.seed,
                                       services=_row_services(services, op, node))
                result = services.executor.map_rows(fn, ctx.rows)
            else:
                result = op.run(ctx)
            if isinstance(result, tuple):  # (rows, meta) for ops that produce artifacts (train, evaluate)
                rows, meta_extra = result
            else:
                rows = result
            if getattr(op, "row_parallel", False) and _summarizes(op):
                # The whole output is here: its batches' summaries are taken from it, as a stream's would be.
                from specdsl.execute.batches import batch_rows, chunks

                op.after_batches(ctx, [op.batch_summary(ctx, part) for part in chunks(rows, batch_rows())])
            outputs[node.id] = rows
            rows_out = len(rows)
        stats_dict = stats.to_dict() if hasattr(stats, "to_dict") else {}
        incomplete = bool(stats_dict.get("failed"))
        report = NodeReport(node.id, node.op, node.fingerprint, "incomplete" if incomplete else "ran", rows_out,
                            stats=stats_dict)
        if "evaluation" in meta_extra:
            report.stats["evaluation"] = meta_extra["evaluation"]
        report.stats.update(artifacts_of(meta_extra, store.node_dir(node.fingerprint)))
        if services.notes.get(node.id):
            report.note = "; ".join(services.notes[node.id])
            meta_extra = {**meta_extra, "notes": services.notes[node.id]}
        if incomplete or not commit:
            if incomplete:
                report.note = f"{stats_dict['failed']} request(s) failed; rerun to retry them"
            if written is not None:  # never stored, so the nodes after it read it from memory this run
                from specdsl.execute.store import DATA, read_table

                outputs[node.id] = read_table(staging / DATA, written[1])
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            return report
        if store.node_dir(node.fingerprint).exists():
            store.quarantine(node.fingerprint)  # stale or broken (see cached_nodes): the new output wins
        meta = {"node": node.id, "op": node.op, "params": node.params, "columns": list(node.columns),
                "stats": stats_dict, **meta_extra}
        if written is not None:
            store.commit_written(node.fingerprint, written[0], written[1], meta, staging)
        else:
            store.commit(node.fingerprint, rows, meta, staging)
        return report
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise


def _streams(op: Any, node: PlanNode, services: Services) -> bool:
    """Whether the node runs batch by batch: an op that yields its own batches (``run_batches``: a
    source, or generate reading its one input in batches), or a row-parallel op reading one input on this
    process or through an executor that streams (``run_streaming``: Ray). Everything else (training,
    evaluation, an op that needs its whole table) gets its inputs whole."""
    if callable(getattr(op, "run_batches", None)) and (not node.inputs or _reads_input_batches(op, node)):
        return True
    executor = services.executor
    return bool(getattr(op, "row_parallel", False)) and [param for param, _src in node.inputs] == ["from"] \
        and (getattr(executor, "in_process", False) or callable(getattr(executor, "run_streaming", None)))


def _run_in_batches(plan: Plan, node: PlanNode, op: Any, services: Services, staging: Path, store: Store,
                    outputs: Mapping[str, list[dict[str, Any]]]) -> tuple[int, list[str]]:
    """Run a streaming node: each batch of output is written as it comes (peak memory: a batch)."""
    from specdsl.execute.batches import TableWriter

    def context(rows: list[dict[str, Any]]) -> RunContext:
        return RunContext(node_id=node.id, params=node.params, inputs={"from": rows} if node.inputs else {},
                          vars=plan.vars, seed=plan.seed, services=services, artifact_dir=staging)

    writer = TableWriter(staging)
    if callable(getattr(op, "run_batches", None)):
        ctx = context([])
        if node.inputs:  # it reads its input in batches (see _streams): generate
            ctx = RunContext(node_id=node.id, params=node.params, inputs={}, vars=plan.vars, seed=plan.seed,
                             services=services, artifact_dir=staging,
                             batches=_input_batches(plan, node, store, outputs),
                             input_size=_input_size(plan, node, store, outputs))
        for rows in op.run_batches(ctx):
            writer.write(rows)
        return writer.rows, writer.close()
    if not getattr(services.executor, "in_process", False):
        return _run_streaming(plan, node, op, services, staging, store, outputs)
    run_arrow = getattr(op, "run_arrow", None)
    summaries: list[Any] | None = [] if _summarizes(op) else None
    for batch in _input_batches(plan, node, store, outputs)():
        # An op's Arrow fast path takes a stored batch as it is (None: not this batch), else rows.
        done = run_arrow(context([]), batch) if callable(run_arrow) and batch.arrow() is not None else None
        if done is not None:
            writer.write_arrow(*done.arrow())
            if summaries is not None:
                summaries.append(op.batch_summary(context([]), done.rows()))
            continue
        ctx = context(batch.rows())
        result = op.run(ctx)
        out = result[0] if isinstance(result, tuple) else result
        writer.write(out)
        if summaries is not None:
            summaries.append(op.batch_summary(ctx, out))
    written = writer.rows, writer.close()
    if summaries is not None:
        op.after_batches(context([]), summaries)
    return written


def _run_streaming(plan: Plan, node: PlanNode, op: Any, services: Services, staging: Path, store: Store,
                   outputs: Mapping[str, list[dict[str, Any]]]) -> tuple[int, list[str]]:
    """A row-parallel node on an executor that streams it elsewhere (``run_streaming``): the same batches
    as above, read where the executor runs them, the output written into ``staging``."""
    from specdsl.execute.batches import batch_rows
    from specdsl.execute.store import DATA

    src = node.input("from")
    summarize = _summarizes(op)
    fn = functools.partial(run_row_chunk, op, node.id, node.params, plan.vars, plan.seed,
                           services=_row_services(services, op, node), summarize=summarize)
    if src in outputs:
        written = services.executor.run_streaming(fn, staging, batch_rows(), rows=outputs[src])
    else:
        fingerprint = _stored_input(plan, src, store)
        written = services.executor.run_streaming(
            fn, staging, batch_rows(), table=store.node_dir(fingerprint) / DATA,
            json_columns=store.meta(fingerprint).get("json_columns", []))
    rows, json_columns = written[0], written[1]
    if summarize:
        ctx = RunContext(node_id=node.id, params=node.params, inputs={}, vars=plan.vars, seed=plan.seed,
                         services=services, artifact_dir=staging)
        if len(written) > 2:  # each batch's summary, as fn returned it where the batch ran
            summaries = [meta.get("batch_summary") for meta in written[2]]
        else:  # an executor that returns none: summarize the written table, a batch at a time
            from specdsl.execute.store import read_batches

            summaries = [op.batch_summary(ctx, part) for part in read_batches(staging / DATA, json_columns,
                                                                             batch_rows())]
        op.after_batches(ctx, summaries)
    return rows, json_columns


def _input_batches(plan: Plan, node: PlanNode, store: Store,
                   outputs: Mapping[str, list[dict[str, Any]]]) -> Callable[[], Iterator[Batch]]:
    """The node's ``from`` input a batch at a time: slices of a table in memory (an upstream node computed
    whole this run), else the stored table's row groups as Arrow."""
    from specdsl.execute.batches import batch_rows, chunks

    src = node.input("from")
    size = batch_rows()

    def batches() -> Iterator[Batch]:
        if src in outputs:
            for rows in chunks(outputs[src], size):
                yield Batch.from_rows(rows)
            return
        yield from store.iter_arrow_batches(_stored_input(plan, src, store), size)

    return batches


def _reads_input_batches(op: Any, node: PlanNode) -> bool:
    """The op reads its one input a batch at a time (``reads_batches``) instead of whole."""
    return bool(getattr(op, "reads_batches", False)) and [param for param, _src in node.inputs] == ["from"]


def _input_size(plan: Plan, node: PlanNode, store: Store, outputs: Mapping[str, list[dict[str, Any]]]) -> int | None:
    """Rows in the node's ``from`` input, known without reading it (None: not known)."""
    src = node.input("from")
    if src in outputs:
        return len(outputs[src])
    rows = store.meta(plan.node(src).fingerprint).get("rows") if store.has(plan.node(src).fingerprint) else None
    return rows if isinstance(rows, int) else None


def _stored_input(plan: Plan, src: str, store: Store) -> str:
    """The fingerprint of input ``src``, which must be in the store (it was not computed this run)."""
    fingerprint = plan.node(src).fingerprint
    if not store.has(fingerprint):
        raise RunError(f"input '{src}' is not in the store", hint=f"run with --until {src} first")
    return fingerprint


def is_cached(plan: Plan, node: PlanNode, store: Store, registry: Any) -> bool:
    """The node is in the store and, for an op that writes files outside it (an export, a train step's
    ``output:``), those files are still there unchanged (the op's optional ``outputs_current``)."""
    if not store.has(node.fingerprint):
        return False
    current = getattr(registry.ops.get(node.op), "outputs_current", None)
    if not callable(current):
        return True
    try:
        return bool(current(node.params, node.fingerprint, plan.spec_file))
    except Exception:  # noqa: BLE001 - outputs that cannot be checked are written again
        return False


def artifacts_of(meta: Mapping[str, Any], node_dir: Path) -> dict[str, Any]:
    """``{"artifacts": [...]}`` for a node's report: each artifact an op listed in its meta (``kind``,
    ``path``), a path inside the node's store folder made absolute; empty when it listed none."""
    found = []
    for item in meta.get("artifacts") or []:
        path = Path(item["path"])
        found.append({**item, "path": str(path if path.is_absolute() else node_dir / path)})
    return {"artifacts": found} if found else {}


def _prepare_models(plan: Plan, registry: Any) -> None:
    """Let each model's backend fetch what it needs (``prepare(options)``, optional: a named local model
    is pulled once) before the live display starts: a first pull draws its own progress."""
    for m in plan.models:
        prepare = getattr(registry.backends.get(m.backend), "prepare", None)
        if callable(prepare):
            prepare(m.options)


def run_row_chunk(op: Any, node_id: str, params: Mapping[str, Any], variables: Mapping[str, Any], seed: int,
                  rows: list[dict[str, Any]], services: Any = None, summarize: bool = False) -> Any:
    """Run a row-parallel op on one chunk of rows, in a worker: no artifacts, and as ``ctx.services``
    only ``services`` (a :class:`~specdsl.execute.row_services.RowServices`: the tokenizers of the models
    the op names). With ``summarize``, returns ``(rows, {"batch_summary": ...})``: the op's
    ``batch_summary`` of its output, taken where the batch ran, for ``after_batches`` on the driver."""
    ctx = RunContext(node_id=node_id, params=params, inputs={"from": rows}, vars=variables, seed=seed,
                     services=services, artifact_dir=Path("."))
    result = op.run(ctx)
    if not summarize:
        return result
    out = result[0] if isinstance(result, tuple) else result
    return out, {"batch_summary": op.batch_summary(ctx, out)}


def _row_services(services: Services, op: Any, node: PlanNode) -> Any:
    """What a batch run in another process gets as ``ctx.services`` (see specdsl.execute.row_services)."""
    from specdsl.execute.row_services import RowServices

    return RowServices.for_node(services, op, node.params)


def _summarizes(op: Any) -> bool:
    """The op checks its whole output from per-batch summaries (optional ``batch_summary`` and
    ``after_batches``, see specdsl.contract.hookspecs.OpDef)."""
    return callable(getattr(op, "batch_summary", None)) and callable(getattr(op, "after_batches", None))


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
            # Unknown (null) as soon as one node's is: a partial sum would read as the whole cost.
            "cost": None if any(r.stats.get("requests") and r.stats.get("cost", 0.0) is None for r in reports)
            else round(sum(r.stats.get("cost") or 0.0 for r in reports), 6),
        },
        "artifacts": [{"node": r.id, **a} for r in reports for a in r.stats.get("artifacts", [])],
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
