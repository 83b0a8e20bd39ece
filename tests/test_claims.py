"""Claims: a comparison named in the spec is judged on the items, with its interval and paired test, and
a difference the items cannot resolve is said to be unresolved."""

from __future__ import annotations

import pytest

from specdsl.probes.accuracy import accuracy_evidence, score_accuracy
from specdsl.probes.claims import claims_table, judge, pairs_for
from specdsl.probes.position.scoring import position_evidence
from specdsl.probes.self_correction import SelfCorrectionCase, SelfCorrectionResult, self_correction_evidence

pytestmark = pytest.mark.fast


def _evidence(**flags):
    rows = [{"answer": "1"}] * len(next(iter(flags.values())))
    scored = {name: score_accuracy(rows, ["1" if f else "0" for f in fl], lambda a, g: a == g)
              for name, fl in flags.items()}
    return accuracy_evidence(scored)


def test_a_large_paired_difference_is_resolved_with_mcnemar():
    # 40 items: A right on 30, B right on 10; discordant: A only 20, B only 0.
    a = [True] * 30 + [False] * 10
    b = [True] * 10 + [False] * 30
    out = judge({"better": "a", "than": "b"}, _evidence(a=a, b=b))
    assert out["verdict"] == "resolved" and out["n"] == 40 and out["diff"] == 50.0
    assert out["test"] == "McNemar exact" and out["p"] == pytest.approx(2 / 2 ** 20, rel=1e-2)
    assert out["ci95"][0] > 0
    assert out["conclusion"].startswith("a is better than b on accuracy")


def test_a_small_difference_is_not_resolved_and_says_so():
    a = [True] * 11 + [False] * 9
    b = [True] * 10 + [False] * 10
    out = judge({"better": "a", "than": "b"}, _evidence(a=a, b=b))
    assert out["verdict"] == "not resolved" and out["p"] == 1.0
    assert out["ci95"][0] <= 0 <= out["ci95"][1]
    assert "NOT RESOLVED" in out["conclusion"] and "cannot tell a from b" in out["conclusion"]


def test_the_opposite_direction_is_reported_as_reversed():
    out = judge({"better": "b", "than": "a"}, _evidence(a=[True] * 30 + [False] * 10, b=[True] * 10 + [False] * 30))
    assert out["verdict"] == "reversed" and out["diff"] == -50.0 and "WORSE" in out["conclusion"]


def test_matrixed_arms_are_judged_per_variant_and_as_a_mean():
    strong = [True] * 30 + [False] * 10
    weak = [True] * 10 + [False] * 30
    evidence = _evidence(**{"t.seed-0": strong, "t.seed-1": strong, "t.seed-2": weak, "base": weak})
    out = judge({"better": "t", "than": "base"}, evidence)
    assert out["variants"] == 3
    assert [r["variant"] for r in out["rows"]] == ["seed-0", "seed-1", "seed-2", "mean of 3"]
    assert out["rows"][-1]["diff"] == pytest.approx(100 / 3, abs=0.01)
    assert [r["verdict"] for r in out["rows"][:3]] == ["resolved", "resolved", "not resolved"]
    assert "2 of them resolved alone" in out["conclusion"]
    table = claims_table([out])
    assert [r["variant"] for r in table] == ["seed-0", "seed-1", "seed-2", "mean of 3"]
    assert table[0]["test"] == "McNemar exact" and table[-1]["test"] == "paired bootstrap"


def test_two_matrixed_sides_pair_by_label_and_bad_names_are_refused():
    arms = ["m.mask-true.seed-0", "m.mask-true.seed-1", "m.mask-false.seed-0", "m.mask-false.seed-1", "base"]
    assert pairs_for("m.mask-true", "m.mask-false", arms) == [
        ("seed-0", "m.mask-true.seed-0", "m.mask-false.seed-0"), ("seed-1", "m.mask-true.seed-1", "m.mask-false.seed-1")]
    assert "not one of this probe's arms" in pairs_for("nope", "base", arms)
    with pytest.raises(ValueError, match="metric 'gap'"):
        judge({"better": "a", "than": "b", "metric": "gap"}, _evidence(a=[True], b=[False]))


def test_self_correction_rates_compare_with_the_bootstrap():
    def case(initial, final):
        return SelfCorrectionCase("x", None, "x", initial, final, None)

    fixed = [case(False, True)] * 20 + [case(True, True)] * 20
    broken = [case(False, False)] * 20 + [case(True, False)] * 20
    evidence = self_correction_evidence({"pam": _result(fixed), "plain": _result(broken)})
    up = judge({"better": "pam", "than": "plain", "metric": "wrong_to_right"}, evidence)
    assert up["verdict"] == "resolved" and up["diff"] == 100.0 and up["test"] == "paired bootstrap"
    down = judge({"better": "pam", "than": "plain", "metric": "right_to_wrong"}, evidence)
    assert down["lower_is_better"] and down["verdict"] == "resolved" and down["diff"] == -100.0
    final = judge({"better": "pam", "than": "plain"}, evidence)
    assert final["metric"] == "final_accuracy" and final["test"] == "McNemar exact"


def _result(cases):
    return SelfCorrectionResult(n=len(cases), initial_accuracy=0, final_accuracy=0, wrong_to_right=0,
                                right_to_wrong=0, wrong_to_right_rate=None, right_to_wrong_rate=None,
                                verification_accuracy=None, n_verdicts=0, said_correct_was_right=0,
                                said_correct_was_wrong=0, said_incorrect_was_right=0, said_incorrect_was_wrong=0,
                                no_answer=0, cases=tuple(cases))


class _Item:
    def __init__(self, bucket, expected):
        self.task, self.bucket, self.expected = "records", bucket, expected


def test_a_position_gap_is_better_when_lower_and_resamples_within_buckets():
    items = [_Item(b, "yes") for b in range(2) for _ in range(20)]
    flat = ["yes"] * 40
    sagging = ["yes"] * 20 + ["no"] * 20  # bucket 1 all wrong: gap 100
    evidence = position_evidence(items, {"trained": flat, "base": sagging})
    assert list(evidence.metrics) == ["records gap", "records avg"]
    out = judge({"better": "trained", "than": "base"}, evidence)
    assert out["metric"] == "records gap" and out["diff"] == -100.0 and out["verdict"] == "resolved"
    assert out["ci95"] == [-100.0, -100.0]  # each bucket keeps its 20 items: the gap cannot move


CLAIM_SPEC = """\
specdsl: 1
name: claims
models:
  base: {model: smollm2-135m-instruct}
sources:
  chats: {path: chats.jsonl}
  held: {path: held.jsonl}
steps:
  - id: sft
    matrix: {seed: [0, 1]}
    train: {from: chats, model: base, max_steps: 1}
  - id: score
    evaluate:
      models: [base, sft]
      on: held
      probes:
        - probe: accuracy
          conditions: [{name: base, model: base}, {name: trained, model: sft}]
          claims:
            - {better: trained, than: base}
            - {better: traned, than: base, metric: acuracy}
"""


def test_a_claim_naming_no_arm_or_metric_is_an_error_at_the_claim(tmp_path, monkeypatch):
    from specdsl import api
    from specdsl.errors import SpecErrors

    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    (tmp_path / "chats.jsonl").write_text(
        '{"id": "c", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    (tmp_path / "held.jsonl").write_text('{"id": "h", "question": "2+2?", "answer": "4"}\n')
    (tmp_path / "spec.yaml").write_text(CLAIM_SPEC)
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(tmp_path / "spec.yaml", identities=False)
    errors = sorted(info.value.errors, key=lambda e: (e.pos.line, e.pos.col))
    assert [e.pos.line for e in errors] == [21, 21]
    assert "'traned' is not one of this probe's arms (base, trained.seed-0, trained.seed-1)" in errors[0].message
    assert "unknown metric 'acuracy'" in errors[1].message and "accuracy" in errors[1].hint
    # The first claim, naming the matrixed condition by its prefix, is accepted.
    spec = (tmp_path / "spec.yaml").read_text().replace("            - {better: traned, than: base, metric: acuracy}\n", "")
    (tmp_path / "spec.yaml").write_text(spec)
    plan = api.compile_spec(tmp_path / "spec.yaml", identities=False)
    assert plan.node("score").params["probes"][0]["claims"] == [{"better": "trained", "than": "base"}]


class _Oracle:
    """A backend whose model `good` repeats the question (the gold answer) and `bad` gets every third right."""

    name, version = "oracle", "1"
    options_schema = {"type": "object", "properties": {}, "additionalProperties": False}

    def identity(self, options): return {"model": options["model"]}
    def price(self, options, i, o): return 0.0

    def generate(self, options, requests, on_result):
        from specdsl.contract.hookspecs import GenResult

        for r in requests:
            q = r.messages[-1]["content"]
            right = options["model"] == "good" or int(q) % 3 == 0
            on_result(GenResult(key=r.key, text=q if right else "nope"))


RUN_SPEC = """\
specdsl: 1
name: claims-run
models:
  good: {backend: oracle, model: good}
  bad: {backend: oracle, model: bad}
sources:
  held: {path: held.jsonl}
steps:
  - id: score
    evaluate:
      models: [good, bad]
      on: held
      probes:
        - probe: accuracy
          rule: exact
          claims:
            - {better: good, than: bad}
            - {better: bad, than: good}
"""


def test_a_run_prints_each_claim_with_n_interval_test_and_conclusion(tmp_path, monkeypatch):
    import json
    import types
    import warnings

    from specdsl import api
    from specdsl.contract.hookspecs import hookimpl
    from specdsl.plugins import build_registry

    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    mod = types.ModuleType("oracle_plugin")
    mod.register_backends = hookimpl(lambda register: register(_Oracle()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        registry = build_registry(extra_plugins=(mod,))
    (tmp_path / "held.jsonl").write_text("".join(f'{{"id": "{i}", "question": "{i}", "answer": "{i}"}}\n'
                                                 for i in range(30)))
    (tmp_path / "spec.yaml").write_text(RUN_SPEC)
    plan = api.compile_spec(tmp_path / "spec.yaml", registry=registry)
    result = api.run_plan(plan, store_dir=tmp_path / "store", registry=registry, progress=False)
    assert result.ok, [n.to_dict() for n in result.nodes]
    evaluation = result.evaluations["score"]
    claims = evaluation["results"][0]["claims"]
    # good: 30/30, bad: 10/30 (0, 3, ..., 27); 20 discordant items, all for good
    assert claims[0]["verdict"] == "resolved" and claims[0]["diff"] == pytest.approx(66.67)
    assert claims[0]["n"] == 30 and claims[0]["test"] == "McNemar exact" and claims[0]["p"] == pytest.approx(2 / 2 ** 20, rel=1e-2)
    assert claims[1]["verdict"] == "reversed"
    summary = evaluation["summary"]
    assert "claims (95% paired-bootstrap intervals" in summary and "McNemar exact" in summary
    assert "good is better than bad on accuracy (higher is better): +66.7 points, 95% CI" in summary
    assert "McNemar exact p = 1.91e-06; n = 30 items" in summary
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["evaluations"]["score"]["results"][0]["claims"][0]["conclusion"] == claims[0]["conclusion"]


def test_a_margin_case_is_not_resolved_and_says_why():
    # The CI run of the shipped erasure spec: 60 items, 11 right only under A, 3 only under B.
    a = [True] * 11 + [False] * 3 + [True] * 4 + [False] * 42
    b = [False] * 11 + [True] * 3 + [True] * 4 + [False] * 42
    out = judge({"better": "a", "than": "b"}, _evidence(a=a, b=b))
    assert out["p"] == 0.0574 and out["verdict"] == "not resolved"
    reason = "the interval includes 0" if out["ci95"][0] <= 0 else "the interval and the test disagree at the margin"
    assert reason in out["conclusion"]
