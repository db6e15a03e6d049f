"""`Cond`: everything a backbone is conditioned on besides (x_t, t), as one batched container.

Every model is called as `model(x_t, t, cond)`; every sampler, loss and data collator passes a `Cond`.

Null ("dropped") conditions, shared by the data pipeline (condition dropout), the models and the
guidance code, so that training and classifier-free guidance agree:
  * class:   `labels == num_classes` (DiT's convention: one extra embedding row / token is the null class).
  * text:    the encoding of the empty prompt "" (the text encoder produces it; SD/SDXL practice), so
             the model needs no special case. `text_lengths` counts the valid tokens (BOS/EOS included).
  * control: `control_keep == False` zeroes that row's control embedding c_emb (Eq. 1), i.e. the
             embedder outputs are multiplied by the keep mask. A missing `control_keep` keeps all rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

# Layout of the control metadata vectors (units: pixels of the ORIGINAL image unless stated).
CONTROL_H_FIELDS = ("crop_top", "crop_left", "crop_height", "crop_width", "aspect_ratio", "flip")
"""phi_h, high-level: crop box in original-image pixels, aspect ratio of the crop (width / height of that box),
horizontal flip (0. or 1.). Shape (B, 6). The aspect ratio is 1 for every square crop of an image stored at
its original size (today's square training resolutions), so it carries information only for non-square crops
(`data.transforms.CropTransform` with a (H, W) target) or stored images resized from another aspect."""
CONTROL_L_FIELDS = ("orig_height", "orig_width")
"""phi_l, low-level: original image size in pixels (before any resize or crop). Shape (B, 2)."""
CONTROL_GROUPS: dict[str, tuple[str, ...]] = {
    "crop": ("crop_top", "crop_left", "crop_height", "crop_width"),
    "aspect": ("aspect_ratio",),
    "flip": ("flip",),
    "size": ("orig_height", "orig_width"),
}
"""The control fields a model can be conditioned on, by name (the rows of Table 2c / 2a): `control_fields`
of the models and `data.control_fields` of the trainer list a subset; the others are zeroed before the
control embedder, so they carry nothing (a flipped image can be trained without conditioning on the flip)."""


@dataclass
class Cond:
    labels: Tensor | None = None  # (B,) int64 class ids; num_classes = null class
    text: Tensor | None = None  # (B, T, C_txt) text-encoder last hidden states (raw, before padding mode)
    text_lengths: Tensor | None = None  # (B,) int64 number of valid tokens per prompt (>= 1)
    pooled: Tensor | None = None  # (B, C_pool) pooled text embedding (CLIP pooled output)
    control_h: Tensor | None = None  # (B, 6) phi_h, see CONTROL_H_FIELDS
    control_l: Tensor | None = None  # (B, 2) phi_l, see CONTROL_L_FIELDS
    control_keep: Tensor | None = None  # (B,) bool; False = control condition dropped (null)

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def batch_size(self) -> int | None:
        for value in self._tensors().values():
            return int(value.shape[0])
        return None

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Cond":
        """Move every tensor to `device`; cast floating tensors (text, pooled, control) to `dtype`."""
        out = {}
        for name, value in self._tensors().items():
            cast = dtype if (dtype is not None and value.is_floating_point()) else None
            out[name] = value.to(device=device, dtype=cast)
        return replace(self, **out)

    def index(self, idx) -> "Cond":
        """Select rows (a slice, an index tensor or a bool mask) of every tensor."""
        return replace(self, **{k: v[idx] for k, v in self._tensors().items()})

    def repeat(self, n: int) -> "Cond":
        """Tile the batch n times along dim 0 (rows [b, b+B, b+2B, ...] are copies of row b)."""
        return replace(self, **{k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self._tensors().items()})

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate along the batch dim; all conds must carry the same set of fields."""
        names = [set(c._tensors()) for c in conds]
        if any(n != names[0] for n in names):
            raise ValueError(f"Cond.cat: fields differ between conds: {[sorted(n) for n in names]}")
        return Cond(**{k: torch.cat([getattr(c, k) for c in conds]) for k in names[0]})

    def drop_labels(self, drop: Tensor, num_classes: int) -> "Cond":
        """Replace labels of rows where `drop` (B,) bool is True by the null class `num_classes`."""
        if self.labels is None:
            return self
        return replace(self, labels=torch.where(drop, torch.full_like(self.labels, num_classes), self.labels))

    def drop_control(self, drop: Tensor) -> "Cond":
        """Mark rows where `drop` (B,) bool is True as control-null (see module docstring)."""
        keep = ~drop if self.control_keep is None else (self.control_keep & ~drop)
        return replace(self, control_keep=keep)
