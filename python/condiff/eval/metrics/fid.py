"""FID_train / FID_val (paper Sec. 3, Tab. 1) as a metric: one generated set against the statistics of
each reference shard set."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from condiff.eval.features import FeatureExtractor
from condiff.eval.metrics.base import Metric, Stream
from condiff.eval.statistics import FidStats, frechet_distance


class Fid(Metric):
    """Keeps each sample's features (D,); `compute` -> {"fid_<split>": FID against `references[split]`}.

    `references`: {split: reference statistics} (`condiff.eval.reference.reference_stats`); `shards`:
    {split: shard spec} as given, recorded in the settings."""

    name = "fid"

    def __init__(self, stream: Stream, extractor: FeatureExtractor, references: dict[str, FidStats],
                 shards: dict[str, str] | None = None):
        super().__init__()
        if not references:
            raise ValueError("fid: no reference statistics (give --ref-train and/or --ref-val)")
        self.stream, self.extractor, self.references, self.shards = stream, extractor, references, shards or {}

    def per_sample(self, images: Tensor, indices: list[int]) -> list:
        return list(self.extractor.features(images))  # B rows of (D,) float32

    def compute(self) -> dict[str, float]:
        _, feats = self.ordered()
        generated = FidStats.from_features(np.stack(feats) if feats else np.zeros((0, 0)))  # (N, D)
        return {f"fid_{split}": frechet_distance(generated, ref) for split, ref in self.references.items()}

    def reference_keys(self) -> dict[str, str]:
        """{split: content hash of its reference statistics} (the manifest's `reference`)."""
        return {split: ref.key for split, ref in self.references.items()}

    def settings(self) -> dict:
        return {"features": self.extractor.name, "ref_shards": dict(self.shards),
                "ref_n": {split: ref.n for split, ref in self.references.items()}}
