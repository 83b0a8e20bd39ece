"""The Plan IR: an immutable DAG of op nodes, with fingerprints and a versioned JSON form.

A node's fingerprint hashes its op (and op version), its parameters, the fingerprints of its inputs and
the identity of every backend and model it uses (never secrets: those stay ``${env:...}`` references).
It is the cache key of the node's output: an unchanged node is never recomputed and never re-billed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping

from specdsl.errors import SourcePos

PLAN_FORMAT = 1


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PlanNode:
    id: str
    op: str
    params_json: str                         # canonical JSON of the op's parameters (frozen by construction)
    inputs: tuple[tuple[str, str], ...]      # (param, upstream node id)
    columns: tuple[str, ...]                 # output columns
    kind: str = "transform"
    models: tuple[tuple[str, str], ...] = ()  # (param, train node id): models that are nodes of the plan
    # Every model the node asks, declared or trained, in the step's order: what a reader is told. Not part
    # of the fingerprint, which sees declared models through ``identity`` and trained ones through ``models``.
    model_names: tuple[str, ...] = ()
    backend: str | None = None               # "name version" of the generation backend or training target
    identity_json: str = "{}"                # backend/model identities, vars used: what else decides outputs
    step: str = ""                           # the spec step this node came from
    recipe: str | None = None
    pos: SourcePos | None = None
    fingerprint: str = ""
    estimate: Mapping[str, Any] | None = None
    op_version: str = "1"
    reads: tuple[str, ...] | None = None     # columns read from the main input (None: unknown)
    sink: bool = False                       # kept by the prune pass though nothing reads it (op.sink_op)

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    @property
    def short(self) -> str:
        return self.fingerprint[:12]

    def input(self, param: str = "from") -> str | None:
        return dict(self.inputs).get(param)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "op": self.op, "op_version": self.op_version, "kind": self.kind,
            "params": self.params, "inputs": [list(i) for i in self.inputs], "columns": list(self.columns),
            "models": [list(m) for m in self.models], "model_names": list(self.model_names), "backend": self.backend,
            "identity": json.loads(self.identity_json), "step": self.step, "recipe": self.recipe,
            "pos": [self.pos.file, self.pos.line, self.pos.col] if self.pos else None,
            "fingerprint": self.fingerprint, "estimate": dict(self.estimate) if self.estimate else None,
            "reads": list(self.reads) if self.reads is not None else None, "sink": self.sink,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PlanNode":
        pos = SourcePos(*d["pos"]) if d.get("pos") else None
        return cls(id=d["id"], op=d["op"], op_version=d.get("op_version", "1"), kind=d.get("kind", "transform"),
                   params_json=canonical_json(d["params"]), inputs=tuple(tuple(i) for i in d["inputs"]),
                   columns=tuple(d["columns"]), models=tuple(tuple(m) for m in d.get("models", [])),
                   model_names=tuple(d.get("model_names", ())),
                   backend=d.get("backend"), identity_json=canonical_json(d.get("identity", {})),
                   step=d.get("step", ""), recipe=d.get("recipe"), pos=pos, fingerprint=d.get("fingerprint", ""),
                   estimate=d.get("estimate"),
                   reads=tuple(d["reads"]) if d.get("reads") is not None else None, sink=bool(d.get("sink")))


@dataclass(frozen=True)
class ModelRef:
    """A model as the plan needs it at run time (options keep secrets as references)."""

    name: str
    backend: str
    model: str
    options_json: str
    identity_json: str

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(self.options_json)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "model": self.model, "options": self.options,
                "identity": json.loads(self.identity_json)}


@dataclass(frozen=True)
class Plan:
    name: str
    spec_file: str
    spec_hash: str
    nodes: tuple[PlanNode, ...]
    models: tuple[ModelRef, ...] = ()
    vars_json: str = "{}"
    seed: int = 0
    store: str | None = None
    notes: tuple[str, ...] = ()              # what the passes did (shown by `plan`)
    expansions: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @cached_property
    def _by_id(self) -> dict[str, PlanNode]:
        return {n.id: n for n in self.nodes}

    def node(self, node_id: str) -> PlanNode:
        try:
            return self._by_id[node_id]
        except KeyError:
            raise KeyError(node_id) from None

    def has(self, node_id: str) -> bool:
        return node_id in self._by_id

    @property
    def vars(self) -> dict[str, Any]:
        return json.loads(self.vars_json)

    def model(self, name: str) -> ModelRef:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def consumers(self, node_id: str) -> list[PlanNode]:
        return [n for n in self.nodes if any(src == node_id for _, src in n.inputs)
                or any(ref == node_id for _, ref in n.models)]

    def upstream(self, node_id: str) -> list[str]:
        n = self.node(node_id)
        return [src for _, src in n.inputs] + [ref for _, ref in n.models if self.has(ref)]

    def ancestors(self, node_id: str) -> list[str]:
        """``node_id`` and everything it depends on, in plan (topological) order."""
        wanted: set[str] = set()
        stack = [node_id]
        while stack:
            cur = stack.pop()
            if cur in wanted:
                continue
            wanted.add(cur)
            stack.extend(self.upstream(cur))
        return [n.id for n in self.nodes if n.id in wanted]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT, "name": self.name, "spec_file": self.spec_file, "spec_hash": self.spec_hash,
            "seed": self.seed, "store": self.store, "vars": self.vars,
            "models": [m.to_dict() for m in self.models], "nodes": [n.to_dict() for n in self.nodes],
            "notes": list(self.notes), "expansions": {k: list(v) for k, v in self.expansions},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan format {d.get('format')!r} is not {PLAN_FORMAT}")
        models = tuple(ModelRef(m["name"], m["backend"], m["model"], canonical_json(m["options"]),
                                canonical_json(m["identity"])) for m in d.get("models", []))
        return cls(name=d["name"], spec_file=d["spec_file"], spec_hash=d["spec_hash"],
                   nodes=tuple(PlanNode.from_dict(n) for n in d["nodes"]), models=models,
                   vars_json=canonical_json(d.get("vars", {})), seed=d.get("seed", 0), store=d.get("store"),
                   notes=tuple(d.get("notes", [])),
                   expansions=tuple((k, tuple(v)) for k, v in d.get("expansions", {}).items()))


def fingerprint_node(node: PlanNode, input_fingerprints: Mapping[str, str]) -> str:
    """The node's cache key. ``meta:`` is never interpreted, so editing it does not invalidate a cache."""
    params = json.loads(node.params_json)
    if isinstance(params, dict):
        params.pop("meta", None)
    return digest({
        "op": node.op, "op_version": node.op_version, "params": params,
        "inputs": [[param, input_fingerprints[src]] for param, src in node.inputs],
        "models": [[param, input_fingerprints.get(ref, ref)] for param, ref in node.models],
        "identity": json.loads(node.identity_json),
    })


def refingerprint(nodes: Iterable[PlanNode], external: Mapping[str, str] | None = None) -> tuple[PlanNode, ...]:
    """Recompute fingerprints in topological order (passes call this after rewiring the DAG)."""
    known: dict[str, str] = dict(external or {})
    out = []
    for node in nodes:
        fp = fingerprint_node(node, known)
        known[node.id] = fp
        out.append(replace(node, fingerprint=fp))
    return tuple(out)


def topo_order(keys: Iterable[str], upstream: Callable[[str], Iterable[str]]) -> list[str]:
    """Stable topological order of ``keys`` (ties keep the given order); ``upstream`` must be acyclic.

    Iterative, not recursive: plans may be thousands of steps deep.
    """
    done: set[str] = set()
    order: list[str] = []
    for root in keys:
        if root in done:
            continue
        done.add(root)
        stack = [(root, iter(list(upstream(root))))]
        while stack:
            key, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                order.append(key)
            elif child not in done:
                done.add(child)
                stack.append((child, iter(list(upstream(child)))))
    return order


def topo_sort(nodes: Iterable[PlanNode]) -> tuple[PlanNode, ...]:
    """Plan nodes in stable topological order (ties keep declaration order)."""
    by_id = {n.id: n for n in nodes}

    def upstream(node_id: str) -> list[str]:
        n = by_id[node_id]
        return [src for _, src in list(n.inputs) + list(n.models) if src in by_id]

    return tuple(by_id[k] for k in topo_order(by_id, upstream))
