"""``tokenize`` and ``segment`` are row-parallel: a batch in, a batch out, on every executor path.

* each sees at most a batch of rows (the local executor), and gives the whole-table run's table;
* tokenize's check about the whole table ("no token carries loss in any sample") holds across batches:
  one trained sample in the last batch is enough, none at all fails the node and commits nothing;
* an executor that runs batches in another process (here: through pickle, with ``map_rows`` or with a
  ``run_streaming`` that predates per-batch summaries) gives the same tables and the same error, the
  tokenizer loaded from the model's local folder in that process (:class:`RowServices`).
"""

from __future__ import annotations

import json
import pickle
import types
import warnings

import pytest

from specdsl import api
from specdsl.contract.hookspecs import hookimpl
from specdsl.errors import RunError
from specdsl.execute.row_services import RowServices, load_tokenizer
from specdsl.ops.designs import SegmentOp
from specdsl.ops.tokenize import TokenizeOp
from specdsl.plugins import build_registry

pytest.importorskip("transformers")
pytest.importorskip("pyarrow")

SEEN: dict[str, list[int]] = {}


class SeenTokenize(TokenizeOp):
    """The built-in tokenize, recording the size of every batch it is handed."""

    name = "seen_tokenize"

    def run(self, ctx):
        SEEN.setdefault(self.name, []).append(len(ctx.rows))
        return super().run(ctx)


class SeenSegment(SegmentOp):
    """The built-in segment, recording the size of every batch it is handed."""

    name = "seen_segment"

    def run(self, ctx):
        SEEN.setdefault(self.name, []).append(len(ctx.rows))
        return super().run(ctx)


class PickledChunks:
    """An executor that runs row-parallel work elsewhere: ``fn`` crosses a pickle, in chunks of 5 rows."""

    name = "pickled_chunks"

    def map_rows(self, fn, rows):
        fn = pickle.loads(pickle.dumps(fn))
        return [row for start in range(0, len(rows), 5) for row in fn(rows[start:start + 5])]

    def wrap_backend(self, backend):
        return backend


class OldStreaming(PickledChunks):
    """An executor whose ``run_streaming`` returns (rows, json_columns) only, as before batch summaries."""

    name = "old_streaming"

    def run_streaming(self, fn, staging, batch_rows, *, rows=None, table=None, json_columns=()):
        from specdsl.execute.batches import TableWriter, chunks
        from specdsl.execute.store import read_batches

        fn = pickle.loads(pickle.dumps(fn))
        writer = TableWriter(staging)
        for batch in chunks(rows, batch_rows) if rows is not None else read_batches(table, json_columns, batch_rows):
            result = fn(batch)
            writer.write(result[0] if isinstance(result, tuple) else result)
        return writer.rows, writer.close()


def registry():
    mod = types.ModuleType("rowpar_plugin")
    mod.register_ops = hookimpl(lambda register: (register(SeenTokenize()), register(SeenSegment())))
    mod.register_executors = hookimpl(lambda register: (register(PickledChunks()), register(OldStreaming())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return build_registry(extra_plugins=(mod,))


SPEC = """\
specdsl: 1
name: rowpar-tokenizer-ops
models:
  m: {{backend: transformers, model: {model}}}
sources:
  docs: {{path: docs.jsonl}}
steps:
  - id: segs
    seen_segment: {{from: docs, model: m, min_tokens: 8}}
  - id: texts
    segment: {{from: docs, model: m, min_tokens: 8, per: text}}
  - id: pairs
    format: {{from: docs, to: prompt_completion, prompt: "{{{{ row.question }}}}", completion: "{{{{ row.answer }}}}"}}
  - id: chats
    format: {{from: docs, user: "{{{{ row.question }}}}", assistant: "{{{{ row.answer }}}}"}}
  - id: pair_tokens
    seen_tokenize: {{from: pairs, model: m, max_length: {max_length}}}
  - id: chat_tokens
    tokenize: {{from: chats, model: m}}
"""
NODES = ("segs", "texts", "pair_tokens", "chat_tokens")


def write_spec(folder, model, *, rows=43, long_prompts=(), max_length=64):
    """``rows`` documents; the rows in ``long_prompts`` ask a question too long for ``max_length``, so their
    completion is cut off and carries no loss."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "docs.jsonl").open("w") as f:
        for i in range(rows):
            text = "" if i % 10 == 3 else "Paris is the capital of France. Berlin is in Germany.\n" * (1 + i % 6)
            question = ("Alice has 12 apples " * 20 if i in long_prompts else "") + f"What is {i} plus 1?"
            f.write(json.dumps({"id": f"d{i:02d}", "text": text, "question": question,
                                "answer": f"Answer: {i + 1}"}) + "\n")
    (folder / "spec.yaml").write_text(SPEC.format(model=model, max_length=max_length))
    return folder / "spec.yaml"


def run(spec, store, monkeypatch, *, batch_rows=8, executor="local"):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    monkeypatch.setenv("SPECDSL_BATCH_ROWS", str(batch_rows))
    SEEN.clear()
    reg = registry()
    plan = api.compile_spec(spec, registry=reg, passes=False)
    return api.run_plan(plan, store_dir=store, executor=executor, registry=reg, progress=False)


def test_each_op_sees_at_most_a_batch_and_gives_the_whole_tables(tmp_path, monkeypatch, tiny_model_dir):
    spec = write_spec(tmp_path, tiny_model_dir)
    batched = run(spec, tmp_path / "batched", monkeypatch, batch_rows=8)
    assert batched.ok
    assert SEEN == {"seen_segment": [8, 8, 8, 8, 8, 3], "seen_tokenize": [8, 8, 8, 8, 8, 3]}
    whole = run(spec, tmp_path / "whole", monkeypatch, batch_rows=10_000)
    assert SEEN == {"seen_segment": [43], "seen_tokenize": [43]}
    for node in NODES:
        assert batched.rows(node) == whole.rows(node), node
    assert len(batched.rows("segs")) > 43 and {r["n_trained"] > 0 for r in batched.rows("pair_tokens")} == {True}


def test_one_trained_sample_in_the_last_batch_is_enough(tmp_path, monkeypatch, tiny_model_dir):
    spec = write_spec(tmp_path, tiny_model_dir, long_prompts=range(40), max_length=24)
    result = run(spec, tmp_path / "store", monkeypatch)
    assert result.ok
    trained = [r["id"] for r in result.rows("pair_tokens") if r["n_trained"]]
    assert trained and min(trained) >= "d40"  # only the sixth batch trains anything


@pytest.mark.parametrize("executor", ["local", "pickled_chunks", "old_streaming"])
def test_no_trained_token_in_any_batch_fails_the_node_and_commits_nothing(tmp_path, monkeypatch, tiny_model_dir,
                                                                          executor):
    spec = write_spec(tmp_path, tiny_model_dir, long_prompts=range(43), max_length=24)
    with pytest.raises(RunError) as info:
        run(spec, tmp_path / "store", monkeypatch, executor=executor)
    assert info.value.node == "pair_tokens" and info.value.message == "no token carries loss in any sample"
    assert "assistant message or completion is empty or truncated" in info.value.hint
    plan = api.compile_spec(spec, registry=registry(), passes=False)
    store = tmp_path / "store"
    assert not (store / "nodes" / plan.node("pair_tokens").fingerprint[:2] / plan.node("pair_tokens").fingerprint
                ).exists()
    assert not list((store / "tmp").iterdir())  # the staging folder went with the error


@pytest.mark.parametrize("executor", ["pickled_chunks", "old_streaming"])
def test_batches_in_another_process_give_the_local_tables(tmp_path, monkeypatch, tiny_model_dir, executor):
    spec = write_spec(tmp_path, tiny_model_dir)
    local = run(spec, tmp_path / "local", monkeypatch)
    other = run(spec, tmp_path / executor, monkeypatch, executor=executor)
    assert local.ok and other.ok
    for node in NODES:
        assert other.rows(node) == local.rows(node), node


def test_row_services_load_the_tokenizer_from_the_local_folder_once(tmp_path, tiny_model_dir):
    unresolved = {"api": ("model 'api' is served by 'litellm'", "use a local model")}
    services = pickle.loads(pickle.dumps(RowServices({"m": str(tiny_model_dir)}, unresolved)))  # as workers get it
    tok = services.tokenizer("m")
    assert tok.is_fast and services.tokenizer("m") is tok and load_tokenizer(tiny_model_dir, "m") is tok
    with pytest.raises(RunError, match="served by 'litellm'"):
        services.tokenizer("api")
    with pytest.raises(RunError, match="not one this step names"):
        services.tokenizer("other")
    missing = RowServices({"m": str(tmp_path / "elsewhere")})
    with pytest.raises(RunError) as info:
        missing.tokenizer("m")
    assert "is not there on" in info.value.message and "same path" in info.value.hint
