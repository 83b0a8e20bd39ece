"""The run report (`report.html` beside every run.json) and the inspect page, checked as files and in a
real browser: headless Chromium dumps the DOM (token spans, the SVG plan graph) and takes screenshots
whose pixels must show the trained-token highlight and the node colours.

The plan runs end to end with no generation and no training: sources, prompt erasure, PAM, IN2 segment +
interleave, three `tokenize` steps exported as datasets, and an `evaluate` step. Its probe is a plugin defined here (principle
8: plugins defined inside tests): IN2-style position probing on records, answered by searching the
context and by a "lost in the middle" answerer, scored and plotted by specdsl's own position-probe code.

Chromium: Debian's `chromium` package (`apt-get install -y chromium`). Only the browser tests skip, and
only when no Chromium binary is installed.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from specdsl.contract.hookspecs import hookimpl
from tests.test_inspect import PROBLEMS, assert_self_contained, parse_examples, recording_console, write_spec

TOKENIZE_STEPS = """
  - id: erased
    erase_prompt: {from: problems, generic_system: "You are a helpful assistant."}
  - id: erased_tokens
    tokenize: {from: erased, model: student}
  - id: corrected
    pam: {from: problems}
  - id: pam_tokens
    tokenize: {from: corrected, model: student}
  - id: segs
    segment: {from: docs, model: student, min_tokens: 16}
  - id: long
    interleave: {from: qa, pool: segs, model: student, min_tokens: 80, max_tokens: 120}
  - id: in2_tokens
    tokenize: {from: long, model: student}
  - id: export
    export: {from: in2_tokens, path: out/in2, format: parquet}
  - id: export_pam
    export: {from: pam_tokens, path: out/pam, format: parquet}
  - id: export_erased
    export: {from: erased_tokens, path: out/erased, format: parquet}
  - id: probe
    evaluate:
      models: [student]
      probes:
        - {probe: records_search, context_tokens: 320, buckets: 4, per_bucket: 3}
"""
TOKENIZED = ("erased_tokens", "pam_tokens", "in2_tokens")
TRAINED_RGB = (0xB7, 0xEB, 0xC0)     # --trained in specdsl.views.html_page.CSS
RAN_FILL_RGB = (0xDC, 0xF5, 0xE1)    # STATUS_COLOURS["ran"] fill in specdsl.views.report


# -- the test plugin: a probe that needs no model ------------------------------------------------------


def _search(item) -> str:
    """Answer a records question by reading the context (what a perfect long-context model does)."""
    line = re.search(rf"^id: {re.escape(item.query)}, name: [^,]+, label: (.+)$", item.context, re.MULTILINE)
    return line.group(1) if line else ""


class RecordsSearchProbe:
    name = "records_search"
    params_schema = {"type": "object", "additionalProperties": False, "properties": {
        "probe": {"const": "records_search"}, "context_tokens": {"type": "integer"},
        "buckets": {"type": "integer"}, "per_bucket": {"type": "integer"}}}

    def run(self, ctx):
        from specdsl.probes.position import build_position_probe, plot_position_results, results_table, \
            score_position_probe

        p = ctx.params
        items = build_position_probe("records", context_tokens=p["context_tokens"], n_buckets=p["buckets"],
                                     per_bucket=p["per_bucket"], seed=0)
        middle_lost = [_search(it) if not 0.25 <= it.position < 0.75 else "no idea" for it in items]
        by_model = {"search": {"records": score_position_probe(items, [_search(it) for it in items])},
                    "lost-in-the-middle": {"records": score_position_probe(items, middle_lost)}}
        plot = ctx.artifact_dir / "position.png"
        plot_position_results(by_model, plot)
        return {"probe": "position", "table": results_table(by_model), "plot": plot.name,
                "results": {m: {t: r.to_dict() for t, r in tasks.items()} for m, tasks in by_model.items()}}


class ProbePlugin:
    __name__ = "test_report_probe"

    @hookimpl
    def register_probes(self, register):
        register(RecordsSearchProbe())


@pytest.fixture(scope="module")
def registry():
    """The installed plugins plus the test probe."""
    import specdsl.plugins as plugins

    return plugins.build_registry(extra_plugins=(ProbePlugin(),))


@pytest.fixture(scope="module")
def report_run(registry, tiny_model_dir, tmp_path_factory):
    from specdsl import api
    from specdsl.api import run_plan as run  # the API run writes report.html

    root = tmp_path_factory.mktemp("report")
    plan = api.compile_spec(write_spec(root, tiny_model_dir, steps=TOKENIZE_STEPS, name="report-test"),
                            registry=registry)
    result = run(plan, store_dir=root / ".specdsl", progress=False, registry=registry)
    assert result.ok, [(n.id, n.status, n.note) for n in result.nodes]
    return plan, result


# -- a tiny DOM reader for report pages ----------------------------------------------------------------


class ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.nodes: list[dict] = []
        self.edges: list[tuple[str, str]] = []
        self.images: list[str] = []
        self.svgs = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and "dag" in (a.get("class") or ""):
            self.svgs += 1
        elif tag == "g" and a.get("class") == "node":
            self.nodes.append({"id": a["data-node"], "status": a["data-status"]})
        elif tag == "path" and a.get("class") == "edge":
            self.edges.append((a["data-from"], a["data-to"]))
        elif tag == "img":
            self.images.append(a.get("src") or "")


def parse_report(html: str) -> ReportParser:
    p = ReportParser()
    p.feed(html)
    return p


def plan_edges(plan) -> set[tuple[str, str]]:
    return {(src, n.id) for n in plan.nodes for _, src in n.inputs} | \
        {(ref, n.id) for n in plan.nodes for _, ref in n.models if plan.has(ref)}


# -- report files (no browser needed) -----------------------------------------------------------------


def test_every_run_writes_a_report_beside_its_manifest(report_run):
    plan, result = report_run
    report = result.manifest_path.parent / "report.html"
    latest = result.store.root / "report.html"
    assert report.is_file() and latest.read_bytes() == report.read_bytes()
    html = report.read_text()
    assert_self_contained(html)
    dom = parse_report(html)
    assert dom.svgs == 1
    assert sorted(n["id"] for n in dom.nodes) == sorted(n.id for n in plan.nodes)
    assert {n["status"] for n in dom.nodes} == {"ran"}
    assert set(dom.edges) == plan_edges(plan)
    for n in result.nodes:  # per-node rows in the table
        assert f'<tr id="node-{n.id}"><td><b>{n.id}</b>' in html
    # The evaluation: the probe's table and its plot, embedded byte for byte.
    fp = plan.node("probe").fingerprint
    png = (result.store.node_dir(fp) / "position.png").read_bytes()
    assert "data:image/png;base64," + base64.b64encode(png).decode() in dom.images
    assert "<h4>probe: position</h4>" in html and "lost-in-the-middle" in html
    # A section of examples per tokenized node, linked from the node table.
    for node in TOKENIZED:
        assert f'id="examples-{node}"' in html and f'href="#examples-{node}"' in html


def test_report_examples_count_trained_tokens(report_run):
    plan, result = report_run
    html = (result.manifest_path.parent / "report.html").read_text()
    examples = parse_examples(html)
    expected = []
    for node in TOKENIZED:
        for row in result.rows(node)[:3]:
            expected.append((row["id"], sum(1 for x in row["labels"] if x != -100)))
    assert [(e["data-id"], int(e["data-trained-count"])) for e in examples] == expected
    for ex in examples:
        assert ex["data-view"] == "tokens"
        assert sum(1 for t in ex["tokens"] if t["class"] == "tok trained") == int(ex["data-trained-count"])


def test_report_of_a_cached_rerun_and_every_input_form(report_run, registry, tmp_path):
    from specdsl.api import run_plan as run  # the API run writes report.html
    from specdsl.views.report import write_report

    plan, first = report_run
    again = run(plan, store_dir=first.store.root, progress=False, registry=registry)
    assert {n.status for n in again.nodes} == {"cached"}
    html = (again.manifest_path.parent / "report.html").read_text()
    dom = parse_report(html)
    assert {n["status"] for n in dom.nodes} == {"cached"}
    assert any(src.startswith("data:image/png;base64,") for src in dom.images)  # evaluation from the store
    # A RunResult, a run.json path and a manifest mapping give the same report.
    a = write_report(again, tmp_path / "a.html").read_text()
    b = write_report(again.manifest_path, tmp_path / "b.html").read_text()
    c = write_report(json.loads(again.manifest_path.read_text()), tmp_path / "c.html",
                     store_dir=again.store.root).read_text()
    assert a == b == c
    # --until: nodes outside the run show as stored or not computed.
    partial = run(plan, store_dir=tmp_path / "fresh", until="erased_tokens", progress=False, registry=registry)
    dom = parse_report((partial.manifest_path.parent / "report.html").read_text())
    status = {n["id"]: n["status"] for n in dom.nodes}
    assert status["erased_tokens"] == "ran" and status["in2_tokens"] == "not computed"
    assert len(dom.nodes) == len(plan.nodes)


def test_inspecting_an_evaluate_node_shows_its_results(report_run, tmp_path):
    from specdsl.views.inspect import inspect_node

    plan, result = report_run
    console = recording_console()
    res = inspect_node(plan, "probe", html=tmp_path / "probe.html", store_dir=result.store.root, console=console)
    out = console.export_text()
    assert not res.tokenized
    assert "records_search:" in out and "lost-in-the-middle" in out and "position.png" in out
    html = res.html_path.read_text()
    png = (result.store.node_dir(plan.node("probe").fingerprint) / "position.png").read_bytes()
    assert "data:image/png;base64," + base64.b64encode(png).decode() in html
    assert_self_contained(html)


def test_graph_layout_by_topological_level(report_run):
    from specdsl.views.report import layout

    plan, _ = report_run
    pos = layout([n.to_dict() for n in plan.nodes])
    level = {i: lv for i, (lv, _) in pos.items()}
    assert level["problems"] == level["docs"] == level["qa"] == level["probe"] == 0
    assert level["erased"] == level["corrected"] == level["segs"] == 1
    assert level["long"] == 2 and level["in2_tokens"] == 3 and level["export"] == 4
    for src, dst in plan_edges(plan):
        assert level[src] < level[dst]
    assert len(set(pos.values())) == len(pos)  # no two boxes in one place


# -- in a browser ---------------------------------------------------------------------------------------


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = chromium_binary()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (Debian: apt-get install -y chromium)")


def chromium(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def dump_dom(page: Path, tmp_path: Path) -> str:
    proc = chromium(page, tmp_path, "--dump-dom")
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def screenshot(page: Path, tmp_path: Path, out: Path, size: str = "1200,900") -> Path:
    # Let layout, fonts and the SVG finish before the capture (without these a loaded machine can shoot a
    # half-drawn page).
    proc = chromium(page, tmp_path, f"--screenshot={out}", f"--window-size={size}", "--hide-scrollbars",
                    "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000")
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    return out


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and unfiltered RGB(A) rows of an 8-bit PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [b"".join(r[i:i + 3] for i in range(0, len(r), bpp)) for r in rows]


def colours(path: Path) -> dict[tuple[int, int, int], int]:
    width, height, rows = read_png(path)
    counts: dict[tuple[int, int, int], int] = {}
    for row in rows[::3]:
        for i in range(0, len(row), 9):
            px = (row[i], row[i + 1], row[i + 2])
            counts[px] = counts.get(px, 0) + 1
    return counts


def assert_readable_screenshot(path: Path, must_show: tuple[int, int, int]) -> None:
    assert path.stat().st_size > 20_000, path.stat().st_size
    width, height, _ = read_png(path)
    assert (width, height) == (1200, 900)
    counts = colours(path)
    assert len(counts) > 20, "a near-uniform screenshot"
    white = counts.get((255, 255, 255), 0)
    assert white < 0.97 * sum(counts.values()), "a blank page"
    assert counts.get(must_show, 0) > 20, f"colour {must_show} not visible"


@pytest.mark.browser
@needs_chromium
def test_inspect_page_in_chromium(report_run, tmp_path):
    from specdsl.views.inspect import inspect_node

    plan, result = report_run
    page = tmp_path / "pam.html"
    inspect_node(plan, "pam_tokens", rows=3, html=page, store_dir=result.store.root, console=recording_console())
    dom = dump_dom(page, tmp_path)
    examples = parse_examples(dom)
    rows = result.rows("pam_tokens")
    assert [e["data-id"] for e in examples] == [r["id"] for r in rows] == [p["id"] for p in PROBLEMS]
    for ex, row in zip(examples, rows):
        n = sum(1 for x in row["labels"] if x != -100)
        assert int(ex["data-trained-count"]) == n
        assert sum(1 for t in ex["tokens"] if t["class"] == "tok trained") == n
        assert len(ex["tokens"]) == len(row["input_ids"])
    # The inline script runs: unticking "token boundaries" is wired to the page.
    assert 'id="tokb"' in dom
    shot = screenshot(page, tmp_path, tmp_path / "inspect.png")
    assert_readable_screenshot(shot, TRAINED_RGB)


@pytest.mark.browser
@needs_chromium
def test_report_in_chromium(report_run, tmp_path):
    plan, result = report_run
    page = result.manifest_path.parent / "report.html"
    dom = dump_dom(page, tmp_path)
    parsed = parse_report(dom)
    assert parsed.svgs == 1
    assert sorted(n["id"] for n in parsed.nodes) == sorted(n.id for n in plan.nodes)
    assert set(parsed.edges) == plan_edges(plan)
    for ex in parse_examples(dom):
        assert sum(1 for t in ex["tokens"] if t["class"] == "tok trained") == int(ex["data-trained-count"])
    shot = screenshot(page, tmp_path, tmp_path / "report.png")
    assert_readable_screenshot(shot, RAN_FILL_RGB)
