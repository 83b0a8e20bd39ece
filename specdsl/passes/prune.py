"""Drop nodes whose output nothing uses.

Sinks are the nodes of ops that declare ``sink_op`` (train, evaluate, export, and plugin ops that say so),
nodes of the train, evaluate and export kinds, and the spec's last step (a spec that only generates data
wants its last table). Everything that does not feed a sink is dropped, so it is never run or billed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from specdsl.ir.plan import Plan

SINK_KINDS = ("train", "evaluate", "export")


def prune_unused(plan: Plan, registry: Any = None) -> Plan:
    if not plan.nodes:
        return plan
    steps = [n for n in plan.nodes if n.kind != "source"]
    last_step = steps[-1].step if steps else None
    sinks = [n.id for n in plan.nodes if n.sink or n.kind in SINK_KINDS
             or (n.kind != "source" and n.step == last_step and not plan.consumers(n.id))]
    keep: set[str] = set()
    for s in sinks:
        keep.update(plan.ancestors(s))
    dropped = [n.id for n in plan.nodes if n.id not in keep]
    if not dropped:
        return plan
    notes = list(plan.notes) + [f"dropped '{d}': nothing uses its output" for d in dropped]
    return replace(plan, nodes=tuple(n for n in plan.nodes if n.id in keep), notes=tuple(notes))
