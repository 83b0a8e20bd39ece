"""The typed Spec: what a checked YAML mapping means, as frozen dataclasses.

Positions stay attached (through the loaded document) so later stages can point at the exact key that
caused a problem, even after recipes expanded into several primitive steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from specdsl.errors import SourcePos
from specdsl.frontend.load import KeyPath, LoadedDoc

DEFAULT_BACKEND = "transformers"


@dataclass(frozen=True)
class ModelDecl:
    name: str
    backend: str
    model: str
    options: Mapping[str, Any]  # everything but backend/model/meta, secrets still as ${env:...}
    path: KeyPath


@dataclass(frozen=True)
class SourceDecl:
    name: str
    path: str                    # as written, relative to the spec's folder
    format: str                  # jsonl | json | csv | parquet
    columns: tuple[str, ...] | None
    id_column: str | None
    limit: int | None
    key_path: KeyPath


@dataclass(frozen=True)
class StepDecl:
    id: str
    op: str                      # a primitive op name (recipes are expanded before this exists)
    params: Mapping[str, Any]
    path: KeyPath                # where the op mapping sits in the document
    recipe: str | None = None    # the recipe this step came from, if any
    recipe_step: str | None = None  # the spec step it was expanded from (a `use:` step, or a `matrix:` step)
    exact_positions: bool = True    # False for recipe output: positions point at the `use:` step
    note: str | None = None         # what a recipe says the user must know about this step (plan shows it)


@dataclass(frozen=True)
class Spec:
    version: int
    name: str
    description: str
    file: Path
    models: Mapping[str, ModelDecl]
    sources: Mapping[str, SourceDecl]
    vars: Mapping[str, Any]
    steps: tuple[StepDecl, ...]
    seed: int
    store: str | None
    doc: LoadedDoc = field(repr=False, compare=False)
    expansions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # use-step id -> expanded ids

    @property
    def dir(self) -> Path:
        return self.file.parent

    def pos(self, path: KeyPath, *, key: bool = False) -> SourcePos:
        return self.doc.pos(path, key=key)

    def step_pos(self, step: StepDecl, *keys: str | int, key: bool = False) -> SourcePos:
        if not step.exact_positions:
            return self.doc.pos(step.path + ("use",), key=True)  # a recipe's step: point at its `use:`
        return self.doc.pos(step.path + tuple(keys), key=key)
