"""``tokenize``: render each sample with the student's own chat template and turn its spans into labels.

Train steps lower to a tokenize node feeding the train node, so the exact tokens and labels the loss
will see are a cached table that ``specdsl inspect`` can show before any training runs. Each row is
tokenized on its own (row-parallel: a batch in, a batch out, on any executor); the one check about the
whole table, that some sample carries loss, is made from per-batch counts after the last batch.
"""

from __future__ import annotations

from typing import Any, Mapping

from specdsl.errors import RunError
from specdsl.contract.ops import MODEL_REF, STEP_REF, CheckContext, Estimate, Rows, RunContext, StepOp, obj_schema

TOKENIZED_COLUMNS = ("id", "input_ids", "labels", "n_tokens", "n_trained", "text", "spans", "truncated")
# Carried through for inspection (IN2 key positions, the erased instruction shown struck through).
TOKENIZE_PASSTHROUGH = ("key_positions", "erased_system")


class TokenizeOp(StepOp):
    name = "tokenize"
    row_parallel = True  # stateless per row: an executor may split the rows (the tokenizer loads per process)
    requires = (("transformers", "local"),)  # the model's tokenizer
    description = "render samples with the model's chat template; labels are -100 outside the trained spans"
    model_keys = ("model",)
    params_schema = obj_schema({
        "from": STEP_REF,
        "model": MODEL_REF,
        "max_length": {"type": "integer", "minimum": 8, "description": "longer samples are cut (default: none)"},
        "loss": {"enum": ["assistant", "completion", "all"], "description": "which text carries loss"},
        "mask": {"type": "boolean", "description": "false: loss on everything the assistant says (ablation)"},
    }, required=["from", "model"])

    def estimate(self, params: Mapping[str, Any], input_rows: int | None, services: Any) -> Estimate:
        # A row per input row, but not the input's rows: no sample rows for estimates downstream to render
        # their prompts on (a row-parallel op would otherwise pass its input's on).
        return Estimate(details={"rows": input_rows}, sample_rows=())

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        check_trainable(ctx)
        return TOKENIZED_COLUMNS + tuple(c for c in TOKENIZE_PASSTHROUGH if c in ctx.columns)

    def run(self, ctx: RunContext) -> Rows:
        from specdsl.designs.masking import TemplateMaskError, render_chat, render_prompt_completion, tokenize_with_mask

        p = ctx.params
        tokenizer = ctx.services.tokenizer(p["model"])
        loss = p.get("loss", "assistant")
        unmasked = p.get("mask", True) is False
        out = []
        for row in ctx.rows:
            try:
                if "messages" in row and row["messages"] is not None:
                    messages = row["messages"]
                    if unmasked:  # the ablation: every part the assistant says carries loss
                        messages = [_unmask(m) for m in messages]
                    sample = render_chat(tokenizer, messages, trained="all" if loss == "all" else ("assistant",))
                else:
                    sample = render_prompt_completion(tokenizer, row["prompt"], row["completion"])
                enc = tokenize_with_mask(tokenizer, sample, max_length=p.get("max_length"))
            except (TemplateMaskError, ValueError, KeyError) as exc:
                raise RunError(f"cannot tokenize row id={row.get('id')!r}: {exc}", node=ctx.node_id,
                               hint="check the format step's output for this row (its messages or prompt and "
                                    "completion)") from None
            new: dict[str, Any] = {
                "id": row.get("id"), "input_ids": enc["input_ids"], "labels": enc["labels"],
                "n_tokens": enc["num_tokens"], "n_trained": enc["num_trained_tokens"], "text": sample.text,
                "spans": [[s.start, s.end, s.trained, s.label] for s in sample.spans],
                "truncated": enc["truncated"],
            }
            for extra in TOKENIZE_PASSTHROUGH:
                if extra in row:
                    new[extra] = row[extra]
            out.append(new)
        return out

    def batch_summary(self, ctx: RunContext, rows: Rows) -> dict[str, int]:
        return {"rows": len(rows), "trained": sum(1 for r in rows if r["n_trained"])}

    def after_batches(self, ctx: RunContext, summaries: list[dict[str, int]]) -> None:
        if sum(s["rows"] for s in summaries) and not sum(s["trained"] for s in summaries):
            raise RunError("no token carries loss in any sample", node=ctx.node_id,
                           hint="check the format step: the assistant message or completion is empty or truncated")


def _unmask(message: dict) -> dict:
    if message.get("role") != "assistant" or isinstance(message.get("content"), str):
        return message
    parts = [{**part, "trained": True} if isinstance(part, dict) else part for part in message["content"]]
    return {**message, "content": parts, "trained": True}


def check_trainable(ctx: CheckContext) -> None:
    cols = set(ctx.columns)
    if "messages" not in cols and not {"prompt", "completion"} <= cols:
        ctx.error("S402", "a train step reads chat `messages` or `prompt`/`completion` columns; its input has neither",
                  "from", hint=f"add a `format` step first (columns here: {', '.join(ctx.columns) or 'none'})")
