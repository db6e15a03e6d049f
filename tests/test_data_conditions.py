"""Condition dropout (Eq. 2's three predictions) and building a `Cond` from a batch."""

import pytest
import torch

from condiff.conditioning.cond import Cond
from condiff.conditioning.text import build_text_encoder
from condiff.data.conditions import CondDropout, DropoutConfig, apply_dropout, build_cond, sample_drop_masks


def _batch(b=6):
    return {
        "key": [str(i) for i in range(b)],
        "label": torch.arange(b),
        "caption": [f"prompt {i}" for i in range(b)],
        "control_h": torch.rand(b, 6),
        "control_l": torch.rand(b, 2),
    }


def test_event_frequencies_and_marginals():
    cfg = DropoutConfig(p_semantic=0.2, p_control=0.1, p_both=0.15)
    g = torch.Generator().manual_seed(0)
    sem, ctl = sample_drop_masks(200_000, cfg, g)
    freq = lambda m: m.float().mean().item()  # noqa: E731
    assert abs(freq(sem & ctl) - 0.15) < 0.005
    assert abs(freq(sem & ~ctl) - 0.2) < 0.005 and abs(freq(~sem & ctl) - 0.1) < 0.005
    assert cfg.marginals == pytest.approx((0.35, 0.25))
    ind = DropoutConfig.independent(0.1, 0.3)
    sem, ctl = sample_drop_masks(200_000, ind, g)
    assert abs(freq(sem) - 0.1) < 0.005 and abs(freq(ctl) - 0.3) < 0.005 and abs(freq(sem & ctl) - 0.03) < 0.003
    none, _ = sample_drop_masks(1000, DropoutConfig(0, 0, 0), g)
    assert not none.any()
    with pytest.raises(ValueError, match="sum to <= 1"):
        DropoutConfig(0.6, 0.3, 0.2)


def test_null_forms_match_cond():
    batch = _batch()
    sem = torch.tensor([1, 0, 1, 0, 0, 0], dtype=torch.bool)
    ctl = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool)
    out = apply_dropout(batch, sem, ctl, num_classes=10)
    assert out["label"].tolist() == [10, 1, 10, 3, 4, 5]
    assert out["caption"] == ["", "prompt 1", "", "prompt 3", "prompt 4", "prompt 5"]
    assert out["control_keep"].tolist() == [False, False, True, True, True, True]
    assert batch["label"].tolist() == list(range(6))  # input untouched
    # the same as Cond's own null operations
    ref = Cond(labels=batch["label"]).drop_labels(sem, 10).drop_control(ctl)
    cond = build_cond(out)
    assert torch.equal(cond.labels, ref.labels) and torch.equal(cond.control_keep, ref.control_keep)
    with pytest.raises(ValueError, match="num_classes"):
        apply_dropout(batch, sem, ctl)


def test_text_dropout_equals_encoding_the_empty_prompt():
    enc = build_text_encoder({"kind": "tiny-clip", "dim": 16, "layers": 1, "heads": 2, "max_length": 12})
    batch = _batch(4)
    sem = torch.tensor([1, 0, 0, 1], dtype=torch.bool)
    ctl = torch.zeros(4, dtype=torch.bool)
    dropped = apply_dropout(batch, sem, ctl, num_classes=4)
    on_the_fly = build_cond(dropped, text_encoder=enc)
    # precomputed states (as in latent shards) + null_text give the same Cond
    tb = enc.encode(batch["caption"])
    pre = dict(batch, text=tb.states, text_lengths=tb.lengths, pooled=tb.pooled)
    pre = apply_dropout(pre, sem, ctl, num_classes=4, null_text=enc.encode([""]))
    precomputed = build_cond(pre)
    for name in ("text", "text_lengths", "pooled", "labels", "control_h", "control_keep"):
        torch.testing.assert_close(getattr(precomputed, name), getattr(on_the_fly, name))
    assert on_the_fly.text_lengths[0] == 2 and on_the_fly.text_lengths[1] > 2
    assert on_the_fly.labels is None  # a text model gets no labels, though the batch has them
    assert torch.equal(build_cond(dropped, text_encoder=enc, conditioning="class").labels, dropped["label"])
    with pytest.raises(ValueError, match="needs precomputed"):
        build_cond(dropped, conditioning="text")
    with pytest.raises(ValueError, match="null_text"):
        apply_dropout(dict(batch, text=tb.states, text_lengths=tb.lengths, pooled=tb.pooled), sem, ctl, 4)


def test_cond_dropout_callable_is_seeded():
    drop = CondDropout({"p_semantic": 0.3, "p_control": 0.3, "p_both": 0.2}, num_classes=6)
    a = drop(_batch(), torch.Generator().manual_seed(1))
    b = drop(_batch(), torch.Generator().manual_seed(1))
    assert a["label"].tolist() == b["label"].tolist() and a["control_keep"].tolist() == b["control_keep"].tolist()
    cond = build_cond(a, device="cpu")
    assert cond.batch_size == 6 and cond.control_h.shape == (6, 6) and cond.text is None
