"""Statistics of `condiff repro` reports: 95% Student-t confidence intervals over seeds and the verdict.

Per arm: mean of the per-seed values x_1..x_n and the t-interval mean +- t_{0.975, n-1} s / sqrt(n)
(s the sample standard deviation, ddof = 1). A difference between two arms is taken
  * PAIRED when both have the same seeds (d_k = a_k - b_k, seed by seed: same data order, same
    evaluation noise; the interval is the t-interval of the d_k), else
  * UNPAIRED (Welch): mean(a) - mean(b) +- t_{0.975, nu} sqrt(s_a^2/n_a + s_b^2/n_b), nu the
    Welch-Satterthwaite degrees of freedom.
Fewer than two values give no interval (None), and a claim without an interval is inconclusive.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from scipy import stats as _stats

LEVEL = 0.95
VERDICTS = ("reproduced", "not reproduced", "inconclusive")


@dataclass
class Interval:
    mean: float
    lo: float | None  # None: fewer than two values (or one value per side for Welch)
    hi: float | None
    n: int
    method: str  # "t" | "paired t" | "welch t"

    def to_dict(self) -> dict:
        return asdict(self)

    def fmt(self, digits: int = 3) -> str:
        if self.lo is None:
            return f"{self.mean:.{digits}f} (n={self.n}, no CI)"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def _t(df: float) -> float:
    return float(_stats.t.ppf(0.5 + LEVEL / 2, df))


def t_interval(values: list[float], method: str = "t") -> Interval:
    """Mean and 95% t-interval of `values` (lo = hi = None for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval: no values")
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, None, n, method)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, method)


def difference(a: dict[int, float], b: dict[int, float]) -> Interval:
    """Interval of mean(a) - mean(b), {seed: value} each: paired by seed when the seeds are the same, else Welch."""
    if a.keys() == b.keys():
        return t_interval([a[s] - b[s] for s in sorted(a)], "paired t")
    xa, xb = list(a.values()), list(b.values())
    ma, mb = sum(xa) / len(xa), sum(xb) / len(xb)
    if len(xa) < 2 or len(xb) < 2:
        return Interval(ma - mb, None, None, min(len(xa), len(xb)), "welch t")
    va = sum((v - ma) ** 2 for v in xa) / (len(xa) - 1) / len(xa)
    vb = sum((v - mb) ** 2 for v in xb) / (len(xb) - 1) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(ma - mb, ma - mb, ma - mb, min(len(xa), len(xb)), "welch t")
    df = (va + vb) ** 2 / (va ** 2 / (len(xa) - 1) + vb ** 2 / (len(xb) - 1))
    half = _t(df) * se
    return Interval(ma - mb, ma - mb - half, ma - mb + half, min(len(xa), len(xb)), "welch t")


def verdict(diff: Interval, direction: str) -> str:
    """The claim "arm is `direction` (higher | lower) than against" given the interval of arm - against:
    reproduced when the whole interval lies on the claimed side of 0, not reproduced when it lies wholly
    on the other side, inconclusive when it contains 0 (or there is no interval)."""
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction {direction!r}: expected 'higher' or 'lower'")
    if diff.lo is None:
        return "inconclusive"
    sign = 1.0 if direction == "higher" else -1.0
    lo, hi = sorted((sign * diff.lo, sign * diff.hi))
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "not reproduced"
    return "inconclusive"
