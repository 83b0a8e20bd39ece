"""Plan -> Plan passes, applied in order. Each is a pure function returning a new Plan."""

from __future__ import annotations

from specdsl.ir.plan import Plan
from specdsl.passes.prune import prune_unused
from specdsl.passes.push_filters import push_filters_before_generation

PASSES = (push_filters_before_generation, prune_unused)


def run_passes(plan: Plan) -> Plan:
    for p in PASSES:
        plan = p(plan)
    return plan
