"""Transformer zoo: names, shapes, config round-trip, zero-init, resolution change, Table A1 parameter counts."""

import json

import pytest
import torch

from condiff.conditioning.cond import Cond
from condiff.models import attention_impl, create
from condiff.models.zoo import TRANSFORMERS

CLASS_ONLY = {"dit", "mdt-v2"}
FAMILIES = sorted(TRANSFORMERS)
# mmDiT's non-default context streams (class -> shared and text -> light are the defaults).
STREAMS = {"mmdit-full": ("mmdit", {"context_stream": "full"}), "mmdit-light": ("mmdit", {"context_stream": "light"}),
           "mmdit-shared": ("mmdit", {"context_stream": "shared"})}
CASES = [(f, c) for f in FAMILIES for c in ("class", "text") if not (f in CLASS_ONLY and c == "text")]
CASES += [("mmdit-full", "class"), ("mmdit-full", "text"), ("mmdit-light", "class"), ("mmdit-shared", "text")]
SMALL = dict(input_size=8, text_dim=32, pooled_dim=24, text_len=7, num_classes=10, hidden_size=64, depth=2,
             control_freq_dim=32)


def tiny(family, conditioning, **kw):
    """The family's tiny config, shrunk further for test speed (mDT keeps depth 4: 1 + 1 encoder, 2 decoder)."""
    family, extra = STREAMS.get(family, (family, {}))
    small = {**SMALL, "depth": 4} if family == "mdt-v2" else SMALL
    return create(f"{family}-tiny", conditioning=conditioning, **{**small, **extra, **kw})


def perturb(model):
    """Give the zero-initialised layers random values so that outputs depend on every input."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("family,conditioning", CASES)
def test_shapes_config_roundtrip_and_zero_init(family, conditioning):
    model = tiny(family, conditioning)
    x, t, cond = model.example_inputs(3)
    out = model(x, t, cond)
    assert out.shape == (3, 4, 8, 8)
    assert out._base is None, "the output must not be a view (FSDP2 hooks the root's output)"
    assert torch.equal(out, torch.zeros_like(out)), "zero-init: a fresh model must predict exactly 0"
    config = json.loads(json.dumps(model.config))
    rebuilt = create(**config)
    assert rebuilt.config == model.config
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())
    rebuilt.load_state_dict(model.state_dict())


@pytest.mark.parametrize("family,conditioning", CASES)
def test_other_resolutions_and_odd_batch(family, conditioning):
    model = perturb(tiny(family, conditioning)).eval()
    for size, batch in ((8, 1), (12, 5), (16, 3)):
        x, t, cond = model.example_inputs(batch, input_size=size)
        out = model(x, t, cond)
        assert out.shape == (batch, 4, size, size)
        assert torch.isfinite(out).all()
    x = torch.randn(2, 4, 8, 12)  # non-square
    _, t, cond = model.example_inputs(2)
    assert model(x, t, cond).shape == (2, 4, 8, 12)


def test_text_only_families_reject_text_with_clear_error():
    with pytest.raises(ValueError, match="class-conditional only"):
        create("dit-tiny", conditioning="text")


def test_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown model"):
        create("vit-tiny")
    with pytest.raises(ValueError, match="unknown model size"):
        create("dit-huge/2")
    with pytest.raises(ValueError, match="unknown option"):
        create("dit-tiny", depthh=3)
    with pytest.raises(ValueError, match="control must be one of"):
        create("mmdit-tiny", control="sometimes")


def test_names_and_sizes():
    m = create("mmdit-ours-s/4", input_size=16)
    assert (m.cfg.depth, m.cfg.hidden_size, m.cfg.num_heads, m.cfg.patch_size) == (12, 384, 6, 4)
    assert m.cfg.control == "disentangled" and m.cfg.text_padding == "noisy-replicate"
    with torch.device("meta"):
        bare = create("mmdit-ours")
    assert (bare.cfg.depth, bare.cfg.hidden_size, bare.cfg.patch_size) == (28, 1152, 2)


@pytest.mark.parametrize("family,conditioning", CASES)
def test_fused_ops_match_reference_backend_and_math_attention(family, conditioning):
    model = perturb(tiny(family, conditioning)).eval()
    ref = create(**{**model.config, "ops_backend": "reference", "attn_impl": "math"}).eval()
    ref.load_state_dict(model.state_dict())
    x, t, cond = model.example_inputs(3)
    out = model(x, t, cond)
    torch.testing.assert_close(ref(x, t, cond), out, rtol=1e-4, atol=1e-5)
    with attention_impl("math"):
        torch.testing.assert_close(model(x, t, cond), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,conditioning", CASES)
def test_gradients_reach_every_parameter(family, conditioning):
    model = perturb(tiny(family, conditioning)).train()
    x, t, cond = model.example_inputs(2)
    loss = model(x, t, cond).square().mean()
    if family.startswith("mdt"):  # the masked pass (mask token, side-interpolater) of MDT's two-pass loss
        loss = loss + model(x, t, cond, mask_ratio=model.mask_ratio).square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("family,conditioning", [c for c in CASES if c[1] == "class"])
def test_null_class_and_condition_changes_output(family, conditioning):
    model = perturb(tiny(family, conditioning)).eval()
    x, t, cond = model.example_inputs(2)
    out = model(x, t, cond)
    null = model(x, t, cond.drop_labels(torch.tensor([True, False]), 10))
    assert not torch.allclose(null[0], out[0]) and torch.allclose(null[1], out[1], atol=1e-6)


def test_meta_device_construction_and_math_forward():
    with torch.device("meta"):
        model = create("mmdit-ours-xl/2", conditioning="text")
        x, t, cond = model.example_inputs(1)
        with attention_impl("math"):
            out = model(x, t, cond)
    assert out.shape == (1, 4, 32, 32) and out.is_meta


# Table A1 (paper, params M). Our -xl/2 defaults must land within 2% (shared/notes/table-a1.md).
TABLE_A1 = {
    ("dit", "class"): 679.09, ("dit-att", "class"): 792.44, ("mmdit", "class"): 679.09,
    ("mmdit-ours", "class"): 679.09, ("dit-att", "text"): 940.49, ("mmdit", "text"): 791.64,
    ("mmdit-ours", "text"): 791.64, ("pixart-alpha", "class"): 611.7, ("pixart-alpha", "text"): 610.12,
    ("mdt-v2", "class"): 748.07,
}


@pytest.mark.parametrize("key", sorted(TABLE_A1))
def test_xl2_parameter_counts_match_table_a1(key):
    family, conditioning = key
    with torch.device("meta"):
        model = create(family, conditioning=conditioning)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    assert abs(params - TABLE_A1[key]) / TABLE_A1[key] < 0.02, (key, params)


def test_mmdit_light_vs_full_context_stream_parameter_difference():
    """Light: +3d^2+3d (own q,k,v) per block over the class model; full adds own adaLN, proj and MLP (notes)."""
    def count(**kw):
        with torch.device("meta"):
            return sum(p.numel() for p in create("mmdit", conditioning="text", **kw).parameters())

    d, depth = 1152, 28
    light, full, shared = count(context_stream="light"), count(context_stream="full"), count(context_stream="shared")
    hd = d // 16
    # context q,k,v and its q/k RMSNorm weights (the last block, context_pre_only, has no q norm)
    assert light - shared == depth * (3 * d * d + 3 * d + 2 * hd) - hd
    # full: + context adaLN (6d), proj (d), MLP (8d) per block; the last block: adaLN 2d, no proj, no MLP.
    per_block = (6 * d * d + 6 * d) + (d * d + d) + (8 * d * d + 5 * d)
    last = (2 * d * d + 2 * d)  # pre-only context adaLN (shift, scale)
    assert full - light == (depth - 1) * per_block + last


def test_mdt_masked_pass():
    model = perturb(tiny("mdt-v2", "class")).train()
    x, t, cond = model.example_inputs(3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = model(x, t, cond, mask_ratio=0.5, generator=g1)
    b = model(x, t, cond, mask_ratio=0.5, generator=g2)
    assert a.shape == x.shape and torch.equal(a, b), "masking must be reproducible from the generator"
    full = model(x, t, cond)
    assert not torch.allclose(a, full), "the masked pass must differ from the full pass"
    assert torch.equal(model(x, t, cond, mask_ratio=0.0), full)
    with pytest.raises(ValueError, match="mask_ratio"):
        model(x, t, cond, mask_ratio=0.9)


def test_mdt_random_masking_bookkeeping():
    from condiff.models.mdt import random_masking

    x = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10, 1)
    kept, mask, ids_restore, ids_keep = random_masking(x, 0.3, torch.Generator().manual_seed(0))
    assert kept.shape == (2, 7, 1) and mask.sum(1).tolist() == [3.0, 3.0]
    for b in range(2):  # kept tokens are exactly the unmasked positions
        assert sorted(kept[b, :, 0].long().tolist()) == [b * 10 + i for i in range(10) if mask[b, i] == 0]


@pytest.mark.slow
@pytest.mark.parametrize("family,conditioning", CASES)
def test_torch_compile_matches_eager(family, conditioning):
    """torch.compile (inductor) of the tiny configs: same forward output and parameter gradients as eager."""
    model = perturb(tiny(family, conditioning)).eval()
    x, t, cond = model.example_inputs(2)
    compiled = torch.compile(model)
    out_eager = model(x, t, cond)
    out = compiled(x, t, cond)
    torch.testing.assert_close(out, out_eager, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
    ref = torch.autograd.grad(out_eager.square().sum(), list(model.parameters()), allow_unused=True)
    for g, r in zip(grads, ref):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)  # fused-kernel reassociation


def test_learn_sigma_returns_eps_channels_only():
    model = perturb(tiny("dit", "class", learn_sigma=True))
    assert model.final_layer.linear.out_features == 2 * 2 * 8
    x, t, cond = model.example_inputs(2)
    out = model(x, t, cond)
    assert out.shape == (2, 4, 8, 8) and out._base is None and out.is_contiguous()


def test_text_states_validation_and_default_lengths():
    model = perturb(tiny("mmdit", "text")).eval()
    x, t, cond = model.example_inputs(2)
    with pytest.raises(ValueError, match=r"cond.text must be \(2, T, 32\)"):
        model(x, t, Cond(text=torch.randn(2, 7, 16), pooled=cond.pooled))
    with pytest.raises(ValueError, match=r"cond.pooled must be \(2, 24\)"):
        model(x, t, Cond(text=cond.text, text_lengths=cond.text_lengths))
    with pytest.raises(ValueError, match="Cond.labels is required"):
        perturb(tiny("dit", "class"))(x, t, Cond())
    full = Cond(text=cond.text, pooled=cond.pooled)  # no lengths = every token valid (zero padding is a no-op)
    explicit = Cond(text=cond.text, pooled=cond.pooled, text_lengths=torch.tensor([7, 7]))
    torch.testing.assert_close(model(x, t, full), model(x, t, explicit))
    minilm = tiny("mmdit-ours", "text", text_dim=384, pooled_dim=384)  # other encoders: configurable dims
    xm, tm, cm = minilm.example_inputs(1)
    assert cm.text.shape == (1, 7, 384) and minilm(xm, tm, cm).shape == (1, 4, 8, 8)


def test_positional_grid_kinds():
    """arange = facebookresearch/DiT (MAE) table; rectified = App. C linspace(0, base, grid); the model uses the
    table of the actual grid, anchored at its base size."""
    import numpy as np

    from condiff.models.posemb import sincos_pos_embed_2d

    def mae_table(dim, pos_h, pos_w):  # the MAE/DiT formula written out: [w features | h features], [sin | cos]
        omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
        gw, gh = np.meshgrid(pos_w, pos_h)
        feats = [np.concatenate([np.sin(np.outer(g.reshape(-1), omega)), np.cos(np.outer(g.reshape(-1), omega))], 1)
                 for g in (gw, gh)]
        return torch.from_numpy(np.concatenate(feats, 1)).float()

    torch.testing.assert_close(sincos_pos_embed_2d(16, 4, rectified=False), mae_table(16, np.arange(4), np.arange(4)))
    lin = np.linspace(0, 4, 8)
    torch.testing.assert_close(sincos_pos_embed_2d(16, 8, base_size=4), mae_table(16, lin, lin))
    scaled = np.arange(8) * 4 / 8 / 2.0
    torch.testing.assert_close(sincos_pos_embed_2d(16, 8, base_size=4, kind="scaled", interp_scale=2.0),
                               mae_table(16, scaled, scaled))
    crop = (np.arange(4) + 2) * 4 / 8
    torch.testing.assert_close(sincos_pos_embed_2d(16, 4, base_size=4, kind="sd3", max_size=8), mae_table(16, crop, crop))
    model = tiny("dit", "class")
    assert model.base_size == 4
    torch.testing.assert_close(model.pos_embed(8, 8, "cpu", torch.float32)[0], sincos_pos_embed_2d(64, 8, base_size=4))
    dit = tiny("dit", "class", pos_grid="arange")
    torch.testing.assert_close(dit.pos_embed(4, 4, "cpu", torch.float32)[0], mae_table(64, np.arange(4), np.arange(4)))


@pytest.mark.parametrize("family,conditioning", [("mdt-v2", "class"), ("pixart-alpha", "text"), ("mmdit-full", "text"),
                                                 ("mmdit-ours", "class")])
def test_meta_init_then_to_empty_and_initialize_weights(family, conditioning):
    """FSDP-style init: build on meta, materialise with to_empty, initialize_weights() restores every
    parameter and computed buffer (RMSNorm ones, control scales, step-gamma sigmas, MDT / PixArt tables)."""
    kw = dict(gamma="step") if family == "mmdit-ours" else {}
    with torch.device("meta"):
        model = tiny(family, conditioning, **kw)
    model.to_empty(device="cpu")
    model.initialize_weights()
    fresh = tiny(family, conditioning, **kw)
    for (n, b), (_, ref) in zip(model.named_buffers(), fresh.named_buffers()):
        torch.testing.assert_close(b, ref, msg=n)
    for (n, p), (_, ref) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.isfinite(p).all(), n
        if ref.std() == 0 or "norm" in n:  # constants (zeros, ones) are reproduced exactly
            assert torch.equal(p, ref), n
        else:  # random inits: same scale
            assert 0.5 < (p.std() / ref.std()).item() < 2.0, n
    x, t, cond = model.example_inputs(2)
    assert torch.equal(model(x, t, cond), torch.zeros(2, 4, 8, 8))


# --- non-square inputs (H != W) ------------------------------------------------------------------------------

@pytest.mark.parametrize("family,conditioning", CASES)
def test_non_square_inputs_give_non_square_outputs(family, conditioning):
    """(B, C, H, W) with H != W, both multiples of the patch, runs every backbone: output (B, C, H, W); a full
    forward on the wide input equals the per-sample forwards (no cross-talk through a square assumption)."""
    model = perturb(tiny(family, conditioning)).eval()
    for hw in ((16, 32), (32, 16)):
        x, t, cond = model.example_inputs(2, input_size=hw, generator=torch.Generator().manual_seed(0))
        assert cond.control_h[0, 4] == hw[1] / hw[0]  # aspect = width / height
        out = model(x, t, cond)
        assert out.shape == (2, 4, *hw) and torch.isfinite(out).all()
        torch.testing.assert_close(model(x[1:], t[1:], cond.index(slice(1, 2))), out[1:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        model(torch.randn(1, 4, 8, 9), t[:1], cond.index(slice(0, 1)))


@pytest.mark.parametrize("family,conditioning", [("dit", "class"), ("mdt-v2", "class"), ("pixart-alpha", "text"),
                                                 ("mmdit-ours", "text")])
def test_transposed_shape_gets_its_own_positional_grid(family, conditioning):
    """A model made at one (square) size and run at H x W and at W x H adds the rectified table of that very
    grid (App. C, one step sqrt(gh gw)-equivalent on both axes), not a square or height-anchored one."""
    from condiff.models.posemb import rectified_step, sincos_1d

    model = perturb(tiny(family, conditioning)).eval()  # input_size 8, patch 2: base grid 4
    D = model.cfg.hidden_size
    for gh, gw in ((4, 8), (8, 4), (2, 8)):
        x = torch.randn(1, 4, 2 * gh, 2 * gw)
        tokens, grid = model.embed_input(x)
        assert grid == (gh, gw)
        step = 4 / ((gh * gw) ** 0.5 - 1)
        assert rectified_step(gh, gw, 4) == pytest.approx(step, rel=1e-15)
        pos = tokens - model.x_embedder(x)[0]  # (1, N, D): what was added
        for h, w in ((0, 0), (gh - 1, gw - 1), (gh // 2, 1)):
            want = torch.cat([sincos_1d(D // 2, torch.tensor([w * step])),
                              sincos_1d(D // 2, torch.tensor([h * step]))], 1).float()[0]
            torch.testing.assert_close(pos[0, h * gw + w], want, rtol=0, atol=1e-5)
    wide = model.pos_embed(4, 8, "cpu", torch.float32)[0].view(4, 8, D)
    tall = model.pos_embed(8, 4, "cpu", torch.float32)[0].view(8, 4, D)
    swap = torch.cat([wide[..., D // 2:], wide[..., : D // 2]], -1).transpose(0, 1)  # w <-> h features
    torch.testing.assert_close(tall, swap, rtol=0, atol=0)
    square = model.pos_embed(4, 4, "cpu", torch.float32)[0].view(4, 4, D)
    assert not torch.allclose(wide[:, :4], square) and not torch.allclose(tall[:4], square)


def test_mdt_non_square_masked_pass_and_relative_bias():
    """mDT on a non-square grid: the masked pass runs and is reproducible; the relative-position bias of a
    gh x gw grid reads the base table at offset (dh, dw) * (W - 1) / (sqrt(gh gw) - 1), bilinearly."""
    from condiff.models.mdt import RelativePositionBias

    model = perturb(tiny("mdt-v2", "class")).train()
    x, t, cond = model.example_inputs(2, input_size=(8, 16))
    a = model(x, t, cond, mask_ratio=0.5, generator=torch.Generator().manual_seed(3))
    b = model(x, t, cond, mask_ratio=0.5, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 4, 8, 16) and torch.equal(a, b)
    assert not torch.allclose(a, model(x, t, cond))

    bias = RelativePositionBias((4, 4), num_heads=2)
    base = bias.relative_position_bias_table[:-3].detach().view(7, 7, 2)

    def bilerp(y, x):  # the base table at a fractional offset (y, x) in [-3, 3]
        y, x = y + 3, x + 3
        y0, x0 = min(int(y), 5), min(int(x), 5)
        fy, fx = y - y0, x - x0
        return ((1 - fy) * (1 - fx) * base[y0, x0] + (1 - fy) * fx * base[y0, x0 + 1]
                + fy * (1 - fx) * base[y0 + 1, x0] + fy * fx * base[y0 + 1, x0 + 1])

    for gh, gw in ((4, 8), (8, 4)):
        scale = 3 / ((gh * gw) ** 0.5 - 1)
        table = bias.table(gh, gw).detach().view(2 * gh - 1, 2 * gw - 1, 2)
        for dh, dw in ((0, 0), (1, -2), (-(gh - 1), gw - 1), (gh - 2, 0)):
            want = bilerp(max(-3, min(3, dh * scale)), max(-3, min(3, dw * scale)))
            torch.testing.assert_close(table[dh + gh - 1, dw + gw - 1], want, rtol=0, atol=1e-6)
    # a grid with the base token count (2 x 8): the base table, w offsets past the window take its edge
    assert bias.table(2, 8) is bias.relative_position_bias_table
    idx = bias.index(2, 8, "cpu")  # (16, 16)
    assert idx[0, 7].item() == 3 * 7 + (0 - 3 + 3)  # dh 0, dw -7 -> clamped to -3
    assert idx[7, 0].item() == 3 * 7 + (3 + 3)  # dw +7 -> +3
