"""Content change over size sweeps (`condiff.eval.content_change`, the toy stand-in for Tab. 2a's LPIPS) as a
metric on the LPIPS size-sweep stream."""

from __future__ import annotations

from torch import Tensor

from condiff.eval import content_change
from condiff.eval.metrics.base import Metric, Stream


class ContentChange(Metric):
    """Fed size sweeps (one per prompt index: K images, same noise and prompt, sizes `stream.sizes`); keeps the
    K - 1 pairs of each sweep against the image at `ref_size` (default the first size); `compute` ->
    {"content_change": mean score, "content_change/<component>": ...} (`content_change.aggregate`)."""

    name = "content-change"

    def __init__(self, stream: Stream, ref_size: int | None = None):
        super().__init__()
        if stream.sizes is None or len(stream.sizes) < 2:
            raise ValueError(f"content-change: needs a size-sweep stream of at least two sizes, got {stream.sizes}")
        ref_size = stream.sizes[0] if ref_size is None else ref_size
        if ref_size not in stream.sizes:
            raise ValueError(f"content-change: reference size {ref_size} is not one of the sweep's sizes {stream.sizes}")
        self.stream, self.ref_size, self.ref = stream, ref_size, stream.sizes.index(ref_size)

    def per_sample(self, images: Tensor, indices: list[int]) -> list:
        k = len(self.stream.sizes)
        if images.dim() != 5 or images.shape[1] != k:
            raise ValueError(f"content-change: expected size sweeps (B, {k}, 3, H, W), got {tuple(images.shape)}")
        u8 = content_change.as_uint8(images.flatten(0, 1), "content-change images")  # (B K, H, W, 3)
        u8 = u8.reshape(images.shape[0], k, *u8.shape[1:])  # (B, K, H, W, 3)
        return [content_change.sweep_pairs(sweep, self.ref) for sweep in u8]

    def compute(self) -> dict[str, float]:
        _, sweeps = self.ordered()
        out = content_change.aggregate([p for pairs in sweeps for p in pairs])
        return {"content_change": out.pop("score"), **{f"content_change/{k}": v for k, v in out.items()}}

    def settings(self) -> dict:
        return {"content_change_sizes": list(self.stream.sizes), "content_change_ref_size": self.ref_size}
