"""SDXL-style UNet: structure, Table A1 sizes, zero-init, conditioning paths, gradients, compile."""

import json
from dataclasses import fields

import pytest
import torch

from condiff.conditioning.cond import Cond
from condiff.models import create
from condiff.models.unet import UNet, build_unet


def _randomize_zero_params(model: torch.nn.Module) -> None:
    """Give the zero-initialised layers small random weights (as after some training)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)


def _control(b):
    return dict(control_h=torch.tensor([[0.0, 0, 256, 256, 1, 0]]).repeat(b, 1),
                control_l=torch.tensor([[256.0, 256]]).repeat(b, 1))


def _class_cond(b, labels=None):
    return Cond(labels=torch.arange(b) % 10 if labels is None else labels, **_control(b))


def _text_cond(b, dim=64, tokens=7):
    return Cond(text=torch.randn(b, tokens, dim), pooled=torch.randn(b, dim), **_control(b))


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_shapes_and_zero_init_predicts_zero(conditioning):
    model = build_unet("unet-sdxl-tiny", conditioning, num_classes=10)
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([0.0, 500.0, 999.0])
    cond = _class_cond(3) if conditioning == "class" else _text_cond(3)
    out = model(x, t, cond)
    assert out.shape == (3, 4, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))  # conv_out is zero: exactly 0 at init
    _randomize_zero_params(model)
    out = model(x, t, cond)
    assert out.abs().min() > 0 and torch.isfinite(out).all()
    # non-square latents work (all levels see even sizes); a row's output does not depend on the batch's shape
    for hw in ((8, 12), (16, 32), (32, 16)):
        xn = torch.randn(3, 4, *hw)
        out = model(xn, t, cond)
        assert out.shape == (3, 4, *hw) and torch.isfinite(out).all()
        torch.testing.assert_close(model(xn[:1], t[:1], cond.index(slice(0, 1))), out[:1], rtol=1e-4, atol=1e-5)
    f = model.downsample_factor
    with pytest.raises(ValueError, match=f"H, W divisible by {f}"):
        model(torch.randn(1, 4, 4 * f, 4 * f + f // 2), t[:1], cond.index(slice(0, 1)))


def test_every_block_starts_as_identity():
    """Zero-init of ResBlock out-convs and transformer out-projections: each block is the identity at init."""
    model = build_unet("unet-sdxl-tiny", "class", num_classes=10)
    h = torch.randn(2, 32, 8, 8)
    emb = torch.randn(2, 128)
    block = model.down[0].res
    assert torch.equal(block(h, emb), h)
    attn = model.middle[0].attn
    hm = torch.randn(2, 64, 4, 4)
    assert torch.equal(attn(hm, torch.randn(2, 1, 64)), hm)


def test_null_class_and_conditioning_changes_output():
    model = build_unet("unet-sdxl-tiny", "class", num_classes=10)
    _randomize_zero_params(model)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 300.0)
    a = model(x, t, _class_cond(2, torch.tensor([1, 1])))
    b = model(x, t, _class_cond(2, torch.tensor([2, 2])))
    null = model(x, t, _class_cond(2, torch.tensor([10, 10])))  # num_classes = null class
    assert not torch.allclose(a, b) and not torch.allclose(a, null)
    # dropping labels through Cond gives the same as passing the null id
    dropped = _class_cond(2, torch.tensor([1, 1])).drop_labels(torch.tensor([True, True]), 10)
    assert torch.equal(model(x, t, dropped), null)
    # batch rows are independent
    assert torch.allclose(model(x[:1], t[:1], _class_cond(1, torch.tensor([1]))), a[:1], atol=1e-6)


def test_text_conditioning_uses_states_and_pooled():
    model = build_unet("unet-sdxl-tiny", "text")
    _randomize_zero_params(model)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.full((2,), 300.0), _text_cond(2)
    base = model(x, t, cond)
    other_text = Cond(text=cond.text + 1.0, pooled=cond.pooled, **_control(2))
    other_pooled = Cond(text=cond.text, pooled=cond.pooled + 1.0, **_control(2))
    assert not torch.allclose(model(x, t, other_text), base)
    assert not torch.allclose(model(x, t, other_pooled), base)


def test_gradients_reach_every_parameter():
    for conditioning in ("class", "text"):
        model = build_unet("unet-sdxl-tiny", conditioning, num_classes=10)
        _randomize_zero_params(model)
        cond = _class_cond(2) if conditioning == "class" else _text_cond(2)
        model(torch.randn(2, 4, 8, 8), torch.full((2,), 10.0), cond).square().mean().backward()
        for name, p in model.named_parameters():
            if conditioning == "class" and name == "class_embed.embedding_table.weight":
                assert p.grad[:2].abs().sum() > 0  # rows of the labels used
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_paper_sizes_on_meta_device():
    """Table A1 UNet cells: class 398.11M (+ class table + control embedder) vs 401.75M; text 872.63M (+ control)
    vs 864.31M."""
    with torch.device("meta"):
        cls = build_unet("unet-sdxl", "class")
        txt = build_unet("unet-sdxl", "text")
    assert next(cls.parameters()).is_meta
    n_cls = sum(p.numel() for p in cls.parameters())
    n_txt = sum(p.numel() for p in txt.parameters())
    # exact counts of the designs in notes/table-a1.md (without the class table and the control embedder)
    ctrl = sum(p.numel() for p in cls.control_embed.parameters())
    assert n_cls - cls.class_embed.embedding_table.weight.numel() - ctrl == 398_105_092
    assert n_txt - sum(p.numel() for p in txt.control_embed.parameters()) == 872_634_820
    assert abs(n_cls / 401.75e6 - 1) < 0.02 and abs(n_txt / 864.31e6 - 1) < 0.02
    # SDXL structure: 3 levels, attention only at levels 2 and 3, width 256/512/1024
    assert [s.res.in_layers[2].out_channels for s in cls.down if s.res is not None] == [256, 256, 512, 512, 1024, 1024]
    assert [s.attn is not None for s in cls.down if s.res is not None] == [False, False, True, True, True, True]


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_example_inputs_run(conditioning):
    model = build_unet("unet-sdxl-tiny", conditioning, input_size=16)
    x, t, cond = model.example_inputs(3)
    assert x.shape == (3, 4, 16, 16) and cond.batch_size == 3
    assert model(x, t, cond).shape == x.shape


def test_config_is_json_and_rebuilds():
    model = build_unet("unet-sdxl-tiny", "text")
    config = json.loads(json.dumps(model.config))
    rebuilt = create(**config)
    assert rebuilt.config == model.config
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]


def test_config_shares_the_transformers_field_names():
    """One model-spec contract: the text widths and the control / gamma_c fields have the transformers' names,
    and the UNet's config is the shared `ModelConfig` extended."""
    from condiff.models.base import ModelConfig
    from condiff.models.unet import UNetConfig

    shared = {f.name for f in fields(ModelConfig)}
    assert {"text_dim", "pooled_dim", "control", "gamma", "gamma_alpha", "gamma_k", "text_padding"} <= shared
    assert issubclass(UNetConfig, ModelConfig)
    unet = create("unet-sdxl-tiny", "text", text_dim=24, pooled_dim=20, control="disentangled", gamma="linear",
                  gamma_alpha=2.0)
    dit = create("mmdit-tiny", "text", text_dim=24, pooled_dim=20, control="disentangled", gamma="linear",
                 gamma_alpha=2.0)
    for key in shared - {"name"}:
        if key not in ("input_size", "in_channels"):
            assert unet.config[key] == dit.config[key], key
    assert unet.control_embed.gamma == "linear" and unet.control_embed.alpha == 2.0
    assert unet.down[-1].attn.blocks[0].attn2.to_k.in_features == 24  # text states are the context
    assert unet.label_emb[0].in_features == 20  # the pooled vector is the adm vector
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['width'\]"):
        create("unet-sdxl-tiny", "text", width=3)


def test_configs_written_with_the_old_field_names_still_build():
    """meta.json of runs saved before the shared names (context_dim / adm_dim / control_kwargs) rebuilds the
    same architecture."""
    old = dict(name="unet-sdxl-tiny", conditioning="text", context_dim=24, adm_dim=20,
               control_kwargs=dict(gamma="linear", alpha=2.0, k=1.0, freq_dim=128))
    model = create(**old)
    assert (model.cfg.text_dim, model.cfg.pooled_dim, model.cfg.gamma_alpha, model.cfg.control_freq_dim) == (
        24, 20, 2.0, 128)
    assert create("unet-sdxl-tiny", "class", context_dim=48, adm_dim=48).cfg.class_dim == 48
    with pytest.raises(ValueError, match="must equal the class width"):
        create("unet-sdxl-tiny", "class", context_dim=48, adm_dim=32)


def test_meta_init_then_to_empty_and_initialize_weights():
    """The UNet has one `initialize_weights` like the transformers: after building on meta and `to_empty`, it
    restores the zero-init (a fresh model predicts 0) and the default scales of every layer."""
    with torch.device("meta"):
        model = build_unet("unet-sdxl-tiny", "class", num_classes=10, control="disentangled", gamma="step")
    model.to_empty(device="cpu")
    model.initialize_weights()
    fresh = build_unet("unet-sdxl-tiny", "class", num_classes=10, control="disentangled", gamma="step")
    for (n, b), (_, ref) in zip(model.named_buffers(), fresh.named_buffers()):
        torch.testing.assert_close(b, ref, msg=n)
    for (n, p), (_, ref) in zip(model.named_parameters(), fresh.named_parameters()):
        if ref.numel() > 1 and ref.std() > 0:
            assert 0.5 < (p.std() / ref.std()).item() < 2.0, n
        else:
            assert torch.equal(p, ref), n
    x, t, cond = model.example_inputs(2, input_size=8)
    assert torch.equal(model(x, t, cond), torch.zeros(2, 4, 8, 8))


def test_bad_inputs_raise_clear_errors():
    model = build_unet("unet-sdxl-tiny", "class", num_classes=10)
    x, t = torch.randn(1, 4, 8, 8), torch.zeros(1)
    with pytest.raises(ValueError, match="Cond.labels is required"):
        model(x, t, Cond())
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 4, 7, 8), t, _class_cond(1))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        model(torch.randn(1, 3, 8, 8), t, _class_cond(1))
    text = build_unet("unet-sdxl-tiny", "text")
    with pytest.raises(ValueError, match="cond.pooled must be"):
        text(x, t, Cond(text=torch.randn(1, 5, 64), pooled=torch.randn(1, 32)))
    with pytest.raises(ValueError, match="transformer_depth"):
        build_unet("unet-sdxl-tiny", "class", transformer_depth=(1,))
    with pytest.raises(ValueError, match="unknown UNet config"):
        build_unet("unet-huge")


def test_text_padding_modes():
    """Zero padding (the baseline) zeroes the states past `text_lengths`; replicate fills them with copies."""
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 300.0)
    text, pooled, lengths = torch.randn(2, 7, 64), torch.randn(2, 64), torch.tensor([3, 7])
    zero = build_unet("unet-sdxl-tiny", "text")
    _randomize_zero_params(zero)
    manual = text.clone()
    manual[0, 3:] = 0
    out = zero(x, t, Cond(text=text, pooled=pooled, text_lengths=lengths))
    assert torch.allclose(out, zero(x, t, Cond(text=manual, pooled=pooled)), atol=1e-6)
    assert not torch.allclose(out, zero(x, t, Cond(text=text, pooled=pooled)), atol=1e-4)
    rep = build_unet("unet-sdxl-tiny", "text", text_padding="replicate")
    rep.load_state_dict(zero.state_dict())
    copies = text.clone()
    copies[0, 3:] = text[0, torch.arange(3, 7) % 3]
    out = rep(x, t, Cond(text=text, pooled=pooled, text_lengths=lengths))
    assert torch.allclose(out, rep(x, t, Cond(text=copies, pooled=pooled)), atol=1e-6)


@pytest.mark.parametrize("mode", ["additive", "disentangled"])
def test_control_conditioning_is_additive_and_droppable(mode):
    model = build_unet("unet-sdxl-tiny", "class", num_classes=10, control=mode)
    _randomize_zero_params(model)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 100.0)
    ctrl = dict(control_h=torch.tensor([[0.0, 0, 256, 256, 1, 0], [10, 20, 300, 200, 1.5, 1]]),
                control_l=torch.tensor([[256.0, 256], [512, 640]]))
    labels = torch.tensor([1, 2])
    with_ctrl = model(x, t, Cond(labels=labels, **ctrl))
    no_ctrl = model(x, t, Cond(labels=labels))
    assert not torch.allclose(with_ctrl, no_ctrl)
    dropped = model(x, t, Cond(labels=labels, control_keep=torch.tensor([False, True]), **ctrl))
    assert torch.equal(dropped[0], no_ctrl[0]) and torch.allclose(dropped[1], with_ctrl[1], atol=1e-6)
    # the control embedder's output layer is zero-initialised: no effect at init
    fresh = build_unet("unet-sdxl-tiny", "class", num_classes=10, control=mode)
    assert torch.equal(fresh(x, t, Cond(labels=labels, **ctrl)), fresh(x, t, Cond(labels=labels)))


def test_zoo_create_and_rebuild():
    from condiff.models import create

    model = create("unet-sdxl-tiny", conditioning="class", num_classes=10)
    assert isinstance(model, UNet) and model.config["name"] == "unet-sdxl-tiny"
    rebuilt = create(**json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    x, t = torch.randn(1, 4, 8, 8), torch.zeros(1)
    assert torch.equal(rebuilt(x, t, _class_cond(1)), model(x, t, _class_cond(1)))
    with pytest.raises(ValueError, match="conditioning must be one of"):
        build_unet("unet-sdxl", "audio")


def test_math_attention_matches_sdpa():
    from condiff.models import attention_impl

    model = build_unet("unet-sdxl-tiny", "text")
    _randomize_zero_params(model)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.full((2,), 50.0), _text_cond(2)
    ref = model(x, t, cond)
    with attention_impl("math"):
        assert torch.allclose(model(x, t, cond), ref, atol=1e-5)


@pytest.mark.slow  # ~10-25 s of compilation on 2 cores
def test_torch_compile_tiny():
    model = build_unet("unet-sdxl-tiny", "class", num_classes=10)
    _randomize_zero_params(model)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.full((2,), 50.0), _class_cond(2)
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.allclose(compiled(x, t, cond), model(x, t, cond), atol=1e-5)
