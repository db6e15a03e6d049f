"""Condition dropout for guidance, and the `Cond` of a batch.

Guidance (paper Eq. 2) mixes three predictions: eps(c, s) with both the semantic condition c and the
control condition s, eps(0, s) with the semantic condition dropped, and eps(0, 0) with both dropped.
The model learns the last two only if training drops the conditions: each row of a batch falls in
exactly one of four events, drawn with one uniform number u per row:
    u < p_both                                   both dropped       -> eps(0, 0)
    p_both <= u < p_both + p_semantic            semantic only      -> eps(0, s)
    ... < u < p_both + p_semantic + p_control    control only       -> eps(c, 0)
    otherwise                                    nothing dropped    -> eps(c, s)
so the marginals are P(semantic dropped) = p_both + p_semantic, P(control dropped) = p_both + p_control.
(Independent drops with marginals a, b are the special case p_both = a b, p_semantic = a (1 - b),
p_control = b (1 - a): `DropoutConfig.independent(a, b)`.)

Null forms are those of `conditioning.cond.Cond`: label -> `num_classes`, caption -> "" (encoded like
any prompt, so precomputed text states of a dropped row are replaced by the encoding of ""), control ->
`control_keep = False`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from condiff.conditioning.cond import Cond


@dataclass(frozen=True)
class DropoutConfig:
    p_semantic: float = 0.1  # semantic only
    p_control: float = 0.0  # control only
    p_both: float = 0.0  # both at once

    def __post_init__(self):
        ps = (self.p_semantic, self.p_control, self.p_both)
        if min(ps) < 0 or sum(ps) > 1 + 1e-9:
            raise ValueError(f"condition dropout probabilities must be >= 0 and sum to <= 1, got {ps}")

    @staticmethod
    def independent(p_semantic: float, p_control: float) -> "DropoutConfig":
        """Independent drops with the given marginals."""
        return DropoutConfig(p_semantic * (1 - p_control), p_control * (1 - p_semantic), p_semantic * p_control)

    @property
    def marginals(self) -> tuple[float, float]:
        return self.p_both + self.p_semantic, self.p_both + self.p_control


def sample_drop_masks(batch_size: int, config: DropoutConfig, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(drop_semantic, drop_control), each (B,) bool, per the events in the module docstring."""
    u = torch.rand(batch_size, generator=generator)  # (B,)
    both = u < config.p_both
    sem_only = (u >= config.p_both) & (u < config.p_both + config.p_semantic)
    a = config.p_both + config.p_semantic
    ctl_only = (u >= a) & (u < a + config.p_control)
    return both | sem_only, both | ctl_only


def apply_dropout(batch: dict, drop_semantic: Tensor, drop_control: Tensor, num_classes: int | None = None,
                  null_text=None) -> dict:
    """A copy of `batch` with the dropped rows in their null forms and `control_keep` (B,) bool added.

    num_classes: needed when the batch has `label`. null_text: a `TextBatch` of the empty prompt
    (B = 1), needed when the batch has precomputed `text` states."""
    out = dict(batch)
    if "label" in batch:
        if num_classes is None:
            raise ValueError("apply_dropout: the batch has labels, so num_classes (the null class id) is required")
        out["label"] = torch.where(drop_semantic, torch.full_like(batch["label"], num_classes), batch["label"])
    if "caption" in batch:
        out["caption"] = ["" if d else c for c, d in zip(batch["caption"], drop_semantic.tolist())]
    if "text" in batch:
        if null_text is None:
            raise ValueError("apply_dropout: the batch has precomputed text states; pass null_text = encoder.encode([''])")
        t = batch["text"].shape[1]
        null_states = torch.zeros(1, t, batch["text"].shape[2], dtype=batch["text"].dtype)
        n = min(t, null_text.states.shape[1])
        null_states[:, :n] = null_text.states[:, :n].to(batch["text"].dtype)
        m = drop_semantic[:, None, None]
        out["text"] = torch.where(m, null_states, batch["text"])
        out["text_lengths"] = torch.where(drop_semantic, null_text.lengths.to(batch["text_lengths"].dtype)[0], batch["text_lengths"])
        out["pooled"] = torch.where(drop_semantic[:, None], null_text.pooled.to(batch["pooled"].dtype), batch["pooled"])
    keep = ~drop_control
    out["control_keep"] = keep if "control_keep" not in batch else (batch["control_keep"] & keep)
    return out


class CondDropout:
    """`CondDropout(config, num_classes)(batch, generator) -> batch` with conditions dropped."""

    def __init__(self, config: DropoutConfig | dict, num_classes: int | None = None, null_text=None):
        self.config = config if isinstance(config, DropoutConfig) else DropoutConfig(**config)
        self.num_classes, self.null_text = num_classes, null_text

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        b = len(batch["key"]) if "key" in batch else batch["control_h"].shape[0]
        sem, ctl = sample_drop_masks(b, self.config, generator)
        return apply_dropout(batch, sem, ctl, self.num_classes, self.null_text)


def build_cond(batch: dict, text_encoder=None, device=None, conditioning: str | None = None) -> Cond:
    """The `Cond` of a batch for a model with `conditioning` "class" (labels) or "text" (precomputed
    `text`/`text_lengths`/`pooled`, or the batch's captions encoded by `text_encoder`), plus
    control_h / control_l / control_keep. None picks text when text states are available (precomputed
    or an encoder is given), else class. Only one semantic condition is set: shapes batches carry both
    a label and a caption, and a text model must not receive labels."""
    has_text = "text" in batch or ("caption" in batch and text_encoder is not None)
    conditioning = conditioning or ("text" if has_text else "class")
    if conditioning not in ("class", "text"):
        raise ValueError(f"build_cond: conditioning must be 'class' or 'text', got {conditioning!r}")
    labels = text = lengths = pooled = None
    if conditioning == "class":
        if "label" not in batch:
            raise ValueError("build_cond: class conditioning but the batch has no 'label'")
        labels = batch["label"]
    elif "text" in batch:
        text, lengths, pooled = batch["text"], batch["text_lengths"], batch["pooled"]
    elif "caption" in batch and text_encoder is not None:
        tb = text_encoder.encode(batch["caption"])
        text, lengths, pooled = tb.states, tb.lengths, tb.pooled
    else:
        raise ValueError("build_cond: text conditioning needs precomputed 'text' in the batch, or captions and a text_encoder")
    cond = Cond(
        labels=labels,
        text=text,
        text_lengths=lengths,
        pooled=pooled,
        control_h=batch.get("control_h"),
        control_l=batch.get("control_l"),
        control_keep=batch.get("control_keep"),
    )
    return cond.to(device) if device is not None else cond
