"""``format``: shape rows into what a trainer reads: chat ``messages`` or ``prompt``/``completion``."""

from __future__ import annotations

from specdsl import templates
from specdsl.execute.columns import string_scalar
from specdsl.errors import RunError
from specdsl.contract.ops import STEP_REF, TEMPLATE, Batch, CheckContext, Rows, RunContext, StepOp, obj_schema


class FormatOp(StepOp):
    row_parallel = True  # stateless per row: an executor may split the rows
    name = "format"
    description = "build chat messages (loss on the assistant) or prompt/completion pairs (loss on the completion)"
    template_keys = ("system", "user", "assistant", "prompt", "completion")
    params_schema = obj_schema({
        "from": STEP_REF,
        "to": {"enum": ["chat", "prompt_completion"], "description": "default: chat"},
        "system": {**TEMPLATE, "description": "chat: the system message (omit for none)"},
        "user": {**TEMPLATE, "description": "chat: the user message"},
        "assistant": {**TEMPLATE, "description": "chat: the assistant message (carries the loss)"},
        "prompt": {**TEMPLATE, "description": "prompt_completion: the prompt text (no loss)"},
        "completion": {**TEMPLATE, "description": "prompt_completion: the completion text (carries the loss)"},
    }, required=["from"])

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        p = ctx.params
        to = p.get("to", "chat")
        need = ("user", "assistant") if to == "chat" else ("prompt", "completion")
        wrong = ("prompt", "completion") if to == "chat" else ("system", "user", "assistant")
        for key in need:
            if key not in p:
                column = "question" if key in ("user", "prompt") else "answer"
                ctx.error("S101", f"format to {to} needs `{key}:`",
                          hint=f"add `{key}:` (a template, e.g. {key}: \"{{{{ row.{column} }}}}\")")
        for key in wrong:
            if key in p:
                ctx.error("S401", f"`{key}:` does not apply to format to {to}", key, key=True,
                          hint=f"format to {to} takes {', '.join(f'`{k}:`' for k in need)}"
                               + (" (and `system:`)" if to == "chat" else "") + "; remove it or change `to:`")
        cols = [c for c in ctx.columns if c not in ("messages", "prompt", "completion")]
        return tuple(cols) + (("messages",) if to == "chat" else ("prompt", "completion"))

    def run(self, ctx: RunContext) -> Rows:
        p = ctx.params
        to = p.get("to", "chat")
        rows = ctx.rows
        keys = (("system",) if p.get("system") else ()) + ("user", "assistant") if to == "chat" \
            else ("prompt", "completion")
        try:  # a template at a time (the templates' fast path); on any error, row by row names the row
            rendered = {key: templates.render_many(p[key], rows, ctx.vars) for key in keys}
        except Exception:  # noqa: BLE001
            return self._run_rows(ctx)
        out = []
        for i, row in enumerate(rows):
            new = dict(row)
            if to == "chat":
                new["messages"] = [{"role": key, "content": rendered[key][i]} for key in keys]
            else:
                new["prompt"] = rendered["prompt"][i]
                new["completion"] = rendered["completion"][i]
            out.append(new)
        return out

    def run_arrow(self, ctx: RunContext, batch: Batch) -> Batch | None:
        """Every template vectorised (specdsl.ops.vectorised) on a stored batch: the rows :meth:`run` gives,
        as the store would keep them (``messages`` as the JSON text the store writes for a list of dicts,
        built without a Python object per row); None when a template is not."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from specdsl.ops.vectorised import json_string_array, render_column, with_columns

        p = ctx.params
        to = p.get("to", "chat")
        table, json_columns = batch.arrow()
        keys = (("system",) if p.get("system") else ()) + ("user", "assistant") if to == "chat" \
            else ("prompt", "completion")
        rendered = {}
        for key in keys:
            rendered[key] = render_column(p[key], table, json_columns, ctx.vars)
            if rendered[key] is None:
                return None
        if to != "chat":
            return Batch.from_arrow(*with_columns(table, json_columns, rendered))
        pieces: list = []
        for i, key in enumerate(keys):  # json.dumps([{"role": ..., "content": ...}, ...], ensure_ascii=False)
            escaped = json_string_array(rendered[key])
            if escaped is None:
                return None
            opening = "[" if i == 0 else ", "
            pieces += [string_scalar(f'{opening}{{"role": "{key}", "content": "'), escaped, string_scalar('"}')]
        pieces.append(string_scalar("]"))
        messages = pc.binary_join_element_wise(*pieces, string_scalar(""))
        return Batch.from_arrow(*with_columns(table, json_columns, {"messages": messages}, new_json=["messages"]))

    def _run_rows(self, ctx: RunContext) -> Rows:
        p = ctx.params
        to = p.get("to", "chat")
        out = []
        for row in ctx.rows:
            try:
                new = dict(row)
                if to == "chat":
                    messages = []
                    if p.get("system"):
                        messages.append({"role": "system", "content": templates.render(p["system"], row, ctx.vars)})
                    messages.append({"role": "user", "content": templates.render(p["user"], row, ctx.vars)})
                    messages.append({"role": "assistant", "content": templates.render(p["assistant"], row, ctx.vars)})
                    new["messages"] = messages
                else:
                    new["prompt"] = templates.render(p["prompt"], row, ctx.vars)
                    new["completion"] = templates.render(p["completion"], row, ctx.vars)
            except Exception as exc:  # noqa: BLE001
                raise RunError(f"template failed on row id={row.get('id')!r}: {exc}", node=ctx.node_id,
                               hint="fix the template for rows like this one (a `{% if %}` or `| default(...)` handles "
                                    "a missing or empty value)") from None
            out.append(new)
        return out
