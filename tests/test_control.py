"""Control conditioning (Eq. 1, Table 2a / A6) and text padding modes (Eq. 7) as the models use them."""

import math

import pytest
import torch

from condiff.conditioning.cond import Cond
from condiff.conditioning.control import ControlEmbedder, gamma_c, pinned_sigmas
from condiff.conditioning.padding import pad_text
from condiff.models import create


def control(B, size=256.0):
    h = torch.tensor([[4.0, 8.0, size, size, 1.0, 1.0]]).repeat(B, 1)
    l = torch.tensor([[size * 2, size * 3]]).repeat(B, 1)
    return h, l


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05)
    return module


# ---- gamma_c -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,at0,at1", [("none", 0, 0), ("uniform", 1, 1), ("linear", 1, 0), ("power-cosine", 1, 0)])
def test_gamma_endpoints(kind, at0, at1):
    g = gamma_c(torch.tensor([0.0, 1.0]), kind, alpha=8.0)
    assert g.tolist() == pytest.approx([at0, at1], abs=1e-12)


@pytest.mark.parametrize("kind", ["linear", "power-cosine", "step"])
def test_gamma_is_monotone_decreasing_in_noise(kind):
    T = 1000
    t = torch.arange(T, dtype=torch.float32)
    sigma = pinned_sigmas(T).float()
    g = gamma_c(t / T, kind, alpha=4.0, k=2.0, sigma=sigma)
    assert (g[1:] <= g[:-1] + 1e-7).all()
    assert g[0] == 1 and g[-1] < 1e-3


def test_power_cosine_formula_and_alpha_ordering():
    t = torch.tensor([0.25, 0.5, 0.75])
    for alpha in (1.0, 2.0, 4.0, 8.0):
        expected = torch.cos(math.pi / 2 * t) ** alpha
        torch.testing.assert_close(gamma_c(t, "power-cosine", alpha=alpha), expected)
    # larger alpha = the low-level condition enters later (smaller weight at every intermediate t)
    assert (gamma_c(t, "power-cosine", alpha=8.0) < gamma_c(t, "power-cosine", alpha=1.0)).all()


def test_step_gamma_thresholds_sigma():
    sigma = torch.tensor([0.5, 1.0, 1.5, 6.0, 7.0])
    assert gamma_c(torch.zeros(5), "step", k=1.0, sigma=sigma).tolist() == [1, 1, 0, 0, 0]
    assert gamma_c(torch.zeros(5), "step", k=6.0, sigma=sigma).tolist() == [1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="needs sigma"):
        gamma_c(torch.zeros(2), "step")
    with pytest.raises(ValueError, match="kind must be one of"):
        gamma_c(torch.zeros(2), "cosine-ish")


def test_step_gamma_in_embedder_uses_the_pinned_schedule():
    emb = ControlEmbedder(16, "disentangled", gamma="step", k=1.0)
    sig = pinned_sigmas(1000)
    t = torch.tensor([0.0, 999.0, float((sig <= 1.0).nonzero().max()), float((sig <= 1.0).nonzero().max() + 1)])
    assert emb.weight(t).tolist() == [1.0, 0.0, 1.0, 0.0]


# ---- ControlEmbedder -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["additive", "disentangled"])
def test_control_embedding_is_exactly_zero_at_init(mode):
    emb = ControlEmbedder(32, mode)
    h, l = control(3)
    out = emb(torch.tensor([0.0, 500.0, 999.0]), Cond(control_h=h, control_l=l), 3)
    assert out.shape == (3, 32) and torch.equal(out, torch.zeros_like(out))


def test_disentangled_embedding_follows_eq1():
    emb = randomize(ControlEmbedder(32, "disentangled", gamma="power-cosine", alpha=2.0))
    B = 4
    h, l = control(B)
    l = l + torch.arange(B)[:, None] * 100.0
    t = torch.tensor([0.0, 250.0, 500.0, 999.0])
    out = emb(t, Cond(control_h=h, control_l=l), B)
    expected = emb.embed_h(h) + (torch.cos(math.pi / 2 * t / 1000) ** 2)[:, None] * emb.embed_l(l)
    torch.testing.assert_close(out, expected)


def test_additive_embedding_is_one_joint_embedder_without_t_dependence():
    emb = randomize(ControlEmbedder(32, "additive"))
    h, l = control(2)
    cond = Cond(control_h=h, control_l=l)
    a, b = emb(torch.tensor([0.0, 0.0]), cond, 2), emb(torch.tensor([999.0, 999.0]), cond, 2)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, emb.embedder(torch.cat([h, l], 1)))


def test_null_control_rows_and_missing_control_give_zero():
    emb = randomize(ControlEmbedder(32, "disentangled"))
    h, l = control(3)
    keep = torch.tensor([True, False, True])
    out = emb(torch.full((3,), 10.0), Cond(control_h=h, control_l=l, control_keep=keep), 3)
    assert torch.equal(out[1], torch.zeros(32)) and out[0].abs().sum() > 0
    assert torch.equal(emb(torch.zeros(3), Cond(labels=torch.zeros(3, dtype=torch.long)), 3), torch.zeros(3, 32))
    with pytest.raises(ValueError, match="together"):
        emb(torch.zeros(3), Cond(control_h=h), 3)
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        emb(torch.zeros(3), Cond(control_h=h[:, :5], control_l=l), 3)


# ---- control inside the models -------------------------------------------------------------------------------
SMALL = dict(input_size=8, num_classes=10, text_dim=32, pooled_dim=24, text_len=7, hidden_size=64, depth=4,
             control_freq_dim=32)


@pytest.mark.parametrize("name,mode", [("dit-tiny", "additive"), ("dit-att-tiny", "disentangled"),
                                       ("pixart-alpha-tiny", "disentangled"), ("mmdit-ours-tiny", "disentangled"),
                                       ("mmdit-tiny", "additive"), ("mdt-v2-tiny", "disentangled")])
def test_every_backbone_takes_control_and_null_rows_match_no_control(name, mode):
    model = randomize(create(name, control=mode, **SMALL)).eval()
    assert model.control_embedder.mode == mode
    x, t, cond = model.example_inputs(3)
    h, l = control(3, 64.0)
    with_ctrl = Cond(labels=cond.labels, control_h=h, control_l=l, control_keep=torch.tensor([True, False, True]))
    out = model(x, t, with_ctrl)
    no_ctrl = model(x, t, Cond(labels=cond.labels))
    torch.testing.assert_close(out[1], no_ctrl[1])
    assert not torch.allclose(out[0], no_ctrl[0])


def test_disentangled_low_level_control_is_ignored_at_high_noise_only():
    """mmdit-ours: the original size (phi_l) cannot change the prediction at t -> T, but does at t = 0."""
    model = randomize(create("mmdit-ours-tiny", **SMALL)).eval()
    x, _, cond = model.example_inputs(2)
    h, l = control(2, 64.0)
    a = Cond(labels=cond.labels, control_h=h, control_l=l)
    b = Cond(labels=cond.labels, control_h=h, control_l=l * 3)
    hi, lo = torch.full((2,), 999.0), torch.zeros(2)
    torch.testing.assert_close(model(x, hi, a), model(x, hi, b), rtol=0, atol=1e-6)
    assert not torch.allclose(model(x, lo, a), model(x, lo, b))
    baseline = randomize(create("mmdit-tiny", **SMALL)).eval()  # additive (SDXL): size matters at every t
    assert not torch.allclose(baseline(x, hi, a), baseline(x, hi, b))


def test_control_none_has_no_embedder():
    model = create("mmdit-tiny", control="none", **SMALL)
    assert model.control_embedder is None
    assert not any("control" in n for n, _ in model.named_parameters())


# ---- text padding --------------------------------------------------------------------------------------------
def test_pad_text_modes():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(2, 6, 4, generator=g)
    lengths = torch.tensor([2, 6])
    zero = pad_text(states, lengths, "zero")
    assert torch.equal(zero[0, 2:], torch.zeros(4, 4)) and torch.equal(zero[0, :2], states[0, :2])
    assert torch.equal(zero[1], states[1])
    rep = pad_text(states, lengths, "replicate")
    assert torch.equal(rep[0], states[0, [0, 1, 0, 1, 0, 1]]) and torch.equal(rep[1], states[1])
    noisy = pad_text(states, lengths, "noisy-replicate", beta=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy[0, :2], states[0, :2]) and not torch.allclose(noisy[0, 2:], rep[0, 2:])
    assert torch.equal(noisy[1], states[1])  # full-length prompt: nothing to pad
    torch.testing.assert_close(pad_text(states, lengths, "noisy-replicate", beta=0.0), rep)
    with pytest.raises(ValueError, match="mode must be one of"):
        pad_text(states, lengths, "mirror")
    with pytest.raises(ValueError, match="lengths must be <= T"):
        pad_text(states, torch.tensor([2, 7]), "zero")


def test_noisy_replicate_noise_only_in_training_mode():
    model = randomize(create("mmdit-ours-tiny", conditioning="text", **SMALL))
    assert model.cfg.text_padding == "noisy-replicate"
    x, t, cond = model.example_inputs(2)
    cond.text_lengths = torch.tensor([2, 3])
    model.eval()
    assert torch.equal(model(x, t, cond), model(x, t, cond))
    model.train()
    assert not torch.allclose(model(x, t, cond), model(x, t, cond))


def test_beta_txt_readings_and_noise_at_inference():
    """beta_txt is a variance by default (std factor sqrt(beta)), a std factor by name; noise at inference by switch."""
    from condiff.conditioning.padding import noise_amplitude

    assert noise_amplitude(0.09) == pytest.approx(0.3)
    assert noise_amplitude(0.09, "std") == pytest.approx(0.09)
    assert noise_amplitude(0.09, training=False) == 0.0 and noise_amplitude(0.09, training=False, at_inference=True) > 0
    with pytest.raises(ValueError, match="text_noise_reading must be one of"):
        noise_amplitude(0.1, "var")
    states, lengths = torch.randn(2, 6, 32), torch.tensor([2, 3])
    for reading, factor in (("variance", math.sqrt(0.04)), ("std", 0.04)):
        model = create("mmdit-ours-tiny", conditioning="text", text_noise_beta=0.04, text_noise_reading=reading,
                       **SMALL)
        assert model.config["text_noise_reading"] == reading
        got = model.text_states(Cond(text=states, text_lengths=lengths), 2, torch.Generator().manual_seed(3))
        want = pad_text(states, lengths, "noisy-replicate", factor, torch.Generator().manual_seed(3))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    model = create("mmdit-ours-tiny", conditioning="text", text_noise_at_inference=True, **SMALL)
    model.eval()
    cond = Cond(text=states, text_lengths=lengths)
    assert not torch.equal(model.text_states(cond, 2), model.text_states(cond, 2))
    with pytest.raises(ValueError, match="text_noise_reading"):
        create("mmdit-ours-tiny", conditioning="text", text_noise_reading="var", **SMALL)


@pytest.mark.parametrize("mode", ["additive", "disentangled"])
def test_unconditioned_control_fields_carry_nothing(mode):
    """control_fields (Table 2c): a field left out cannot change the output; a field kept does."""
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 20.0])
    h, l = control(2)
    flipped = h.clone()
    flipped[:, 5] = 1 - flipped[:, 5]
    bigger = l * 2
    no_flip = randomize(create("dit-tiny", conditioning="class", control=mode, control_fields=["crop", "aspect", "size"],
                               in_channels=3, **{k: v for k, v in SMALL.items() if k in ("input_size", "num_classes")}))
    assert no_flip.config["control_fields"] == ["crop", "aspect", "size"]
    labels = torch.tensor([1, 2])
    out = no_flip(x, t, Cond(labels=labels, control_h=h, control_l=l))
    torch.testing.assert_close(no_flip(x, t, Cond(labels=labels, control_h=flipped, control_l=l)), out, rtol=0, atol=0)
    assert not torch.allclose(no_flip(x, t, Cond(labels=labels, control_h=h, control_l=bigger)), out)
    full = create("dit-tiny", conditioning="class", control=mode, in_channels=3, input_size=8, num_classes=10)
    full.load_state_dict(no_flip.state_dict())
    assert not torch.allclose(full(x, t, Cond(labels=labels, control_h=flipped, control_l=l)),
                              full(x, t, Cond(labels=labels, control_h=h, control_l=l)))
    with pytest.raises(ValueError, match="control_fields"):
        create("dit-tiny", conditioning="class", control_fields=["mirror"])
