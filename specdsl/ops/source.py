"""``source``: the op every ``sources:`` entry lowers to. It reads the entry's file or folder with the
registered format (``register_sources``), so a plugin's data format is read exactly like a built-in one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from specdsl.contract.ops import SOURCE_OP, Estimate, Rows, RunContext, StepOp, obj_schema
from specdsl.errors import RunError


def _reader(registry: Any, fmt: str) -> Any:
    reader = registry.sources.get(fmt)
    if reader is None:
        raise RunError(f"no installed source format '{fmt}'",
                       hint=f"installed: {', '.join(sorted(registry.sources))} (see `specdsl plugins`)")
    return reader


class SourceOp(StepOp):
    name = SOURCE_OP
    kind = "source"
    description = "read a `sources:` entry (a file or folder, in any registered format)"
    input_keys = ()
    spec_step = False  # placed by the compiler for each `sources:` entry, never written as a step
    # Its params are the `sources:` entry's, as the compiler passes them on (the spec schema checks the entry).
    params_schema = obj_schema({
        "path": {"type": "string", "description": "the file or folder, relative to the spec"},
        "format": {"type": "string", "description": "the registered source format that reads it"},
        "id": {"type": ["string", "null"], "description": "the column that identifies a row"},
        "limit": {"type": ["integer", "null"], "minimum": 1, "maximum": 10**12, "description": "read only the first N rows"},
    }, required=["path", "format"], description="what a `sources:` entry lowers to")

    def estimate(self, params: Mapping[str, Any], input_rows: int | None, services: Any) -> Estimate:
        """Counted exactly (as far as the source's limit); a few rows kept to measure prompts downstream.
        Both read only what the run will, and hold little of it; a malformed file is reported by the run."""
        path = services.spec_dir / params["path"]
        reader = services.registry.sources.get(params["format"])
        count, sample = None, []
        if reader is not None:
            try:
                count = reader.count(path, limit=params.get("limit"))
            except Exception:  # noqa: BLE001 - estimates never fail a plan
                count = None
            try:
                limit = min(params.get("limit") or services.sample_size, services.sample_size)
                sample = reader.read(path, id_column=params.get("id"), limit=limit)
            except Exception:  # noqa: BLE001 - estimates never fail a plan
                sample = []
        return Estimate(rows=count, rows_unknown=count is None, details={"rows": count}, sample_rows=sample)

    def run_batches(self, ctx: RunContext) -> Iterator[Rows]:
        """The rows a batch at a time, for formats that can (``iter_batches``); else the whole read as one
        batch. The runner writes each batch as it comes: a large source never sits whole in memory."""
        from specdsl.execute.batches import batch_rows

        p = ctx.params
        path = Path(ctx.services.plan.spec_file).parent / p["path"]
        reader = _reader(ctx.services.registry, p["format"])
        options = {"id_column": p.get("id"), "limit": p.get("limit"), "display": p["path"]}
        if callable(getattr(reader, "iter_batches", None)):
            yield from reader.iter_batches(path, size=batch_rows(), **options)
        else:
            yield reader.read(path, **options)

    def run(self, ctx: RunContext) -> Rows:
        p = ctx.params
        path = Path(ctx.services.plan.spec_file).parent / p["path"]
        return _reader(ctx.services.registry, p["format"]).read(path, id_column=p.get("id"), limit=p.get("limit"),
                                                                 display=p["path"])
