"""condiff.inference: the spec's one resolution of defaults (Eq. 4 lambda, size conditioning), the eval
presets' lambda actually used, per-index determinism whatever the batch size, and save_grid."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from condiff.diffusion.schedule import Schedule
from condiff.eval.__main__ import PRESETS, parse_args
from condiff.inference.cli_args import spec_of
from condiff.inference.generate import Generator
from condiff.inference.grid import save_grid
from condiff.inference.pipeline import Pipeline
from condiff.inference.spec import SamplingSpec, parse_size_cond, resolve
from condiff.io.checkpoint import CheckpointMeta

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class _Latent(torch.nn.Module):  # resolve() reads only the config: a 256 px (or 512 px) latent DiT
    def __init__(self, input_size):
        super().__init__()
        self.config = {"input_size": input_size, "patch_size": 2, "base_size": 16, "in_channels": 4,
                       "conditioning": "class", "num_classes": 10}


class _VAE:
    downsample = 8


def _pipe(train_px):
    return Pipeline(_Latent(train_px // 8), Schedule(), None, _VAE(), CheckpointMeta(), "test")


@pytest.mark.parametrize("preset, train_px, extra, used", [
    ("fid-256", 256, [], 1.5), ("fid-256", 512, [], 1.5),  # App. B: 1.5 at 256 px
    ("fid-512", 256, [], 2.0), ("fid-512", 512, [], 2.0),  # App. B: 2.0 at 512 px (not 3.0)
    ("coco", 256, [], 5.0), ("coco", 512, [], 5.0),  # Sec. 3: 5.0 as used (not 9.0)
    ("coco", 256, ["--resolution", "512"], 5.0),
    ("lpips", 256, ["--resolution", "512"], 2.0),  # 1.5 at the 256 px base -> Eq. 4 at 512
])
def test_presets_lambda_actually_used(preset, train_px, extra, used):
    args = parse_args(["run", "--preset", preset, "--prompts", "x", "--ref-train", "x", *extra])
    r = resolve(_pipe(train_px), spec_of(args))
    assert r.guidance == pytest.approx(used)
    assert len(r.timesteps) == PRESETS[preset]["steps"]


def test_guidance_is_lambda_at_the_base_resolution():
    pipe = _pipe(512)  # base_size 16 x patch 2 x factor 8 = 256 px base: a 512 px fine-tune of a 256 px model
    assert resolve(pipe, SamplingSpec(guidance=1.5)).guidance == 2.0
    assert resolve(pipe, SamplingSpec(guidance=1.5, guidance_law=False)).guidance == 1.5
    assert resolve(pipe, SamplingSpec(guidance=1.5, resolution=256)).guidance == 1.5


def test_non_square_size_resolves_shape_aspect_and_pixel_count_guidance():
    pipe = _pipe(256)  # base 256 px, latent factor 8, patch 2: sides are multiples of 16 px
    r = resolve(pipe, SamplingSpec(guidance=1.5, size=(256, 512)))
    assert r.size == (256, 512) and r.latent_hw == (32, 64) and r.aspect == 2.0
    assert r.guidance_scale_s == pytest.approx(2 ** 0.5) and r.guidance == pytest.approx(1 + 2 ** 0.5 * 0.5)
    assert r.resolution == pytest.approx(2 ** 0.5 * 256)  # the pixel-count side
    assert resolve(pipe, SamplingSpec(guidance=1.5, size=(512, 256))).guidance == r.guidance  # transposed
    assert resolve(pipe, SamplingSpec(guidance=1.5, size=(512, 512))).guidance == 2.0  # square: Eq. 4 as before
    rec = r.to_record()
    assert rec["size"] == [256, 512] and rec["latent_hw"] == [32, 64] and json.loads(json.dumps(rec)) == rec
    for bad, msg in (((256, 264), "--size 264: the latent side 33"), ((256, 4), "--size 4: must be a positive")):
        with pytest.raises(ValueError, match=msg):
            resolve(pipe, SamplingSpec(size=bad))
    args = parse_args(["run", "--preset", "shapes", "--size", "256", "384"])
    assert spec_of(args).size == (256, 384)
    with pytest.raises(SystemExit):  # FID's references are square centre crops
        parse_args(["run", "--preset", "fid-256", "--ref-train", "x", "--size", "256", "384"])


def test_generator_noise_and_control_follow_the_requested_shape():
    pipe = Pipeline.from_zoo("dit-tiny", seed=0)  # 32 px, pixel space
    gen = Generator(pipe, SamplingSpec(steps=1, size=(16, 48), batch_size=2))
    assert gen.noise(0).shape == (3, 16, 48)
    cond = gen.cond([0, 1])
    assert cond.control_h[:, 4].tolist() == [3.0, 3.0] and cond.control_l.tolist() == [[16.0, 48.0]] * 2
    images = gen.generate(2)
    assert images.shape == (2, 3, 16, 48)


def test_size_cond_syntax():
    assert parse_size_cond("fixed:512").size == (512.0, 512.0)
    assert parse_size_cond("fixed:384x512").size == (384.0, 512.0)
    assert parse_size_cond("uniform:512-1024").range == (512.0, 1024.0)
    assert str(parse_size_cond("uniform:512-1024")) == "uniform:512-1024"
    for bad in ("fixed:big", "uniform:1024-512", "uniform:5", "median"):
        with pytest.raises(ValueError, match="--size-cond .*expected auto"):
            parse_size_cond(bad, "--size-cond")


def test_uniform_sizes_and_batch_size_independence():
    pipe = Pipeline.from_zoo("dit-tiny", seed=0)
    spec = SamplingSpec(steps=2, size_cond="uniform:512-1024", batch_size=4, seed=3)
    gen = Generator(pipe, spec)
    sizes = gen.sizes(list(range(64)))
    assert sizes.shape == (64, 2) and torch.equal(sizes[:, 0], sizes[:, 1])
    assert sizes.min() >= 512 and sizes.max() <= 1024 and sizes.std() > 50
    assert torch.equal(gen.sizes([5]), sizes[5:6])
    one_batch = Generator(pipe, SamplingSpec(steps=2, size_cond="uniform:512-1024", batch_size=10, seed=3))
    torch.testing.assert_close(one_batch.generate(10)[7], gen.generate(10)[7], atol=1e-5, rtol=1e-5)
    assert gen.record()["size_cond"] == "uniform:512-1024"
    with pytest.raises(ValueError, match="train-dist: the checkpoint stores no training sizes"):
        Generator(pipe, SamplingSpec(size_cond="train-dist"))


def test_flip_field_of_the_control_condition():
    """--flip 1 sets phi_h's flip field (Table 2c: ask a flip-conditioned model for the mirrored layout)."""
    pipe = Pipeline.from_zoo("mmdit-ours-tiny", seed=0)  # control: disentangled, every field conditioned
    plain = Generator(pipe, SamplingSpec(steps=1)).cond([0, 1])
    flipped = Generator(pipe, spec_of(parse_args(["run", "--metrics", "align", "--flip", "1", "--steps", "1"]))).cond([0, 1])
    assert plain.control_h[:, 5].tolist() == [0.0, 0.0] and flipped.control_h[:, 5].tolist() == [1.0, 1.0]
    torch.testing.assert_close(plain.control_h[:, :5], flipped.control_h[:, :5])  # the crop is unchanged
    with pytest.raises(ValueError, match="--flip 2"):
        resolve(pipe, SamplingSpec(flip=2))


def test_save_grid_writes_png_and_record(tmp_path):
    imgs = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    p = save_grid(imgs, tmp_path / "grid.png", record={"guidance": 2.0})
    assert Image.open(p).size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # 2x2 grid, padding 2
    assert json.loads((tmp_path / "grid.png.json").read_text()) == {"guidance": 2.0}
    big = save_grid(imgs, tmp_path / "big.png", nrow=4, min_cell=32)
    assert Image.open(big).size == (4 * 32 + 5 * 2, 32 + 2 * 2)  # nearest x4 upscaling
    assert not list(tmp_path.glob(".*tmp*"))
    from condiff.inference.grid import pad_to_common

    wide, tall = torch.ones(3, 4, 8), -torch.ones(1, 3, 8, 2)  # mixed aspects: centred on grey (0)
    both = pad_to_common([wide, tall])
    assert both.shape == (2, 3, 8, 8)
    assert torch.equal(both[0, :, 2:6], wide) and both[0, :, :2].abs().sum() == 0 and both[0, :, 6:].abs().sum() == 0
    assert torch.equal(both[1, :, :, 3:5], tall[0]) and both[1, :, :, :3].abs().sum() == 0


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*512/*.yaml")))
def test_512_recipes_preview_the_papers_lambda(recipe):
    """The 512 px recipes fine-tune a 256 px run (init_from: Eq. 3 schedule base 256), so log.sample_guidance
    is lambda at 256 px and previews use Eq. 4 at 512: 2.0 for ImageNet (App. B), 5.0 for text models."""
    from condiff.diffusion.guidance import guidance_scale_for_resolution
    from condiff.train.config import load_config

    cfg = load_config(recipe)
    assert cfg.init_from and cfg.data.resolution == 512
    used = guidance_scale_for_resolution(cfg.log.sample_guidance, 512 / 256)
    assert used == (5.0 if cfg.model.conditioning == "text" else 2.0)
