"""The ops of the three data designs: ``erase_prompt`` (Orca 2), ``pam`` (self-correction with partial
answer masking), ``segment`` and ``interleave`` (IN2). Each wraps the pure functions of
:mod:`specdsl.designs` with compile-time checks and run-time error messages that name the row.
"""

from __future__ import annotations

import random

from specdsl.errors import RunError
from typing import Any, Mapping

from specdsl.contract.ops import (COLUMN, MODEL_REF, STEP_REF, CheckContext, Estimate, Rows, RunContext, StepOp,
                                  obj_schema)


def _generic_default() -> str:
    from specdsl.designs.erase import DEFAULT_GENERIC_SYSTEM

    return DEFAULT_GENERIC_SYSTEM


class ErasePromptOp(StepOp):
    row_parallel = True  # stateless per row: an executor may split the rows
    name = "erase_prompt"
    description = "Orca 2 prompt erasure: keep the user prompt and the teacher's answer, replace the detailed " \
                  "system instruction with a generic one"
    params_schema = obj_schema({
        "from": STEP_REF,
        "answer": {**COLUMN, "description": "the teacher's answer (default: response)"},
        "prompt": {**COLUMN, "description": "the messages the teacher saw (default: <answer>_prompt)"},
        "user": {**COLUMN, "description": "take the user prompt from this column instead of the teacher's messages"},
        "generic_system": {"type": ["string", "null"],
                           "description": "the generic system message (default: Orca 2's); null or '' for none"},
        "into": {**COLUMN, "description": "default: messages"},
    }, required=["from"])

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        p = ctx.params
        answer = p.get("answer", "response")
        ctx.column(answer, "answer" if "answer" in p else "from")
        if p.get("user"):
            ctx.column(p["user"], "user")
        else:
            ctx.column(p.get("prompt", f"{answer}_prompt"), "prompt" if "prompt" in p else "from")
        prompt_col = p.get("prompt", f"{answer}_prompt")
        # The teacher's messages hold the detailed instruction: they must not flow on to training.
        cols = [c for c in ctx.columns if c != prompt_col]
        return tuple(cols) + (p.get("into", "messages"), "erased_system")

    def run(self, ctx: RunContext) -> Rows:
        from specdsl.designs.erase import ErasureLeakError, erase_row

        p = ctx.params
        answer = p.get("answer", "response")
        prompt_col = p.get("prompt", f"{answer}_prompt")
        generic = p.get("generic_system", _generic_default())
        out = []
        for row in ctx.rows:
            prompt = row.get(prompt_col) or []
            system = next((m["content"] for m in prompt if m.get("role") == "system"), "")
            user = row.get(p["user"]) if p.get("user") else next(
                (m["content"] for m in reversed(prompt) if m.get("role") == "user"), None)
            work = {**{k: v for k, v in row.items() if k != prompt_col}, "__user": user, "__system": system,
                    "__answer": row.get(answer)}
            try:
                new = erase_row(work, user_field="__user", answer_field="__answer", system_field="__system",
                                generic_system=generic, into=p.get("into", "messages"))
            except ErasureLeakError as exc:
                raise RunError(f"row id={row.get('id')!r}: {exc}", node=ctx.node_id,
                               hint="the detailed instruction would reach the student; drop such rows upstream") from None
            except ValueError as exc:
                raise RunError(f"row id={row.get('id')!r}: {exc}", node=ctx.node_id,
                               hint="filter out rows without an answer before erasing") from None
            for k in ("__user", "__answer", "__system"):
                new.pop(k, None)
            new["erased_system"] = system
            out.append(new)
        return out


class PamOp(StepOp):
    row_parallel = True  # stateless per row: an executor may split the rows
    name = "pam"
    description = "self-correction samples with partial answer masking: no loss on a wrong initial answer"
    drops_rows = True  # a row without a usable correction makes no sample
    params_schema = obj_schema({
        "from": STEP_REF,
        "question": {**COLUMN, "description": "default: question"},
        "gold": {**COLUMN, "description": "the gold answer (default: answer)"},
        "initial": {**COLUMN, "description": "the initial answer with its reasoning (default: initial_answer)"},
        "corrected": {**COLUMN, "description": "the corrected answer for bad cases (default: corrected_answer)"},
        "verification": {**COLUMN, "description": "optional: a written negative verification for bad cases"},
        "rule": {"enum": ["exact", "contains", "regex", "number"], "description": "answer matcher (default: number)"},
        "pattern": {"type": "string", "description": "with rule: regex, the regex whose first group is the answer"},
        "mask": {"type": "boolean", "description": "partial answer masking (default: true; false = the ablation)"},
        "system": {"type": "string", "description": "a system message for the samples (default: none)"},
        "separator": {"type": "string", "description": "between the parts of a sample (default: the paper's)"},
        "negative_verification": {"type": "string",
                                  "description": "the verification after a wrong answer (default: the paper's)"},
        "positive_verification": {"type": "string",
                                  "description": "the verification after a right answer (default: the paper's)"},
        "into": {**COLUMN, "description": "default: messages"},
    }, required=["from"])

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        p = ctx.params
        for key, default in (("question", "question"), ("gold", "answer"), ("initial", "initial_answer"),
                             ("corrected", "corrected_answer")):
            ctx.column(p.get(key, default), key if key in p else "from")
        if p.get("verification"):
            ctx.column(p["verification"], "verification")
        return tuple(ctx.columns) + (p.get("into", "messages"), "case", "initial_correct")

    def run(self, ctx: RunContext) -> Rows:
        from specdsl.designs.pam import DEFAULT_FORMAT, SelfCorrectionFormat, self_correction_row

        p = ctx.params
        fmt = SelfCorrectionFormat(
            separator=p.get("separator", DEFAULT_FORMAT.separator),
            negative_verification=p.get("negative_verification", DEFAULT_FORMAT.negative_verification),
            positive_verification=p.get("positive_verification", DEFAULT_FORMAT.positive_verification))
        out = []
        for row in ctx.rows:
            try:
                new = self_correction_row(
                    row, question_field=p.get("question", "question"), gold_field=p.get("gold", "answer"),
                    initial_field=p.get("initial", "initial_answer"),
                    corrected_field=p.get("corrected", "corrected_answer"),
                    verification_field=p.get("verification"), rule=p.get("rule", "number"),
                    pattern=p.get("pattern"), pam=p.get("mask", True), fmt=fmt, system=p.get("system"),
                    into=p.get("into", "messages"))
            except ValueError as exc:
                raise RunError(f"row id={row.get('id')!r}: {exc}", node=ctx.node_id,
                               hint="check this row's values in the step's input (`specdsl inspect`)") from None
            if new is not None:  # rows without a usable (correct) correction cannot make a sample
                out.append(new)
        return out


def _counter(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_ids(tokenizer, texts: list[str]) -> dict[str, list[int]]:
    """Each distinct text's token ids, from one batch call (the same ids as one call per text)."""
    distinct = list(dict.fromkeys(texts))
    if not distinct:
        return {}
    return dict(zip(distinct, tokenizer(distinct, add_special_tokens=False)["input_ids"]))


def _decodes_concatenatively(tokenizer) -> bool:
    """Whether ``decode(a + b) == decode(a) + decode(b)`` for id lists that start where a text starts.

    True of a byte-level BPE decoder alone with no clean-up (decoding is the UTF-8 of the concatenated
    bytes, replacement characters included); anything else (SentencePiece's leading-space strip, word
    pieces, clean-up of spaces before punctuation) is not assumed to be, and takes the exact path.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel" and not getattr(tokenizer, "clean_up_tokenization_spaces", True)


class SegmentOp(StepOp):
    row_parallel = True  # each text is cut on its own: an executor may split the rows
    name = "segment"
    # 2: each segment's token ids are kept (`<into>_ids`, or `segments_ids` per text). The tokenizer is in
    # the fingerprint through the model's identity (its content fingerprint covers the tokenizer files).
    version = "2"
    requires = (("transformers", "local"),)  # the model's tokenizer counts tokens
    description = "IN2: cut texts into segments of at least min_tokens tokens (leftover merged into the last)"
    model_keys = ("model",)
    drops_rows = True  # an empty text has no segment (and a long one has several)
    params_schema = obj_schema({
        "from": STEP_REF,
        "text": {**COLUMN, "description": "the column holding the text (default: text)"},
        "model": {**MODEL_REF, "description": "whose tokenizer counts tokens"},
        "min_tokens": {"type": "integer", "minimum": 1, "maximum": 100000, "description": "default: 128"},
        "per": {"enum": ["segment", "text"], "description": "one row per segment (type 1 QA) or per text with a "
                                                            "`segments` list (type 2 QA); default: segment"},
        "into": {**COLUMN, "description": "default: segment"},
    }, required=["from", "model"])

    def estimate(self, params: Mapping[str, Any], input_rows: int | None, services: Any) -> Estimate:
        # Rows depend on text lengths: known once it runs. Its rows are not its input's, so it passes no
        # sample rows on (a row-parallel op would otherwise pass its input's).
        return Estimate(rows_unknown=True, details={"rows": None}, sample_rows=())

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        p = ctx.params
        ctx.column(p.get("text", "text"), "text" if "text" in p else "from")
        base = tuple(c for c in ctx.columns if c != "id")
        if p.get("per", "segment") == "segment":
            into = p.get("into", "segment")
            return ("id", "text_id") + base + (into, f"{into}_ids", "segment_index", "n_segments")
        return ("id", "text_id") + base + ("segments", "segments_ids", "n_segments")

    def run(self, ctx: RunContext) -> Rows:
        from specdsl.designs.in2 import segment_text

        p = ctx.params
        tok = ctx.services.tokenizer(p["model"])
        count = _counter(tok)
        col, into = p.get("text", "text"), p.get("into", "segment")
        cut = []
        for row in ctx.rows:
            text = row.get(col)
            if not isinstance(text, str) or not text.strip():
                continue
            cut.append((row, segment_text(text, count, min_tokens=p.get("min_tokens", 128))))
        # Each segment's ids, from one call per batch (ids do not depend on the batch): what interleave
        # assembles contexts from.
        ids_of = _token_ids(tok, [seg for _row, segments in cut for seg in segments])
        out = []
        for row, segments in cut:
            if p.get("per", "segment") == "text":
                out.append({**row, "id": str(row["id"]), "text_id": str(row["id"]), "segments": segments,
                            "segments_ids": [ids_of[seg] for seg in segments], "n_segments": len(segments)})
                continue
            for i, seg in enumerate(segments):
                out.append({**row, "id": f"{row['id']}:{i}", "text_id": str(row["id"]), into: seg,
                            f"{into}_ids": ids_of[seg], "segment_index": i, "n_segments": len(segments)})
        return out


class InterleaveOp(StepOp):
    name = "interleave"
    requires = (("transformers", "local"),)  # the model's tokenizer assembles contexts
    description = "IN2: hide the key segment(s) of each QA pair at a random position among segments of other " \
                  "texts, in a context of a length drawn uniformly from [min_tokens, max_tokens]"
    input_keys = ("from", "pool")
    model_keys = ("model",)
    drops_rows = True  # a pair without a question, answer or key, or whose keys exceed max_tokens, is left out
    params_schema = obj_schema({
        "from": {**STEP_REF, "description": "QA rows (question, answer, and the key segment(s))"},
        "pool": {**STEP_REF, "description": "segment rows of all texts (a `segment` step, per: segment)"},
        "model": {**MODEL_REF, "description": "whose tokenizer assembles contexts on token ids"},
        "key": {**COLUMN, "description": "the key segment (a string) or segments (a list) of each row; default: segment"},
        "pool_column": {**COLUMN, "description": "the segment column of the pool (default: segment)"},
        "question": {**COLUMN, "description": "default: question"},
        "answer": {**COLUMN, "description": "default: answer"},
        "min_tokens": {"type": "integer", "minimum": 1,
                       "description": "shortest context; lengths are drawn uniformly from min_tokens..max_tokens"},
        "max_tokens": {"type": "integer", "minimum": 1, "description": "longest context (at least min_tokens)"},
        "short_ratio": {"type": "number", "minimum": 0, "maximum": 10,
                        "description": "short-context samples (the key segment alone) per long one; default 0"},
        "format": {"enum": ["chat", "film"], "description": "chat: the FILM instruction in the model's chat "
                                                           "template (default); film: the raw [INST] prompt"},
        "separator": {"type": "string", "description": "between segments (default: a blank line)"},
        "seed": {"type": "integer", "minimum": 0, "description": "sampling seed (default: the spec's seed)"},
    }, required=["from", "pool", "model", "min_tokens", "max_tokens"])

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        p = ctx.params
        lo, hi = p.get("min_tokens"), p.get("max_tokens")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            ctx.error("S401", f"min_tokens ({lo}) must be <= max_tokens ({hi})", "min_tokens",
                      hint=f"lower min_tokens or raise max_tokens (e.g. min_tokens: {hi}, max_tokens: {lo})")
        ctx.column(p.get("key", "segment"), "key" if "key" in p else "from")
        ctx.column(p.get("question", "question"), "question" if "question" in p else "from")
        ctx.column(p.get("answer", "answer"), "answer" if "answer" in p else "from")
        ctx.column(p.get("pool_column", "segment"), "pool_column" if "pool_column" in p else "pool", input_key="pool")
        out = ("id", "question", "answer", "context_tokens", "key_positions", "short", "text_id")
        return out + (("messages",) if p.get("format", "chat") == "chat" else ("prompt", "completion"))

    def run(self, ctx: RunContext) -> Rows:
        from specdsl.designs.in2 import ContextText, interleave_samples

        p = ctx.params
        tok = ctx.services.tokenizer(p["model"])
        rng = random.Random(p.get("seed", ctx.seed))
        sep = p.get("separator", "\n\n")
        sep_ids = tok(sep, add_special_tokens=False)["input_ids"] if sep else []
        pool_rows = ctx.inputs["pool"]
        pool_col = p.get("pool_column", "segment")
        # Each distinct segment text is tokenized once, in one batch call; keys that are pool segments
        # (type 1 and type 2 QA made from the pool's texts) reuse the pool's ids.
        ids_of = _token_ids(tok, [r[pool_col] for r in pool_rows])
        pool_ids = [ids_of[r[pool_col]] for r in pool_rows]
        key_col, q_col, a_col = p.get("key", "segment"), p.get("question", "question"), p.get("answer", "answer")
        rows = [r for r in ctx.rows if r.get(q_col) and r.get(a_col) and r.get(key_col)]
        key_texts = [k for r in rows for k in (r[key_col] if isinstance(r[key_col], list) else [r[key_col]])]
        ids_of.update(_token_ids(tok, [k for k in dict.fromkeys(key_texts) if k not in ids_of]))

        def keys_ids(row):
            keys = row[key_col] if isinstance(row[key_col], list) else [row[key_col]]
            return [ids_of[k] for k in keys]

        def on_error(row, exc):
            return RunError(f"row id={row.get('id')!r}: {exc}", node=ctx.node_id,
                            hint="lower max_tokens, or add more texts to the pool")

        text = ContextText(tok.decode, sep_ids, concatenative=_decodes_concatenatively(tok),
                           special_ids=frozenset(getattr(tok, "all_special_ids", ()) or ()) |
                           frozenset(getattr(tok, "added_tokens_decoder", {}) or {}))
        out, too_long = interleave_samples(
            rows, pool_ids, [str(r.get("text_id", r.get("id"))) for r in pool_rows], keys_ids, text,
            question=q_col, answer=a_col, min_tokens=p["min_tokens"], max_tokens=p["max_tokens"],
            short_ratio=p.get("short_ratio", 0), chat=p.get("format", "chat") == "chat", rng=rng,
            on_error=on_error)
        if too_long:
            ctx.services.note(ctx.node_id, f"skipped {len(too_long)} row(s) whose key segments alone exceed "
                                           f"max_tokens={p['max_tokens']}: {', '.join(too_long[:5])}"
                                           f"{', ...' if len(too_long) > 5 else ''}")
        if rows and not out:
            raise RunError("every row's key segments exceed max_tokens; nothing to interleave", node=ctx.node_id,
                           hint="raise max_tokens or use shorter texts")
        return out


OPS = (ErasePromptOp(), PamOp(), SegmentOp(), InterleaveOp())
