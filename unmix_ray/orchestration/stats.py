"""Statistics of the results table: the difference of a variant to its baseline over seeds, with a
confidence interval from the t-distribution (paired by seed where seeds are shared, Welch otherwise)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t-distribution with ``df`` degrees of freedom."""
    return float(stats.t.ppf(p, df))


@dataclass(frozen=True)
class Delta:
    """A difference of means with its confidence interval (NaN where it cannot be estimated)."""

    value: float
    low: float
    high: float
    test: str  # "paired n=K" (K seeds run with both) or "unpaired" (Welch); "" when there is no data

    @property
    def has_ci(self) -> bool:
        return not math.isnan(self.low)


NO_DELTA = Delta(math.nan, math.nan, math.nan, "")


def seed_delta(variant: dict[str, float], baseline: dict[str, float], confidence: float = CONFIDENCE) -> Delta:
    """``variant - baseline`` over seeds. Where seeds are shared, the difference is paired by seed (the
    same seed gives the same initialisation and data order): the mean of the per-seed differences,
    CI = mean +- t(1 - a/2, K-1) * sd / sqrt(K) over the K shared seeds. Without shared seeds, the
    difference of means with Welch's interval. One value per side (or one shared seed): no CI."""
    if not variant or not baseline:
        return NO_DELTA
    q = 1 - (1 - confidence) / 2
    shared = sorted(set(variant) & set(baseline))
    if shared:
        d = np.array([variant[s] - baseline[s] for s in shared])
        k = len(d)
        if k < 2:
            return Delta(float(d[0]), math.nan, math.nan, "paired n=1")
        half = t_quantile(q, k - 1) * d.std(ddof=1) / math.sqrt(k)
        return Delta(float(d.mean()), float(d.mean() - half), float(d.mean() + half), f"paired n={k}")
    v, b = np.array(list(variant.values())), np.array(list(baseline.values()))
    diff = float(v.mean() - b.mean())
    if len(v) < 2 or len(b) < 2:
        return Delta(diff, math.nan, math.nan, "unpaired")
    sv, sb = v.var(ddof=1) / len(v), b.var(ddof=1) / len(b)
    se = math.sqrt(sv + sb)
    if se == 0:
        return Delta(diff, diff, diff, "unpaired")
    df = (sv + sb) ** 2 / (sv**2 / (len(v) - 1) + sb**2 / (len(b) - 1))  # Welch-Satterthwaite
    half = t_quantile(q, df) * se
    return Delta(diff, diff - half, diff + half, "unpaired")
