"""``train``: fine-tune a local model with TRL on the tokenized table (exact labels, -100 outside the loss).

Lowers to ``<id>.tokens`` (tokenize) feeding ``<id>`` (train). The trained model lives in the store under
the train node's fingerprint and can be used by later steps (generate, evaluate) by the step's id.
"""

from __future__ import annotations

from typing import Any

from specdsl.errors import RunError
from specdsl.contract.ops import MODEL_REF, STEP_REF, CheckContext, Rows, RunContext, StepOp, obj_schema
from specdsl.ops.tokenize import check_trainable

# Keys of the train step itself; everything else is the training target's own parameters, whose schema
# the target publishes (one source of truth for what `train:` accepts).
STEP_KEYS = ("from", "model", "target", "loss", "mask", "meta")


def _target_params_schema() -> dict[str, Any]:
    from specdsl.training.trl.config import PARAMS_SCHEMA

    return dict(PARAMS_SCHEMA.get("properties", {}))


class TrainOp(StepOp):
    name = "train"
    kind = "train"
    description = "fine-tune a local model with TRL's SFTTrainer (full or LoRA) on CPU, CUDA or several processes"
    model_keys = ("model",)
    sink_op = True
    params_schema = obj_schema({
        "from": STEP_REF,
        "model": {**MODEL_REF, "description": "the base model (a `backend: transformers` model)"},
        "target": {"type": "string", "minLength": 1,
                   "description": "a training target (built in: cpu, cuda; `auto` picks cuda when available)"},
        "loss": {"enum": ["assistant", "completion", "all"], "description": "which text carries loss (default: assistant)"},
        "mask": {"type": "boolean", "description": "false switches a design's partial masking off (ablation)"},
        **_target_params_schema(),
    }, required=["from", "model"])

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        check_trainable(ctx)
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

    def run(self, ctx: RunContext) -> tuple[Rows, dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from specdsl.contract.hookspecs import TrainRequest

        p = dict(ctx.params)
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
                "data_fingerprint": ctx.services.plan.node(ctx.node_id).input("from"),
                "mask_policy": _mask_policy(p), "rows": len(rows), "tokens": total_tokens,
                "trained_tokens": sum(r.get("n_trained", 0) for r in rows)}
        card["data_fingerprint"] = ctx.services.plan.node(card["data_fingerprint"]).fingerprint
        target_params = {k: v for k, v in p.items() if k not in STEP_KEYS}
        request = TrainRequest(base_model=base, dataset=data, output_dir=ctx.artifact_dir / "model",
                               params=target_params, seed=p.get("seed", ctx.seed), card=card)
        progress = ctx.services.progress_callback(ctx.node_id, unit="step")
        out_dir = target.train(request, progress)
        data.unlink(missing_ok=True)  # the tokenized table is already in the store
        metrics: dict[str, Any] = {}
        record_file = out_dir / "specdsl_train.json"  # the target's record: params, choices, metrics
        if record_file.exists():
            import json

            metrics = json.loads(record_file.read_text()).get("metrics", {})
        row = {"model_dir": out_dir.name, "train_loss": metrics.get("train_loss"), "steps": metrics.get("global_step"),
               "train_tokens": total_tokens}
        return [row], {"model_dir": out_dir.relative_to(ctx.artifact_dir).as_posix(), "target": target.name,
                       "metrics": metrics}


def _mask_policy(p: dict) -> str:
    loss = p.get("loss", "assistant")
    policy = {"assistant": "loss on assistant turns only (prompt and system masked)",
              "completion": "loss on the completion only", "all": "loss on every token"}[loss]
    if p.get("mask") is False:
        policy += "; partial answer masking switched off (ablation)"
    return policy
