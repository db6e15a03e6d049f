"""Toy-scale Frechet distance: FID's code path (`condiff.eval.statistics`) with the features of a small CNN
trained on the shapes dataset (`condiff.eval.shapes_features`) against rendered shapes images.

    FD = ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))
over the D = 64 features of the generated set (g) and of `ref_n` shapes images of `preset` rendered with
`ref_seed` at the evaluation resolution (r; `condiff.eval.reference.shapes_reference_stats`, cached).
Lower is better; 0 only for equal feature statistics. Values are comparable only under the same
extractor (its cache key is in `settings()`), preset, resolution and reference size.
"""

from __future__ import annotations

import os

import numpy as np
from torch import Tensor

from condiff.eval.features import FeatureExtractor
from condiff.eval.metrics.base import Metric, Stream
from condiff.eval.statistics import FidStats, frechet_distance


class ShapesFd(Metric):
    """Keeps each sample's shapes-CNN features (D,); `compute` -> {"shapes_fd": FD against the reference}.

    `resolution`: the evaluation resolution (of the generated images and the rendered reference);
    `extractor`: default `shapes_features.shapes_extractor(device)` (trained once, cached)."""

    name = "shapes-fd"

    def __init__(self, stream: Stream, resolution: int, preset: str = "default", ref_n: int = 2000,
                 ref_seed: int = 0, extractor: FeatureExtractor | None = None,
                 cache_dir: str | os.PathLike | None = None, device="cpu", log=print):
        super().__init__()
        from condiff.eval.reference import shapes_reference_stats
        from condiff.eval.shapes_features import shapes_extractor

        self.stream, self.resolution, self.preset, self.ref_seed = stream, resolution, preset, ref_seed
        self.extractor = extractor or shapes_extractor(device, cache_dir=cache_dir)
        self.reference: FidStats = shapes_reference_stats(self.extractor, resolution, preset, ref_n, ref_seed,
                                                          cache_dir=cache_dir, log=log)

    def per_sample(self, images: Tensor, indices: list[int]) -> list:
        if images.dim() != 4 or images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(f"shapes-fd: expected (B, 3, {self.resolution}, {self.resolution}) images (the "
                             f"reference resolution), got {tuple(images.shape)}")
        return list(self.extractor.features(images))  # B rows of (D,) float32

    def compute(self) -> dict[str, float]:
        _, feats = self.ordered()
        generated = FidStats.from_features(np.stack(feats) if feats else np.zeros((0, 0)))  # (N, D)
        return {"shapes_fd": frechet_distance(generated, self.reference)}

    def settings(self) -> dict:
        return {"shapes_fd_features": self.extractor.name, "shapes_fd_preset": self.preset,
                "shapes_fd_ref_n": self.reference.n, "shapes_fd_ref_seed": self.ref_seed,
                "shapes_fd_accuracy": self.extractor.info.get("accuracy")}
