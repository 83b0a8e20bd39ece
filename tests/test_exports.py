"""Exports people take elsewhere: native nested types, the dataset card, rewritten when their files go,
never overwriting what specdsl did not write, staying inside the spec's folder, any node exportable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specdsl import api
from specdsl.errors import RunError, SpecErrors

CHAT_ROWS = [{"id": f"r{i}", "q": f"question {i}",
              "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(3)]


def write_spec(tmp_path: Path, export: str, extra_steps: str = "") -> Path:
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    path = tmp_path / "spec.yaml"
    path.write_text("specdsl: 1\nname: exports\nsources:\n  rows: {path: rows.jsonl}\nsteps:\n" + extra_steps
                    + f"  - id: out\n    export: {export}\n")
    return path


def run(path: Path):
    result = api.run_spec(path, progress=False)
    assert result.ok, [(n.id, n.status, n.note) for n in result.nodes]
    return result


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_parquet_export_loads_with_native_nested_types_and_a_card_with_features(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = write_spec(tmp_path, "{from: rows, path: out, format: parquet, license: apache-2.0}")
    result = run(path)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data.parquet"))["train"]
    assert ds.features["messages"] == datasets.List({"role": datasets.Value("string"),
                                                     "content": datasets.Value("string")})
    assert ds[0]["messages"] == CHAT_ROWS[0]["messages"]
    card = (tmp_path / "out" / "README.md").read_text()
    front = front_matter(card)
    info = front["dataset_info"]
    assert [f["name"] for f in info["features"]] == ["id", "q", "messages"]
    assert {"name": "messages", "list": [{"name": "role", "dtype": "string"},
                                         {"name": "content", "dtype": "string"}]} in info["features"]
    # The features are spelled as `datasets` itself writes them.
    assert info["features"] == ds.features._to_yaml_list()
    assert info["splits"] == [{"name": "train", "num_bytes": (tmp_path / "out" / "data.parquet").stat().st_size,
                               "num_examples": 3}]
    assert front["license"] == "apache-2.0" and front["task_categories"] == ["text-generation"]
    assert front["configs"][0]["data_files"] == [{"split": "train", "path": "data.parquet"}]
    spec_hash = result.plan.spec_hash
    assert f"sha256 `{spec_hash}`" in card and "step: `out`" in card and "file `spec.yaml`" in card
    # The export's folder is an artifact of the run: in the summary's data and in run.json.
    manifest = json.loads(result.manifest_path.read_text())
    assert {"node": "out", "kind": "export", "path": str(tmp_path / "out")} == \
        {k: v for k, v in manifest["artifacts"][0].items() if k != "files"}


def test_jsonl_export_still_loads_and_states_no_licence_unless_given(tmp_path):
    datasets = pytest.importorskip("datasets")
    run(write_spec(tmp_path, "{from: rows, path: out}"))
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "out" / "data.jsonl"))["train"]
    assert ds[2]["messages"] == CHAT_ROWS[2]["messages"]
    assert "license" not in front_matter((tmp_path / "out" / "README.md").read_text())


def test_a_deleted_or_changed_export_is_written_again(tmp_path):
    from rich.console import Console

    from specdsl.views.plan import render_plan

    path = write_spec(tmp_path, "{from: rows, path: out, format: parquet}")
    run(path)
    data = tmp_path / "out" / "data.parquet"
    original = data.read_bytes()
    assert run(path).report("out").status == "cached"

    import shutil

    shutil.rmtree(tmp_path / "out")
    console = Console(record=True, width=200, color_system=None)
    render_plan(api.compile_spec(path), console=console)
    text = console.export_text()
    assert "not cached" in text.split("out export")[1].splitlines()[1]
    again = run(path)
    assert again.report("out").status == "ran" and data.read_bytes() == original
    assert run(path).report("out").status == "cached"

    data.write_bytes(original[:-10] + b"0123456789")  # same size, other content
    assert run(path).report("out").status == "ran" and data.read_bytes() == original
    (tmp_path / "out" / "README.md").unlink()
    assert run(path).report("out").status == "ran" and (tmp_path / "out" / "README.md").is_file()


def test_an_export_never_overwrites_a_file_specdsl_did_not_write(tmp_path):
    path = write_spec(tmp_path, "{from: rows, path: .}")
    (tmp_path / "README.md").write_text("# my project\n")
    with pytest.raises(RunError) as info:
        api.run_spec(path, progress=False)
    assert "will not overwrite" in info.value.message and "README.md" in info.value.message
    assert (tmp_path / "README.md").read_text() == "# my project\n"
    assert not (tmp_path / "data.jsonl").exists()  # refused before anything was written
    # Without the card nothing is in the way; and files specdsl wrote are its own to rewrite.
    path = write_spec(tmp_path, "{from: rows, path: ., card: false}")
    run(path)
    assert (tmp_path / "data.jsonl").is_file() and (tmp_path / "README.md").read_text() == "# my project\n"


def test_an_export_stays_in_the_spec_folder_unless_allowed(tmp_path):
    spec_dir = tmp_path / "project"
    spec_dir.mkdir()
    path = write_spec(spec_dir, "{from: rows, path: ../elsewhere}")
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(path, identities=False)
    err = info.value.errors[0]
    assert (err.code, err.pos.line) == ("S105", 7) and "outside the spec's folder" in err.message
    assert "allow_outside: true" in err.hint
    # A symlink inside the folder that leads out of it is caught when the run resolves it.
    (spec_dir / "link").symlink_to(tmp_path)
    with pytest.raises(RunError, match="outside the spec's folder"):
        api.run_spec(write_spec(spec_dir, "{from: rows, path: link/x}"), progress=False)
    run(write_spec(spec_dir, "{from: rows, path: ../elsewhere, allow_outside: true}"))
    assert (tmp_path / "elsewhere" / "data.jsonl").is_file()


TRAIN_HEAD = """\
specdsl: 1
name: t
models:
  m: {model: smollm2-135m-instruct}
sources:
  rows: {path: rows.jsonl}
steps:
  - id: chat
    format: {from: rows, user: "{{ row.q }}", assistant: "{{ row.q }}"}
  - id: sft
    train: {from: chat, model: m, max_length: 128, max_steps: 1}
"""


def test_a_helper_node_can_be_exported(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    path = tmp_path / "s.yaml"
    path.write_text(TRAIN_HEAD + "  - id: out\n    export: {from: sft.tokens, path: tokens, format: parquet}\n")
    plan = api.compile_spec(path, identities=False)
    assert plan.node("out").inputs == (("from", "sft.tokens"),)
    ids = [n.id for n in plan.nodes]
    assert ids.index("sft.tokens") < ids.index("out")
    # A column check sees the helper's columns.
    path.write_text(TRAIN_HEAD + "  - id: out\n    export: {from: sft.tokens, path: t, columns: [input_ids, nope]}\n")
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(path, identities=False)
    assert [e.code for e in info.value.errors] == ["S403"]


def test_a_helper_node_that_does_not_exist_is_a_positioned_error(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    path = tmp_path / "s.yaml"
    path.write_text(TRAIN_HEAD + "  - id: out\n    export: {from: sft.tokenz, path: t}\n")
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(path, identities=False)
    err = info.value.errors[0]
    assert (err.code, err.pos.line, err.pos.col) == ("S203", 13, 20)
    assert err.message == "step 'sft' makes no node 'sft.tokenz'" and "sft.tokens" in err.hint
    # A step cannot read its own helper, and an unknown step before the dot is the usual unknown step.
    path.write_text(TRAIN_HEAD + "  - id: out\n    export: {from: sfx.tokens, path: t}\n")
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(path, identities=False)
    assert info.value.errors[0].code == "S203" and "sfx.tokens" in info.value.errors[0].message


def test_the_json_column_type_guess_is_what_arrow_infers():
    """Export reads chat columns with Arrow's JSON reader held to a type guessed from the first value; the
    guess (made in Python: pyarrow.array imports pandas) is exactly pyarrow's inference, or None."""
    import pyarrow as pa
    from hypothesis import given, settings, strategies as st

    from specdsl.ops.export import _strings_shape

    keys = st.sampled_from(["role", "content", "name", "trained"])
    leaves = st.one_of(st.text(max_size=3), st.integers(), st.none(), st.booleans())
    values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(keys, inner, max_size=3)), max_leaves=8)

    @settings(max_examples=400, deadline=None)
    @given(values)
    def check(value):
        guessed = _strings_shape(value)
        if guessed is not None:
            assert pa.array([value]).type == guessed

    check()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "name": "bot"}]
    assert _strings_shape(messages) == pa.array([messages]).type
