"""`specdsl inspect`: a real store built by running a small plan (sources, erase_prompt, pam, IN2 segment +
interleave, and the tokenize nodes the train steps lower to) on the tiny random-init model; no generation,
no training. The terminal view is checked through a recording rich console (ANSI styles included), the
HTML view by parsing it: every example's trained-token spans must be exactly its labels != -100.
"""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

TOKENIZED = ("sft.tokens", "sc.tokens", "film.tokens")

PROBLEMS = [
    {"id": "p1", "question": "Alice has 12 apples and gives 5 to Bob. How many are left?", "answer": "7",
     "response": "12 - 5 = 7.\nAnswer: 7",
     "response_prompt": [{"role": "system", "content": "Subtract the second number from the first."},
                         {"role": "user", "content": "Alice has 12 apples and gives 5 to Bob. How many are left?"}],
     "initial_answer": "12 - 5 = 6.\nAnswer: 6", "corrected_answer": "12 - 5 = 7.\nAnswer: 7"},
    {"id": "p2", "question": "What is 7 times 8?", "answer": "56", "response": "7 * 8 = 56.\nAnswer: 56",
     "response_prompt": [{"role": "system", "content": "Multiply the two numbers."},
                         {"role": "user", "content": "What is 7 times 8?"}],
     "initial_answer": "7 * 8 = 56.\nAnswer: 56", "corrected_answer": "7 * 8 = 56.\nAnswer: 56"},
    {"id": "p3", "question": "A train travels 60 miles per hour for 2 hours. How far?", "answer": "120",
     "response": "60 * 2 = 120.\nAnswer: 120",
     "response_prompt": [{"role": "system", "content": "Multiply speed by time."},
                         {"role": "user", "content": "A train travels 60 miles per hour for 2 hours. How far?"}],
     "initial_answer": "60 + 2 = 62.\nAnswer: 62", "corrected_answer": "60 * 2 = 120.\nAnswer: 120"},
]
DOCS = [
    {"id": "d1", "text": "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy. "
                         "The quick brown fox jumps over the lazy dog. " * 3},
    {"id": "d2", "text": "A train leaves the station at 3 pm and travels 60 miles per hour. "
                         "Alice has 12 apples and gives 5 to Bob. " * 3},
    {"id": "d3", "text": "def add(a, b):\n    return a + b\n\n" * 4},
]
QA = [{"id": "q1", "text_id": "k1", "segment": "The secret number of the blue door is 42.",
       "question": "What is the secret number of the blue door?", "answer": "42"},
      {"id": "q2", "text_id": "k2", "segment": "Bob keeps 1000 apples in the red barn.",
       "question": "How many apples are in the red barn?", "answer": "1000"}]


TRAIN_STEPS = """
  - id: erased
    erase_prompt: {from: problems, generic_system: "You are a helpful assistant."}
  - id: sft
    train: {from: erased, model: student, max_steps: 1, batch_size: 2}
  - id: corrected
    pam: {from: problems}
  - id: sc
    train: {from: corrected, model: student, max_steps: 1, batch_size: 2}
  - id: segs
    segment: {from: docs, model: student, min_tokens: 16}
  - id: long
    interleave: {from: qa, pool: segs, model: student, min_tokens: 80, max_tokens: 120}
  - id: film
    train: {from: long, model: student, max_steps: 1, batch_size: 2}
"""


def write_spec(root: Path, model_dir: Path, *, steps: str = TRAIN_STEPS, name: str = "inspect-test") -> Path:
    """A spec exercising every mask the inspect view knows: erased instruction, PAM, IN2 key segments.
    The train steps lower to `<id>.tokens` tokenize nodes, which run without training anything."""
    root.mkdir(parents=True, exist_ok=True)
    for source, rows in (("problems", PROBLEMS), ("docs", DOCS), ("qa", QA)):
        (root / f"{source}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"""specdsl: 1
name: {name}
seed: 0
models:
  student: {{backend: transformers, model: {model_dir}, max_new_tokens: 4}}
sources:
  problems: {{path: problems.jsonl}}
  docs: {{path: docs.jsonl}}
  qa: {{path: qa.jsonl}}
steps:""" + steps
    path = root / "spec.yaml"
    path.write_text(spec)
    return path


def run_tokenize_nodes(plan, store_dir, registry=None):
    """Run everything the tokenize nodes need (no generation, no training)."""
    from specdsl.execute.runner import run

    result = None
    for node in TOKENIZED:
        result = run(plan, until=node, store_dir=store_dir, progress=False, registry=registry)
        assert result.ok, [(n.id, n.status, n.note) for n in result.nodes]
    return result


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    from specdsl import api
    from specdsl.execute.store import Store

    root = tmp_path_factory.mktemp("inspect")
    plan = api.compile_spec(write_spec(root, tiny_model_dir))
    run_tokenize_nodes(plan, root / ".specdsl")
    return plan, Store(root / ".specdsl")


def recording_console(width: int = 160):
    from rich.console import Console

    return Console(record=True, width=width, force_terminal=True, color_system="truecolor")


def style_prefix(style: str) -> str:
    """The ANSI codes rich writes before text of ``style``."""
    from rich.color import ColorSystem
    from rich.style import Style

    rendered = Style.parse(style).render("\x00", color_system=ColorSystem.TRUECOLOR)
    return rendered.split("\x00")[0]


class ExampleParser(HTMLParser):
    """Collects, per `<section class="example">`, its data attributes and its tokens (class, text, index)."""

    def __init__(self):
        super().__init__()
        self.examples: list[dict] = []
        self.stack: list[tuple[str, str | None]] = []   # (tag, role) role: tok / key / None
        self.keys: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class") or ""
        role = None
        if tag == "section" and cls == "example":
            self.examples.append({**{k: v for k, v in a.items() if k.startswith("data-")}, "tokens": [], "keys": []})
        elif tag == "span" and cls.split()[:1] == ["tok"]:
            self.examples[-1]["tokens"].append({"class": cls, "text": "", "i": int(a["data-i"]),
                                                "label": a.get("data-label")})
            role = "tok"
        elif tag == "span" and cls == "key":
            self.examples[-1]["keys"].append("")
            role = "key"
        elif tag == "span" and cls == "nl":
            role = "nl"
        self.stack.append((tag, role))

    def handle_endtag(self, tag):
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break

    def handle_data(self, data):
        roles = [r for _, r in self.stack]
        if "nl" in roles:
            return  # the ↵ marker is decoration, not text
        if "tok" in roles:
            self.examples[-1]["tokens"][-1]["text"] += data
        if "key" in roles:
            self.examples[-1]["keys"][-1] += data


def parse_examples(html: str) -> list[dict]:
    p = ExampleParser()
    p.feed(html)
    return p.examples


def trained_runs_of(tokens: list[dict]) -> list[str]:
    runs, last = [], None
    for t in tokens:
        if t["class"] == "tok trained":
            if last is not None and t["i"] == last + 1:
                runs[-1] += t["text"]
            else:
                runs.append(t["text"])
            last = t["i"]
    return runs


def assert_self_contained(html: str) -> None:
    low = html.lower()
    for bad in ('src="http', "src='http", 'href="http', "href='http", "<link", "@import", "url(http", "<iframe"):
        assert bad not in low, bad


# -- errors ------------------------------------------------------------------------------------------


def test_unknown_node_lists_the_nodes(built):
    from specdsl.errors import RunError
    from specdsl.views.inspect import inspect_node

    plan, store = built
    with pytest.raises(RunError) as e:
        inspect_node(plan, "sft.token", store_dir=store.root, console=recording_console())
    assert "no node 'sft.token'" in e.value.message
    assert "did you mean 'sft.tokens'?" in e.value.hint
    for node in plan.nodes:
        assert node.id in e.value.hint


def test_node_not_in_the_store_hints_the_run_command(built, tmp_path):
    from specdsl.errors import RunError
    from specdsl.views.inspect import inspect_node

    plan, store = built
    with pytest.raises(RunError) as e:  # no store at all
        inspect_node(plan, "sft.tokens", store_dir=tmp_path / "nothing", console=recording_console())
    assert "not in the store" in e.value.message
    assert "specdsl run" in e.value.hint and "--until sft.tokens" in e.value.hint
    assert not (tmp_path / "nothing").exists(), "inspecting must not create a store"
    with pytest.raises(RunError) as e:  # a store without the node (train nodes never ran here)
        inspect_node(plan, "sft", store_dir=store.root, console=recording_console())
    assert "--until sft" in e.value.hint and "spec.yaml" in e.value.hint


def test_cli_errors_are_one_clean_message(built):
    from click.testing import CliRunner

    from specdsl.cli import main

    plan, store = built
    res = CliRunner().invoke(main, ["inspect", plan.spec_file, "--node", "nope", "--store", str(store.root)])
    assert res.exit_code == 1
    assert "error: no node 'nope'" in res.output and "Traceback" not in res.output


# -- ordinary nodes -------------------------------------------------------------------------------


def test_ordinary_node_shows_a_table_with_long_values_cut(built):
    from specdsl.views.inspect import inspect_node

    plan, store = built
    console = recording_console(width=400)
    res = inspect_node(plan, "erased", rows=2, store_dir=store.root, console=console)
    out = console.export_text()
    assert not res.tokenized and len(res.rows) == 2 and res.rows_total == 3
    assert "erased erase_prompt  3 rows" in out and "showing 2" in out
    for column in ("question", "messages", "erased_system"):
        assert column in out
    assert "Alice has 12 apples" in out and "What is 7 times 8?" in out
    assert "A train travels" not in out  # the third row is not shown
    assert "…" in out  # the messages JSON is longer than a cell shows


# -- tokenized nodes: terminal ----------------------------------------------------------------------


def test_terminal_highlights_exactly_the_trained_text(built, tiny_tokenizer):
    from specdsl.views.inspect import STYLE_MASKED_ANSWER, STYLE_TRAINED, inspect_node
    from specdsl.designs.masking import trained_text

    plan, store = built
    trained_prefix = style_prefix(STYLE_TRAINED)
    for node in TOKENIZED:
        console = recording_console()
        res = inspect_node(plan, node, rows=3, store_dir=store.root, console=console)
        assert res.tokenized
        ansi, plain = console.export_text(styles=True, clear=False), console.export_text()
        all_rows = store.load(plan.node(node).fingerprint)
        for row in res.rows:
            share = row["n_trained"] / row["n_tokens"]
            assert f"id={row['id']}  tokens {row['n_tokens']:,}  trained {row['n_trained']:,}  ({share:.1%} with loss)" \
                in plain
            runs = trained_text(tiny_tokenizer, row["input_ids"], row["labels"])
            assert runs
            for run in runs:  # every line of every trained run is printed in the trained style
                for line in run.split("\n"):
                    if line.strip():
                        assert trained_prefix + line in ansi, (node, line)
        tokens = sum(r["n_tokens"] for r in all_rows)
        trained = sum(sum(1 for x in r["labels"] if x != -100) for r in all_rows)
        assert res.totals.tokens == tokens and res.totals.trained == trained
        assert f"all {len(all_rows)} rows: {tokens:,} tokens, {trained:,} with loss ({trained / tokens:.1%})" in plain
        assert "legend:" in plain and "trained (loss)" in plain

    # PAM: the wrong initial answer is shown struck through (masked), the correction trained.
    console = recording_console()
    inspect_node(plan, "sc.tokens", rows=1, store_dir=store.root, console=console)
    ansi, plain = console.export_text(styles=True, clear=False), console.export_text()
    assert style_prefix(STYLE_MASKED_ANSWER) + "12 - 5 = 6." in ansi
    assert trained_prefix + "12 - 5 = 7." in ansi
    assert "initial_answer no loss" in plain and "corrected_answer loss" in plain


def test_terminal_shows_the_erased_instruction_apart(built):
    from specdsl.views.inspect import inspect_node

    plan, store = built
    console = recording_console()
    inspect_node(plan, "sft.tokens", rows=3, store_dir=store.root, console=console)
    plain = console.export_text()
    for p in PROBLEMS:
        system = p["response_prompt"][0]["content"]
        assert f"erased: {system}  (not in the training text)" in plain
    assert "LEAK" not in plain


def test_terminal_marks_in2_key_segments(built):
    from specdsl.views.inspect import STYLE_KEY, inspect_node

    plan, store = built
    console = recording_console()
    inspect_node(plan, "film.tokens", rows=2, store_dir=store.root, console=console)
    ansi, plain = console.export_text(styles=True, clear=False), console.export_text()
    for qa in QA:
        assert qa["segment"] in plain
        assert style_prefix(f"grey62 {STYLE_KEY}") + qa["segment"] in ansi
    assert "key segment 0: segment #" in plain


# -- tokenized nodes: HTML ---------------------------------------------------------------------------


def test_html_tokens_match_the_labels(built, tiny_tokenizer, tmp_path):
    from specdsl.views.inspect import inspect_node
    from specdsl.designs.masking import trained_text

    plan, store = built
    for node in TOKENIZED:
        out = tmp_path / f"{node}.html"
        res = inspect_node(plan, node, rows=3, html=out, store_dir=store.root, console=recording_console())
        assert res.html_path == out and res.token_view
        html = out.read_text()
        assert_self_contained(html)
        examples = parse_examples(html)
        rows = {r["id"]: r for r in store.load(plan.node(node).fingerprint)}
        assert [e["data-id"] for e in examples] == [r["id"] for r in res.rows]
        for ex in examples:
            row = rows[ex["data-id"]]
            n_trained = sum(1 for x in row["labels"] if x != -100)
            assert ex["data-view"] == "tokens"
            assert int(ex["data-trained-count"]) == n_trained == row["n_trained"]
            assert int(ex["data-token-count"]) == len(ex["tokens"]) == len(row["input_ids"])
            trained = [t for t in ex["tokens"] if t["class"] == "tok trained"]
            assert [t["i"] for t in trained] == [i for i, x in enumerate(row["labels"]) if x != -100]
            # Token by token, the page shows the text; the trained runs decode to the trained ids.
            assert "".join(t["text"] for t in ex["tokens"]) == row["text"]
            assert trained_runs_of(ex["tokens"]) == trained_text(tiny_tokenizer, row["input_ids"], row["labels"])
            assert all(t["class"] in ("tok trained", "tok masked", "tok masked answer") for t in ex["tokens"])


def test_html_names_the_spans_behind_each_mask(built, tmp_path):
    from specdsl.views.inspect import inspect_node

    plan, store = built
    # PAM: tokens of the wrong first answer are masked answers, labelled initial_answer.
    html = inspect_node(plan, "sc.tokens", rows=1, html=tmp_path / "sc.html", store_dir=store.root,
                        console=recording_console()).html_path.read_text()
    (ex,) = parse_examples(html)
    initial = [t for t in ex["tokens"] if t["label"] == "initial_answer"]
    assert initial and all(t["class"] == "tok masked answer" for t in initial)
    assert "".join(t["text"] for t in initial).strip() == "12 - 5 = 6.\nAnswer: 6"
    assert {t["label"] for t in ex["tokens"] if t["class"] == "tok trained"} >= \
        {"verification", "corrected_answer", "final_verification", "end_of_turn"}
    assert "masked answer" in html and "span label" in html  # legend and per-example span table

    # Prompt erasure: the erased instruction is shown apart, and is not among the tokens.
    html = inspect_node(plan, "sft.tokens", rows=3, html=tmp_path / "sft.html", store_dir=store.root,
                        console=recording_console()).html_path.read_text()
    for p, ex in zip(PROBLEMS, parse_examples(html)):
        system = p["response_prompt"][0]["content"]
        assert f'<div class="erased">erased: <s>{system}</s>' in html
        assert system not in "".join(t["text"] for t in ex["tokens"])

    # IN2: the key segment is outlined inside the context.
    html = inspect_node(plan, "film.tokens", rows=2, html=tmp_path / "film.html", store_dir=store.root,
                        console=recording_console()).html_path.read_text()
    examples = parse_examples(html)
    assert [ex["keys"] for ex in examples] == [[qa["segment"]] for qa in QA]
    for ex in examples:
        assert int(ex["data-trained-count"]) == sum(1 for t in ex["tokens"] if t["class"] == "tok trained")


def test_all_rows_and_cli_html(built, tmp_path):
    from click.testing import CliRunner

    from specdsl.cli import main

    plan, store = built
    out = tmp_path / "all.html"
    res = CliRunner().invoke(main, ["inspect", plan.spec_file, "--node", "sc.tokens", "--rows", "10", "--html",
                                    str(out), "--store", str(store.root)])
    assert res.exit_code == 0, res.output
    assert "all 3 rows:" in res.output
    assert len(parse_examples(out.read_text())) == 3


def test_without_a_tokenizer_the_html_falls_back_to_spans(tiny_model_dir, tmp_path):
    """The model folder is gone after tokenizing: the view shows the character spans, counts from labels."""
    from specdsl import api
    from specdsl.execute.runner import run
    from specdsl.views.inspect import inspect_node

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    plan = api.compile_spec(write_spec(tmp_path / "spec", model))
    assert run(plan, until="sc.tokens", progress=False).ok
    shutil.rmtree(model)
    console = recording_console()
    res = inspect_node(plan, "sc.tokens", rows=2, html=tmp_path / "spans.html", console=console)
    assert not res.token_view
    assert any("no model folder" in n for n in res.notes), res.notes
    html = res.html_path.read_text()
    assert "token boundaries unavailable" in html
    from specdsl.execute.store import Store

    rows = Store(tmp_path / "spec" / ".specdsl").load(plan.node("sc.tokens").fingerprint)[:2]
    examples = parse_examples(html)
    assert len(examples) == 2
    for ex, row in zip(examples, rows):
        assert ex["data-view"] == "spans" and not ex["tokens"]
        assert int(ex["data-trained-count"]) == sum(1 for x in row["labels"] if x != -100)
    assert '<span class="seg masked answer" data-label="initial_answer">12 - 5 = 6.' in html
    # The terminal still highlights the trained spans.
    assert "12 - 5 = 7." in console.export_text()


def test_long_untrained_stretches_can_be_elided_without_touching_loss_or_keys(built, tiny_tokenizer):
    """The report hides the middle of long masked runs (IN2 contexts); trained tokens and keys stay."""
    import re

    from specdsl.views.inspect import render_examples_html

    plan, store = built
    rows = store.load(plan.node("film.tokens").fingerprint)
    html = render_examples_html(rows, tiny_tokenizer, max_masked_run=20)
    elided = [int(n) for n in re.findall(r'data-elided="(\d+)"', html)]
    assert elided and all(n > 0 for n in elided)
    examples = parse_examples(html)
    assert [ex["keys"] for ex in examples] == [[qa["segment"]] for qa in QA]
    for ex, row in zip(examples, rows):
        trained = [t["i"] for t in ex["tokens"] if t["class"] == "tok trained"]
        assert trained == [i for i, x in enumerate(row["labels"]) if x != -100]
        assert int(ex["data-trained-count"]) == len(trained)
    assert sum(len(ex["tokens"]) for ex in examples) + sum(elided) == sum(len(r["input_ids"]) for r in rows)
