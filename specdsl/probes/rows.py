"""Per-row evaluation outputs: every probe answer with what was asked, what was parsed and the verdict.

An evaluate node keeps, beside its summary tables, one Parquet table per probe in its store folder
(``rows-<index>-<probe>.parquet``) with the columns ``condition, model, id, prompt, answer, parsed, gold,
verdict`` (plus a probe's own: ``initial``/``verification`` for self-correction, ``task``/``bucket``/
``score`` for position), so a moved score can be traced to the answers that moved it.
``specdsl inspect <spec> --node <evaluate node>`` shows them, and report.html links them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

ROWS_FILE = "rows-{index}-{probe}.parquet"


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """A chat prompt as one readable text: ``[role] content`` per message."""
    return "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in messages)


def parsed_answer(rule: str, answer: str | None, pattern: str | None = None) -> str | None:
    """What the matcher reads from an answer under ``rule``: the number (``number``), the pattern's group
    (``regex`` with a pattern), else the answer normalised as the ``exact``/``contains`` rules compare it."""
    from specdsl.designs.matchers import extract_number, normalize_text

    if answer is None:
        return None
    if rule == "number":
        value = extract_number(answer)
        return None if value is None else (str(int(value)) if float(value).is_integer() else str(value))
    if rule == "regex" and pattern:
        found = re.search(pattern, answer)
        if found is None:
            return None
        return found.group(1) if found.re.groups else found.group(0)
    return normalize_text(answer)


def position_rows(task: str, model: str, items: Sequence[Any], answers: Sequence[str | None]) -> list[dict[str, Any]]:
    """One row per position-probe item: the query (the context is in the prompt the model saw), the answer,
    the expected text, the item's bucket and position, its score and a verdict."""
    from specdsl.probes.position.scoring import score_answer

    out = []
    for i, (item, answer) in enumerate(zip(items, answers)):
        score = score_answer(item.task, answer or "", item.expected)
        out.append({"condition": task, "model": model, "id": f"{task}-{i}", "prompt": item.query,
                    "answer": answer, "parsed": None, "gold": item.expected,
                    "verdict": "correct" if score >= 1 else ("wrong" if score <= 0 else f"partial {score:.2f}"),
                    "task": task, "bucket": item.bucket, "position": round(float(item.position), 4),
                    "score": float(score)})
    return out


def write_probe_rows(folder: Path, index: int, probe: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Write one probe's rows as Parquet into ``folder``; the file's name (relative to the node's folder)."""
    import pyarrow.parquet as pq

    from specdsl.ops.export import arrow_table

    name = ROWS_FILE.format(index=index, probe=re.sub(r"[^A-Za-z0-9_.-]", "_", probe))
    table, _json_columns = arrow_table(list(rows))
    pq.write_table(table, Path(folder) / name)
    return name
