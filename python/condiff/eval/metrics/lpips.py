"""LPIPS size-diversity (`condiff.eval.lpips_size`, paper Sec. 3 and Tab. 2a) as a metric."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from condiff.eval.lpips_size import mean_pairwise_lpips
from condiff.eval.metrics.base import Metric, Stream


class LpipsSize(Metric):
    """Fed size sweeps (one per prompt index: K images, same noise and prompt, sizes `stream.sizes`); keeps
    each prompt's mean pairwise LPIPS; `compute` -> {"lpips_size": mean over prompts}.

    `model`: `lpips_size.lpips_model(...)`; `record`: the LPIPS settings for the manifest."""

    name = "lpips"

    def __init__(self, stream: Stream, model, record: dict | None = None):
        super().__init__()
        if stream.sizes is None or len(stream.sizes) < 2:
            raise ValueError(f"lpips: needs a size-sweep stream of at least two sizes, got {stream.sizes}")
        self.stream, self.model, self.record = stream, model, dict(record or {})

    def per_sample(self, images: Tensor, indices: list[int]) -> list:
        k = len(self.stream.sizes)
        if images.dim() != 5 or images.shape[1] != k:
            raise ValueError(f"lpips: expected size sweeps (B, {k}, 3, H, W), got {tuple(images.shape)}")
        return [mean_pairwise_lpips(sweep.float(), self.model) for sweep in images]  # sweep (K, 3, H, W)

    def compute(self) -> dict[str, float]:
        _, scores = self.ordered()
        return {"lpips_size": float(np.mean(scores))}

    def settings(self) -> dict:
        return {"lpips_sizes": list(self.stream.sizes), "lpips_prompts": self.stream.n, **self.record}
