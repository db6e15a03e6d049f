"""Mean CLIP score (`condiff.eval.clip_score`) as a metric."""

from __future__ import annotations

from typing import Callable

import numpy as np
from torch import Tensor

from condiff.eval.clip_score import ClipScorer
from condiff.eval.metrics.base import Metric, Stream


class ClipScore(Metric):
    """Keeps each sample's CLIP score against its caption (`caption(i)`); `compute` -> {"clip": mean}."""

    name = "clip"

    def __init__(self, stream: Stream, scorer: ClipScorer, caption: Callable[[int], str | None],
                 source: str | None = None):
        super().__init__()
        self.stream, self.scorer, self.caption, self.source = stream, scorer, caption, source

    def per_sample(self, images: Tensor, indices: list[int]) -> list:
        captions = [self.caption(i) for i in indices]
        if any(c is None for c in captions):
            raise ValueError("clip: a sample has no caption (class models need class names as --prompts)")
        return self.scorer(images, captions).tolist()

    def compute(self) -> dict[str, float]:
        _, scores = self.ordered()
        return {"clip": float(np.mean(scores))}

    def settings(self) -> dict:
        return {"clip": self.source}
