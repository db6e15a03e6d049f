"""Schedule: quadratic betas, sigma view (Eq. 6) vs alpha view (Eq. 5), Eq. 3 rescaling, zero-SNR, persistence."""

import json
import math

import pytest
import torch

from condiff.diffusion.schedule import TERMINAL_ALPHA_CUMPROD, Schedule, rescale_for_resolution


def test_paper_betas_are_quadratic_and_match_diffusers():
    from diffusers import DDIMScheduler

    s = Schedule()
    T = 1000
    i = torch.arange(T, dtype=torch.float64)
    expected = (0.00085**0.5 + i / (T - 1) * (0.012**0.5 - 0.00085**0.5)) ** 2
    torch.testing.assert_close(s.betas, expected, rtol=1e-10, atol=0)
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-6, atol=0)
    assert s.alphas_cumprod.dtype == torch.float64
    assert s.betas[0] == pytest.approx(0.00085) and s.betas[-1] == pytest.approx(0.012)
    assert torch.all(s.sigmas[1:] > s.sigmas[:-1])


def test_sigma_view_equals_alpha_view():
    s = Schedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    alpha_view = abar.sqrt() * x0 + (1 - abar).sqrt() * eps  # Eq. 5
    sig = s.sigmas[t].view(-1, 1, 1, 1)
    sigma_view = (x0 + sig * eps) / (1 + sig**2).sqrt()  # Eq. 6, written out
    torch.testing.assert_close(sigma_view, alpha_view, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.add_noise(x0, eps, t), alpha_view, rtol=1e-12, atol=1e-12)
    # sigma_t^2 = (1 - abar) / abar
    torch.testing.assert_close(s.sigmas**2, (1 - s.alphas_cumprod) / s.alphas_cumprod, rtol=1e-12, atol=0)
    # float32 data stays float32 and matches diffusers' own add_noise
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    out = s.add_noise(x0.float(), eps.float(), t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.add_noise(x0.float(), eps.float(), t), rtol=1e-5, atol=1e-5)


def test_eq3_against_direct_evaluation_and_identity():
    base = Schedule()
    up = Schedule(base_resolution=256, resolution=512)
    for t in (0, 10, 300, 700, 999):
        a = float(base.alphas_cumprod[t])
        direct = 256**2 * a / (512**2 + a * (256**2 - 512**2))  # Eq. 3 by hand
        assert float(up.alphas_cumprod[t]) == pytest.approx(direct, rel=1e-12)
    # equivalent statement (App. D, Eq. 21): sigma' = (s'/s) sigma
    torch.testing.assert_close(up.sigmas, 2.0 * base.sigmas, rtol=1e-12, atol=0)
    # more noise at every step when going up in resolution
    assert torch.all(up.alphas_cumprod < base.alphas_cumprod)
    # identity at s == s'
    same = Schedule(base_resolution=256, resolution=256)
    assert torch.equal(same.alphas_cumprod, base.alphas_cumprod)
    torch.testing.assert_close(rescale_for_resolution(base.alphas_cumprod, 64, 64), base.alphas_cumprod,
                               rtol=1e-15, atol=0)
    # only the ratio matters
    torch.testing.assert_close(Schedule(base_resolution=32, resolution=64).alphas_cumprod, up.alphas_cumprod,
                               rtol=1e-13, atol=0)
    # betas stay consistent with the rescaled cumulative product
    torch.testing.assert_close(torch.cumprod(1 - up.betas, 0), up.alphas_cumprod, rtol=1e-10, atol=0)


def test_at_resolution_does_not_compound():
    s = Schedule().at_resolution(512, base_resolution=256)
    assert s.config.base_resolution == 256 and s.config.resolution == 512
    s2 = s.at_resolution(1024)
    torch.testing.assert_close(s2.sigmas, 4.0 * Schedule().sigmas, rtol=1e-12, atol=0)
    assert s2 == Schedule(base_resolution=256, resolution=1024)
    assert s.at_resolution(1024, base_resolution=512) == s2  # the current resolution may be restated
    with pytest.raises(ValueError, match="already rescaled for resolution 512"):
        s.at_resolution(1024, base_resolution=256)
    assert torch.equal(Schedule().at_resolution(512).alphas_cumprod, Schedule().alphas_cumprod)  # no base: identity


def test_zero_terminal_snr_matches_diffusers_with_terminal_floor():
    from diffusers import DDIMScheduler

    s = Schedule(zero_terminal_snr=True)
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    torch.testing.assert_close(s.alphas_cumprod[:-1].float(), ref.alphas_cumprod[:-1], rtol=1e-4, atol=1e-7)
    assert float(ref.alphas_cumprod[-1]) == 0.0
    assert float(s.alphas_cumprod[-1]) == TERMINAL_ALPHA_CUMPROD
    assert s.sigma_max == pytest.approx(4096.0, rel=1e-6)
    assert float(s.alphas_cumprod[0]) == pytest.approx(float(Schedule().alphas_cumprod[0]), rel=1e-12)


def test_to_dict_round_trip_through_json():
    s = Schedule(num_timesteps=500, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 zero_terminal_snr=True, base_resolution=256, resolution=512)
    d = json.loads(json.dumps(s.to_dict()))
    s2 = Schedule.from_dict(d)
    assert s2 == s and torch.equal(s2.alphas_cumprod, s.alphas_cumprod)
    assert Schedule.from_dict(Schedule().to_dict()) == Schedule()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start < beta_end"),
        ({"beta_schedule": "cosine"}, "beta_schedule must be one of"),
        ({"num_timesteps": 1}, "num_timesteps"),
        ({"base_resolution": 256}, "give both base_resolution and resolution"),
        ({"base_resolution": 256, "resolution": -1}, "resolution must be > 0"),
    ],
)
def test_bad_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_from_dict_errors_name_the_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['T'\]"):
        Schedule.from_dict({"type": "ddpm-eps", "T": 1000})
    with pytest.raises(ValueError, match="unknown schedule type 'edm'"):
        Schedule.from_dict({"type": "edm"})


def test_add_noise_rejects_bad_timesteps():
    s = Schedule()
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        s.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="integers"):
        s.add_noise(x, x, torch.tensor([0.5, 3.0]))
    with pytest.raises(ValueError, match="differ in shape"):
        s.add_noise(x, x[:1], torch.tensor([0, 1]))


def test_weight_tables():
    s = Schedule()
    inv = s.weight_table("eps-inv-snr")
    snr = s.alphas_cumprod / (1 - s.alphas_cumprod)
    torch.testing.assert_close(inv, snr / snr.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(inv, (1 / s.sigmas**2) / (1 / s.sigmas**2).mean(), rtol=1e-12, atol=0)
    assert float(inv.mean()) == pytest.approx(1.0, rel=1e-12)
    assert float(inv[0] / inv[-1]) == pytest.approx(float(s.sigmas[-1] ** 2 / s.sigmas[0] ** 2), rel=1e-10)
    assert torch.equal(s.weight_table("edm"), torch.ones(1000, dtype=torch.float64))
    ms = s.weight_table("min-snr-gamma", snr_gamma=5.0)
    raw = snr.clamp(max=5.0) / snr
    torch.testing.assert_close(ms, raw / raw.mean(), rtol=1e-12, atol=0)
    assert math.isclose(float(raw[-1]), 1.0) and float(raw[0]) < 0.01
    w = s.loss_weight(torch.tensor([0, 999]), "eps-inv-snr")
    assert w.dtype == torch.float32 and w.shape == (2,)
    with pytest.raises(ValueError, match="loss weighting must be one of"):
        s.weight_table("snr")
    for old in ("inv-snr", "none"):  # former names must not silently keep or change their meaning
        with pytest.raises(ValueError, match="no longer accepted: use 'edm'"):
            s.weight_table(old)
