"""``train``: fine-tune a local model with TRL on the tokenized table (exact labels, -100 outside the loss).

Lowers to ``<id>.tokens`` (tokenize) feeding ``<id>`` (train). The trained model lives in the store under
the train node's fingerprint and can be used by later steps (generate, evaluate) by the step's id.
"""

from __future__ import annotations

from typing import Any

from ..errors import RunError
from .base import MODEL_REF, STEP_REF, CheckContext, Rows, RunContext, StepOp, obj_schema
from .tokenize import check_trainable

LORA = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "r": {"type": "integer", "minimum": 1, "maximum": 1024},
        "alpha": {"type": "number", "exclusiveMinimum": 0},
        "dropout": {"type": "number", "minimum": 0, "maximum": 1},
        "target_modules": {"oneOf": [{"type": "array", "items": {"type": "string"}}, {"const": "all-linear"}]},
        "merge": {"type": "boolean", "description": "merge the adapter into the base weights at the end"},
    },
}


class TrainOp(StepOp):
    name = "train"
    kind = "train"
    description = "fine-tune a local model with TRL's SFTTrainer (full or LoRA) on CPU, CUDA or several processes"
    model_keys = ("model",)
    sink_op = True
    params_schema = obj_schema({
        "from": STEP_REF,
        "model": {**MODEL_REF, "description": "the base model (a `backend: transformers` model)"},
        "target": {"enum": ["auto", "cpu", "cuda"], "description": "where to train (default: auto)"},
        "loss": {"enum": ["assistant", "completion", "all"], "description": "which text carries loss (default: assistant)"},
        "mask": {"type": "boolean", "description": "false switches a design's partial masking off (ablation)"},
        "lora": LORA,
        "epochs": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
        "max_steps": {"type": "integer", "minimum": 1},
        "learning_rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 4096},
        "gradient_accumulation": {"type": "integer", "minimum": 1},
        "max_length": {"type": "integer", "minimum": 8, "maximum": 1048576},
        "packing": {"type": "boolean"},
        "warmup_ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "lr_scheduler": {"enum": ["linear", "cosine", "constant", "constant_with_warmup"]},
        "weight_decay": {"type": "number", "minimum": 0},
        "processes": {"type": "integer", "minimum": 1, "maximum": 1024, "description": "data-parallel processes (accelerate launch)"},
        "nodes": {"type": "integer", "minimum": 1, "maximum": 1024, "description": "machines (accelerate launch on each)"},
        "strategy": {"enum": ["ddp", "fsdp", "deepspeed"]},
        "compile": {"type": "boolean", "description": "torch.compile the model (cuda)"},
        "max_tokens_per_batch": {"type": "integer", "minimum": 64, "description": "cuda: token budget per batch"},
        "seed": {"type": "integer", "minimum": 0},
    }, required=["from", "model"])

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        check_trainable(ctx)
        base = ctx.params.get("model")
        backend = ctx.models.get(base) if isinstance(base, str) else None
        if backend not in (None, "transformers", "trained"):
            ctx.error("S401", f"model '{base}' is served by '{backend}'; training needs a local transformers model",
                      "model", hint="declare the student with `backend: transformers`")
        if ctx.params.get("nodes", 1) > 1 and ctx.params.get("processes", 1) < ctx.params.get("nodes", 1):
            ctx.error("S401", "`processes` counts all processes across nodes; it must be >= `nodes`", "processes")
        return ("model_dir", "train_loss", "steps", "train_tokens")

    def run(self, ctx: RunContext) -> tuple[Rows, dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ..hookspecs import TrainRequest

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
        request = TrainRequest(base_model=base, dataset=data, output_dir=ctx.artifact_dir / "model",
                               params=p, seed=p.get("seed", ctx.seed), card=card)
        progress = ctx.services.progress_callback(ctx.node_id, unit="step")
        out_dir = target.train(request, progress)
        data.unlink(missing_ok=True)  # the tokenized table is already in the store
        metrics = {}
        metrics_file = out_dir / "train_metrics.json"
        if metrics_file.exists():
            import json

            metrics = json.loads(metrics_file.read_text())
        row = {"model_dir": out_dir.name, "train_loss": metrics.get("train_loss"), "steps": metrics.get("steps"),
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
