"""diffusion_loss: Eq. 6 noising, epsilon target, per-timestep weighting, two-pass (mDT) hook."""

import pytest
import torch
from torch import nn

from condiff.conditioning.cond import Cond
from condiff.diffusion.loss import diffusion_loss
from condiff.diffusion.schedule import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Recorder(nn.Module):
    """eps_hat = scale * x_t; records its inputs."""

    def __init__(self, mask_ratio: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.mask_ratio = mask_ratio
        self.calls = []

    def forward(self, x, t, cond, mask_ratio=None):
        self.calls.append({"x": x, "t": t, "cond": cond, "mask_ratio": mask_ratio})
        out = self.scale * x
        return out * 0.9 if mask_ratio else out


def test_loss_matches_manual_computation():
    s = Schedule()
    model = Recorder()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 4, 4, generator=g)
    noise = torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    cond = Cond(labels=torch.tensor([1, 2, 3, 4]))
    for weighting in ("edm", "eps-inv-snr", "min-snr-gamma"):
        loss, stats = diffusion_loss(model, x0, cond, s, weighting=weighting, t=t, noise=noise)
        call = model.calls[-1]
        abar = s.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        torch.testing.assert_close(call["x"], x_t, rtol=1e-6, atol=1e-6)
        assert call["t"].dtype == torch.float32 and torch.equal(call["t"], t.float())
        assert call["cond"] is cond
        mse = ((0.5 * x_t - noise) ** 2).mean(dim=(1, 2, 3))
        w = s.weight_table(weighting)[t].float()
        torch.testing.assert_close(loss, (w * mse).mean(), rtol=1e-6, atol=0)
        torch.testing.assert_close(stats["mse_per_sample"], mse, rtol=1e-6, atol=0)
        assert torch.equal(stats["t"], t)
    loss.backward()
    assert model.scale.grad is not None and model.scale.grad != 0


def test_default_weighting_is_inv_snr_on_the_edm_denoiser_error():
    """App. C: 1/sigma_t^2 * ||x0_hat - x0||^2 with x0_hat from Eq. 17 -- which is the plain epsilon MSE."""
    s = Schedule()
    model = Recorder()
    x0 = torch.randn(3, 1, 2, 2)
    noise = torch.randn(3, 1, 2, 2)
    t = torch.tensor([3, 100, 900])
    loss, stats = diffusion_loss(model, x0, None, s, t=t, noise=noise)
    x_t = s.add_noise(x0, noise, t)
    sigma = s.sigmas[t].float().view(-1, 1, 1, 1)
    x0_hat = (1 + sigma**2).sqrt() * x_t - sigma * model(x_t, t.float(), None)  # Eq. 17
    edm = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3)) / sigma.flatten() ** 2
    torch.testing.assert_close(loss.detach(), edm.mean().detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats["mse_per_sample"], edm.detach(), rtol=1e-5, atol=0)


def test_eps_inv_snr_weight_is_one_over_sigma_squared_on_epsilon_mse():
    s = Schedule()
    model = Recorder()
    x0 = torch.randn(2, 1, 2, 2)
    noise = torch.randn(2, 1, 2, 2)
    t = torch.tensor([100, 900])
    _, stats = diffusion_loss(model, x0, None, s, weighting="edm", t=t, noise=noise)
    loss_inv, _ = diffusion_loss(model, x0, None, s, weighting="eps-inv-snr", t=t, noise=noise)
    inv_sigma2 = 1.0 / s.sigmas[t] ** 2
    norm = float((1.0 / s.sigmas**2).mean())
    expected = (inv_sigma2.float() / norm * stats["mse_per_sample"]).mean()
    torch.testing.assert_close(loss_inv.detach(), expected, rtol=1e-6, atol=0)


def test_random_draws_follow_generator_and_are_uniform():
    s = Schedule()
    model = Recorder()
    x0 = torch.randn(4096, 1, 1, 1)
    _, a = diffusion_loss(model, x0, None, s, generator=torch.Generator().manual_seed(3))
    _, b = diffusion_loss(model, x0, None, s, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["t"], b["t"]) and torch.equal(model.calls[-1]["x"], model.calls[-2]["x"])
    assert a["t"].min() >= 0 and a["t"].max() <= 999
    # uniform on [0, T): mean ~ 499.5 (std of the mean ~4.5)
    assert abs(a["t"].float().mean().item() - 499.5) < 25


def test_two_pass_loss_for_masked_models():
    s = Schedule()
    model = Recorder(mask_ratio=0.3)
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn(3, 2, 4, 4)
    t = torch.tensor([5, 50, 500])
    loss, stats = diffusion_loss(model, x0, None, s, t=t, noise=noise)
    assert [c["mask_ratio"] for c in model.calls] == [None, 0.3]
    assert torch.equal(model.calls[0]["x"], model.calls[1]["x"])  # same x_t and t for both passes
    torch.testing.assert_close(loss.detach(), stats["loss_full"] + stats["loss_masked"])
    assert stats["loss_masked"] != stats["loss_full"]
    # a wrapper (DDP-style `.module`) is seen through
    wrapper = nn.Module()
    wrapper.module = model
    wrapper.forward = model.forward
    diffusion_loss(wrapper, x0, None, s, t=t, noise=noise)
    assert model.calls[-1]["mask_ratio"] == 0.3


def test_shape_errors():
    s = Schedule()
    bad = lambda x, t, c: x[:, :1]  # noqa: E731
    with pytest.raises(ValueError, match="model output"):
        diffusion_loss(bad, torch.zeros(2, 3, 2, 2), None, s)
    with pytest.raises(ValueError, match="t must have shape"):
        diffusion_loss(Recorder(), torch.zeros(2, 3, 2, 2), None, s, t=torch.tensor([1, 2, 3]))


def test_real_mdt_model_gets_the_masked_pass():
    from condiff.models import create

    model = create("mdt-v2-tiny", input_size=8, in_channels=3, num_classes=4)
    assert model.mask_ratio > 0
    with torch.no_grad():  # past the zero-initialised gates, so gradients reach the mask token
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0 = torch.randn(2, 3, 8, 8)
    cond = Cond(labels=torch.tensor([0, 3]))
    loss, stats = diffusion_loss(model, x0, cond, Schedule(), generator=torch.Generator().manual_seed(0))
    assert "loss_masked" in stats and torch.isfinite(loss) and stats["loss_masked"] != stats["loss_full"]
    loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
