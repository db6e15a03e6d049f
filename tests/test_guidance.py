"""Guidance: Eq. 2 (control guidance), plain CFG, one batched forward, Eq. 4 law, inference size conditioning."""

import pytest
import torch
from torch import nn

from condiff.conditioning.cond import Cond
from condiff.diffusion.guidance import (
    ControlGuidance,
    classifier_free_guidance,
    control_guidance_weights,
    guidance_scale_for_resolution,
)
from condiff.diffusion.size_cond import (
    draw_sizes,
    full_crop_control_h,
    inference_control,
    nearest_bucket,
    size_distribution_from_meta,
    sizes_for_output,
)

NUM_CLASSES = 5


class ToyModel(nn.Module):
    """eps depends on x, t, the label (null = NUM_CLASSES), text and the control metadata (zeroed when
    control_keep is False); records the batch size of each forward."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.label_emb = nn.Parameter(torch.randn(NUM_CLASSES + 1, 3, generator=g))
        self.ctrl = nn.Parameter(torch.randn(2, 3, generator=g))
        self.batches = []

    def forward(self, x, t, cond):
        self.batches.append(x.shape[0])
        e = torch.zeros(x.shape[0], 3)
        if cond.labels is not None:
            e = e + self.label_emb[cond.labels]
        if cond.text is not None:
            e = e + cond.text.mean(dim=(1, 2))[:, None]
        if cond.control_l is not None:
            keep = torch.ones(x.shape[0]) if cond.control_keep is None else cond.control_keep.float()
            e = e + keep[:, None] * (cond.control_l / 512.0) @ self.ctrl
        return torch.tanh(x + e[:, :, None, None] + t[:, None, None, None] / 1000.0)


def make_inputs(b=4, control=True):
    x = torch.randn(b, 3, 4, 4)
    t = torch.full((b,), 500.0)
    cond = Cond(labels=torch.arange(b) % NUM_CLASSES)
    if control:
        cond.control_h, cond.control_l = inference_control(b, (32, 32), size=(512, 384))
        cond.control_l = cond.control_l + torch.arange(b)[:, None] * 100.0
    null = Cond(labels=torch.tensor([NUM_CLASSES]))
    return x, t, cond, null


def separate_predictions(model, x, t, cond):
    b = x.shape[0]
    keep, drop = torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
    null_labels = torch.full((b,), NUM_CLASSES)
    c_cs = Cond(labels=cond.labels, control_h=cond.control_h, control_l=cond.control_l, control_keep=keep)
    c_0s = Cond(labels=cond.labels, control_h=cond.control_h, control_l=cond.control_l, control_keep=drop)
    c_00 = Cond(labels=null_labels, control_h=cond.control_h, control_l=cond.control_l, control_keep=drop)
    return model(x, t, c_cs), model(x, t, c_0s), model(x, t, c_00)


def test_eq2_with_three_terms_in_one_batched_forward():
    model = ToyModel()
    x, t, cond, null = make_inputs()
    eps_cs, eps_0s, eps_00 = separate_predictions(model, x, t, cond)
    assert not torch.allclose(eps_cs, eps_0s) and not torch.allclose(eps_0s, eps_00)
    lam, beta = 4.0, 1.375
    model.batches.clear()
    out = ControlGuidance(model, null, lam=lam, beta=beta)(x, t, cond)
    expected = lam * (beta * eps_cs + (1 - beta) * eps_0s) + (1 - lam) * eps_00
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert model.batches == [3 * x.shape[0]]  # ONE forward of the three stacked conditions


def test_eq2_beta_one_is_plain_cfg_and_skips_the_control_null_row():
    model = ToyModel()
    x, t, cond, null = make_inputs()
    eps_cs, _, eps_00 = separate_predictions(model, x, t, cond)
    model.batches.clear()
    out = ControlGuidance(model, null, lam=1.5, beta=1.0)(x, t, cond)
    torch.testing.assert_close(out, 1.5 * eps_cs - 0.5 * eps_00, rtol=1e-6, atol=1e-6)
    assert model.batches == [2 * x.shape[0]]
    torch.testing.assert_close(classifier_free_guidance(model, null, 1.5)(x, t, cond), out, rtol=0, atol=0)


def test_lambda_one_beta_one_is_the_conditional_prediction():
    model = ToyModel()
    x, t, cond, null = make_inputs()
    model.batches.clear()
    out = ControlGuidance(model, null, lam=1.0, beta=1.0)(x, t, cond)
    assert model.batches == [x.shape[0]]
    torch.testing.assert_close(out, model(x, t, cond), rtol=0, atol=0)


def test_no_control_metadata_merges_the_control_terms():
    model = ToyModel()
    x, t, cond, null = make_inputs(control=False)
    model.batches.clear()
    out = ControlGuidance(model, null, lam=3.0, beta=1.375)(x, t, cond)
    assert model.batches == [2 * x.shape[0]]  # eps(0,s) == eps(c,s): not evaluated
    uncond = model(x, t, Cond(labels=torch.full((x.shape[0],), NUM_CLASSES)))
    torch.testing.assert_close(out, 3.0 * model(x, t, cond) - 2.0 * uncond, rtol=1e-6, atol=1e-6)


def test_text_null_condition_is_broadcast_and_checked():
    model = ToyModel()
    b, seq, dim = 3, 7, 8
    x, t = torch.randn(b, 3, 4, 4), torch.full((b,), 10.0)
    cond = Cond(text=torch.randn(b, seq, dim), text_lengths=torch.tensor([3, 5, 7]))
    null = Cond(text=torch.full((1, seq, dim), 0.25), text_lengths=torch.tensor([2]))
    out = ControlGuidance(model, null, lam=2.0)(x, t, cond)
    null_b = Cond(text=null.text.expand(b, seq, dim), text_lengths=torch.tensor([2, 2, 2]))
    torch.testing.assert_close(out, 2 * model(x, t, cond) - model(x, t, null_b), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="null condition 'text' has shape"):
        ControlGuidance(model, Cond(text=torch.zeros(1, 77, dim), text_lengths=torch.tensor([2])), lam=2.0)(x, t, cond)
    with pytest.raises(ValueError, match="the null condition does not"):
        ControlGuidance(model, Cond(labels=torch.tensor([0])), lam=2.0)(x, t, cond)


def test_guidance_is_applied_to_every_channel():
    model = ToyModel()
    x, t, cond, null = make_inputs()
    eps_cs, _, eps_00 = separate_predictions(model, x, t, cond)
    out = ControlGuidance(model, null, lam=4.0)(x, t, cond)
    for c in range(3):  # DiT's script would leave channels >= 3 unguided; every channel is guided here
        torch.testing.assert_close(out[:, c], 4 * eps_cs[:, c] - 3 * eps_00[:, c], rtol=1e-6, atol=1e-6)


def test_guidance_law_eq4():
    assert guidance_scale_for_resolution(1.5, 2.0) == 2.0  # App. D: 1 + 2 (1.5 - 1) = 2.0 at 512 from 256
    assert guidance_scale_for_resolution(4.0, 1.0) == 4.0
    assert guidance_scale_for_resolution(1.0, 3.0) == 1.0
    assert guidance_scale_for_resolution(3.0, 0.5) == 2.0
    with pytest.raises(ValueError, match="must be > 0"):
        guidance_scale_for_resolution(1.5, 0.0)
    w = control_guidance_weights(2.0, 1.375)
    assert w == {"cs": 2.75, "0s": -0.75, "00": -1.0} and sum(w.values()) == 1.0


def test_guidance_law_pixel_count_scale_for_non_square_outputs():
    """s of Eq. 4 for H x W = sqrt(H W) / sqrt(H0 W0) (App. D: s^2 observations per low-resolution patch)."""
    from condiff.diffusion.guidance import resolution_scale

    assert resolution_scale((512, 512), (256, 256)) == 2.0  # square: exactly H / H0
    assert resolution_scale((384, 384), (256, 256)) == 1.5
    assert resolution_scale((256, 512), (256, 256)) == pytest.approx(2 ** 0.5, rel=1e-15)
    assert resolution_scale((512, 256), (256, 256)) == resolution_scale((256, 512), (256, 256))  # transposed
    assert resolution_scale((192, 320), (256, 256)) == pytest.approx((192 * 320) ** 0.5 / 256, rel=1e-15)
    assert resolution_scale((512, 1024), (256, 256)) == pytest.approx(8 ** 0.5, rel=1e-15)
    lam = guidance_scale_for_resolution(1.5, resolution_scale((256, 512), (256, 256)))
    assert lam == pytest.approx(1 + 2 ** 0.5 * 0.5, rel=1e-15)
    with pytest.raises(ValueError, match="sizes must be > 0"):
        resolution_scale((0, 256), (256, 256))


def test_full_centred_crop_control():
    h = full_crop_control_h(torch.tensor([[480.0, 640.0], [800.0, 600.0], [256.0, 256.0]]), (32, 32))
    expected = torch.tensor([[0, 80, 480, 480, 1, 0], [100, 0, 600, 600, 1, 0], [0, 0, 256, 256, 1, 0]]).float()
    torch.testing.assert_close(h, expected)
    # same box as the data pipeline's "center" crop for square outputs
    import numpy as np

    from condiff.data.transforms import sample_crop

    for hh, ww in ((480, 640), (801, 600)):
        p = sample_crop(hh, ww, "center", np.random.default_rng(0), flip_prob=0.0)
        ours = full_crop_control_h(torch.tensor([[float(hh), float(ww)]]), (64, 64))[0]
        assert ours.tolist() == [p.top, p.left, p.size, p.size, 1.0, 0.0]
    # non-square output: largest centred box with the output's aspect (width / height = 2)
    wide = full_crop_control_h(torch.tensor([[480.0, 640.0]]), (32, 64))[0]
    torch.testing.assert_close(wide, torch.tensor([80.0, 0.0, 320.0, 640.0, 2.0, 0.0]))


def test_size_conditioning_fixed_drawn_and_default():
    ctrl_h, ctrl_l = inference_control(3, (64, 64), size=(512, 768))
    assert ctrl_l.tolist() == [[512.0, 768.0]] * 3 and ctrl_h[:, 2:4].tolist() == [[512.0, 512.0]] * 3
    dist = [[300, 400], [1024, 768], [512, 512]]
    _, drawn = inference_control(2000, (64, 64), size_distribution=dist, generator=torch.Generator().manual_seed(0))
    rows = {tuple(r) for r in drawn.tolist()}
    assert rows == {(300.0, 400.0), (1024.0, 768.0), (512.0, 512.0)}
    counts = torch.stack([(drawn == torch.tensor(d, dtype=torch.float32)).all(1) for d in dist]).sum(1)
    assert counts.min() > 550  # uniform over the stored (empirical) sizes: ~667 each
    a = draw_sizes(5, dist, torch.Generator().manual_seed(4))
    assert torch.equal(a, draw_sizes(5, dist, torch.Generator().manual_seed(4)))
    _, default = inference_control(2, (32, 48))
    assert default.tolist() == [[32.0, 48.0]] * 2
    assert size_distribution_from_meta({"train_sizes": dist}) == [[float(a), float(b)] for a, b in dist]
    assert size_distribution_from_meta({"size_distribution": [[1, 2]], "train_sizes": dist}) == [[1.0, 2.0]]
    assert size_distribution_from_meta({}) is None
    with pytest.raises(ValueError, match=r"meta\['train_sizes'\]\[1\]: expected \[height, width\]"):
        size_distribution_from_meta({"train_sizes": [[1, 2], [3]]})
    with pytest.raises(ValueError, match="expected \\(height, width\\)"):
        inference_control(1, (8, 8), size=(0, 4))


def test_per_bucket_size_distribution_draws_from_the_nearest_aspect():
    """Multi-aspect checkpoints store {"HxW": [[h, w], ...]} (bucket output size -> original sizes); train-dist
    draws from the bucket whose aspect is nearest the output's; a single list is used at every aspect."""
    buckets = {"256x256": [[500, 500]], "192x320": [[600, 1000], [300, 500]], "320x192": [[900, 540]],
               "128x512": [[100, 400]]}
    assert nearest_bucket(buckets, (16, 16)) == "256x256"
    assert nearest_bucket(buckets, (32, 64)) == "192x320"  # 2:1 -> log distance to 5:3 < to 4:1
    assert nearest_bucket(buckets, (64, 32)) == "320x192"
    assert nearest_bucket(buckets, (32, 96)) == "128x512"  # 3:1: log(3) is nearer log(4) than log(5/3)
    assert nearest_bucket({"256x128": [[1, 1]], "512x256": [[2, 2]]}, (500, 250)) == "512x256"  # tie: pixel count
    _, drawn = inference_control(400, (32, 64), size_distribution=buckets, generator=torch.Generator().manual_seed(0))
    assert {tuple(r) for r in drawn.tolist()} == {(600.0, 1000.0), (300.0, 500.0)}
    ctrl_h, _ = inference_control(2, (32, 64), size_distribution=buckets, generator=torch.Generator().manual_seed(0))
    assert ctrl_h[:, 4].tolist() == [2.0, 2.0]  # phi_h's aspect is the output's, W / H
    assert sizes_for_output([[1, 2]], (32, 64)) == ([[1, 2]], None)
    # where it is stored: a dict under any SIZE_META_KEYS key wins over a list
    meta = {"train_sizes": [[64, 64]], "train_sizes_by_bucket": buckets}
    got = size_distribution_from_meta(meta)
    assert got["192x320"] == [[600.0, 1000.0], [300.0, 500.0]] and set(got) == set(buckets)
    assert size_distribution_from_meta({"size_distribution": buckets})["128x512"] == [[100.0, 400.0]]
    assert size_distribution_from_meta({"train_sizes": [[64, 64]]}) == [[64.0, 64.0]]
    with pytest.raises(ValueError, match=r"bucket key '256' must be 'HxW'"):
        size_distribution_from_meta({"train_sizes": {"256": [[1, 1]]}})
    with pytest.raises(ValueError, match=r"meta\['train_sizes'\]\['8x8'\]\[0\]: expected \[height, width\]"):
        size_distribution_from_meta({"train_sizes": {"8x8": [[1]]}})


def test_eq2_with_a_real_text_model_and_control():
    """mmDiT-ours (text, disentangled control, noisy-replicate padding) in eval mode: the batched Eq. 2 equals
    the combination of three separate forwards, and dropping the control changes the prediction."""
    from condiff.models import create

    torch.manual_seed(0)
    model = create("mmdit-ours-tiny", conditioning="text", input_size=8, in_channels=3, text_dim=16, pooled_dim=16,
                   text_len=6).eval()
    with torch.no_grad():
        for p in model.parameters():  # past the zero-initialised gates / embedders
            p.add_(0.05 * torch.randn_like(p))
    b = 3
    x, t = torch.randn(b, 3, 8, 8), torch.tensor([900.0, 500.0, 100.0])
    ctrl_h, ctrl_l = inference_control(b, (64, 64), size_distribution=[[300, 400], [800, 600]])
    cond = Cond(text=torch.randn(b, 6, 16), text_lengths=torch.tensor([2, 4, 6]), pooled=torch.randn(b, 16),
                control_h=ctrl_h, control_l=ctrl_l)
    null = Cond(text=torch.zeros(1, 6, 16), text_lengths=torch.tensor([2]), pooled=torch.zeros(1, 16))
    lam, beta = 3.0, 1.375
    with torch.no_grad():
        out = ControlGuidance(model, null, lam=lam, beta=beta)(x, t, cond)
        keep, drop = torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
        eps_cs = model(x, t, Cond(**{**cond._tensors(), "control_keep": keep}))
        eps_0s = model(x, t, Cond(**{**cond._tensors(), "control_keep": drop}))
        null_b = Cond(text=null.text.expand(b, 6, 16), text_lengths=null.text_lengths.expand(b),
                      pooled=null.pooled.expand(b, 16), control_h=ctrl_h, control_l=ctrl_l, control_keep=drop)
        eps_00 = model(x, t, null_b)
    assert not torch.allclose(eps_cs, eps_0s, atol=1e-4)  # the control condition matters
    expected = lam * (beta * eps_cs + (1 - beta) * eps_0s) + (1 - lam) * eps_00
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_guidance_base_resolution():
    from condiff.diffusion.guidance import guidance_base_resolution
    from condiff.diffusion.schedule import Schedule

    dit = {"input_size": 64, "patch_size": 2, "base_size": 16}  # 512 px latents, grid kept at 256 px's 16
    assert guidance_base_resolution(Schedule().config, dit, 8) == 256.0
    assert guidance_base_resolution(Schedule(base_resolution=256, resolution=512).config, {"input_size": 64}, 8) == 256
    assert guidance_base_resolution(Schedule().config, {"input_size": 32}, 8) == 256.0  # e.g. a UNet
    lam = guidance_scale_for_resolution(1.5, 512 / guidance_base_resolution(Schedule().config, dit, 8))
    assert lam == 2.0
    with pytest.raises(ValueError, match="give the resolution lambda is tuned at"):
        guidance_base_resolution(Schedule().config, {}, 8)
