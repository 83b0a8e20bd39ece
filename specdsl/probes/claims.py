"""Claims: the comparison a spec says its evaluation tests, judged on the items and printed in words.

An evaluate step's probe may carry ``claims:``, each naming two of the probe's arms (accuracy conditions,
or models) and a metric::

    claims:
      - {better: sft+generic, than: base+generic}            # metric: the probe's first (accuracy)
      - {better: in2, than: student, metric: document gap}   # a gap is better when lower

A probe that supports claims returns its per-item outcomes as :class:`Evidence` (every arm scored on the
same items, in the same order) and publishes :class:`Metric` definitions; :func:`judge` then compares the
two arms on the same items: the difference with a 95% paired-bootstrap interval (items resampled
together under both arms, within strata when the probe has them), and a paired test (the exact McNemar
test when the metric is the mean of a per-item yes/no, else the paired bootstrap's two-sided p). A claim
counts as *resolved* only when the interval excludes 0 and p < 0.05; otherwise the conclusion says the
run cannot tell the arms apart, rather than reading a direction into noise.

Arms written out by a ``matrix:`` (``sft+generic.seed-0``, ``sft+generic.seed-1``...) are matched by their
prefix: each variant is judged on its own, and the mean over variants gets its own interval (items
resampled once for all of them); that mean is the claim's headline. When both sides are matrixed the
variants pair by label (``sc.mask-true.seed-0`` with ``sc.mask-false.seed-0``).

Pure functions of per-item outcomes: the standard library only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from specdsl.probes.stats import BOOTSTRAP_RESAMPLES, _percentile, mcnemar_exact, significant

ALPHA = 0.05

CLAIMS_SCHEMA: Mapping[str, Any] = {
    "type": "array", "minItems": 1,
    "description": "comparisons this probe tests, each judged with its 95% interval and a paired test and "
                   "printed as a conclusion (docs/spec.md, Claims)",
    "items": {"type": "object", "required": ["better", "than"], "additionalProperties": False, "properties": {
        "better": {"type": "string", "minLength": 1,
                   "description": "the arm (condition or model) claimed better; a matrixed one stands for its variants"},
        "than": {"type": "string", "minLength": 1, "description": "the arm it is compared with"},
        "metric": {"type": "string", "minLength": 1, "description": "what is compared (default: the probe's first metric)"},
        "meta": {"type": "object", "description": "free-form metadata, never interpreted"}}},
}


@dataclass(frozen=True)
class Metric:
    """A statistic over an arm's per-item outcomes (percent). ``flag`` maps one outcome to the yes/no whose
    mean the metric is, when it is one (the McNemar test applies); ``lower_is_better`` for gaps and
    breakage rates."""

    value: Callable[[Sequence[Any]], "float | None"]
    flag: "Callable[[Any], bool] | None" = None
    lower_is_better: bool = False
    description: str = ""


@dataclass(frozen=True)
class Evidence:
    """Each arm's per-item outcomes, items in the same order for every arm; ``strata`` (one label per item,
    e.g. a position bucket) keeps each stratum's size in the bootstrap."""

    arms: Mapping[str, Sequence[Any]]
    metrics: Mapping[str, Metric]
    strata: "Sequence[Any] | None" = None


@dataclass
class _Pair:
    label: str
    better: str
    than: str
    values: list[float] = field(default_factory=list)


def variants_of(name: str, arms: Sequence[str]) -> dict[str, str]:
    """``{variant label: arm}`` for the arms ``name`` stands for: itself (label ``""``), or the variants a
    matrix wrote out of it (``name.<label>``)."""
    if name in arms:
        return {"": name}
    return {arm[len(name) + 1:]: arm for arm in arms if arm.startswith(name + ".")}


def pairs_for(better: str, than: str, arms: Sequence[str]) -> list[tuple[str, str, str]] | str:
    """(label, better arm, than arm) for each variant pair, or a message saying why the claim names no pair."""
    left, right = variants_of(better, arms), variants_of(than, arms)
    for name, found in ((better, left), (than, right)):
        if not found:
            return f"'{name}' is not one of this probe's arms ({', '.join(arms)})"
    if len(left) > 1 and len(right) > 1:
        if set(left) != set(right):
            return f"the variants of '{better}' ({', '.join(left)}) and '{than}' ({', '.join(right)}) do not pair up"
        return [(label, left[label], right[label]) for label in left]
    if len(right) > 1:
        (arm,) = left.values()
        return [(label, arm, other) for label, other in right.items()]
    (other,) = right.values()
    return [(label, arm, other) for label, arm in left.items()]


def _resample(n: int, strata: Sequence[Any] | None, rng: random.Random) -> list[int]:
    if strata is None:
        return [rng.randrange(n) for _ in range(n)]
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    return [g[rng.randrange(len(g))] for g in groups.values() for _ in g]


def _p_text(p: float) -> str:
    return f"{p:.3g}"


def judge(claim: Mapping[str, Any], evidence: Evidence, *, seed: int = 0,
          resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """One claim judged on ``evidence``: each variant pair, the mean over variants when there are several,
    and a verdict in words. Raises ValueError for a claim that names no arm or metric of the evidence."""
    metric_name = claim.get("metric") or next(iter(evidence.metrics))
    if metric_name not in evidence.metrics:
        raise ValueError(f"metric '{metric_name}' is not one of this probe's ({', '.join(evidence.metrics)})")
    metric = evidence.metrics[metric_name]
    found = pairs_for(claim["better"], claim["than"], list(evidence.arms))
    if isinstance(found, str):
        raise ValueError(found)
    n = len(next(iter(evidence.arms.values())))
    sign = -1.0 if metric.lower_is_better else 1.0  # "better" measured as a gain in the metric's good direction

    def value(arm: str, idx: Sequence[int] | None) -> float | None:
        outcomes = evidence.arms[arm]
        return metric.value(outcomes if idx is None else [outcomes[i] for i in idx])

    def gain(a: str, b: str, idx: Sequence[int] | None) -> float | None:
        va, vb = value(a, idx), value(b, idx)
        return None if va is None or vb is None else sign * (va - vb)

    rng = random.Random(seed)
    pairs = [_Pair(label, a, b) for label, a, b in found]
    pooled: list[float] = []
    for _ in range(resamples):
        idx = _resample(n, evidence.strata, rng)
        gains = [gain(p.better, p.than, idx) for p in pairs]
        for p, g in zip(pairs, gains):
            if g is not None:
                p.values.append(g)
        if all(g is not None for g in gains):
            pooled.append(sum(gains) / len(gains))  # type: ignore[arg-type]

    rows = []
    for p in pairs:
        exact = None
        if metric.flag is not None:  # a mean of yes/no per item: the exact paired test on the discordant items
            flags_a = [metric.flag(o) for o in evidence.arms[p.better]]
            flags_b = [metric.flag(o) for o in evidence.arms[p.than]]
            only_a = sum(x and not y for x, y in zip(flags_a, flags_b))
            only_b = sum(y and not x for x, y in zip(flags_a, flags_b))
            exact = {"test": "McNemar exact", "p": significant(mcnemar_exact(only_a, only_b)),
                     "only_better_right": only_a, "only_than_right": only_b}
        row = _row(p.label or "-", n, value(p.better, None), value(p.than, None), gain(p.better, p.than, None),
                   p.values, sign, exact)
        rows.append({"better": p.better, "than": p.than, **row})
    if len(pairs) > 1:
        gains = [gain(p.better, p.than, None) for p in pairs]
        point = None if any(g is None for g in gains) else sum(gains) / len(gains)  # type: ignore[arg-type]
        mean_row = _row(f"mean of {len(pairs)}", n, None, None, point, pooled, sign)
        headline = {"better": claim["better"], "than": claim["than"], **mean_row}
        rows.append(headline)
    else:
        headline = rows[0]
    resolved = [r for r in rows[: len(pairs)] if r["verdict"] == "resolved"]
    out = {"better": claim["better"], "than": claim["than"], "metric": metric_name,
           "lower_is_better": metric.lower_is_better, "n": n, "variants": len(pairs),
           "verdict": headline["verdict"], "diff": headline["diff"], "ci95": headline["ci95"],
           "test": headline["test"], "p": headline["p"], "rows": rows}
    out["conclusion"] = _conclusion(out, len(resolved))
    return out


def _row(label: str, n: int, value_a: float | None, value_b: float | None, gain: float | None,
         replicates: list[float], sign: float, exact: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A pair's (or the mean's) difference in the metric's own direction (better minus than), its 95%
    paired-bootstrap interval, the paired test (``exact``'s when given, else the bootstrap's two-sided p),
    and the verdict."""
    diff = None if gain is None else round(sign * gain, 2)
    if replicates:
        ordered = sorted(replicates)
        low, high = _percentile(ordered, 0.025), _percentile(ordered, 0.975)
        interval = sorted([round(sign * low, 1), round(sign * high, 1)])
        # Two-sided: twice the share of resamples on the far side of 0 (at least one resample's worth).
        below = sum(g <= 0 for g in ordered) / len(ordered)
        above = sum(g >= 0 for g in ordered) / len(ordered)
        p = min(1.0, max(2 * min(below, above), 1 / len(ordered)))
        gain_low, gain_high = low, high
    else:
        interval, p, gain_low, gain_high = None, 1.0, 0.0, 0.0
    test = "paired bootstrap"
    if exact is not None:
        test, p = exact["test"], exact["p"]
    if gain is not None and replicates and gain_low > 0 and p < ALPHA:
        verdict = "resolved"
    elif gain is not None and replicates and gain_high < 0 and p < ALPHA:
        verdict = "reversed"
    else:
        verdict = "not resolved"
    return {"variant": label, "n": n, "better_value": None if value_a is None else round(value_a, 2),
            "than_value": None if value_b is None else round(value_b, 2), "diff": diff, "ci95": interval,
            "test": test, "p": significant(p), "verdict": verdict, **{k: v for k, v in (exact or {}).items()
                                                                  if k not in ("test", "p")}}


def _conclusion(judged: Mapping[str, Any], resolved_variants: int) -> str:
    """The claim's verdict in one plain sentence."""
    better, than, metric = judged["better"], judged["than"], judged["metric"]
    ci = judged["ci95"]
    numbers = (f"{judged['diff']:+.1f} points, 95% CI {ci[0]:+.1f} to {ci[1]:+.1f}, {judged['test']} "
               f"p = {_p_text(judged['p'])}" if ci is not None and judged["diff"] is not None else "no difference computable")
    over = f"n = {judged['n']} items" + (f", mean over {judged['variants']} variants "
                                         f"({resolved_variants} of them resolved alone)" if judged["variants"] > 1 else "")
    direction = "lower" if judged["lower_is_better"] else "higher"
    if judged["verdict"] == "resolved":
        return f"{better} is better than {than} on {metric} ({direction} is better): {numbers}; {over}."
    if judged["verdict"] == "reversed":
        return (f"the opposite of the claim: {better} is WORSE than {than} on {metric} ({direction} is better): "
                f"{numbers}; {over}.")
    if ci is None or ci[0] <= 0 <= ci[1]:
        reason = "the interval includes 0"
    else:
        reason = f"p >= {ALPHA} (the interval and the test disagree at the margin)"
    return (f"NOT RESOLVED: this run cannot tell {better} from {than} on {metric} ({numbers}; {over}); {reason}, "
            "so it does not establish a difference either way.")


def claims_table(judged: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One table row per variant pair and per mean over variants, as the terminal and report show them."""
    out = []
    for claim in judged:
        for row in claim["rows"]:
            ci = row["ci95"]
            out.append({"claim": f"{claim['better']} > {claim['than']}", "metric": claim["metric"],
                        "variant": row["variant"], "n": row["n"], "better": row["better_value"],
                        "than": row["than_value"], "diff": row["diff"],
                        "diff 95%": None if ci is None else f"{ci[0]:.1f} to {ci[1]:.1f}",
                        "test": row["test"], "p": _p_text(row["p"]), "verdict": row["verdict"]})
    return out
