"""Variants in the language: a step's ``matrix:`` expands it into one step per combination of values.

```yaml
- id: sft
  matrix: {mask: [true, false], seed: [1, 2]}
  train: {from: samples, model: student}
```

is four train steps, ``sft.mask-true.seed-1`` ... ``sft.mask-false.seed-2``, each with its parameters
set from the matrix (a key is a parameter of the step's op, or of the recipe's ``with:``; ``lora.r``
reaches into a mapping). Steps after it follow the variants:

* a step that reads one matrixed step by name (``from: sft``, ``model: sft``) becomes one step per
  variant, reading that variant (``out.mask-true`` reads ``sft.mask-true``);
* a list of references (``models: [base, sft]``) lists every variant instead (``[base, sft.mask-true,
  sft.mask-false]``), so an evaluate step compares them side by side; a mapping inside a list that names a
  matrixed step (an accuracy condition's ``model: sft``) becomes one mapping per variant, its ``name``
  suffixed with the variant's label.

Steps upstream of the matrix are not copied: every variant reads the same node, so what they computed
(a teacher's answers) is computed and paid for once. Variants whose nodes come out equal (a tokenize step
that a seed does not change) share one fingerprint, and so one cached result.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any, Iterable, Mapping, Sequence

# Keys under which a mapping inside a list may name a step or model (an evaluate condition's `model:`).
NESTED_REFERENCE_KEYS = ("model", "from", "on")


def combinations(matrix: Mapping[str, Sequence[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every combination of the matrix's values, in the order written: (label, {key: value})."""
    keys = list(matrix)
    out = []
    for values in itertools.product(*(matrix[k] for k in keys)):
        bindings = dict(zip(keys, values))
        out.append((".".join(f"{key.replace('.', '_')}-{_label(value)}" for key, value in bindings.items()),
                    bindings))
    return out


def _label(value: Any) -> str:
    text = "true" if value is True else "false" if value is False else "null" if value is None else str(value)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "_"


def apply(params: Mapping[str, Any], bindings: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with each binding set (a dotted key sets inside nested mappings, creating them)."""
    out = copy.deepcopy(dict(params))
    for key, value in bindings.items():
        *parents, last = key.split(".")
        target = out
        for part in parents:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[last] = copy.deepcopy(value)
    return out


def scalar_references(params: Mapping[str, Any], keys: Iterable[str], matrixed: Mapping[str, Any]) -> list[str]:
    """The matrixed steps that ``params`` name by a single reference under ``keys``."""
    return [params[k] for k in keys if isinstance(params.get(k), str) and params[k] in matrixed]


def substitute(value: Any, variants: Mapping[str, Sequence[tuple[str, str]]], chosen: Mapping[str, str],
               reference_keys: frozenset[str], key: str | None = None) -> Any:
    """``value`` with references to matrixed steps replaced, looking only under ``reference_keys`` (the
    op's input and model keys, and :data:`NESTED_REFERENCE_KEYS`): a reference that ``chosen`` picks a
    variant for becomes that variant; in a list, any other reference becomes every variant; a mapping
    inside a list that names a matrixed step becomes one mapping per variant."""
    is_reference = key in reference_keys
    if isinstance(value, str):
        return chosen.get(value, value) if is_reference else value
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            if is_reference and isinstance(item, str) and item in variants and item not in chosen:
                out.extend(vid for vid, _label in variants[item])
            elif isinstance(item, dict):
                out.extend(_split_mapping(item, variants, chosen, reference_keys))
            else:
                out.append(substitute(item, variants, chosen, reference_keys, key))
        return out
    if isinstance(value, dict):
        return {k: substitute(v, variants, chosen, reference_keys, k) for k, v in value.items()}
    return value


def _split_mapping(item: Mapping[str, Any], variants: Mapping[str, Sequence[tuple[str, str]]],
                   chosen: Mapping[str, str], reference_keys: frozenset[str]) -> list[dict[str, Any]]:
    named = [item[k] for k in NESTED_REFERENCE_KEYS
             if isinstance(item.get(k), str) and item[k] in variants and item[k] not in chosen]
    if not named:
        return [substitute(item, variants, chosen, reference_keys)]
    origin = named[0]
    out = []
    for vid, label in variants[origin]:
        copied = substitute(item, variants, {**chosen, origin: vid}, reference_keys)
        if isinstance(copied.get("name"), str):
            copied["name"] = f"{copied['name']}.{label}"
        out.append(copied)
    return out
