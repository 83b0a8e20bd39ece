"""``train``: fine-tune a local model on the tokenized table (exact labels, -100 outside the loss).

Lowers to ``<id>.tokens`` (tokenize) feeding ``<id>`` (train). The trained model lives in the store under
the train node's fingerprint and can be used by later steps (generate, evaluate) by the step's id.

The step's own keys are :data:`STEP_KEYS`; every other key is a parameter of the training target, which
publishes the ones it accepts as its ``params_schema`` (see :class:`~specdsl.contract.hookspecs.TrainingTarget`).
:meth:`TrainOp.schema_for` builds the step's schema from the registered targets, and the run passes the
chosen target only the parameters it publishes.
"""

from __future__ import annotations

from typing import Any, Mapping

from specdsl.errors import RunError
from specdsl.contract.ops import (MODEL_REF, STEP_REF, CheckContext, Estimate, HelperNode, Rows, RunContext, StepOp,
                                  obj_schema)
from specdsl.ops.outputs import ALLOW_OUTSIDE, check_output_path
from specdsl.ops.tokenize import TOKENIZE_PASSTHROUGH, TOKENIZED_COLUMNS, check_trainable

# A train step lowers to a tokenize node (exact masks, inspectable) with this suffix, feeding the train node.
TOKENIZE_SUFFIX = ".tokens"

# Keys of the train step itself; everything else is the training target's own parameters, whose schema
# the target publishes (one source of truth for what `train:` accepts).
STEP_KEYS = ("from", "model", "target", "loss", "mask", "output", "allow_outside", "meta")

_STEP_PROPERTIES: dict[str, Any] = {
    "from": STEP_REF,
    "model": {**MODEL_REF, "description": "the base model (a `backend: transformers` model)"},
    "target": {"type": "string", "minLength": 1,
               "description": "a training target (built in: cpu, cuda; `auto` picks cuda when available)"},
    "loss": {"enum": ["assistant", "completion", "all"], "description": "which text carries loss (default: assistant)"},
    "mask": {"type": "boolean", "description": "false switches a design's partial masking off (ablation)"},
    "output": {"type": "string", "minLength": 1,
               "description": "a folder, relative to the spec, that receives a portable copy of the trained model "
                              "or adapter (the store keeps its own)"},
    "allow_outside": ALLOW_OUTSIDE,
}


def target_properties(target: Any) -> dict[str, Any] | None:
    """The ``train:`` parameters a target publishes (its ``params_schema`` properties, less the step's own
    keys), or None when it publishes no ``params_schema``."""
    schema = getattr(target, "params_schema", None)
    if not isinstance(schema, Mapping):
        return None
    props = schema.get("properties")
    return {k: v for k, v in props.items() if k not in STEP_KEYS} if isinstance(props, Mapping) else {}


def _builtin_properties() -> dict[str, Any]:
    # The static schema names the built-in TRL targets' parameters (config.py imports nothing heavy).
    from specdsl.training.trl.config import PARAMS_SCHEMA

    return {k: v for k, v in PARAMS_SCHEMA["properties"].items() if k not in STEP_KEYS}


class TrainOp(StepOp):
    name = "train"
    kind = "train"
    description = "fine-tune a local model with TRL's SFTTrainer (full or LoRA) on CPU, CUDA or several processes"
    model_keys = ("model",)
    sink_op = True
    model_backend = "transformers"  # later steps generate with the trained model through the local backend
    # The static schema: the step's keys and the built-in targets' parameters. The spec schema uses
    # schema_for(registry) instead; this one serves code that has no registry (the recipes' `train:`).
    params_schema = obj_schema({**_STEP_PROPERTIES, **_builtin_properties()}, required=["from", "model"])

    def schema_for(self, registry: Any) -> dict[str, Any]:
        """The step's schema for the targets in ``registry``.

        The step's keys, plus every parameter some registered target publishes in its ``params_schema``
        (a key two targets define differently accepts either definition). A step that names its target
        (``target: NAME``) may use only that target's parameters: one ``if target == NAME then`` rule per
        target that publishes a schema. With ``target: auto`` (or none) the union applies.
        """
        published = {name: props for name, target in sorted(getattr(registry, "targets", {}).items())
                     if (props := target_properties(target)) is not None}
        union: dict[str, Any] = {}
        for props in published.values():
            for key, schema in props.items():
                if key not in union:
                    union[key] = schema
                elif schema != union[key]:
                    options = list(union[key]["anyOf"]) if set(union[key]) == {"anyOf"} else [union[key]]
                    union[key] = {"anyOf": options + ([schema] if schema not in options else [])}
        schema = obj_schema({**_STEP_PROPERTIES, **union}, required=["from", "model"])
        own_keys = {key: True for key in (*_STEP_PROPERTIES, "meta")}  # already checked by the schema above
        rules = []
        for name, props in published.items():
            # A value the union already checks exactly is not checked again: the rule only limits the keys.
            mine = {key: True if union[key] == value else value for key, value in props.items()}
            then: dict[str, Any] = {"properties": {**own_keys, **mine}, "additionalProperties": False}
            required = getattr(registry.targets[name], "params_schema", {}).get("required")
            if required:
                then["required"] = list(required)
            rules.append({"if": {"properties": {"target": {"const": name}}, "required": ["target"]}, "then": then})
        if rules:
            schema["allOf"] = rules
        return schema

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        check_trainable(ctx)
        check_output_path(ctx, "output")
        target = ctx.params.get("target", "auto")
        if ctx.registry is not None and target != "auto" and target not in ctx.registry.targets:
            from specdsl.errors import did_you_mean

            ctx.error("S212", f"unknown training target '{target}'", "target",
                      hint=did_you_mean(str(target), list(ctx.registry.targets) + ["auto"]))
        base = ctx.params.get("model")
        backend = ctx.models.get(base) if isinstance(base, str) else None
        if backend not in (None, "transformers", "trained"):
            ctx.error("S401", f"model '{base}' is served by '{backend}'; training needs a local transformers model",
                      "model", hint="declare the student with `backend: transformers`")
        return ("model_dir", "train_loss", "steps", "train_tokens")

    def expand(self, ctx: CheckContext) -> tuple[HelperNode, ...]:
        """The tokenize node in front of training: the exact tokens and labels are a cached table."""
        params = {k: ctx.params[k] for k in ("max_length", "loss", "mask") if k in ctx.params}
        params["model"] = ctx.params.get("model")
        columns = TOKENIZED_COLUMNS + tuple(c for c in TOKENIZE_PASSTHROUGH if c in ctx.columns)
        return (HelperNode(TOKENIZE_SUFFIX, "tokenize", params, columns),)

    def backend_label(self, params: Mapping[str, Any]) -> str:
        return f"trl:{params.get('target', 'auto')}"

    def estimate(self, params: Mapping[str, Any], input_rows: int | None, services: Any) -> Estimate:
        """Tokens trained: samples x a typical length (capped by max_length) x epochs. Rough by design."""
        tokens = None
        if input_rows is not None:
            tokens = int(input_rows * min(params.get("max_length") or 512, 256) * params.get("epochs", 1))
        return Estimate(rows=1, details={"rows": input_rows, "train_tokens": tokens})

    def outputs_current(self, params: Mapping[str, Any], fingerprint: str, spec_file: str) -> bool:
        """Whether the ``output:`` folder still holds the trained model unchanged (always, without one).
        When it does not, the node runs again and copies the model from the store: no training."""
        if not params.get("output"):
            return True
        from specdsl.ops.model_output import output_current

        return output_current(params, fingerprint, spec_file)

    def run(self, ctx: RunContext) -> tuple[Rows, dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from specdsl.contract.hookspecs import TrainRequest
        from specdsl.ops.model_output import publish_model, trained_before

        p = dict(ctx.params)
        done = trained_before(ctx)
        if done is not None:  # only the output folder was missing or changed: copy, do not train again
            rows, meta = done
            meta["artifacts"] = [{"kind": "model", "path": meta["model_dir"]},
                                 publish_model(ctx, ctx.services.store.node_dir(
                                     ctx.services.plan.node(ctx.node_id).fingerprint) / meta["model_dir"])]
            return rows, meta
        rows = ctx.rows
        if not rows:
            raise RunError("nothing to train on: the input table is empty", node=ctx.node_id,
                           hint="check the filters upstream (`specdsl inspect` shows each node's rows)")
        data = ctx.artifact_dir / "train.parquet"
        pq.write_table(pa.table({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}),
                       data)
        base = ctx.services.model_dir(p["model"])
        target = ctx.services.training_target(p.get("target", "auto"))
        total_tokens = sum(len(r["input_ids"]) for r in rows)
        card = {"spec": ctx.services.plan.name, "spec_file": ctx.services.plan.spec_file, "node": ctx.node_id,
                "base_model_id": _base_model_id(ctx, p["model"]),
                "data_fingerprint": ctx.services.plan.node(ctx.node_id).input("from"),
                "mask_policy": _mask_policy(p), "rows": len(rows), "tokens": total_tokens,
                "trained_tokens": sum(r.get("n_trained", 0) for r in rows)}
        card["data_fingerprint"] = ctx.services.plan.node(card["data_fingerprint"]).fingerprint
        target_params = _params_for(target, p)
        ignored = sorted(set(p) - set(STEP_KEYS) - set(target_params))
        if ignored:
            # Valid for another registered target (the schema checked them against all): `target: auto`
            # chose one that does not take them.
            ctx.services.note(ctx.node_id, f"training target '{target.name}' takes no {', '.join(ignored)}; "
                                           "not passed to it (name the target with `target:` to require them)")
        request = TrainRequest(base_model=base, dataset=data, output_dir=ctx.artifact_dir / "model",
                               params=target_params, seed=p.get("seed", ctx.seed), card=card)
        progress = ctx.services.progress_callback(ctx.node_id, unit="step", label=f"{p.get('model')} · {target.name}")
        out_dir = target.train(request, progress)
        data.unlink(missing_ok=True)  # the tokenized table is already in the store
        metrics: dict[str, Any] = {}
        record_file = out_dir / "specdsl_train.json"  # the target's record: params, choices, metrics
        if record_file.exists():
            import json

            metrics = json.loads(record_file.read_text()).get("metrics", {})
        row = {"model_dir": out_dir.name, "train_loss": metrics.get("train_loss"), "steps": metrics.get("global_step"),
               "train_tokens": total_tokens}
        model_dir = out_dir.relative_to(ctx.artifact_dir).as_posix()
        artifacts = [{"kind": "model", "path": model_dir}]
        if p.get("output"):
            artifacts.append(publish_model(ctx, out_dir))
        return [row], {"model_dir": model_dir, "target": target.name, "metrics": metrics, "artifacts": artifacts}


def _base_model_id(ctx: RunContext, ref: str) -> str | None:
    """The base model's Hub id when it is a known model (the embedded default knows its own), else None."""
    from specdsl.modelcache.known import hub_id

    services = ctx.services
    if services.is_trained(ref):
        return None
    return hub_id(services.plan.model(ref).model)


def _params_for(target: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """The step's parameters a target receives: those its ``params_schema`` lists; without one, every key
    that is not the step's own (what targets received before they published schemas)."""
    own = target_properties(target)
    return {k: v for k, v in params.items() if k not in STEP_KEYS and (own is None or k in own)}


def _mask_policy(p: dict) -> str:
    loss = p.get("loss", "assistant")
    policy = {"assistant": "loss on assistant turns only (prompt and system masked)",
              "completion": "loss on the completion only", "all": "loss on every token"}[loss]
    if p.get("mask") is False:
        policy += "; partial answer masking switched off (ablation)"
    return policy
