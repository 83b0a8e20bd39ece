"""Move filters that read no model output ahead of the generation that precedes them.

A filter that only looks at columns the generate step received (say, the category of a problem) drops
the same rows whether it runs before or after generation; running it first means those rows are never
sent to a model, never paid for.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from specdsl.ir.plan import Plan, refingerprint, topo_sort


def _holds(op: Any, attribute: str, params: Mapping[str, Any], default: bool) -> bool:
    """An op attribute that is a bool or a function of the step's params (see StepOp)."""
    value = getattr(op, attribute, default)
    return bool(value(params)) if callable(value) else bool(value)


def push_filters_before_generation(plan: Plan, registry: Any = None) -> Plan:
    if registry is None:
        from specdsl.plugins import default_registry

        registry = default_registry()
    nodes = {n.id: n for n in plan.nodes}
    notes = list(plan.notes)
    changed = True
    while changed:
        changed = False
        for f in list(nodes.values()):
            if f.reads is None or not _holds(registry.ops.get(f.op), "selects_rows", f.params, False):
                continue  # unknown reads; or not a row selector (a filter writing a verdict drops nothing)
            g_id = f.input("from")
            g = nodes.get(g_id)
            if g is None or g.kind != "generate" or len(f.inputs) != 1:
                continue
            upstream = g.input("from")
            if upstream is None or upstream not in nodes:
                continue
            if not set(f.reads) <= set(nodes[upstream].columns):
                continue  # the filter reads generated text: it must stay after generation
            if "id" in f.reads and not _holds(registry.ops.get(g.op), "keeps_row_ids", g.params, True):
                continue  # generating n samples per row rewrites `id` (id#k): the filter would see other ids
            consumers = [n for n in nodes.values() if any(src == g_id for _, src in n.inputs)]
            if [c.id for c in consumers] != [f.id]:
                continue  # someone else needs every generated row
            # Rewire: upstream -> filter -> generate -> (filter's old consumers).
            new_f = replace(f, inputs=(("from", upstream),), columns=nodes[upstream].columns)
            new_g = replace(g, inputs=tuple((p, f.id if src == upstream else src) for p, src in g.inputs))
            nodes[f.id] = new_f
            nodes[g_id] = new_g
            for n in list(nodes.values()):
                if n.id in (f.id, g_id):
                    continue
                if any(src == f.id for _, src in n.inputs):
                    nodes[n.id] = replace(n, inputs=tuple((p, g_id if src == f.id else src) for p, src in n.inputs))
            notes.append(f"pushed filter '{f.id}' ahead of generation '{g_id}': it reads only "
                         f"{', '.join(f.reads) or 'no columns'}, so filtered rows are never sent to the model")
            changed = True
            break
    if notes == list(plan.notes):
        return plan
    return replace(plan, nodes=refingerprint(topo_sort(nodes.values())), notes=tuple(notes))
