"""What a step op is: a schema for its parameters, a compile-time check and a run function.

Ops are registered through the ``register_ops`` hook. The compiler resolves everything generic (which
params name upstream steps, which name models, which are row templates) from the class attributes below,
then calls :meth:`StepOp.check` for the op's own rules and its output columns. At run time
:meth:`StepOp.run` receives the upstream rows and the services of the executor, and returns rows.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from specdsl.errors import ErrorSink, SourcePos, did_you_mean
from specdsl import templates

Rows = list[dict[str, Any]]

# The op that every entry under `sources:` lowers to (its reader is the entry's registered format).
SOURCE_OP = "source"


@dataclass(frozen=True)
class Estimate:
    """What a node is expected to cost before it runs (returned by an op's ``estimate``).

    ``rows`` is how many rows the node outputs; None means as many as it reads, unless ``rows_unknown``
    says that nothing can be known before it runs (a segmenter). The planner shows ``requests``,
    ``input_tokens``, ``output_tokens``, ``cost`` (and ``train_tokens`` when set) beside the rows the node
    reads; an op that shows something else gives the whole mapping as ``details`` instead.
    ``sample_rows``: rows like the node's output, for estimates downstream to render their prompts on
    (a row-parallel op passes its input's sample on by itself).
    """

    requests: int | None = 0
    input_tokens: int | None = 0
    output_tokens: int | None = 0
    cost: float | None = 0.0       # USD; None when the backend cannot price it
    train_tokens: int | None = 0
    rows: int | None = None
    rows_unknown: bool = False
    details: Mapping[str, Any] | None = None
    sample_rows: Sequence[Mapping[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cost": self.cost, "train_tokens": self.train_tokens, "rows": self.rows}


@dataclass(frozen=True)
class HelperNode:
    """A node an op puts in front of its own step when the spec is lowered (``train`` puts a ``tokenize``
    node in front of itself, so the exact labels are a cached, inspectable table before any training).

    Its id is the step's id plus ``suffix``; it runs registered op ``op`` with ``params`` and outputs
    ``columns``. It reads the step's inputs (the previous helper's output, for a chain), depends on the
    step's models, and the step reads its output as ``from``.
    """

    suffix: str
    op: str
    params: Mapping[str, Any]
    columns: tuple[str, ...]


@dataclass
class CheckContext:
    """What an op sees at compile time."""

    step_id: str
    params: Mapping[str, Any]
    inputs: Mapping[str, tuple[str, ...]]          # input param -> columns available from it
    var_names: frozenset[str]
    sink: ErrorSink
    pos_of: Callable[..., SourcePos]                # pos_of(*keys, key=False)
    models: Mapping[str, str] = field(default_factory=dict)  # model name -> backend; train step id -> "trained"
    used_columns: set[str] = field(default_factory=set)
    used_vars: set[str] = field(default_factory=set)
    registry: Any = None  # the plugins this spec is compiled with (probes, targets, ...)

    def error(self, code: str, message: str, *keys: str | int, hint: str | None = None, key: bool = False) -> None:
        self.sink.add(code, message, self.pos_of(*keys, key=key), (self.step_id,) + tuple(keys), hint)

    @property
    def columns(self) -> tuple[str, ...]:
        return self.inputs.get("from", ())

    def template(self, text: Any, *keys: str | int, columns: Iterable[str] | None = None) -> None:
        """Check one row template (a string param) against the columns available to it."""
        if not isinstance(text, str):
            return
        cols = tuple(self.columns if columns is None else columns)
        try:
            info = templates.analyze(text)
            self.used_columns |= info.columns
            self.used_vars |= info.var_names | (info.names & self.var_names)
        except templates.TemplateError:
            pass
        for err in templates.check(text, columns=cols, var_names=self.var_names):
            hint = getattr(err, "hint", None)
            if err.code == "S302":
                missing = err.message.split("'row.", 1)[1].split("'", 1)[0]
                hint = f"columns here: {', '.join(cols) or '(none)'}"
                close = did_you_mean(missing, cols)
                if close and close.startswith("did you mean"):
                    hint = f"{close} (columns here: {', '.join(cols)})"
            elif err.code == "S303":
                hint = hint or "templates see `row`, `vars` and the names under `vars:`"
            elif err.code == "S304":
                hint = hint or "templates may not reach private attributes"
            pos = self.pos_of(*keys)
            if err.lineno and err.lineno > 1 and "\n" in text:
                pos = SourcePos(pos.file, pos.line + err.lineno, pos.col)
            self.sink.add(err.code, err.message, pos, (self.step_id,) + tuple(keys), hint)

    def column(self, name: Any, *keys: str | int, input_key: str = "from", code: str = "S403") -> None:
        """Require that column ``name`` exists in input ``input_key``."""
        if not isinstance(name, str):
            return
        cols = self.inputs.get(input_key, ())
        self.used_columns.add(name)
        if name not in cols:
            close = did_you_mean(name, cols)
            hint = f"{close} (columns here: {', '.join(cols)})" if close and close.startswith("did") else \
                f"columns here: {', '.join(cols) or '(none)'}"
            self.error(code, f"column '{name}' does not exist at this step", *keys, hint=hint)


class Batch:
    """Consecutive rows of a table, as the store holds them or as rows.

    From the store a batch is an Arrow table whose ``json_columns`` hold JSON text (values of mixed or
    nested shape; the store decodes them for rows); in memory it is a list of row dicts. :meth:`rows`
    gives the rows either way (decoded once); :meth:`arrow` gives ``(table, json_columns)`` only for a
    batch that is already Arrow (None for rows: converting them is not the op's business). An op's
    ``run_arrow`` returns one built with :meth:`from_arrow`.
    """

    def __init__(self, *, rows: Rows | None = None, table: Any = None, json_columns: Sequence[str] = ()):
        if (rows is None) == (table is None):
            raise ValueError("a Batch holds rows or an Arrow table, not both")
        self._rows, self._table, self.json_columns = rows, table, tuple(json_columns)

    @classmethod
    def from_rows(cls, rows: Rows) -> "Batch":
        return cls(rows=rows)

    @classmethod
    def from_arrow(cls, table: Any, json_columns: Iterable[str] = ()) -> "Batch":
        return cls(table=table, json_columns=tuple(json_columns))

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else self._table.num_rows

    def arrow(self) -> tuple[Any, tuple[str, ...]] | None:
        return None if self._table is None else (self._table, self.json_columns)

    def rows(self) -> Rows:
        if self._rows is None:
            self._rows = decode_json_columns(self._table.to_pylist(), self.json_columns)
        return self._rows


def decode_json_columns(rows: Rows, json_columns: Iterable[str]) -> Rows:
    """``rows`` with the JSON text of ``json_columns`` parsed back (in place), as the store stores them."""
    import json

    json_columns = list(json_columns)
    if json_columns:
        for row in rows:
            for c in json_columns:
                if row.get(c) is not None:
                    row[c] = json.loads(row[c])
    return rows


@dataclass
class RunContext:
    """What an op sees when it runs: upstream rows and the executor's services.

    ``batches`` is set, instead of ``inputs["from"]``, for an op that declares ``reads_batches``: called
    with no argument it yields its input a :class:`Batch` at a time, in order (once per call);
    ``input_size`` is then the input's row count when it is known before reading it (else None).
    """

    node_id: str
    params: Mapping[str, Any]
    inputs: Mapping[str, Rows]
    vars: Mapping[str, Any]
    seed: int
    services: Any   # specdsl.execute.services.Services (kept loose to avoid an import cycle)
    artifact_dir: Path  # a private folder for this node's artifacts (models, plots); kept in the store
    batches: Callable[[], Iterator[Batch]] | None = None
    input_size: int | None = None

    @property
    def rows(self) -> Rows:
        return self.inputs.get("from", [])

    def input_batches(self, size: int = 8192) -> Iterator[Batch]:
        """The ``from`` input a batch at a time: the runner's batches, else ``ctx.rows`` in slices."""
        if self.batches is not None:
            yield from self.batches()
            return
        rows = self.rows
        for start in range(0, len(rows), size):
            yield Batch.from_rows(rows[start:start + size])


class StepOp(abc.ABC):
    """Base class for built-in ops; third-party ops may subclass it or follow the same shape."""

    name: str = ""
    kind: str = "transform"           # generate | transform | train | evaluate | export
    version: str = "1"
    description: str = ""
    params_schema: Mapping[str, Any] = {}
    input_keys: tuple[str, ...] = ("from",)   # params naming an upstream step or source
    model_keys: tuple[str, ...] = ()          # params naming a model (or a train step)
    template_keys: tuple[str, ...] = ()       # string params rendered per row
    sink_op: bool = False                     # kept even when nothing reads its output
    reads_known: bool = False                 # reads only the columns it names via ctx.column()/ctx.template()
    row_parallel: bool = False                # stateless per row: an executor may run it on chunks of rows
    # Reads its input once, in order, a batch at a time (``ctx.batches``) but needs every row (export): the
    # runner streams the table to it instead of loading it whole.
    reads_batches: bool = False
    # May output fewer rows than it reads (a filter, a dedupe), so plan estimates downstream of it are upper
    # bounds. A function of the step's params where they decide (a filter with `into:` keeps every row).
    drops_rows: bool | Callable[[Mapping[str, Any]], bool] = False
    # The op's output is a model that later steps may name like a declared one (train): the name of the
    # generation backend that serves it. None for ops that make tables.
    model_backend: str | None = None
    # False for an op only the compiler places (source): a spec's steps cannot name it.
    spec_step: bool = True
    # Its output rows are some of its input rows, unchanged (a filter without `into:`), so a pass may run it
    # ahead of the generation before it. A function of the step's params where they decide.
    selects_rows: bool | Callable[[Mapping[str, Any]], bool] = False
    # Every output row carries the id of the input row it came from (generate with n: 1); a function of the
    # params where they decide.
    keeps_row_ids: bool | Callable[[Mapping[str, Any]], bool] = True

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        """Op-specific compile-time rules; returns the output columns."""
        return ctx.columns

    def expand(self, ctx: CheckContext) -> Sequence[HelperNode]:
        """Nodes to put in front of this step when it is lowered (none by default); see HelperNode."""
        return ()

    def backend_label(self, params: Mapping[str, Any]) -> str | None:
        """What ``plan`` shows as the node's backend; None (the default) lists the backends of its models."""
        return None

    def estimate(self, params: Mapping[str, Any], input_rows: int | None, services: Any) -> Estimate | None:
        """What ``specdsl plan`` shows for this step: requests, tokens, cost, rows out (None: not known).

        ``input_rows`` is the estimated row count of ``from`` (None when unknown). ``services`` is a
        ``specdsl.passes.estimate.EstimateServices``: ``price(model, input_tokens, output_tokens)``,
        ``usage(...)``, ``sample_rows``, ``input_rows(param)``, ``samples(param)`` and the planner's rules of
        thumb. Never call a model here. Returning None (the default) passes the input's row count on.
        Built-in ops estimate themselves through this same method.
        """
        return None

    @abc.abstractmethod
    def run(self, ctx: RunContext) -> Rows:
        """Compute the node's rows (or ``(rows, meta)`` for ops that produce artifacts)."""


def obj_schema(properties: Mapping[str, Any], required: Sequence[str] = (), description: str = "") -> dict:
    """A strict object schema (``additionalProperties: false``) with the ``meta`` escape hatch."""
    props = dict(properties)
    props.setdefault("meta", {"type": "object", "description": "free-form metadata, never interpreted"})
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


STEP_REF = {"type": "string", "minLength": 1, "description": "the id of an earlier step, or a source name"}
MODEL_REF = {"type": "string", "minLength": 1, "description": "a name under `models:`, or the id of a train step"}
TEMPLATE = {"type": "string", "description": "a Jinja2 template rendered per row (`row.COLUMN`, `vars`)"}
COLUMN = {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "description": "a column name"}
