"""The image grid of a run: the first samples by global index, gathered like a metric's state."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from condiff.eval.metrics.base import IndexedState, Stream
from condiff.inference.grid import pad_to_common


class Grid(IndexedState):
    """Keeps the samples with index < `limit` (on the CPU). `images()` -> (N, 3, H, W) in index order, a size
    sweep stream's K images per index side by side (`nrow` = K)."""

    name = "grid"

    def __init__(self, stream: Stream, limit: int):
        super().__init__()
        self.stream, self.limit = stream, limit

    def per_sample(self, images: Tensor, indices: list[int]) -> list:
        return [img.cpu() for img in images]

    def update(self, images: Tensor, indices: Sequence[int]) -> None:
        keep = [j for j, i in enumerate(indices) if int(i) < self.limit]
        if keep:
            super().update(images[keep], [indices[j] for j in keep])

    @property
    def nrow(self) -> int | None:
        return None if self.stream.sizes is None else len(self.stream.sizes)

    def images(self) -> Tensor | None:
        """(N, 3, H, W) or (N K, 3, H, W) in index order; mixed aspects centred on grey at the largest sides."""
        _, shown = self.ordered()
        if not shown:
            return None
        return pad_to_common(shown)
