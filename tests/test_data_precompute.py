"""Autoencoders (diffusers AutoencoderKL from a local folder, pixels) and `condiff precompute`."""

import io
import os

import numpy as np
import pytest
import torch

from condiff.cli import main as cli
from condiff.conditioning.text import build_text_encoder
from condiff.data import shapes
from condiff.data.autoencoder import build_autoencoder
from condiff.data.loader import LoaderConfig, ShardLoader, _seed_int
from condiff.data.make_shards import write_shapes
from condiff.data.precompute import load_null_text
from condiff.data.transforms import CropTransform

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, layers_per_block=1, scaling_factor=0.5, shift_factor=0.1,
    )
    root = tmp_path_factory.mktemp("pipeline")
    vae.save_pretrained(str(root / "vae"))  # diffusers pipeline layout: <root>/vae/
    return str(root)


def test_diffusers_autoencoder_scaling_shift_and_roundtrip(vae_dir):
    from diffusers import AutoencoderKL

    ae = build_autoencoder({"kind": "diffusers", "path": vae_dir})
    assert ae.latent_channels == 4 and ae.downsample == 2
    assert ae.scaling_factor == 0.5 and ae.shift_factor == 0.1
    ref = AutoencoderKL.from_pretrained(os.path.join(vae_dir, "vae"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 4, 8, 8)
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mode()
        torch.testing.assert_close(z, (mean - 0.1) * 0.5)
        torch.testing.assert_close(ae.decode(z), ref.decode(mean).sample, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in ae.parameters())
    sampled = build_autoencoder({"kind": "diffusers", "path": vae_dir, "sample": True})
    assert (sampled.encode(x, torch.Generator().manual_seed(0)) - z).abs().max() > 0
    assert build_autoencoder(ae.config).config == ae.config


def test_pixels_and_missing_vae(tmp_path):
    px = build_autoencoder({"kind": "pixels"})
    x = torch.rand(1, 3, 8, 8)
    assert px.encode(x) is x and px.decode(x) is x and px.latent_channels == 3 and px.downsample == 1
    assert build_autoencoder(None).config == {"kind": "pixels"}
    with pytest.raises(FileNotFoundError, match="autoencoder.path = a local diffusers AutoencoderKL directory"):
        build_autoencoder({"kind": "diffusers", "path": str(tmp_path)})
    with pytest.raises(ValueError, match="kind"):
        build_autoencoder({"kind": "vqgan"})


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("src"))
    write_shapes(out, n=10, seed=0, preset="demo", shard_size=4)  # 3 shards: 4 + 4 + 2
    return out


def test_precompute_latents_and_text_read_back_exactly(vae_dir, shapes_shards, tmp_path, capsys):
    out = str(tmp_path / "lat")
    args = [
        "precompute", shapes_shards, "--out", out, "--autoencoder", "diffusers", "--autoencoder-path", vae_dir,
        "--text-encoder", "tiny-clip", "--text-max-length", "16", "--resolution", "16", "--crop", "global",
        "--views", "1", "--no-flip", "--dtype", "bf16", "--batch-size", "3", "--seed", "7",
    ]
    assert cli(args) == 0
    log = capsys.readouterr().out
    assert "estimate for the rest: ~12 samples" in log and "MiB" in log and "estimated time" in log
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar")) == [f"latent-{i:06d}.tar" for i in range(3)]
    loader = ShardLoader(LoaderConfig(shards=out, batch_size=5, epochs=1, drop_last=False, conditioning="text", shuffle_buffer=0,
                                      shuffle_shards=False, flip_prob=0.0))
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 10 and "image" not in batches[0]
    b = batches[0]
    assert b["latent"].shape == (5, 4, 8, 8) and b["latent"].dtype == torch.float32
    assert b["text"].shape == (5, 16, 64) and b["pooled"].shape == (5, 64) and b["text_lengths"].dtype == torch.int64
    # recompute sample by sample: same view (seeded by (seed, view, key)), same latent up to bf16 rounding
    # (batched and single encodes differ by float noise, which can flip a bf16 rounding: one bf16 ulp)
    bf16 = dict(rtol=2 ** -7, atol=1e-5)
    ae = build_autoencoder({"kind": "diffusers", "path": vae_dir})
    enc = build_text_encoder({"kind": "tiny-clip", "max_length": 16})
    t = CropTransform(16, "global", 0.0)
    for j, key in enumerate(b["key"]):
        s = shapes.render(int(key), "demo", 0)
        x, control_h, control_l, _ = t(s.image, np.random.default_rng(_seed_int(7, 0, key)))
        torch.testing.assert_close(b["latent"][j], ae.encode(x[None])[0].float(), **bf16)
        assert b["control_h"][j].tolist() == control_h.tolist() and b["control_l"][j].tolist() == control_l.tolist()
        assert b["caption"][j] == s.caption
        tb = enc.encode([s.caption])
        n = int(tb.lengths[0])
        assert b["text_lengths"][j] == n and (b["text"][j, n:] == 0).all()
        torch.testing.assert_close(b["text"][j, :n], tb.states[0, :n], **bf16)
        torch.testing.assert_close(b["pooled"][j], tb.pooled[0], **bf16)
    null = load_null_text(out)
    assert null.lengths.tolist() == [2] and null.states.shape == (1, 16, 64)


def test_precompute_resumes_refuses_other_settings_and_skips_bad_samples(shapes_shards, tmp_path, capsys):
    from webdataset import TarWriter

    src = str(tmp_path / "src")
    os.makedirs(src)
    for f in sorted(os.listdir(shapes_shards)):
        if f.endswith(".tar"):
            with open(os.path.join(shapes_shards, f), "rb") as a, open(os.path.join(src, f), "wb") as b:
                b.write(a.read())
    with TarWriter(os.path.join(src, "shard-000003.tar")) as w:
        w.write({"__key__": "bad", "png": b"\x89PNG broken", "cls": 1})
        img = io.BytesIO()
        shapes.render(0, "demo", 0).image.save(img, format="PNG")
        w.write({"__key__": "ok", "png": img.getvalue(), "cls": 2})
    out = str(tmp_path / "lat")
    args = ["precompute", src, "--out", out, "--resolution", "8", "--views", "3", "--crop", "mix", "--dtype", "fp16"]
    assert cli(args) == 0
    assert "skipped {'skipped_corrupt_image': 1}" in capsys.readouterr().out
    first = ShardLoader(LoaderConfig(shards=out, batch_size=4, epochs=1, drop_last=False, shuffle_buffer=0, shuffle_shards=False,
                                     crop="mix"))
    ref = {k: (l, h) for b in first for k, l, h in zip(b["key"], b["latent"], b["control_h"])}
    assert len(ref) == 11 and ref["ok"][0].shape == (3, 8, 8)
    os.remove(os.path.join(out, "latent-000001.tar"))
    mtime = os.path.getmtime(os.path.join(out, "latent-000000.tar"))
    assert cli(args) == 0
    assert "3 already done" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "latent-000000.tar")) == mtime  # not rewritten
    again = ShardLoader(LoaderConfig(shards=out, batch_size=4, epochs=1, drop_last=False, shuffle_buffer=0, shuffle_shards=False,
                                     crop="mix"))
    for b in again:
        for k, l, h in zip(b["key"], b["latent"], b["control_h"]):
            torch.testing.assert_close(l, ref[k][0], rtol=0, atol=0)
            torch.testing.assert_close(h, ref[k][1], rtol=0, atol=0)
    # the stored views differ (3 crops per image, each also mirrored), the loader picks one per epoch
    two = ShardLoader(LoaderConfig(shards=out, batch_size=11, epochs=4, drop_last=False, shuffle_buffer=0, shuffle_shards=False,
                                   crop="mix"))
    seen = {}
    for b in two:
        for k, h in zip(b["key"], b["control_h"]):
            seen.setdefault(k, set()).add(tuple(h.tolist()))
    assert max(len(v) for v in seen.values()) > 1
    assert cli(args[:-2] + ["--dtype", "bf16"]) == 2
    assert "other settings (dtype)" in capsys.readouterr().err
    assert cli(["precompute", str(tmp_path / "none-*.tar"), "--out", out]) == 2


def test_precompute_views_flips_and_the_loader_draw(shapes_shards, tmp_path):
    """--views K stores K crops (and their mirrors with --flip) with exact metadata; the loader draws one view per
    (epoch, sample) deterministically, honours data.flip, and refuses a crop / flips the shards cannot give."""
    from safetensors.torch import load as st_load
    from webdataset import WebDataset

    out = str(tmp_path / "lat")
    assert cli(["precompute", shapes_shards, "--out", out, "--resolution", "8", "--views", "3", "--crop", "local",
                "--dtype", "fp32", "--seed", "3"]) == 0
    first = sorted(f for f in os.listdir(out) if f.endswith(".tar"))[0]
    sample = next(iter(WebDataset(os.path.join(out, first), shardshuffle=False)))
    t = st_load(sample["safetensors"])
    assert t["latent"].shape == (6, 3, 8, 8) and t["control_h"].shape == (6, 6)
    key = sample["__key__"]
    image = shapes.render(int(key), "demo", 0).image
    for k in range(3):  # crop k from RNG (seed, k, key); view 2k+1 is its mirror
        x, control_h, _, _ = CropTransform(8, "local", 0.0)(image, np.random.default_rng(_seed_int(3, k, key)))
        torch.testing.assert_close(t["latent"][2 * k], x, rtol=0, atol=0)
        torch.testing.assert_close(t["latent"][2 * k + 1], x.flip(-1), rtol=0, atol=0)
        assert t["control_h"][2 * k].tolist() == control_h.tolist()
        assert t["control_h"][2 * k + 1].tolist() == [*control_h[:5].tolist(), 1.0]

    def views(flip_prob, epochs=6):
        cfg = LoaderConfig(shards=out, batch_size=64, epochs=epochs, drop_last=False, shuffle_buffer=0,
                           shuffle_shards=False, crop="local", flip_prob=flip_prob, seed=1)
        return [(k, tuple(h.tolist())) for b in ShardLoader(cfg) for k, h in zip(b["key"], b["control_h"])]

    drawn = views(0.5)
    assert drawn == views(0.5)  # deterministic per (seed, epoch, sample)
    assert {h[5] for _, h in drawn} == {0.0, 1.0}
    per_key = {}
    for k, h in drawn:
        per_key.setdefault(k, set()).add(h[:4])
    assert max(len(v) for v in per_key.values()) > 1  # different crops in different epochs
    assert {h[5] for _, h in views(0.0)} == {0.0}  # data.flip=false: only un-flipped views
    with pytest.raises(ValueError, match=r"crop 'mix' \(data.crop\).*crop 'local'"):
        ShardLoader(LoaderConfig(shards=out, crop="mix"))
    plain = str(tmp_path / "plain")
    assert cli(["precompute", shapes_shards, "--out", plain, "--resolution", "8", "--crop", "global", "--no-flip"]) == 0
    with pytest.raises(ValueError, match=r"flips \(data.flip.*--flip"):
        ShardLoader(LoaderConfig(shards=plain, crop="global", flip_prob=0.5))
