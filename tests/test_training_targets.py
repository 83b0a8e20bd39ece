"""Training targets publish their parameters: a plugin target defined here, used by a spec end to end.

The plugin target ``copy`` takes one parameter of its own (``flavour: a | b``) and none of TRL's. The
``train`` step's schema comes from the registered targets (``TrainOp.schema_for``): ``validate`` rejects
a wrong flavour, or TRL's parameters for ``target: copy``, or ``flavour`` for ``target: cpu``, each at the
offending key; ``api.run_plan`` hands the target exactly its own parameters.
"""

from __future__ import annotations

import json
import shutil
import types
import warnings
from pathlib import Path

import pytest

from specdsl import api
from specdsl.contract.hookspecs import TrainingTarget, hookimpl
from specdsl.errors import SpecErrors
from specdsl.ops.train import TrainOp
from specdsl.plugins import build_registry
from specdsl.training.trl import PARAMS_SCHEMA


class CopyTarget:
    """'Trains' by copying the base model folder to the output; records every request it gets."""

    name = "copy"
    version = "1"
    params_schema = {"type": "object", "additionalProperties": False,
                     "properties": {"flavour": {"enum": ["a", "b"], "description": "which copy"}}}

    def __init__(self):
        self.requests = []

    def available(self) -> bool:
        return True

    def train(self, request, progress):
        self.requests.append(request)
        progress({"step": 1, "total": 1, "loss": 0.5})
        shutil.copytree(request.base_model, request.output_dir)
        (Path(request.output_dir) / "specdsl_train.json").write_text(json.dumps(
            {"metrics": {"train_loss": 0.5, "global_step": 1}, "params": dict(request.params)}))
        return Path(request.output_dir)


def copy_plugin(target=None, name="copy_target_plugin") -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.target = target or CopyTarget()

    @hookimpl
    def register_training_targets(register):
        register(mod.target)

    mod.register_training_targets = register_training_targets
    return mod


def registry_with(*plugins):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return build_registry(extra_plugins=plugins)


@pytest.fixture(autouse=True)
def _only_builtins_by_default(monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")


def write_spec(folder: Path, model_dir: Path, train: str) -> Path:
    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"Answer: {2 * i}"}]} for i in range(3)]
    (folder / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    spec = folder / "s.yaml"
    spec.write_text(f"""specdsl: 1
name: plugin-target
models:
  student: {{backend: transformers, model: {model_dir}}}
sources:
  chats: {{path: chats.jsonl}}
steps:
  - id: sft
    train: {train}
""")
    return spec


def column(spec: Path, text: str) -> int:
    """The 1-based column of ``text`` on the train step's line (line 9)."""
    return spec.read_text().splitlines()[8].index(text) + 1


def spec_errors(spec: Path, registry) -> SpecErrors:
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(spec, registry=registry, identities=False)
    return info.value


def test_the_builtin_targets_publish_trls_parameters():
    registry = registry_with()
    for name in ("cpu", "cuda"):
        target = registry.targets[name]
        assert isinstance(target, TrainingTarget)
        assert target.params_schema["properties"] == PARAMS_SCHEMA["properties"]
    # Built from the registry, the step's keys are the static fallback's (which the recipes copy).
    schema = TrainOp().schema_for(registry)
    assert schema["properties"] == TrainOp.params_schema["properties"]
    assert [rule["if"]["properties"]["target"]["const"] for rule in schema["allOf"]] == ["cpu", "cuda"]


def test_the_step_schema_is_the_union_of_the_targets_and_each_named_target_gets_its_own():
    other = CopyTarget()
    other.name, other.params_schema = "copy2", {"type": "object", "required": ["flavour"],
                                                "properties": {"flavour": {"type": "integer"}, "depth": {}}}
    registry = registry_with(copy_plugin(), copy_plugin(other, name="copy2_plugin"))
    schema = TrainOp().schema_for(registry)
    props = schema["properties"]
    assert set(PARAMS_SCHEMA["properties"]) | {"flavour", "depth"} <= set(props)
    # Two targets define `flavour` differently: the union accepts either, each target's rule its own.
    assert props["flavour"] == {"anyOf": [{"enum": ["a", "b"], "description": "which copy"}, {"type": "integer"}]}
    rules = {rule["if"]["properties"]["target"]["const"]: rule["then"] for rule in schema["allOf"]}
    assert set(rules) == {"cpu", "cuda", "copy", "copy2"}
    assert set(rules["copy"]["properties"]) == {"from", "model", "target", "loss", "mask", "output", "allow_outside",
                                                "meta", "flavour"}
    assert rules["copy"]["properties"]["flavour"] == {"enum": ["a", "b"], "description": "which copy"}
    assert rules["copy2"]["required"] == ["flavour"] and rules["cpu"]["additionalProperties"] is False


def test_validate_checks_a_plugin_targets_parameters_at_their_keys(tmp_path, tiny_model_dir):
    registry = registry_with(copy_plugin())
    spec = write_spec(tmp_path, tiny_model_dir, "{from: chats, model: student, target: copy, flavour: c}")
    exc = spec_errors(spec, registry)
    assert [(e.code, e.pos.line, e.pos.col) for e in exc.errors] == [("S103", 9, column(spec, "c}"))], exc.render()
    assert "'c' is not one of ['a', 'b']" in exc.errors[0].message and "'a', 'b'" in exc.errors[0].hint

    # TRL's parameters are not the copy target's ...
    spec = write_spec(tmp_path, tiny_model_dir, "{from: chats, model: student, target: copy, epochs: 2}")
    exc = spec_errors(spec, registry)
    assert [(e.code, e.pos.line, e.pos.col) for e in exc.errors] == [("S104", 9, column(spec, "epochs"))], exc.render()
    assert "unknown key 'epochs'" in exc.errors[0].message
    # ... nor is flavour the cpu target's.
    spec = write_spec(tmp_path, tiny_model_dir, "{from: chats, model: student, target: cpu, flavour: a}")
    exc = spec_errors(spec, registry)
    assert [(e.code, e.pos.line, e.pos.col) for e in exc.errors] == [("S104", 9, column(spec, "flavour"))], exc.render()
    # Without the plugin, flavour is no target's parameter at all.
    spec = write_spec(tmp_path, tiny_model_dir, "{from: chats, model: student, flavour: a}")
    assert "unknown key 'flavour'" in spec_errors(spec, registry_with()).errors[0].message

    for train in ("{from: chats, model: student, target: copy, flavour: a}",
                  "{from: chats, model: student, flavour: b, epochs: 1}"):  # auto: any target's parameters
        spec = write_spec(tmp_path, tiny_model_dir, train)
        api.compile_spec(spec, registry=registry, identities=False)


def test_a_run_hands_the_plugin_target_exactly_its_own_parameters(tmp_path, tiny_model_dir):
    plugin = copy_plugin()
    registry = registry_with(plugin)
    spec = write_spec(tmp_path, tiny_model_dir, "{from: chats, model: student, target: copy, flavour: a, mask: false}")
    plan = api.compile_spec(spec, registry=registry)
    result = api.run_plan(plan, store_dir=tmp_path / "store", registry=registry, progress=False)
    assert result.ok, [n.to_dict() for n in result.nodes]
    (request,) = plugin.target.requests
    assert dict(request.params) == {"flavour": "a"}
    assert Path(request.base_model) == tiny_model_dir and request.card["spec"] == "plugin-target"
    (row,) = result.rows("sft")
    assert (row["train_loss"], row["steps"]) == (0.5, 1)
    (record,) = (tmp_path / "store").rglob("specdsl_train.json")  # the output, committed to the store
    assert json.loads(record.read_text())["params"] == {"flavour": "a"}
    assert (record.parent / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()


def test_auto_passes_the_chosen_target_only_its_own_parameters_and_says_so(tmp_path, tiny_model_dir):
    """`target: auto` takes any registered target's parameters; the one it chooses (here the built-in cpu
    or cuda, which would refuse an unknown parameter) gets its own, and the run notes the rest."""
    registry = registry_with(copy_plugin())
    spec = write_spec(tmp_path, tiny_model_dir, "{from: chats, model: student, flavour: b, max_steps: 1, "
                                                "batch_size: 2}")
    result = api.run_plan(api.compile_spec(spec, registry=registry), store_dir=tmp_path / "store",
                          registry=registry, progress=False)
    assert result.ok, [n.to_dict() for n in result.nodes]
    note = result.report("sft").note
    assert "takes no flavour" in note and "name the target" in note
    (record,) = (tmp_path / "store").rglob("specdsl_train.json")
    record = json.loads(record.read_text())
    assert record["specdsl_target"] in ("cpu", "cuda") and record["metrics"]["global_step"] == 1
    assert "flavour" not in record["params"]


def test_a_recipe_passes_a_plugin_targets_parameters_to_its_train_step(tmp_path, tiny_model_dir):
    """A recipe's `train:` takes what the train step takes for the installed targets, checked the same way."""
    registry = registry_with(copy_plugin())
    (tmp_path / "problems.jsonl").write_text(
        '{"id": "p1", "category": "add", "question": "2+2?", "answer": "4"}\n')

    def spec(train: str) -> Path:
        path = tmp_path / "r.yaml"
        path.write_text(f"""specdsl: 1
name: recipe-plugin-target
models:
  student: {{backend: transformers, model: {tiny_model_dir}}}
sources:
  problems: {{path: problems.jsonl}}
vars:
  strategies: {{add: "Add."}}
steps:
  - id: orca
    use: orca.prompt_erasure
    with: {{source: problems, teacher: student, student: student, strategies: strategies, train: {train}}}
""")
        return path

    plan = api.compile_spec(spec("{target: copy, flavour: b}"), registry=registry, identities=False)
    assert plan.node("orca").params["flavour"] == "b"
    errors = spec_errors(spec("{target: copy, flavour: c}"), registry)
    assert errors.codes == ["S103"] and errors.errors[0].pos.line == 12  # at the value, in the recipe's `with:`
    assert "allowed: 'a', 'b'" in errors.errors[0].hint
    # Without the plugin, `flavour` is no train parameter at all.
    assert spec_errors(spec("{target: copy, flavour: b}"), registry_with()).codes
