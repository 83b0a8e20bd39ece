"""Template rendering over 200,000 rows: Jinja per row against the fast path, in the same run.

    python bench/bench_templates.py [--rows 200000]

Templates of the shapes the fast path covers (a column, literal + columns, a var looked up by a
column, `~` concatenation) are rendered for every row three ways: Jinja once per row (the previous
``templates.render``), ``templates.render`` per row (fast path, one row at a time) and
``templates.render_many`` (the fast path a column at a time, as map/format/filter use it). Then the
``map`` and ``format`` ops run on the same rows. Each is checked to give the same strings as Jinja.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEMPLATES = {
    "column": "{{ row.question }}",
    "literal + columns": "Q: {{ row.question }}\nA: {{ row['answer'] }} ({{ row.n }})",
    "var by column": "{{ strategies[row.category] }}",
    "concatenation": "{{ row.question ~ ' / ' ~ vars.suffix }}",
}
VARIABLES = {"strategies": {"math": "Think step by step.", "code": "Explain, then write code.",
                            "trivia": "Answer directly."}, "suffix": "thanks"}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    args = ap.parse_args()

    from specdsl import templates
    from specdsl.contract.ops import RunContext
    from specdsl.ops.format import FormatOp
    from specdsl.ops.map import MapOp

    cats = ["math", "code", "trivia"]
    rows = [{"id": f"r{i}", "question": f"What is {i} plus {i}? é", "answer": str(2 * i), "n": i,
             "category": cats[i % 3]} for i in range(args.rows)]
    print(f"{args.rows:,} rows; seconds (ratio: Jinja per row / this)")
    total_jinja = total_many = 0.0
    for label, source in TEMPLATES.items():
        jinja_s, expected = timed(lambda: [templates._render_jinja(source, r, VARIABLES) for r in rows])
        row_s, per_row = timed(lambda: [templates.render(source, r, VARIABLES) for r in rows])
        many_s, many = timed(lambda: templates.render_many(source, rows, VARIABLES))
        assert per_row == expected and many == expected, label
        total_jinja += jinja_s
        total_many += many_s
        print(f"  {label:18s} Jinja {jinja_s:6.2f}   render {row_s:6.2f} ({jinja_s / row_s:5.1f}x)   "
              f"render_many {many_s:6.2f} ({jinja_s / many_s:5.1f}x)")
    print(f"  {'all four':18s} Jinja {total_jinja:6.2f}   render_many {total_many:6.2f} "
          f"({total_jinja / total_many:5.1f}x)")

    services = SimpleNamespace()

    def ctx(params):
        return RunContext(node_id="n", params=params, inputs={"from": rows}, vars=VARIABLES, seed=0,
                          services=services, artifact_dir=Path("."))

    fmt = {"from": "x", "to": "chat", "system": "{{ strategies[row.category] }}", "user": "{{ row.question }}",
           "assistant": "{{ row.answer }}"}
    mapped = {"from": "x", "columns": {"prompt": TEMPLATES["literal + columns"], "hint": TEMPLATES["var by column"]}}
    for label, op, params in (("format (chat, 3 templates)", FormatOp(), fmt), ("map (2 columns)", MapOp(), mapped)):
        slow_s, slow = timed(lambda: _jinja_only(op, ctx(params), templates))
        fast_s, fast = timed(lambda: op.run(ctx(params)))
        assert fast == slow, label
        print(f"  op {label:26s} Jinja per row {slow_s:6.2f}   now {fast_s:6.2f} ({slow_s / fast_s:5.1f}x)")
    return 0


def _jinja_only(op, ctx, templates):
    """The op's row-by-row path with every template rendered by Jinja: what it did before."""
    saved = templates._fast_parts
    templates._fast_parts = lambda source: None
    try:
        return op._run_rows(ctx)
    finally:
        templates._fast_parts = saved


if __name__ == "__main__":
    sys.exit(main())
