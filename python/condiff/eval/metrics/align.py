"""Shapes alignment accuracies (`condiff.eval.align`) as a metric."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from condiff.eval import align
from condiff.eval.metrics.base import Metric, Stream


class Align(Metric):
    """Keeps each sample's flags against its caption (`caption(i)`, in the shapes grammar); `compute` ->
    {"align/colour", ..., "align/overall", "align/n", "align/n_relation"} (`align.aggregate`)."""

    name = "align"

    def __init__(self, stream: Stream, caption: Callable[[int], str | None]):
        super().__init__()
        self.stream, self.caption = stream, caption

    def per_sample(self, images: Tensor, indices: list[int]) -> list:
        return align.score_samples(images, [self.caption(i) for i in indices])

    def compute(self) -> dict[str, float]:
        _, flags = self.ordered()
        return {f"align/{k}": v for k, v in align.aggregate(flags).items()}
