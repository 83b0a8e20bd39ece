"""``generate``: one model call per row (or ``n`` per row), answers into a new column.

Requests are content-addressed: the same prompt to the same model with the same decoding parameters is
made once, whichever node or run asks for it, and every answer is journaled the moment it arrives.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

from specdsl import templates
from specdsl.errors import RunError
from specdsl.contract.hookspecs import GenRequest, request_keys
from specdsl.contract.ops import COLUMN, MODEL_REF, STEP_REF, TEMPLATE, CheckContext, Estimate, Rows, RunContext, StepOp, obj_schema

DECODING = {
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 131072,
                   "description": "cap on generated tokens (overrides the model's default)"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 5, "description": "0 = greedy"},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
              "description": "nucleus sampling (default: the model's)"},
    "seed": {"type": "integer", "minimum": 0, "description": "sampling seed (default: the spec's seed)"},
}


def prompt_messages(params: Mapping[str, Any], row: Mapping[str, Any], variables: Mapping[str, Any]) -> list[dict]:
    """Render the chat messages of one request from the step's templates."""
    if params.get("messages"):
        return [{"role": m["role"], "content": templates.render(m["content"], row, variables)}
                for m in params["messages"]]
    messages = []
    if params.get("system"):
        messages.append({"role": "system", "content": templates.render(params["system"], row, variables)})
    messages.append({"role": "user", "content": templates.render(params["user"], row, variables)})
    return messages


def prompt_messages_many(params: Mapping[str, Any], rows: Rows, variables: Mapping[str, Any]) -> list[list[dict]]:
    """:func:`prompt_messages` of each of ``rows``, a template at a time (:func:`templates.render_many`)."""
    if params.get("messages"):
        roles = [m["role"] for m in params["messages"]]
        contents = [templates.render_many(m["content"], rows, variables) for m in params["messages"]]
    else:
        roles = (["system"] if params.get("system") else []) + ["user"]
        contents = ([templates.render_many(params["system"], rows, variables)] if params.get("system") else []) + \
            [templates.render_many(params["user"], rows, variables)]
    return [[{"role": role, "content": content} for role, content in zip(roles, texts)] for texts in zip(*contents)]


_FALSE = ("", "false", "0", "none", "no")  # what a rendered `where` means when it skips a row


def decoding_params(params: Mapping[str, Any], seed: int, sample: int) -> dict[str, Any]:
    """What is sent with the request. Sample k of a prompt gets seed + k: a distinct request (its own
    key, its own journal entry) that a seeded provider answers differently."""
    out = {k: params[k] for k in ("max_tokens", "temperature", "top_p") if k in params}
    out["seed"] = params.get("seed", seed) + sample
    return out


class GenerateOp(StepOp):
    name = "generate"
    kind = "generate"
    version = "3"  # 2: failed rows left out (no `<into>_error`); 3: sample k is sent with seed + k
    description = "ask a model once per row (or n times); the answer becomes a column"
    input_keys = ("from",)
    model_keys = ("model",)
    template_keys = ("system", "user", "where")
    reads_known = True
    drops_rows = True  # a failed request leaves its row out
    reads_batches = True  # its input a batch at a time, answered a window at a time (run_batches)

    @staticmethod
    def keeps_row_ids(params: Mapping[str, Any]) -> bool:
        """One output row per input row, with its id: n samples per row rewrite ids (id#k)."""
        return params.get("n", 1) == 1
    params_schema = obj_schema({
        "from": STEP_REF,
        "model": MODEL_REF,
        "system": TEMPLATE,
        "user": TEMPLATE,
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"], "additionalProperties": False,
            "properties": {"role": {"enum": ["system", "user", "assistant"], "description": "who says it"},
                           "content": TEMPLATE}},
            "description": "a whole conversation instead of system/user"},
        "into": {**COLUMN, "description": "the answer's column (default: response)"},
        "n": {"type": "integer", "minimum": 1, "maximum": 64, "description": "samples per row (adds `sample`)"},
        "where": {**TEMPLATE, "description": "generate only for rows where this renders truthy; others get null"},
        **DECODING,
    }, required=["from", "model"])

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        p = ctx.params
        if not p.get("user") and not p.get("messages"):
            ctx.error("S101", "generate needs `user:` (a template) or `messages:`", hint="e.g. user: \"{{ row.question }}\"")
        if p.get("messages") and (p.get("user") or p.get("system")):
            ctx.error("S401", "give either `messages:` or `system:`/`user:`, not both", "messages",
                      hint="`messages:` is the whole conversation; with it, put the system and user turns in it")
        for i, m in enumerate(p.get("messages") or []):
            ctx.template(m.get("content"), "messages", i, "content")
        into = p.get("into", "response")
        cols = list(ctx.columns)
        if into in cols:
            ctx.error("S401", f"column '{into}' already exists; generating into it would overwrite it", "into",
                      hint="choose another `into:` name")
        cols += [into, f"{into}_prompt"]
        if p.get("n", 1) > 1:
            cols.append("sample")
        return tuple(cols)

    def estimate(self, params: Mapping[str, Any], input_rows: int | None, services: Any) -> Estimate | None:
        """One request per row and sample; prompts measured by rendering them on the input's sample rows,
        answers counted at their token cap."""
        count = None if input_rows is None else input_rows * params.get("n", 1)
        _backend, options = services.model(params["model"])
        texts = [params.get("system") or "", params.get("user") or ""] + \
            [m.get("content", "") for m in params.get("messages") or []]
        avg_in = services.average_prompt_tokens(
            services.sample_rows,
            lambda row: sum(len(x["content"]) for x in prompt_messages(params, row, services.vars)),
            sum(len(t) for t in texts))
        cap = params.get("max_tokens") or options.get("max_tokens") or options.get("max_new_tokens") \
            or services.default_output_tokens
        return Estimate(rows=count, rows_unknown=count is None,
                        details={"rows": count, **services.usage(params["model"], count, avg_in, cap)})

    def requests(self, ctx: RunContext, rows: Rows | None = None) -> list[tuple[dict, GenRequest | None, list[dict]]]:
        """(output row, request or None when `where` skips it, messages) for every row (default: ``ctx.rows``)
        and sample. Templates are rendered a batch at a time; a template that fails on some row is rendered
        again row by row, to name that row."""
        p = ctx.params
        rows = ctx.rows if rows is None else rows
        into = p.get("into", "response")
        n = p.get("n", 1)
        identity = ctx.services.model_identity(p["model"])
        samples = [decoding_params(p, ctx.seed, sample) for sample in range(n)]
        keys = [request_keys(identity, dparams) for dparams in samples]
        try:
            wanted = [text.strip().lower() not in _FALSE for text in templates.render_many(p["where"], rows, ctx.vars)] \
                if p.get("where") else None
            rendered = iter(prompt_messages_many(p, rows if wanted is None else
                                                 [row for row, keep in zip(rows, wanted) if keep], ctx.vars))
        except Exception:  # noqa: BLE001 - the row-by-row path below raises, naming the row
            wanted, rendered = self._render_rows(ctx, rows)
        out = []
        for i, row in enumerate(rows):
            keep = wanted is None or wanted[i]
            messages = next(rendered) if keep else []
            for sample in range(n):
                new = dict(row)
                if n > 1:
                    new["sample"] = sample
                    new["id"] = f"{row['id']}#{sample}"
                new[f"{into}_prompt"] = messages or None
                req = None
                if keep:
                    req = GenRequest(key=keys[sample](messages), messages=tuple(messages), params=dict(samples[sample]),
                                     row_id=str(new["id"]))
                out.append((new, req, messages))
        return out

    @staticmethod
    def _render_rows(ctx: RunContext, rows: Rows) -> tuple[list[bool], Iterator[list[dict]]]:
        """(`where` of each row, messages of each wanted row), rendered row by row: a row whose template
        fails raises a RunError that names it."""
        p = ctx.params
        wanted, messages = [], []
        for row in rows:
            try:
                keep = True
                if p.get("where"):
                    keep = templates.render(p["where"], row, ctx.vars).strip().lower() not in _FALSE
                if keep:
                    messages.append(prompt_messages(p, row, ctx.vars))
            except Exception as exc:  # noqa: BLE001 - a template failing on one row names that row
                raise RunError(f"template failed on row id={row.get('id')!r}: {exc}", node=ctx.node_id,
                               hint="check the row's columns, or guard the template with `{% if %}`") from None
            wanted.append(keep)
        return wanted, iter(messages)

    def run_batches(self, ctx: RunContext) -> Iterator[Rows]:
        """The answered rows a window at a time, in input order: the input is read a batch at a time and
        requests are built and answered a window (:func:`generation_windows`) at a time, so peak memory is
        a window's rows and answers whatever the table's size. A repeat of an earlier window's request is
        answered by the journal. The runner writes each batch of output as it comes."""
        from specdsl.execute.batches import batch_rows, chunks

        p = ctx.params
        into = p.get("into", "response")
        n = p.get("n", 1)
        size = batch_rows()
        # Input rows not read yet: the progress bar's total counts their requests before they are built.
        left = ctx.input_size if ctx.batches is not None else len(ctx.rows)
        with ctx.services.generation(ctx.node_id, p["model"]) as session:
            for window in generation_windows(self.requests(ctx, batch.rows()) for batch in ctx.input_batches(size)):
                if left is not None:
                    left = max(0, left - len(window) // n)
                results = session.answer([r for _, r, _ in window if r is not None],
                                         remaining=(left or 0) * n)
                rows = []
                for row, req, _ in window:
                    res = results.get(req.key) if req is not None else None
                    if res is not None and not res.ok:
                        # A failed request leaves its row out: the node is reported incomplete (not cached), its
                        # error is in the run summary, and the next run retries just that request.
                        continue
                    row[into] = res.text if res is not None else None
                    rows.append(row)
                del window, results
                yield from chunks(rows, size)

    def run(self, ctx: RunContext) -> Rows:
        return [row for rows in self.run_batches(ctx) for row in rows]


# A window closes at this many requests or this much prompt text (characters), whichever comes first.
# Large enough that a backend's concurrency stays busy (the last wave of a window waits for its slowest
# answer: at 256 in flight, one wave in 128), small enough that a window of long prompts (IN2's 32K-token
# contexts) stays in the hundreds of MB.
WINDOW_BATCHES = 4             # input batches (SPECDSL_BATCH_ROWS rows, 8,192 by default) per window
WINDOW_PROMPT_CHARS = 64 << 20


def generation_windows(parts: Iterable[list[tuple[dict, GenRequest | None, list[dict]]]],
                       max_requests: int | None = None,
                       max_chars: int = WINDOW_PROMPT_CHARS) -> Iterator[list[tuple[dict, GenRequest | None, list[dict]]]]:
    """Consecutive batches of planned requests joined into windows of at most about ``max_requests``
    rows (default: ``WINDOW_BATCHES`` batches) or ``max_chars`` of prompt text; a window always takes
    whole batches, and at least one."""
    from specdsl.execute.batches import batch_rows

    limit = max_requests if max_requests is not None else WINDOW_BATCHES * batch_rows()
    window: list = []
    chars = 0
    for part in parts:
        window.extend(part)
        chars += sum(len(m["content"]) for _, _, messages in part for m in messages
                     if isinstance(m.get("content"), str))
        if len(window) >= limit or chars >= max_chars:
            yield window
            window, chars = [], 0
    if window:
        yield window
