"""``textstats.clean``: a recipe (macro) that expands into ``dedupe`` -> ``stats`` -> ``filter`` steps.

    - id: clean
      use: textstats.clean
      with: {source: raw, column: text, min_words: 3, max_words: 200}

expands to ``clean.deduped`` (dedupe on the column), ``clean.stats`` (word/char/line counts) and ``clean``
(a built-in ``filter`` keeping rows whose word count is in range). The last step carries the recipe
step's own id, so later steps read the cleaned rows as ``from: clean``. ``specdsl plan --expanded``
shows the expansion.
"""

from __future__ import annotations

from typing import Any, Mapping

COLUMN = {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}


class CleanRecipe:
    name = "textstats.clean"
    description = ("Drop duplicate texts (optionally case/whitespace-insensitive), add length columns, keep rows "
                   "whose word count is within [min_words, max_words].")
    params_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {
            "source": {"type": "string", "minLength": 1, "description": "a source or an earlier step"},
            "column": {**COLUMN, "description": "the text column (default: text)"},
            "min_words": {"type": "integer", "minimum": 0, "description": "default: 1 (drop empty texts)"},
            "max_words": {"type": "integer", "minimum": 1, "description": "default: no upper bound"},
            "normalize": {"type": "boolean", "description": "dedupe case/whitespace-insensitively (default: true)"},
            "meta": {"type": "object"},
        },
    }

    def expand(self, step_id: str, p: Mapping[str, Any]) -> list[dict[str, Any]]:
        col = p.get("column", "text")
        lo, hi = p.get("min_words", 1), p.get("max_words")
        if hi is not None and lo > hi:
            # A ValueError from expand() becomes a positioned S211 error on the recipe step.
            raise ValueError(f"min_words ({lo}) must be <= max_words ({hi})")
        cond = f"row.{col}_words >= {lo}" + (f" and row.{col}_words <= {hi}" if hi is not None else "")
        return [
            {"id": f"{step_id}.deduped",
             "dedupe": {"from": p["source"], "columns": [col], "normalize": p.get("normalize", True)}},
            {"id": f"{step_id}.stats", "stats": {"from": f"{step_id}.deduped", "column": col}},
            {"id": step_id, "filter": {"from": f"{step_id}.stats", "where": "{{ " + cond + " }}"}},
        ]
