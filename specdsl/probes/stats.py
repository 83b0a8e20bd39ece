"""The statistics every probe reports, so a printed comparison can carry the weight readers give it.

* :func:`wilson_interval`: the 95% Wilson score interval of a proportion (right at small n, where the
  normal approximation says "75% +- 25" and runs past 100).
* :func:`mcnemar_exact`: the exact two-sided McNemar test of two conditions scored on the same items
  (a binomial test on the discordant pairs).
* :func:`paired_difference`: the difference of two conditions on the same items, with a paired bootstrap
  interval and the McNemar p-value.
* :func:`bootstrap_interval`: a percentile bootstrap interval of any statistic of grouped scores (the
  position probe's max-min gap), deterministic for a seed.

Pure functions of counts and flags: the standard library only (``validate`` imports nothing heavy).
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes / n`` as (low, high) proportions; None when n is 0."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At 0 or n successes the bound is exactly 0 or 1 (float rounding would leave 0.9999999999999999).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def percent_interval(successes: int, n: int) -> list[float] | None:
    """:func:`wilson_interval` in percent, rounded to 0.1 (how tables and run.json show it)."""
    found = wilson_interval(successes, n)
    return None if found is None else [round(100 * found[0], 1), round(100 * found[1], 1)]


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: ``only_a`` items right under A only, ``only_b`` under B only.

    Under the null each discordant item is a fair coin, so the p-value is twice the binomial tail of the
    smaller count (capped at 1); 1.0 when no item is discordant.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError("counts must be >= 0")
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 1]) of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def paired_difference(a: Sequence[bool], b: Sequence[bool], *, seed: int = 0,
                      resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """A minus B on the same items (percentage points), with a 95% paired-bootstrap interval (items
    resampled together under both conditions) and the exact McNemar test on the discordant items."""
    if len(a) != len(b):
        raise ValueError(f"paired conditions need the same items: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        raise ValueError("no items to compare")
    diffs = [int(x) - int(y) for x, y in zip(a, b)]
    only_a, only_b = diffs.count(1), diffs.count(-1)
    rng = random.Random(seed)
    means = sorted(100.0 * sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return {"n": n, "diff": round(100.0 * sum(diffs) / n, 2),
            "ci95": [round(_percentile(means, 0.025), 1), round(_percentile(means, 0.975), 1)],
            "only_this_right": only_a, "only_other_right": only_b,
            "p_mcnemar": significant(mcnemar_exact(only_a, only_b))}


def bootstrap_interval(groups: Sequence[Sequence[float]], statistic: Callable[[list[list[float]]], float], *,
                       seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> list[float] | None:
    """95% percentile interval of ``statistic`` over resamples that redraw each group's items with
    replacement (groups keep their sizes); None when a group is empty."""
    if not groups or any(len(g) == 0 for g in groups):
        return None
    rng = random.Random(seed)
    values = sorted(statistic([[g[rng.randrange(len(g))] for _ in g] for g in groups]) for _ in range(resamples))
    return [round(_percentile(values, 0.025), 1), round(_percentile(values, 0.975), 1)]


def max_min_gap(groups: list[list[float]]) -> float:
    """The spread of the groups' means: max minus min (the position probe's gap)."""
    means = [sum(g) / len(g) for g in groups]
    return max(means) - min(means)


def significant(p: float) -> float:
    """A p-value to 3 significant digits (rounding to 4 decimals would print 2e-6 as 0)."""
    return float(f"{p:.3g}")
