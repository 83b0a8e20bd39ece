"""What the inspect views read from the store: the first rows of a node, the totals over all rows of a
tokenized node, and the tokenizer its tokenize step used (never downloaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from specdsl.errors import RunError
from specdsl.ir.plan import Plan, PlanNode
from specdsl.views.inspect.sample import IGNORE_INDEX


@dataclass
class Totals:
    """Counts over every row of a tokenized node."""

    rows: int = 0
    tokens: int = 0
    trained: int = 0
    truncated: int = 0

    @property
    def share(self) -> float:
        return self.trained / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "tokens": self.tokens, "trained": self.trained, "truncated": self.truncated,
                "share": round(self.share, 6)}


@dataclass
class Inspection:
    """What :func:`inspect_node` showed (handy in a notebook or a test)."""

    node: str
    op: str
    fingerprint: str
    rows_total: int
    rows: list[dict[str, Any]]
    tokenized: bool
    totals: Totals | None = None
    html_path: Path | None = None
    token_view: bool = False          # token boundaries known (the tokenizer was found and matches)
    notes: list[str] = field(default_factory=list)


def is_tokenized(columns: Iterable[str]) -> bool:
    cols = set(columns)
    return {"input_ids", "labels"} <= cols


def read_node_rows(store: Any, fingerprint: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a stored node (all when None), without reading the rest of the table."""
    from specdsl.execute.store import DATA, META

    if limit is None:
        return store.load(fingerprint)
    import pyarrow.parquet as pq

    d = store.node_dir(fingerprint)
    json_columns = json.loads((d / META).read_text()).get("json_columns", [])
    if limit <= 0:
        return []
    pf = pq.ParquetFile(d / DATA)
    rows: list[dict[str, Any]] = []
    for batch in pf.iter_batches(batch_size=limit):
        rows.extend(batch.to_pylist())
        if len(rows) >= limit:
            break
    rows = rows[:limit]
    for row in rows:
        for c in json_columns:
            if row.get(c) is not None:
                row[c] = json.loads(row[c])
    return rows


def tokenized_totals(store: Any, fingerprint: str) -> Totals:
    """Tokens, trained tokens and truncated rows over ALL rows of a tokenized node (reads three columns)."""
    import pyarrow.parquet as pq

    from specdsl.execute.store import DATA

    path = store.node_dir(fingerprint) / DATA
    pf = pq.ParquetFile(path)  # not pq.read_table: that imports pyarrow.dataset (and pandas), ~1 s
    names = set(pf.schema_arrow.names)
    wanted = [c for c in ("n_tokens", "n_trained", "truncated") if c in names]
    if len(wanted) < 2:  # not our tokenize op's layout: count from the labels themselves
        rows = store.load(fingerprint)
        t = Totals(rows=len(rows))
        for r in rows:
            t.tokens += len(r.get("input_ids") or [])
            t.trained += sum(1 for x in r.get("labels") or [] if x != IGNORE_INDEX)
            t.truncated += bool(r.get("truncated"))
        return t
    table = pf.read(columns=wanted).to_pydict()
    n = len(table[wanted[0]])
    return Totals(rows=n, tokens=sum(v or 0 for v in table.get("n_tokens", [])),
                  trained=sum(v or 0 for v in table.get("n_trained", [])),
                  truncated=sum(1 for v in table.get("truncated", []) if v))


class FastTokenizerFile:
    """The model's ``tokenizer.json`` through the ``tokenizers`` library alone: the same ids and offsets as
    the Hugging Face fast tokenizer built from it, without importing torch/transformers (a report written
    after a fully cached run stays instant). Every row is checked against its stored ``input_ids``."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_file(str(path))

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = True):
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": list(enc.ids), "offset_mapping": [tuple(o) for o in enc.offsets]}


def resolve_tokenizer(plan: Plan, node: PlanNode, store: Any, registry: Any = None,
                      cache: dict[str, tuple[Any, str | None]] | None = None) -> tuple[Any, str | None]:
    """The tokenizer the tokenize node used, or ``(None, why not)``. Never downloads a model.

    Resolved as the tokenize step resolves it (through ``Services``): the model's folder,
    then its ``tokenizer.json`` read directly (fast), else ``Services.tokenizer`` (Hugging Face).
    ``cache`` (model ref -> result) lets a report share one tokenizer between nodes."""
    ref = node.params.get("model")
    if not ref:
        return None, f"node '{node.id}' names no model"
    if cache is not None and ref in cache:
        return cache[ref]
    result = _resolve_tokenizer(plan, ref, store, registry)
    if cache is not None:
        cache[ref] = result
    return result


def _resolve_tokenizer(plan: Plan, ref: str, store: Any, registry: Any) -> tuple[Any, str | None]:
    try:
        if not plan.has(ref):
            m = plan.model(ref)
            if m.backend != "transformers":
                return None, f"model '{ref}' is served by '{m.backend}' (no local tokenizer)"
            try:
                from specdsl.modelcache.models import is_cached, is_known

                if is_known(m.model) and not is_cached(m.model):
                    return None, f"model '{m.model}' is not in the local cache (`specdsl models pull {m.model}`)"
            except ImportError:
                pass
        if registry is None:
            from specdsl.plugins import default_registry

            registry = default_registry()
        from specdsl.execute.services import Services

        services = Services(plan, store, registry, executor=registry.executors["local"])
        tokenizer_file = Path(services.model_dir(ref)) / "tokenizer.json"
        if tokenizer_file.is_file():
            try:
                return FastTokenizerFile(tokenizer_file), None
            except Exception:  # noqa: BLE001 - an unusual file: let transformers read the folder
                pass
        return services.tokenizer(ref), None
    except KeyError:
        return None, f"unknown model '{ref}'"
    except RunError as exc:
        return None, exc.message
    except Exception as exc:  # noqa: BLE001 - a view must not fail because a tokenizer cannot load
        return None, f"cannot load the tokenizer of '{ref}': {exc}"
