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
from typing import Any, Iterator, Mapping

from specdsl.contract.ops import STEP_REF, Batch, CheckContext, Rows, RunContext, StepOp, obj_schema
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
    reads_batches = True  # every row, once, in order: streamed a batch at a time (see _ExportTable)
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
        fmt = p.get("format", "jsonl")
        data_name = f"data.{fmt}"
        table = _ExportTable(ctx, p.get("columns"))
        writer = OutputWriter(out_dir, node=ctx.node_id, fingerprint=node.fingerprint, spec_file=plan.spec_file)
        writer.plan([data_name] + ([CARD] if p.get("card", True) else []))
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            writer.write_with(data_name, table.write_jsonl if fmt == "jsonl" else table.write_parquet)
            if p.get("card", True):
                writer.write_text(CARD, dataset_card(ctx, table.stats, table.schema, fmt,
                                                     writer.files[data_name]["size"],
                                                     table.json_columns if fmt == "parquet" else []))
            record = writer.finish({"format": fmt, "rows": table.rows})
        except OSError as exc:
            raise run_error(exc, out_dir, ctx.node_id) from None
        target = out_dir / data_name
        return [{"path": str(target), "rows": table.rows}], {"artifacts": [record_summary(out_dir, record, "export")]}


class _ExportTable:
    """The exported table, read a batch at a time (``ctx.input_batches()``) and written as it comes:
    peak memory is a batch, not the table.

    The file is what one whole-table write gives (:func:`arrow_table` over every row): the same rows, the
    same schema. A column's type is inferred per batch; a column that is all null in the batches so far
    and typed in a later one is typed so in every batch (the writing starts over, streaming again, with
    the merged schema). A table whose batches disagree otherwise (a column that is an integer in one
    batch and text in another, or JSON text only in some) is the documented limit: it is converted
    whole, as before streaming.
    """

    def __init__(self, ctx: RunContext, columns: list[str] | None):
        self.ctx, self.columns = ctx, list(dict.fromkeys(columns)) if columns else None
        self.schema: Any = None
        self.json_columns: list[str] = []
        self.rows = 0
        self.stats: dict[str, Any] = {}

    def batches(self) -> Iterator[tuple[Batch, Any, list[str], Rows | None]]:
        """(input batch, Arrow table as exported, its JSON-text columns, its selected rows when they were
        decoded) per batch; the card's row and token counts are tallied on the way."""
        self.rows, first, tokens, trained = 0, True, 0, 0
        for batch in self.ctx.input_batches():
            if not len(batch):
                continue
            table, json_columns, rows = export_batch(batch, self.columns)
            if first:
                names = list(rows[0]) if rows is not None else table.column_names
                counts = "n_tokens" in names
                first = False
            if counts:
                tokens += sum(v or 0 for v in _values(table, rows, "n_tokens"))
                trained += sum(v or 0 for v in _values(table, rows, "n_trained"))
            self.rows += table.num_rows
            yield batch, table, json_columns, rows
        self.stats = {"rows": self.rows}
        if not first and counts:
            self.stats.update(tokens=tokens, trained_tokens=trained,
                              share_trained=round(trained / max(tokens, 1), 4))

    def write_parquet(self, path: Path) -> None:
        import pyarrow.parquet as pq

        target: Any = None  # the schema every batch is cast to, once a batch disagreed with the first
        while True:
            writer, restart = None, False
            try:
                for _batch, table, json_columns, _rows in self.batches():
                    if writer is None:
                        self.schema, self.json_columns = target or table.schema, json_columns
                        writer = pq.ParquetWriter(path, self.schema)
                    merged = _merge_schemas(self.schema, table.schema) \
                        if json_columns == self.json_columns else None
                    if merged is None:
                        writer.close()
                        writer = None
                        self._write_whole_parquet(path)
                        return
                    if not merged.equals(self.schema):
                        target, restart = merged, True  # all-null so far, typed now: start over with the type
                        break
                    writer.write_table(table if table.schema.equals(self.schema) else table.cast(self.schema))
            finally:
                if writer is not None:
                    writer.close()
            if not restart:
                break
        if self.schema is None:  # no rows: what a whole-table write of none gives
            table, self.json_columns = arrow_table([])
            self.schema = table.schema
            pq.write_table(table, path)

    def _write_whole_parquet(self, path: Path) -> None:
        import pyarrow.parquet as pq

        rows = [row for batch in self.ctx.input_batches() for row in _selected(batch.rows(), self.columns)]
        table, self.json_columns = arrow_table(rows)
        self.schema = table.schema
        pq.write_table(table, path)
        self.rows, self.stats = len(rows), {"rows": len(rows)}
        if rows and "n_tokens" in rows[0]:
            tokens = sum(r.get("n_tokens") or 0 for r in rows)
            trained = sum(r.get("n_trained") or 0 for r in rows)
            self.stats.update(tokens=tokens, trained_tokens=trained, share_trained=round(trained / max(tokens, 1), 4))

    def write_jsonl(self, path: Path) -> None:
        schema: Any = None
        agreed = True
        with path.open("w", encoding="utf-8") as fh:
            for batch, table, json_columns, rows in self.batches():
                rows = rows if rows is not None else _selected(batch.rows(), self.columns)
                fh.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
                if not agreed:  # the card's features: the schema a whole-table conversion would give
                    continue
                if schema is None:
                    schema, self.json_columns = table.schema, json_columns
                else:
                    schema = _merge_schemas(schema, table.schema) if json_columns == self.json_columns else None
                    agreed = schema is not None
        if schema is None:  # no rows, or batches that disagree: typed whole, as before streaming
            rows = [row for batch in self.ctx.input_batches() for row in _selected(batch.rows(), self.columns)]
            table, self.json_columns = arrow_table(rows)
            schema = table.schema
        self.schema = schema


def export_batch(batch: Batch, columns: list[str] | None) -> tuple[Any, list[str], Rows | None]:
    """One input batch as :func:`arrow_table` converts its rows: (table, JSON-text columns, rows or None).

    A stored batch's plain columns are taken as they are where a conversion through Python would give
    the same array (a scalar column with a value; a column of nulls only becomes Arrow's null type), so
    only nested or JSON-text columns (``messages``) pay a Python object per value."""
    import pyarrow as pa

    stored = batch.arrow()
    if stored is None:
        rows = _selected(batch.rows(), columns)
        table, json_columns = arrow_table(rows)
        return table, json_columns, rows
    table, stored_json = stored
    names = columns or table.column_names
    arrays, json_columns = [], []
    for name in names:
        if name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows))
            continue
        column = table.column(name)
        if column.null_count == len(column):
            arrays.append(pa.nulls(table.num_rows))
        elif name not in stored_json and str(column.type) in _AS_INFERRED:
            arrays.append(column)
        else:
            array = _parsed_json_column(column) if name in stored_json else None
            if array is not None:
                arrays.append(array)
                continue
            values = column.to_pylist()
            if name in stored_json:
                values = [None if v is None else json.loads(v) for v in values]
            array, as_json = _typed(values)
            arrays.append(array)
            if as_json:
                json_columns.append(name)
    return pa.Table.from_arrays(arrays, names=list(names)) if names else pa.table({}), json_columns, None


def _parsed_json_column(column: Any) -> Any | None:
    """A stored JSON-text column (chat ``messages``) parsed by Arrow's JSON reader into the array
    ``pa.array([json.loads(v) ...])`` gives, or None. The type is inferred from the first value, in Python,
    and the reader is held to it: a value that does not fit it (another type, a key the first value lacks)
    fails the read and the column is converted in Python. Only types of lists, dicts and strings are
    read this way: for those, a value that fits gives what inference would."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    first = next((v for v in column.chunk(0).to_pylist() if v is not None), None) if column.num_chunks else None
    if first is None:
        return None
    try:
        guessed = _strings_shape(json.loads(first))
    except ValueError:
        return None
    if guessed is None:
        return None
    from specdsl.execute.columns import joined_text, string_scalar

    lines = pc.binary_join_element_wise(string_scalar('{"v":'), pc.fill_null(column, string_scalar("null")),
                                        string_scalar("}\n"), string_scalar(""))
    body = joined_text(lines.combine_chunks()).decode("utf-8")
    options = pj.ParseOptions(explicit_schema=pa.schema([("v", guessed)]), unexpected_field_behavior="error")
    try:
        parsed = pj.read_json(pa.py_buffer(body.encode("utf-8")), parse_options=options,
                              read_options=pj.ReadOptions(block_size=len(body) + 1, use_threads=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    array = parsed.column("v").combine_chunks()
    return array if len(array) == len(column) else None


def _strings_shape(value: Any) -> Any | None:
    """The Arrow type ``pa.array([value]).type`` infers, for a value made only of strings, non-empty lists
    and non-empty dicts (chat messages); None for anything else (numbers, None, empty containers), which
    the caller converts in Python. Inferred here because ``pa.array`` imports pandas on first use.

    As Arrow infers: a list's items share one type, and dicts in a list make one struct whose fields are
    every key in order of first appearance."""
    import pyarrow as pa

    if isinstance(value, str):
        return pa.string()
    if isinstance(value, dict):
        return _merged_struct([value])
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return pa.list_(pa.string())
        if all(isinstance(v, dict) for v in value):
            item = _merged_struct(value)
        elif all(isinstance(v, list) for v in value):
            types = {_strings_shape(v) for v in value}
            item = types.pop() if len(types) == 1 else None
        else:
            return None
        return None if item is None else pa.list_(item)
    return None


def _merged_struct(dicts: list[dict]) -> Any | None:
    import pyarrow as pa

    fields: dict[str, Any] = {}
    for d in dicts:
        if not d:
            return None
        for key, v in d.items():
            t = _strings_shape(v)
            if t is None or fields.setdefault(key, t) != t:
                return None
    return pa.struct([pa.field(k, t) for k, t in fields.items()])


# Arrow types a column keeps through to_pylist() and pa.array() when it holds a non-null value.
_AS_INFERRED = frozenset({"int64", "double", "bool", "string"})


def _merge_schemas(current: Any, new: Any) -> Any:
    """The schema a whole-table conversion gives for two batches': the same where they agree, a batch's
    type where the other's column is all null; None where they disagree otherwise."""
    import pyarrow as pa

    if current.names != new.names:
        return None
    fields = []
    for a, b in zip(current, new):
        if a.type.equals(b.type) or pa.types.is_null(b.type):
            fields.append(a)
        elif pa.types.is_null(a.type):
            fields.append(b)
        else:
            return None
    return pa.schema(fields)


def _selected(rows: Rows, columns: list[str] | None) -> Rows:
    return [{k: r.get(k) for k in columns} for r in rows] if columns else rows


def _values(table: Any, rows: Rows | None, name: str) -> list[Any]:
    if rows is not None:
        return [r.get(name) for r in rows]
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def arrow_table(rows: Rows) -> tuple[Any, list[str]]:
    """The rows as an Arrow table with native nested types, and the columns that had to become JSON text
    (values Arrow cannot type uniformly). Dict values become structs; their missing keys read as null."""
    import pyarrow as pa

    names = list(dict.fromkeys(k for row in rows for k in row))
    arrays, json_columns = [], []
    for name in names:
        array, as_json = _typed([row.get(name) for row in rows])
        arrays.append(array)
        if as_json:
            json_columns.append(name)
    return (pa.Table.from_arrays(arrays, names=names) if names else pa.table({})), json_columns


def _typed(values: list[Any]) -> tuple[Any, bool]:
    """(the Arrow array of ``values``, False), or (their JSON text, True) when Arrow cannot type them."""
    import pyarrow as pa

    from specdsl.execute.columns import plain_array

    plain = plain_array(values)  # no pandas import for a column of one plain type
    if plain is not None:
        return plain, False
    try:
        return pa.array(values), False
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError):
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                         for v in values], type=pa.string()), True


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


def dataset_card(ctx: RunContext, stats: Mapping[str, Any], schema: Any, fmt: str, num_bytes: int,
                 json_columns: list[str]) -> str:
    """The README.md of an export: ``stats`` are the rows (and, for a tokenized table, the token counts)."""
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
                             "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": stats["rows"]}],
                             "dataset_size": num_bytes}
    front["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": f"data.{fmt}"}]}]
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
