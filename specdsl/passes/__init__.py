"""Plan -> Plan passes, applied in order. Each is a pure function ``(plan, registry=None) -> Plan``: it reads
the ops' declared attributes through the registry (the default one when none is given), never op names."""

from __future__ import annotations

from typing import Any

from specdsl.ir.plan import Plan
from specdsl.passes.prune import prune_unused
from specdsl.passes.push_filters import push_filters_before_generation

PASSES = (push_filters_before_generation, prune_unused)


def run_passes(plan: Plan, registry: Any = None) -> Plan:
    for p in PASSES:
        plan = p(plan, registry)
    return plan
