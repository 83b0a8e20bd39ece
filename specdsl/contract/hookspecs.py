"""The whole plugin contract of specdsl, in one module.

A plugin is any module (usually exposed through the ``specdsl`` entry-point group) with functions
decorated by :data:`hookimpl`. Each hook receives a ``register`` callable; the plugin calls it once per
thing it provides. Built-in backends, ops, recipes and probes register through exactly these hooks.

Rules every registered object follows:

* Importing the plugin module must be cheap: no torch, transformers, trl, litellm or datasets at module
  level. Import them inside the methods that run (``specdsl validate`` must stay fast).
* Options are validated by the JSON Schema fragment the object carries (``options_schema`` /
  ``params_schema``), so user mistakes in backend options become positioned spec errors.
* What a schema cannot express, a backend checks in its optional ``check_options(options)``: it returns
  :class:`OptionProblem` s (option path, message, hint), which ``specdsl validate``, ``plan`` and ``run``
  report as error[S210] at that option's line and column. It runs on every validate, so it stays cheap
  and offline: no network, no heavy imports, no loading or hashing of model weights (``identity()``
  may do those; ``validate`` never calls it). Backends without the method keep working.
* Secrets only arrive resolved at run time; ``identity()`` must never include them (it feeds the
  fingerprint, which is stored in plans, caches and manifests).
* What an object needs beyond the core install it names in an optional class attribute ``requires``:
  ``(module, extra)`` pairs, a top-level import name and what brings it, one of specdsl's extras
  (``run``, ``local``, ``train``, ``litellm``, ``report``, ``ray``) or, for a plugin's own libraries, a
  pip requirement (``"spacy>=3"``). Before any node runs, ``specdsl run`` asks ``find_spec`` (no import)
  for every module the uncached nodes' ops, backends, training targets, probes and executor require, and
  stops with one error naming each missing module and the ``pip install`` line; ``specdsl plugins``
  lists them. E.g. ``requires = (("transformers", "local"), ("torch", "local"))``
  (see ``specdsl/requirements.py``).

Example, a complete third-party backend::

    from specdsl.contract.hookspecs import hookimpl, GenResult, OptionProblem

    class EchoBackend:
        name = "echo"
        version = "1"
        options_schema = {"type": "object", "properties": {}, "additionalProperties": False}
        def identity(self, options): return {"model": options["model"]}
        def check_options(self, options):  # optional
            if options["model"] != options["model"].strip():
                return [OptionProblem(("model",), "the model name has surrounding spaces", "remove them")]
            return []
        def price(self, options, input_tokens, output_tokens): return 0.0
        def generate(self, options, requests, on_result):
            for r in requests:
                on_result(GenResult(key=r.key, text=r.messages[-1]["content"]))

    @hookimpl
    def register_backends(register):
        register(EchoBackend())
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import pluggy

from specdsl.jsontext import key_json, messages_key_json

PROJECT = "specdsl"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenRequest:
    """One chat completion to make.

    ``key`` is the content hash of everything that determines the answer (backend identity, messages,
    sampling parameters, sample index): the request journal and cross-node deduplication use it.
    ``row_id`` is only for messages to the user.
    """

    key: str
    messages: tuple[Mapping[str, str], ...]
    params: Mapping[str, Any] = field(default_factory=dict)  # max_tokens, temperature, top_p, seed
    row_id: str = ""


@dataclass(frozen=True)
class GenResult:
    key: str
    text: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    error: str | None = None  # set when the request failed after all retries
    latency_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def request_key(identity: Mapping[str, Any], messages: Sequence[Mapping[str, str]],
                params: Mapping[str, Any]) -> str:
    """Content hash of a generation request; equal requests share one answer across nodes and runs.

    The hashed text is ``json.dumps({"identity": ..., "messages": list(messages), "params": ...},
    sort_keys=True, ensure_ascii=False, separators=(",", ":"))`` byte for byte: journals and node
    fingerprints depend on it (tests/test_generation_keys.py holds it to that function).
    """
    blob = key_json({"identity": identity, "messages": list(messages), "params": params})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def request_keys(identity: Mapping[str, Any], params: Mapping[str, Any]) -> Callable[[Sequence[Mapping[str, str]]], str]:
    """``lambda messages: request_key(identity, messages, params)``, at about a third of the cost per key:
    a step keys thousands of requests that share one identity and one parameter set, so their JSON and
    its hash up to the messages are made once, and plain messages (str to str) are written by hand.

    The hashed text is request_key's byte for byte: json.dumps with ``sort_keys`` and compact separators
    writes ``{"identity":<identity>,"messages":<messages>,"params":<params>}``, each value as it would
    write it alone.
    """
    head = hashlib.sha256(('{"identity":' + key_json(identity) + ',"messages":').encode("utf-8"))
    tail = (',"params":' + key_json(params) + "}").encode("utf-8")

    def key(messages: Sequence[Mapping[str, str]]) -> str:
        digest = head.copy()
        digest.update(messages_key_json(messages).encode("utf-8"))
        digest.update(tail)
        return digest.hexdigest()

    return key


@dataclass(frozen=True)
class OptionProblem:
    """One thing wrong with a model entry's options, as found by a backend's ``check_options``.

    ``path`` is where the problem is inside the model entry: ``("api_base",)``, ``("model",)`` for the
    model itself, ``("rules", 0, "match")`` inside a nested option, ``()`` for the entry as a whole.
    The error is positioned at that value in the YAML (the nearest written parent when the option is
    not written out, e.g. a default). ``message`` names the option and says what is wrong; ``hint``
    says how to fix it.
    """

    path: tuple[str | int, ...]
    message: str
    hint: str | None = None


@runtime_checkable
class GenerationBackend(Protocol):
    """A generation backend.

    Optional method (not a protocol member, so backends written before it still satisfy
    ``isinstance`` checks)::

        def check_options(self, options: Mapping[str, Any]) -> Sequence[OptionProblem]:
            "Every problem with these options that would make plan or run fail; [] when none."

    ``options`` is what ``identity()`` receives: the schema-valid model entry including ``model``
    (a local path already resolved the way the plan resolves it), secrets still as ``${env:NAME}``
    references. It runs in ``specdsl validate`` for every spec: cheap and offline only (no network, no
    torch/transformers/litellm imports, no loading or hashing of weights), and it must not depend on
    the machine that will run the spec (which GPU, which environment variables are set). Report all
    problems, not just the first. When it returns problems, ``identity()`` is not called for the entry.
    """

    name: str
    version: str
    options_schema: Mapping[str, Any]  # JSON Schema for a model entry's options (minus backend/model)

    def identity(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        """What determines outputs (model name, revision, decoding defaults). Never secrets."""

    def price(self, options: Mapping[str, Any], input_tokens: int, output_tokens: int) -> float | None:
        """Estimated cost in USD, or None when the backend cannot price the model."""

    def generate(self, options: Mapping[str, Any], requests: Sequence[GenRequest],
                 on_result: Callable[[GenResult], None]) -> None:
        """Answer every request, calling ``on_result`` as soon as each one completes (or finally fails).

        ``options`` has secrets resolved. The caller persists each result inside ``on_result``, so a
        backend must call it promptly, from any thread, one result at a time.
        """


@runtime_checkable
class Limiter(Protocol):
    """Admission control for one model's requests (concurrency, request and token rates), used from
    one event loop. Every attempt a backend sends is bracketed by ``acquire`` and ``release``."""

    async def acquire(self, tokens: int) -> None:
        """Wait until one more attempt, estimated to cost ``tokens`` tokens, may be sent."""

    def release(self, reserved: int, used: int) -> None:
        """The attempt admitted with ``reserved`` tokens is over and cost ``used`` (0 when it was
        rejected, ``reserved`` when unknown): free its concurrency slot, correct the token count."""

    def pause(self, seconds: float) -> None:
        """The provider said to wait (``Retry-After``): admit nothing for ``seconds``."""


@runtime_checkable
class LimitedBackend(Protocol):
    """Optional methods of a :class:`GenerationBackend` whose limits can hold across processes.

    An executor that answers one ``generate`` call from several processes (Ray) calls
    ``make_limiter(options)`` where the shared limiter lives (one Ray actor per call) and, in each
    process, sends through ``with_limiter(shared).generate(...)``, so the limits the options set hold
    for all the processes together rather than for each. The local executor never calls either.
    A backend without them keeps its limits per process.
    """

    def make_limiter(self, options: Mapping[str, Any]) -> Limiter | None:
        """A new limiter enforcing the limits ``options`` set (secrets resolved), or None when they set
        none: then nothing is shared and nothing extra is paid per request."""

    def with_limiter(self, limiter: Limiter) -> GenerationBackend:
        """This backend with every attempt admitted by ``limiter`` instead of its own limits."""


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainRequest:
    base_model: Path            # a Hugging Face model directory (config, weights, tokenizer)
    dataset: Path               # a Parquet file with input_ids and labels (-100 = no loss)
    output_dir: Path            # where the trained model or adapter is written (atomically)
    params: Mapping[str, Any]   # the step's parameters the target lists in its params_schema, validated
    seed: int = 0
    card: Mapping[str, Any] = field(default_factory=dict)  # spec name, data fingerprint, mask policy


@runtime_checkable
class TrainingTarget(Protocol):
    """Trains a model on a pre-tokenized Parquet table (``input_ids`` + ``labels``, -100 outside the loss).

    ``train`` returns the published output directory (a model, or a LoRA adapter, with a card). A target
    that trains across machines raises :class:`specdsl.errors.StopRun` on every machine but the one that
    writes the model: the run there stops after this node, successfully, and commits nothing.

    Optional attribute (not a protocol member, so targets written before it still satisfy ``isinstance``
    checks)::

        params_schema: Mapping  # {"type": "object", "properties": {...}, "required": [...]}

    A JSON Schema object fragment listing the parameters the target accepts in a ``train:`` step beyond
    the step's own keys (``from``, ``model``, ``target``, ``loss``, ``mask``, ``meta``); only its
    ``properties`` and ``required`` are read. The ``train`` step's schema accepts every registered
    target's parameters, and a step that names the target (``target: NAME``) only that target's, so a
    mistake is a positioned spec error in ``specdsl validate``. At run time ``request.params`` holds
    only the step's parameters the target lists (a target without ``params_schema`` gets every key that
    is not the step's own). The built-in ``cpu`` and ``cuda`` targets publish TRL's parameters
    (:data:`specdsl.training.trl.PARAMS_SCHEMA`).

    Example, a target with one parameter of its own::

        class CopyTarget:
            name = "copy"
            version = "1"
            params_schema = {"type": "object", "properties": {"flavour": {"enum": ["a", "b"]}}}
            def available(self): return True
            def train(self, request, progress):
                shutil.copytree(request.base_model, request.output_dir)  # request.params["flavour"], ...
                return Path(request.output_dir)

        @hookimpl
        def register_training_targets(register):
            register(CopyTarget())
    """

    name: str                   # cpu, cuda, ...
    version: str

    def available(self) -> bool: ...

    def train(self, request: TrainRequest, progress: Callable[[Mapping[str, Any]], None]) -> Path: ...


# --------------------------------------------------------------------------------------------------
# Ops, recipes, probes, executors
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class OpDef(Protocol):
    """A primitive step. ``check`` runs at compile time, ``run`` at execution time.

    See :mod:`specdsl.contract.ops` for the context objects both receive, and for ``StepOp``, the base class
    of the built-in ops. Besides the members below, the compiler and the executors read these optional
    attributes (``StepOp`` gives each a default; an op without them gets the default):

    * ``version`` (``"1"``): part of the node fingerprint; bump it when ``run``'s output changes.
    * ``input_keys`` (``("from",)``), ``model_keys`` (``()``), ``template_keys`` (``()``): params that name
      upstream steps, models, and per-row templates, which the compiler resolves and checks.
    * ``sink_op`` (False): kept by the prune pass even when nothing reads its output.
    * ``reads_known`` (False): the op reads only the columns it names through ``ctx.column()`` and
      ``ctx.template()``, so passes may reason about which columns it depends on.
    * ``row_parallel`` (False): stateless per row. The local executor runs it one batch of its input at a
      time (``ctx.rows`` is a batch; each batch of output is written as it comes, so peak memory is a
      batch, not the table); another executor may run the batches in other processes or machines.
    * ``reads_batches`` (False): the op reads every row of its ``from`` input once, in order, but never
      needs them all at once (``export``): ``run`` gets ``ctx.batches`` instead of ``ctx.rows``, and
      ``ctx.input_batches()`` yields the input a :class:`specdsl.contract.ops.Batch` at a time, read from
      the store as it goes. An op with neither ``row_parallel`` nor ``reads_batches`` gets its whole input
      table (dedupe, interleave's sampling pool, evaluation): the table must fit in memory.
    * ``drops_rows`` (False, or a function of the step's params): it may output fewer rows than it reads,
      so the plan's estimates downstream of it are upper bounds.
    * ``spec_step`` (True): False for an op only the compiler places (``source``); steps cannot name it.
    * ``selects_rows`` (False, or a function of the params): its output rows are some of its input rows,
      unchanged (a filter without ``into:``); the push-filters pass may run it ahead of a generation.
    * ``keeps_row_ids`` (True, or a function of the params): each output row keeps its input row's id
      (generate with ``n: 1``; with ``n: 3`` ids become ``id#k``).
    * ``model_backend`` (None): the op's output is a model that later steps may name like a declared one,
      served by the generation backend of that name (``train``: ``transformers``).

    And these optional methods (``StepOp`` gives each a default):

    * ``estimate(params, input_rows, services) -> Estimate | None``: what ``specdsl plan`` shows (see
      ``StepOp.estimate``); None passes the input's row count on.
    * ``run_arrow(ctx, batch) -> Batch | None``: a ``row_parallel`` op's fast path on a batch read from
      the store. ``batch.arrow()`` is ``(pyarrow.Table, json_columns)`` as the store holds it (columns of
      nested values as JSON text); the op returns ``Batch.from_arrow(table, json_columns)``, exactly the
      batch the store would keep for the rows ``run`` returns (the same values, types and JSON-text
      columns), or None to have ``run`` called on ``batch.rows()`` instead. Ops without it are called
      with rows, as before.
    * ``run_batches(ctx) -> Iterator[rows]``: an op that produces its output in batches itself; the
      runner writes each batch as it comes and never calls ``run``. Called for an op with no input (the
      built-in ``source``) or one that ``reads_batches`` its one ``from`` input (``generate``: it reads
      the input a batch at a time, answers a window of requests at a time and yields the answered rows,
      so neither the input nor the output is ever whole in memory; ``ctx.input_size`` is the input's row
      count when known, for a progress total). Any other op gets ``run`` with its inputs whole.
    * ``batch_summary(ctx, rows) -> Any`` with ``after_batches(ctx, summaries) -> None`` (no default:
      an op needs both, or neither is called): a ``row_parallel`` op's check of its whole output, which
      no single batch can make (``tokenize``: no sample at all carries loss). ``batch_summary`` runs
      where the batch ran (a Ray worker, too) on that batch's output ``rows`` and returns something small
      and picklable (counts); ``after_batches`` runs once in the run's process after the last batch and
      before the commit, with every batch's summary in order, and may raise a ``RunError``: the node
      fails and nothing is committed, as if ``run`` had raised it. How the output is cut into batches is
      the executor's (a filter's batches may be empty): combine summaries (sums, any), never count them.
    * ``expand(ctx) -> Sequence[HelperNode]``: nodes to put in front of the step when it is lowered
      (``train`` puts ``tokenize`` in front of itself).
    * ``backend_label(params) -> str | None``: what ``plan`` shows as the node's backend.
    * ``schema_for(registry) -> dict``: the op's parameter schema when it depends on other plugins (the
      probes ``evaluate`` accepts, the training targets ``train`` accepts); ``params_schema`` otherwise.
    * ``outputs_current(params, fingerprint, spec_file) -> bool`` (no default: absent means True): for an
      op that writes files outside the store (``export``, ``train`` with ``output:``), whether a cached
      node's files are still there unchanged; False makes the node run again (see specdsl.ops.outputs).
      An op may also list ``artifacts`` (``[{"kind", "path"}]``, a path relative to the node's folder or
      absolute) in the meta it returns: the run summary, run.json and report.html show their paths.
    """

    name: str
    kind: str                        # "generate" | "transform" | "train" | "evaluate" | "export"
    params_schema: Mapping[str, Any]

    def check(self, ctx: Any) -> Any: ...

    def run(self, ctx: Any) -> Any: ...


@runtime_checkable
class RecipeDef(Protocol):
    """A macro: parameters in, a list of primitive step mappings out (ids prefixed by the caller).

    A produced step may carry ``note: TEXT``: something the user must know about it (help the data got, a
    shortcut taken); ``specdsl plan`` prints it and the plan JSON keeps it under ``notes``.
    """

    name: str
    params_schema: Mapping[str, Any]
    description: str

    def expand(self, step_id: str, params: Mapping[str, Any]) -> list[dict[str, Any]]: ...


@runtime_checkable
class ProbeDef(Protocol):
    """An evaluation probe: ``run(ctx)`` (a ``specdsl.ops.evaluate.ProbeContext``) returns its results.

    Its ``params_schema`` checks the probe's mapping in an ``evaluate`` step. An optional
    ``check(ctx)`` (a ``specdsl.ops.evaluate.ProbeCheckContext``) adds compile-time rules, positioned
    at the probe's keys: ``ctx.template(text, *keys)`` checks a row template against the ``on:`` columns,
    ``ctx.column(name, *keys)`` requires a column, ``ctx.error(code, message, *keys, hint=...)`` reports
    anything else.
    """

    name: str
    params_schema: Mapping[str, Any]

    def run(self, ctx: Any) -> Any: ...


@runtime_checkable
class SourceDef(Protocol):
    """A data format that ``sources:`` can read (``format: NAME``). The built-in jsonl, json, csv and
    parquet readers, a folder of Parquet files and a dataset saved by ``datasets.save_to_disk`` register
    through ``register_sources`` exactly like a plugin's.

    ``suffixes`` pick the format when a source names none (``(".jsonl", ".ndjson")``); a format for
    folders may instead give an optional ``matches(path) -> bool`` (checked for paths that exist). Every
    row read gets a string ``id``: the ``id_column``'s value, or the row number. ``columns`` and ``count``
    run at compile time (``validate`` / ``plan``): cheap, reading as little as they can; ``count`` may
    return None when counting would cost a full read. ``identity`` is the content fingerprint of the
    data (a changed file re-runs everything downstream of it). Errors in the data are
    :class:`specdsl.errors.RunError` naming ``display`` (the path as the spec wrote it) and the row.
    An optional ``iter_batches(path, *, id_column, limit, display, size)`` yields the same rows ``size``
    at a time, so a large source streams into the run store instead of being read whole.
    """

    name: str
    suffixes: Sequence[str]

    def columns(self, path: Path) -> tuple[str, ...]: ...

    def count(self, path: Path, *, limit: int | None = None) -> int | None: ...

    def read(self, path: Path, *, id_column: str | None = None, limit: int | None = None,
             display: str | None = None) -> list[dict[str, Any]]: ...

    def identity(self, path: Path) -> Mapping[str, Any]: ...


@runtime_checkable
class ExecutorDef(Protocol):
    """Where row-parallel work runs. The local executor runs it in-process; others fan it out (Ray).

    ``map_rows(fn, rows)`` returns ``fn`` applied to consecutive chunks of ``rows``, concatenated in
    order (``fn`` is picklable: a module-level function bound with ``functools.partial``).
    ``wrap_backend(backend)`` returns a backend whose ``generate`` may spread requests out, still calling
    ``on_result`` in this process as each result arrives (so the request journal stays exact).
    An executor with ``in_process = True`` (optional, default False) runs everything in this process: the
    runner then calls row-parallel ops directly, with the run's services, instead of ``map_rows``.

    An executor that runs elsewhere may stream a row-parallel node instead of taking its whole input
    through ``map_rows``, with the optional method ``run_streaming(fn, staging, batch_rows, *, rows=None,
    table=None, json_columns=()) -> (rows, json_columns[, metas])``:
    apply ``fn`` (picklable, as for ``map_rows``) to the node's input one batch at a time, the batches
    being rows ``[k*batch_rows, (k+1)*batch_rows)`` exactly as the local executor cuts them, and leave the
    output in ``staging/data.parquet`` as :class:`specdsl.execute.batches.TableWriter` writes it (a part
    per non-empty output batch, in input order; ``TableWriter.add_part`` takes a part another process
    wrote). The input is either ``rows`` (a table already in memory) or ``table``, the path of a stored
    ``data.parquet`` whose ``json_columns`` are JSON text to decode. Return the rows written and the
    JSON-text columns (what ``TableWriter.close`` returns); the runner commits the staging folder. ``fn``
    returns a batch's rows, or ``(rows, meta)``: for an op with ``batch_summary`` (see ``OpDef``) ``meta``
    carries the summary taken where the batch ran, and an executor returns every batch's ``meta`` (``{}``
    for plain rows) in input order as a third element, ``metas``. Without it the runner reads the written
    table back a batch at a time to summarize it. ``fn`` also carries what the op may use of the run's
    services in another process (:class:`specdsl.execute.row_services.RowServices`: the local folders of
    the models the op names, and their tokenizers, loaded once per process). The Ray executor implements
    it with Ray Data (:mod:`specdsl.executors.ray.streaming`).
    """

    name: str

    def map_rows(self, fn: Callable[[list[dict]], list[dict]], rows: list[dict]) -> list[dict]: ...

    def wrap_backend(self, backend: GenerationBackend) -> GenerationBackend: ...


class SpecdslHooks:
    """The hooks. Each receives ``register``; call it once per object provided."""

    @hookspec
    def register_backends(self, register: Callable[[GenerationBackend], None]) -> None:
        """Generation backends (LLM providers, local models)."""

    @hookspec
    def register_training_targets(self, register: Callable[[TrainingTarget], None]) -> None:
        """Training targets (cpu, cuda, ...)."""

    @hookspec
    def register_ops(self, register: Callable[[OpDef], None]) -> None:
        """Primitive ops usable as steps."""

    @hookspec
    def register_recipes(self, register: Callable[[RecipeDef], None]) -> None:
        """Recipes (``use: NAME``) that expand into primitive steps."""

    @hookspec
    def register_probes(self, register: Callable[[ProbeDef], None]) -> None:
        """Evaluation probes usable in ``evaluate`` steps."""

    @hookspec
    def register_executors(self, register: Callable[[ExecutorDef], None]) -> None:
        """Executors that run row-parallel work (local threads, Ray, ...)."""

    @hookspec
    def register_sources(self, register: Callable[[SourceDef], None]) -> None:
        """Data formats that ``sources:`` entries can read (``format: NAME``)."""
