"""LPIPS size-diversity protocol, offline with a random backbone; backbone weights from a local file."""

from __future__ import annotations

import pytest
import torch

from condiff.eval import lpips_size as L
from condiff.eval.metrics import Stream
from condiff.eval.metrics.lpips import LpipsSize

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def net():
    return L.lpips_model("alex", random_backbone=True)


def _noise(i: int) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))


def test_protocol_sizes():
    assert L.default_sizes(256) == [256, 341, 427, 512, 597, 683, 768, 853, 939, 1024]
    assert L.protocol_sizes([64, 128, 256, 512, 1024], 256) == [256, 512, 1024]
    assert L.protocol_sizes([64, 128, 256, 512, 1024], 256, include_low=True) == [64, 128, 256, 512, 1024]
    with pytest.raises(ValueError, match="at least two sizes"):
        L.protocol_sizes([64, 128, 256], 256)


def _score(sample_fn, n_prompts: int, sizes: list[int], net, per_batch: int = 2) -> float:
    """The protocol as `condiff eval` runs it: size sweeps of `per_batch` prompts -> sampler -> LpipsSize."""
    metric = LpipsSize(Stream(n_prompts, tuple(sizes)), net)
    k = len(sizes)
    for start in range(0, n_prompts, per_batch):
        idx = list(range(start, min(start + per_batch, n_prompts)))
        noise, size_t = L.size_sweep(torch.stack([_noise(i) for i in idx]), sizes)
        images = sample_fn(noise, size_t)  # (P K, 3, H, W)
        metric.update(images.reshape(len(idx), k, *images.shape[1:]), idx)
    return metric.compute()["lpips_size"]


def test_size_sweep_repeats_each_prompts_noise_over_its_sizes():
    sizes = [32, 48, 64]
    noise, size_t = L.size_sweep(torch.stack([_noise(0), _noise(1)]), sizes)
    k = len(sizes)
    assert noise.shape == (2 * k, 3, 32, 32) and size_t.shape == (2 * k, 2)
    assert torch.equal(noise[0], noise[k - 1]) and not torch.equal(noise[0], noise[k])  # same noise per prompt
    assert torch.equal(noise[k], _noise(1))
    assert size_t[:k, 0].tolist() == sizes and size_t[k:, 0].tolist() == sizes and torch.equal(size_t[:, 0], size_t[:, 1])


def test_size_blind_sampler_scores_zero(net):
    sizes = L.protocol_sizes(L.default_sizes(32, k=4), 32)
    assert _score(lambda noise, size_t: noise.tanh(), 3, sizes, net) == 0.0  # ignores the size conditioning


def test_size_dependent_sampler_scores_higher(net):
    def make(strength):
        def sample_fn(noise, sizes):
            ramp = torch.linspace(-1, 1, 32)[None, None, None, :]
            return (noise.tanh() * 0.5 + strength * (sizes[:, :1, None, None] / 128.0) * ramp).clamp(-1, 1)
        return sample_fn

    sizes = [32, 64, 128]
    weak, strong = _score(make(0.1), 2, sizes, net), _score(make(0.8), 2, sizes, net)
    assert 0.0 < weak < strong


def test_backbone_from_local_file(tmp_path, net):
    """torchvision's state-dict layout (features.N.*, classifier.*) lands in lpips' slices."""
    g = torch.Generator().manual_seed(0)
    state = {f"features.{name.split('.')[1]}.{k}": torch.randn(v.shape, generator=g)
             for name, m in net.net.named_modules() if name.count(".") == 1 for k, v in m.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(3, 3)  # ignored, as the real file's classifier
    torch.save(state, tmp_path / L.BACKBONE_FILES["alex"])
    model = L.lpips_model("alex", backbone_path=tmp_path)
    torch.testing.assert_close(model.net.slice1[0].weight, state["features.0.weight"])
    torch.testing.assert_close(model.net.slice5._modules["10"].bias, state["features.10.bias"])
    del state["features.3.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="features.3"):
        L.lpips_model("alex", backbone_path=tmp_path / "broken.pth")


def test_missing_backbone_says_what_to_provide(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(L.BACKBONE_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        L.lpips_model("vgg", backbone_path=tmp_path / "missing")
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and L.BACKBONE_ENV in msg and "--lpips-random" in msg


def test_random_backbone_is_seeded(net):
    torch.manual_seed(123)  # the global RNG state must not matter
    other = L.lpips_model("alex", random_backbone=True)
    torch.testing.assert_close(other.net.slice1[0].weight, net.net.slice1[0].weight)
