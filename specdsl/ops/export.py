"""``export``: write a node's table as a dataset (JSONL or Parquet) with a Hugging Face dataset card.

Any node's table can be exported, a train step's tokenized table included (``from: sft.tokens``).
Parquet files keep native nested types (``messages`` is a list of ``{role, content}`` structs, not JSON
text), so ``datasets.load_dataset("parquet", data_files=...)`` reads them as they were; a column whose
values Arrow cannot type uniformly (content that is sometimes text, sometimes a list of parts) is written
as JSON text and named in the card. The card's front matter carries ``dataset_info`` (features, row
count, the split), the licence and task categories when known, and its body the spec that made it.

The folder follows the rules of :mod:`specdsl.ops.outputs`: inside the spec's folder unless
``allow_outside: true``, never overwriting a file specdsl did not write, and written again when a cached
export's files are missing or changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from specdsl.contract.ops import STEP_REF, CheckContext, Rows, RunContext, StepOp, obj_schema
from specdsl.ops.outputs import (ALLOW_OUTSIDE, OutputWriter, check_output_path, outputs_current, record_summary,
                                 resolve_output_dir, run_error)

CARD = "README.md"
# Task categories of the Hub's taxonomy, by the columns that show what a table trains.
_TASKS_BY_COLUMN = (("messages", "text-generation"), ("input_ids", "text-generation"),
                    ("completion", "text-generation"), ("response", "text-generation"))
# Arrow type names -> the dtype names of a Hub card's `features` (datasets' own spelling).
_DTYPES = {"double": "float64", "float": "float32", "halffloat": "float16", "bool": "bool", "string": "string",
           "large_string": "large_string", "null": "null"}


class ExportOp(StepOp):
    name = "export"
    kind = "export"
    description = "write a table to a folder beside the spec (JSONL or Parquet), with a dataset card"
    sink_op = True
    params_schema = obj_schema({
        "from": {**STEP_REF, "description": "the step, source or helper node (`sft.tokens`) to export"},
        "path": {"type": "string", "minLength": 1,
                 "description": "output folder, relative to the spec (inside its folder unless allow_outside)"},
        "format": {"enum": ["jsonl", "parquet"], "description": "default: jsonl"},
        "columns": {"type": "array", "items": {"type": "string"}, "description": "columns to keep (default: all)"},
        "card": {"type": "boolean", "description": "write README.md, a dataset card (default: true)"},
        "license": {"type": "string", "minLength": 1,
                    "description": "the card's licence (a Hub licence id such as apache-2.0; default: none stated)"},
        "task_categories": {"type": "array", "items": {"type": "string", "minLength": 1},
                            "description": "the card's task categories (default: text-generation for chat, "
                                           "completion and tokenized tables)"},
        "allow_outside": ALLOW_OUTSIDE,
    }, required=["from", "path"])

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        for i, col in enumerate(ctx.params.get("columns") or []):
            ctx.column(col, "columns", i)
        check_output_path(ctx)
        return ("path", "rows")

    def outputs_current(self, params: Mapping[str, Any], fingerprint: str, spec_file: str) -> bool:
        """Whether a cached export's files are still in its folder, unchanged (else it runs again)."""
        try:
            folder = resolve_output_dir(spec_file, params["path"], allow_outside=bool(params.get("allow_outside")),
                                        node="")
        except Exception:  # noqa: BLE001 - a folder that cannot be resolved now is not current; the run says why
            return False
        return outputs_current(folder, fingerprint)

    def run(self, ctx: RunContext) -> tuple[Rows, dict[str, Any]]:
        p = ctx.params
        plan = ctx.services.plan
        node = plan.node(ctx.node_id)
        out_dir = resolve_output_dir(plan.spec_file, p["path"], allow_outside=bool(p.get("allow_outside")),
                                     node=ctx.node_id)
        rows = ctx.rows
        if p.get("columns"):
            rows = [{k: r.get(k) for k in p["columns"]} for r in rows]
        fmt = p.get("format", "jsonl")
        data_name = f"data.{fmt}"
        table, json_columns = arrow_table(rows)
        writer = OutputWriter(out_dir, node=ctx.node_id, fingerprint=node.fingerprint, spec_file=plan.spec_file)
        writer.plan([data_name] + ([CARD] if p.get("card", True) else []))
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if fmt == "jsonl":
                writer.write_with(data_name, lambda tmp: _write_jsonl(tmp, rows))
            else:
                import pyarrow.parquet as pq

                writer.write_with(data_name, lambda tmp: pq.write_table(table, tmp))
            if p.get("card", True):
                writer.write_text(CARD, dataset_card(ctx, rows, table.schema, fmt, writer.files[data_name]["size"],
                                                     json_columns if fmt == "parquet" else []))
            record = writer.finish({"format": fmt, "rows": len(rows)})
        except OSError as exc:
            raise run_error(exc, out_dir, ctx.node_id) from None
        target = out_dir / data_name
        return [{"path": str(target), "rows": len(rows)}], {"artifacts": [record_summary(out_dir, record, "export")]}


def _write_jsonl(path: Path, rows: Rows) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def arrow_table(rows: Rows) -> tuple[Any, list[str]]:
    """The rows as an Arrow table with native nested types, and the columns that had to become JSON text
    (values Arrow cannot type uniformly). Dict values become structs; their missing keys read as null."""
    import pyarrow as pa

    names = list(dict.fromkeys(k for row in rows for k in row))
    arrays, json_columns = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError):
            arrays.append(pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                                    for v in values], type=pa.string()))
            json_columns.append(name)
    return (pa.Table.from_arrays(arrays, names=names) if names else pa.table({})), json_columns


def features_yaml(schema: Any) -> list[dict[str, Any]]:
    """A card's ``dataset_info.features`` for an Arrow schema, spelled as ``datasets`` writes them."""
    return [{"name": field.name, **_feature(field.type)} for field in schema]


def _feature(t: Any) -> dict[str, Any]:
    import pyarrow as pa

    if pa.types.is_struct(t):
        return {"struct": [{"name": t.field(i).name, **_feature(t.field(i).type)} for i in range(t.num_fields)]}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _feature(t.value_type)
        return {"list": inner["dtype"] if set(inner) == {"dtype"} else inner.get("struct", inner)}
    return {"dtype": _DTYPES.get(str(t), str(t))}


def task_categories(params: Mapping[str, Any], columns: list[str]) -> list[str]:
    if params.get("task_categories"):
        return list(params["task_categories"])
    return sorted({task for col, task in _TASKS_BY_COLUMN if col in columns})


def dataset_card(ctx: RunContext, rows: Rows, schema: Any, fmt: str, num_bytes: int, json_columns: list[str]) -> str:
    import yaml

    plan = ctx.services.plan
    node = plan.node(ctx.node_id)
    src = plan.node(node.input("from"))
    spec_file = Path(plan.spec_file)
    cols = [f.name for f in schema]
    front: dict[str, Any] = {"pretty_name": f"{plan.name}: {src.id}"}
    if ctx.params.get("license"):
        front["license"] = ctx.params["license"]
    tasks = task_categories(ctx.params, cols)
    if tasks:
        front["task_categories"] = tasks
    front["tags"] = ["specdsl", "synthetic"]
    front["dataset_info"] = {"features": features_yaml(schema),
                             "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": len(rows)}],
                             "dataset_size": num_bytes}
    front["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": f"data.{fmt}"}]}]
    stats: dict[str, Any] = {"rows": len(rows)}
    if rows and "n_tokens" in rows[0]:
        stats["tokens"] = sum(r.get("n_tokens") or 0 for r in rows)
        stats["trained_tokens"] = sum(r.get("n_trained") or 0 for r in rows)
        stats["share_trained"] = round(stats["trained_tokens"] / max(stats["tokens"], 1), 4)
    mask_policy = next((n.params.get("loss", "assistant") for n in plan.nodes if n.op == "train"), None)
    lineage = plan.ancestors(node.id)
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip("\n"), "---",
        f"# {plan.name}: {src.id}",
        "",
        "Generated by [specdsl](https://github.com/specdsl/specdsl) from a data-design spec.",
        "",
        "## The spec that made it",
        "",
        f"- spec: `{plan.name}` (file `{spec_file.name}`, sha256 `{plan.spec_hash}`)",
        f"- step: `{node.step or node.id}` (node `{node.id}`, fingerprint `{node.fingerprint}`), "
        f"exporting `{src.id}` ({src.op})",
        "",
        "## Lineage",
        "",
        "| node | op | fingerprint |",
        "| --- | --- | --- |",
        *[f"| {n} | {plan.node(n).op} | `{plan.node(n).short}` |" for n in lineage if n != node.id],
        "",
        "## Statistics",
        "",
        *[f"- {k}: {v}" for k, v in stats.items()],
        f"- columns: {', '.join(cols)}",
    ]
    if json_columns:
        lines.append(f"- stored as JSON text (values of mixed shape): {', '.join(json_columns)}")
    lines += [
        "",
        "## Loss mask policy",
        "",
        f"{mask_policy or 'not a training table'}",
        "",
        "## Spec",
        "",
        "```yaml",
        spec_file.read_text(encoding="utf-8").rstrip("\n") if spec_file.exists() else "(spec not found)",
        "```",
    ]
    return "\n".join(lines) + "\n"
