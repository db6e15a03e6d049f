"""FID statistics and distance: per-set feature mean and covariance, streaming moments mergeable across
ranks, and the Frechet distance.

Conventions (clean-fid's): mu = mean over samples, sigma = `np.cov(feats, rowvar=False)` (unbiased,
float64); distance = `cleanfid.fid.frechet_distance` (Sutherland's stable sqrtm form).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class FidStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    n: int
    key: str = ""  # content hash this was computed under ("" if not cached)

    @staticmethod
    def from_features(feats: np.ndarray, key: str = "") -> "FidStats":
        feats = np.asarray(feats)
        if feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"FID statistics need (N >= 2, D) features, got {feats.shape}")
        return FidStats(np.mean(feats, axis=0), np.cov(feats, rowvar=False), len(feats), key)


def frechet_distance(a: FidStats, b: FidStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) through `cleanfid.fid.frechet_distance`."""
    from cleanfid.fid import frechet_distance as cf_frechet

    if a.mu.shape != b.mu.shape:
        raise ValueError(f"FID: feature dims differ ({a.mu.shape[0]} vs {b.mu.shape[0]}); the reference "
                         "statistics were computed with another feature extractor")
    with warnings.catch_warnings():  # scipy >= 1.16 deprecates sqrtm(disp=...), which clean-fid passes
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(cf_frechet(a.mu, a.sigma, b.mu, b.sigma))


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets, (N, D) and (M, D)."""
    return frechet_distance(FidStats.from_features(feats_a), FidStats.from_features(feats_b))


class Moments:
    """Streaming first and second moments of features (float64, shifted by the first batch's mean for
    accuracy), mergeable across ranks: what reference statistics of millions of images need instead of
    holding every feature. `stats()` equals `FidStats.from_features` of all updates (np.cov, ddof 1)."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, feats: np.ndarray) -> "Moments":
        f = np.asarray(feats, dtype=np.float64)
        if len(f) == 0:
            return self
        if self.shift is None:
            self.shift = f.mean(axis=0)
            self.s1, self.s2 = np.zeros_like(self.shift), np.zeros((f.shape[1], f.shape[1]))
        d = f - self.shift  # (b, D)
        self.n += len(f)
        self.s1 += d.sum(axis=0)
        self.s2 += d.T @ d
        return self

    def merge(self, other: "Moments") -> "Moments":
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.shift, self.s1, self.s2 = other.n, other.shift.copy(), other.s1.copy(), other.s2.copy()
            return self
        c = other.shift - self.shift  # re-centre other's sums on self.shift: d_self = d_other + c
        self.s1 += other.s1 + other.n * c
        self.s2 += other.s2 + np.outer(c, other.s1) + np.outer(other.s1, c) + other.n * np.outer(c, c)
        self.n += other.n
        return self

    def stats(self, key: str = "") -> FidStats:
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 samples, got {self.n}")
        mean_d = self.s1 / self.n
        sigma = (self.s2 - self.n * np.outer(mean_d, mean_d)) / (self.n - 1)
        return FidStats(self.shift + mean_d, sigma, self.n, key)
