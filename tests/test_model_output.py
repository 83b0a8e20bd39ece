"""A trained model people can take away: the train step's `output:` folder, a portable adapter, the real
loss curve in the card, and every artifact's path in the summary, run.json and report.html."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from specdsl import api
from specdsl.errors import SpecErrors
from specdsl.training.trl.card import loss_curve

CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"Answer: {2 * i}"}]} for i in range(6)]


def write_spec(folder: Path, model_dir: Path | str, train_extra: str) -> Path:
    (folder / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    path = folder / "spec.yaml"
    path.write_text(f"""specdsl: 1
name: takeaway
seed: 0
models:
  student: {{backend: transformers, model: {model_dir}, max_new_tokens: 3}}
sources:
  chats: {{path: chats.jsonl}}
steps:
  - id: sft
    train: {{from: chats, model: student, target: cpu, max_steps: 3, batch_size: 2{train_extra}}}
""")
    return path


def test_loss_curve_lines():
    lines = loss_curve([(1, 2.5), (2, 2.0), (3, 1.0), (4, 1.5)])
    assert lines[0] == "- loss: first 2.5000 (step 1), last 1.5000 (step 4), lowest 1.0000 (step 3); 4 logged"
    assert lines[1] == "- loss curve: `█▆▁▃`"
    assert "| 3 | 1.0000 |" in lines
    many = loss_curve([(i, 1.0 / i) for i in range(1, 101)])
    table = [line for line in many if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 20 and table[0].startswith("| 1 |") and table[-1].startswith("| 100 |")
    assert loss_curve([]) == ["- loss: none logged (training logged no step)"]


def test_the_embedded_model_knows_its_hub_id(tmp_path):
    from specdsl.modelcache.known import hub_id
    from specdsl.ops.model_output import portable_adapter_config

    assert hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("/some/folder") is None
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/cache/smollm2", "r": 4}))
    (tmp_path / "specdsl_train.json").write_text(json.dumps(
        {"card": {"base_model_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}}))
    assert json.loads(portable_adapter_config(tmp_path)) == {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 4}
    # A base given as a local folder stays a path: nothing to rewrite.
    (tmp_path / "specdsl_train.json").write_text(json.dumps({"card": {"base_model_id": None}}))
    assert portable_adapter_config(tmp_path) is None


def test_an_output_folder_outside_the_spec_is_refused_at_validate(tmp_path):
    path = write_spec(tmp_path, "smollm2-135m-instruct", ", output: /tmp/models/sft")
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(path, identities=False)
    err = info.value.errors[0]
    assert err.code == "S105" and err.pos.line == 10 and "outside the spec's folder" in err.message


@pytest.mark.training
def test_a_trained_adapter_is_taken_away_and_loads_from_anywhere(tmp_path, tiny_model_dir):
    import torch
    from peft import AutoPeftModelForCausalLM

    from specdsl.views.plan import render_run_summary
    from rich.console import Console

    project = tmp_path / "project"
    project.mkdir()
    path = write_spec(project, tiny_model_dir, ", lora: {r: 4}, output: models/sft")
    result = api.run_spec(path, progress=False)
    assert result.ok, [(n.id, n.status, n.note) for n in result.nodes]
    out = project / "models" / "sft"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    # The card: base model, and the real loss curve (a loss logged at every one of the 3 steps).
    card = (out / "README.md").read_text()
    record = json.loads((out / "specdsl_train.json").read_text())
    losses = record["metrics"]["losses"]
    assert [step for step, _ in losses] == [1, 2, 3]
    assert f"base_model: {json.dumps(str(tiny_model_dir))}" in card  # a local base stays a path
    assert f"- loss: first {losses[0][1]:.4f} (step 1), last {losses[-1][1]:.4f} (step 3)" in card
    assert "- loss curve: `" in card and "None" not in card.split("## Training")[1].split("## Load")[0]

    # Every artifact's path: the summary printed at the end, run.json, report.html.
    console = Console(record=True, width=100, color_system=None)
    render_run_summary(result, console=console)
    printed = console.export_text()
    assert f"sft model output: {out}" in printed
    manifest = json.loads(result.manifest_path.read_text())
    kinds = {a["kind"]: a["path"] for a in manifest["artifacts"]}
    assert kinds["model output"] == str(out)
    assert Path(kinds["model"]).is_dir() and str(result.store.root) in kinds["model"]
    report = (result.manifest_path.parent / "report.html").read_text()
    assert str(out) in report and kinds["model"] in report

    # Moved elsewhere, it loads with peft alone (its base named by adapter_config.json).
    moved = tmp_path / "elsewhere" / "my-adapter"
    moved.parent.mkdir()
    shutil.move(str(out), moved)
    model = AutoPeftModelForCausalLM.from_pretrained(moved)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] > 0

    # The folder was moved away: the next run writes it again from the store, without training.
    again = api.run_spec(path, progress=False)
    report_sft = again.report("sft")
    assert report_sft.status == "ran" and "taken from the store" in report_sft.note
    assert (out / "adapter_model.safetensors").read_bytes() == (moved / "adapter_model.safetensors").read_bytes()
    assert api.run_spec(path, progress=False).report("sft").status == "cached"
