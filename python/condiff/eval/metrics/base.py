"""The metric protocol of `condiff eval`: per-sample state keyed by global sample index.

A metric declares the `Stream` of generated samples it is fed, then, on every rank:
    metric.update(images, indices)    # a batch of this rank's samples and their global indices
    state = metric.state()            # picklable; gathered to rank 0
and on rank 0:
    metric.merge(states)              # every rank's state (its own included) -> their union
    metric.compute() -> {name: value}
    metric.settings() -> {key: JSON-able}  # what shaped the number, for the manifest

The state maps each global sample index to what the metric keeps of that sample (Inception features, a
CLIP score, align flags, an LPIPS sweep score); `compute` reads it back in index order. So a result does
not depend on the world size, the batch size, or the order of updates and merges: merging W ranks' states
equals one pass over all samples. Ranks take disjoint indices (`condiff.inference.generate.rank_indices`), so
an index recorded twice (within a rank or across ranks) is an error naming that index.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from torch import Tensor


@dataclass(frozen=True)
class Stream:
    """The generated samples a metric consumes: global indices 0 <= i < n, rank r of W taking r, r + W, ...

    `sizes` None: one image per index, batches of (B, 3, H, W). `sizes` (s_1, ..., s_K): one size sweep
    per index (the LPIPS size protocol): K images with the same noise and condition and size conditioning
    phi_l = (s_k, s_k), batches of (B, K, 3, H, W). Metrics with equal streams share the generated images."""

    n: int
    sizes: tuple[int, ...] | None = None


class IndexedState(ABC):
    """Per-sample state keyed by global sample index (see the module docstring)."""

    name: str  # used in error messages
    stream: Stream

    def __init__(self):
        self._values: dict[int, Any] = {}

    @abstractmethod
    def per_sample(self, images: Tensor, indices: list[int]) -> list:
        """One value per sample of the batch, in batch order."""

    def update(self, images: Tensor, indices: Sequence[int]) -> None:
        """Record a batch: `images` (B, 3, H, W) (or (B, K, 3, H, W) for a sweep stream) in [-1, 1] and their
        B global sample indices."""
        indices = [int(i) for i in indices]
        if len(indices) != len(images):
            raise ValueError(f"{self.name}: {len(images)} samples but {len(indices)} sample indices")
        self._add(zip(indices, self.per_sample(images, indices)))

    def state(self) -> dict[int, Any]:
        """{global sample index: value}, picklable (what `Dist.gather` sends to rank 0)."""
        return dict(self._values)

    def merge(self, states: Iterable[dict[int, Any]]) -> None:
        """Replace this state with the union of `states` (every rank's, this one's included)."""
        self._values = {}
        for s in states:
            self._add(s.items())

    def ordered(self) -> tuple[list[int], list]:
        """(sorted indices, their values)."""
        keys = sorted(self._values)
        return keys, [self._values[k] for k in keys]

    def _add(self, pairs: Iterable[tuple[int, Any]]) -> None:
        for i, value in pairs:
            if i in self._values:
                raise ValueError(f"{self.name}: sample index {i} recorded twice (ranks must take disjoint indices)")
            self._values[i] = value


class Metric(IndexedState):
    """An evaluation metric: `IndexedState` plus `compute` (the reported numbers) and `settings`."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """{metric name: value} over the recorded samples."""

    def settings(self) -> dict:
        """What shaped the number besides the sampling settings (JSON-able; goes to the manifest)."""
        return {}
