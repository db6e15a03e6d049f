"""Class-label conditioning: the embedding table with its null class (DiT's `LabelEmbedder`).

Null class convention (shared with `Cond` and condition dropout): label == num_classes is the dropped /
unconditional class, so the table has num_classes + 1 rows. Dropout itself happens in the data pipeline
(`Cond.drop_labels`), not here, so the model is deterministic given its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def check_labels(labels: Tensor | None, num_classes: int, batch_size: int) -> Tensor:
    """Validate class ids (B,) int in [0, num_classes] (num_classes = null) and return them."""
    if labels is None:
        raise ValueError("Cond.labels is required by a class-conditional model (use num_classes for the null class)")
    if labels.shape != (batch_size,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"Cond.labels must be ({batch_size},) int64, got {tuple(labels.shape)} {labels.dtype}")
    if not labels.is_meta and not torch.compiler.is_compiling() and bool(((labels < 0) | (labels > num_classes)).any()):
        raise ValueError(f"Cond.labels must lie in [0, {num_classes}] ({num_classes} = null class), "
                         f"got min {int(labels.min())} max {int(labels.max())}")
    return labels


class LabelEmbedder(nn.Module):
    """labels (B,) int -> (B, dim); row `num_classes` is the null class. Init N(0, 0.02) as in DiT."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)  # (B, dim)
