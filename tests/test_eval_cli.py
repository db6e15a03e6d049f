"""End-to-end `condiff eval` on a tiny random-weights checkpoint with the custom random feature extractor,
the random LPIPS backbone and a tiny CLIP; determinism per global index; torchrun across 2 ranks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from condiff.eval import manifest as M

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny class-conditional pixel-space DiT checkpoint, a shapes reference shard, a tiny CLIP dir."""
    import webdataset as wds
    from transformers import CLIPConfig, CLIPModel

    from condiff.data import shapes
    from condiff.diffusion import Schedule
    from condiff.models import create
    from condiff.io.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = create("dit-tiny", conditioning="class", in_channels=3, input_size=16, num_classes=8, depth=1,
                   hidden_size=32, num_heads=2)
    with torch.no_grad():  # leave the zero-init: outputs must depend on noise, class and size
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    save_checkpoint(root / "run", 5, model_state=state, ema_state=state,
                    meta={"model": model.config, "schedule": Schedule().to_dict(), "text_encoder": None,
                          "autoencoder": None, "train_sizes": [[32, 32], [48, 64], [64, 48]]})
    with wds.TarWriter(str(root / "ref-000.tar")) as w:
        for i in range(24):
            s = shapes.render(i, "demo", seed=0)
            buf = io.BytesIO()
            s.image.save(buf, format="PNG")
            w.write({"__key__": f"{i:05d}", "png": buf.getvalue(), "txt": s.caption})
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(root / "clip")
    return root


def _args(root: Path, out: str, n_flag: str = "--n") -> list[str]:
    return ["--checkpoint", str(root / "run"), "--metrics", "fid,clip,lpips,align", n_flag, "6", "--steps", "2",
            "--batch-size", "4", "--ref-train", str(root / "ref-000.tar"), "--ref-val", str(root / "ref-000.tar"),
            "--ref-max", "16", "--features", "random:16:32", "--prompts", "shapes:demo", "--clip", str(root / "clip"),
            "--lpips-random", "--lpips-prompts", "2", "--lpips-sizes", "8,16,24", "--cache-dir", str(root / "cache"),
            "--out", str(root / out), "--grid", "4"]


def test_condiff_eval_end_to_end(setup, capsys):
    from cleanfid.fid import get_folder_features

    from condiff.cli import main
    from condiff.eval import features, statistics

    root = setup
    assert main(["eval", *_args(setup, "out"), "--save-images", str(root / "pngs")]) == 0
    m = M.load(root / "out")
    assert set(m.metrics) >= {"fid_train", "fid_val", "clip", "lpips_size", "align/colour", "align/overall"}
    # relation_given_found is conditional (captions whose two colours were found): undefined (NaN) when a
    # random model draws no such pair; every other metric is always defined
    conditional = m.metrics.pop("align/relation_given_found")
    assert np.isnan(conditional) or 0.0 <= conditional <= 1.0
    assert all(np.isfinite(v) for v in m.metrics.values())
    assert m.n == 6 and m.steps == 2 and m.sampler == "ddim" and m.size_cond == "train-dist" and m.resolution == 16
    assert m.checkpoint_hash == M.checkpoint_hash(Path(m.checkpoint))
    assert set(m.reference) == {"train", "val"} and (root / "cache" / "fid_ref" / f"{m.reference['train']}.npz").is_file()
    assert m.settings["lpips_sizes"] == [16, 24] and m.settings["ref_n"] == {"train": 16, "val": 16}
    assert 0.0 <= m.metrics["clip"] <= 100.0 and m.metrics["align/n"] == 6
    assert (root / "out" / "grid.png").is_file() and "| fid_train |" in (root / "out" / "report.md").read_text()
    # the in-memory features == clean-fid reading the saved PNGs (the same FID against the same reference)
    pngs = sorted((root / "pngs").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    ext = features.random_extractor(16, 32)
    feats = get_folder_features(str(root / "pngs"), ext.fn, num_workers=0, batch_size=8, device=torch.device("cpu"),
                                mode="clean", custom_fn_resize=ext.resize.build(), verbose=False)
    with np.load(root / "cache" / "fid_ref" / f"{m.reference['train']}.npz") as z:
        ref = statistics.FidStats(z["mu"], z["sigma"], int(z["n"]))
    assert statistics.frechet_distance(statistics.FidStats.from_features(feats), ref) == pytest.approx(m.metrics["fid_train"], rel=1e-5)
    assert "results: fid_train=" in capsys.readouterr().out


def test_samples_are_deterministic_per_global_index(setup):
    from condiff.inference.generate import Generator, rank_indices
    from condiff.inference.spec import SamplingSpec
    from condiff.inference.pipeline import Pipeline

    inf = Pipeline.from_checkpoint(setup / "run")
    gen = Generator(inf, SamplingSpec(steps=2, batch_size=5, seed=3))
    all_five = gen.images([0, 1, 2, 3, 4])
    torch.testing.assert_close(gen.images([3]), all_five[3:4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(all_five[0], all_five[1])
    assert sorted(rank_indices(5, 0, 2) + rank_indices(5, 1, 2)) == list(range(5))
    other_seed = Generator(inf, SamplingSpec(steps=2, seed=4)).images([3])
    assert not torch.allclose(other_seed, all_five[3:4])
    # size conditioning is drawn per index from the stored training sizes
    sizes = gen.sizes(list(range(5)))
    assert sizes.shape == (5, 2) and {tuple(s) for s in sizes.tolist()} <= {(32, 32), (48, 64), (64, 48)}
    torch.testing.assert_close(gen.sizes([2]), sizes[2:3])


def test_cli_errors(setup, capsys):
    from condiff.eval.__main__ import main

    with pytest.raises(SystemExit):
        main(["--checkpoint", str(setup / "run"), "--metrics", "fid,bogus"])
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(setup / "run"), "--metrics", "fid"])  # no reference shards
    capsys.readouterr()
    assert main(["--checkpoint", str(setup / "run"), "--metrics", "align", "--n", "2", "--steps", "1"]) == 2
    assert "--prompts shapes" in capsys.readouterr().err
    assert main(["--checkpoint", str(setup / "nowhere"), "--metrics", "align"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--guidance", "--control-guidance"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_guidance_weights_must_be_finite_and_non_negative(flag, value, capsys):
    from condiff.eval.__main__ import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--ckpt", "run", "--metrics", "align", flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}: expected a finite number >= 0, got '{value}'" in capsys.readouterr().err


@pytest.mark.slow  # two fresh interpreters importing torch: ~60 s on the shared 2-core machine
def test_torchrun_two_ranks_match_one(setup, torchrun):
    """`torchrun -m condiff.eval` with 2 gloo ranks gives the single-process numbers."""
    from condiff.eval.__main__ import main

    main(_args(setup, "single"))
    torchrun(["-m", "condiff.eval", *_args(setup, "two", n_flag="--num-samples")], timeout=120)
    one, two = M.load(setup / "single"), M.load(setup / "two")
    assert two.world_size == 2 and one.world_size == 1
    for k, v in one.metrics.items():
        assert two.metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), k  # NaN: undefined in both


def test_text_model_eval_align(tmp_path):
    """A text-conditioned mmDiT-ours (seeded tiny CLIP text encoder) through `condiff eval --metrics align`."""
    from condiff.conditioning.text import build_text_encoder
    from condiff.diffusion import Schedule
    from condiff.eval.__main__ import main
    from condiff.models import create
    from condiff.io.checkpoint import save_checkpoint

    enc_cfg = {"kind": "tiny-clip", "seed": 0, "dim": 32, "layers": 1, "heads": 2, "max_length": 16}
    enc = build_text_encoder(enc_cfg)
    torch.manual_seed(0)
    model = create("mmdit-ours-tiny", conditioning="text", in_channels=3, input_size=16, depth=1, hidden_size=32,
                   num_heads=2, text_dim=enc.dim, pooled_dim=enc.pooled_dim, text_len=enc.max_length)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    save_checkpoint(tmp_path / "run", 1, model_state=state, ema_state=state,
                    meta={"model": model.config, "schedule": Schedule().to_dict(), "text_encoder": enc_cfg,
                          "autoencoder": None, "train_sizes": [[32, 32]]})
    assert main(["--checkpoint", str(tmp_path / "run"), "--metrics", "align", "--n", "4", "--steps", "2",
                 "--prompts", "shapes:demo", "--size-cond", "fixed:48", "--guidance", "2", "--control-guidance",
                 "1.375", "--out", str(tmp_path / "out")]) == 0
    m = M.load(tmp_path / "out")
    assert m.metrics["align/n"] == 4 and m.size_cond == "fixed:48" and m.control_guidance == 1.375
    assert m.guidance == m.settings["guidance_given"] == 2.0  # at the base resolution: lambda used = given
    assert json.loads((tmp_path / "out" / "grid.png.json").read_text())["guidance"] == m.guidance
    assert m.settings["n_prompts"] == 8


def test_shapes_aspects_preset_samples_mixed_aspects(setup, tmp_path, capsys):
    """The `shapes-aspects` preset: sample i at 1:2, 1:1, 2:1 (W:H) in turn, at the trained pixel count (16 px
    model: 22x12, 16x16, 12x22 (H x W) with patch 2); batches hold one shape, and the grid keeps each sample's shape."""
    from condiff.eval.__main__ import main, parse_args
    from condiff.inference.cli_args import spec_of
    from condiff.inference.generate import Generator
    from condiff.inference.pipeline import Pipeline

    out = tmp_path / "mixed"
    assert main(["--checkpoint", str(setup / "run"), "--preset", "shapes-aspects", "--prompts", "shapes:demo",
                 "--n", "6", "--steps", "2", "--batch-size", "4", "--grid", "6", "--out", str(out)]) == 0
    m = M.load(out)
    assert m.metrics["align/n"] == 6 and m.settings["aspects"] == [0.5, 1.0, 2.0]
    shapes = m.settings["shapes"]
    assert [s["size"] for s in shapes] == [[22, 12], [16, 16], [12, 22]]
    assert [s["aspect"] for s in shapes] == [12 / 22, 1.0, 22 / 12]
    for s in shapes:  # each shape's own Eq. 4 lambda: s = sqrt(H W) / base (16 px)
        assert s["guidance"] == pytest.approx(1 + (s["size"][0] * s["size"][1]) ** 0.5 / 16 * 2.0)
    rec = json.loads((out / "grid.png.json").read_text())
    assert rec["shapes"] == shapes and rec["indices"] == list(range(6))
    gen = Generator(Pipeline.from_checkpoint(str(setup / "run"), "cpu"),
                    spec_of(parse_args(["run", "--preset", "shapes-aspects", "--batch-size", "4"])), list(range(8)))
    batches = gen.shape_batches(n=8)
    assert batches == [[0, 3, 6], [1, 4, 7], [2, 5]]  # one shape per batch
    assert [tuple(gen.noise(i).shape) for i in range(3)] == [(3, 22, 12), (3, 16, 16), (3, 12, 22)]
    assert gen.cond([0, 2]).control_h[:, 4].tolist() == pytest.approx([12 / 22, 22 / 12])
    idx, images = next(gen.batches(n=8))
    assert idx == [0, 3, 6] and images.shape == (3, 3, 22, 12)
    with pytest.raises(SystemExit):
        parse_args(["run", "--metrics", "fid", "--ref-train", "x", "--aspects", "1:2,2:1"])
    assert "--metrics fid: fid / shapes-fd compare with square references" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["run", "--metrics", "shapes-fd,content-change", "--aspects", "1:2,2:1"])
    assert "--metrics shapes-fd,content-change: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["run", "--preset", "shapes-aspects", "--aspects", "1:0"])
    assert "'1:0' is not a positive W:H" in capsys.readouterr().err


def test_prompts_checked_before_sampling(setup, tmp_path, capsys):
    from condiff.eval.__main__ import main

    (tmp_path / "p.txt").write_text("\n".join(["a photo of a dog"] * 8) + "\n")
    assert main(["--checkpoint", str(setup / "run"), "--metrics", "align", "--n", "2", "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "shapes grammar" in capsys.readouterr().err
    (tmp_path / "q.txt").write_text("a red circle\n")
    assert main(["--checkpoint", str(setup / "run"), "--metrics", "align", "--n", "2", "--prompts", str(tmp_path / "q.txt")]) == 2
    assert "1 class names for a model with 8 classes" in capsys.readouterr().err


def test_latent_model_decodes_through_autoencoder(tmp_path, capsys):
    """A latent (4-channel) checkpoint without a stored VAE takes one with --autoencoder; the grid and
    the align scores are computed on decoded 16 px images."""
    from diffusers import AutoencoderKL

    from condiff.diffusion import Schedule
    from condiff.eval.__main__ import main
    from condiff.models import create
    from condiff.io.checkpoint import save_checkpoint

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, scaling_factor=0.5).save_pretrained(str(tmp_path / "vae"))
    model = create("dit-tiny", input_size=8, num_classes=8, depth=1, hidden_size=32, num_heads=2)
    meta = {"model": model.config, "schedule": Schedule().to_dict(), "text_encoder": None, "autoencoder": None}
    save_checkpoint(tmp_path / "run", 1, model_state=model.state_dict(), ema_state=None, meta=meta)
    args = ["--checkpoint", str(tmp_path / "run"), "--metrics", "align", "--n", "3", "--steps", "1",
            "--prompts", "shapes:demo", "--out", str(tmp_path / "out")]
    assert main(args) == 2 and "no autoencoder" in capsys.readouterr().err
    assert main([*args, "--autoencoder", str(tmp_path / "vae")]) == 0
    m = M.load(tmp_path / "out")
    assert m.resolution == 16 and m.size_cond == "output" and m.settings["autoencoder"]["kind"] == "diffusers"
    from PIL import Image

    assert Image.open(tmp_path / "out" / "grid.png").size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)


def test_lpips_only_run_grids_its_size_sweeps(setup, tmp_path):
    from PIL import Image

    from condiff.eval.__main__ import main

    assert main(["--checkpoint", str(setup / "run"), "--metrics", "lpips", "--steps", "1", "--lpips-random",
                 "--lpips-prompts", "2", "--lpips-sizes", "8,16,24,32", "--out", str(tmp_path / "out")]) == 0
    m = M.load(tmp_path / "out")
    assert m.n == 0 and m.settings["lpips_sizes"] == [16, 24, 32] and m.metrics["lpips_size"] > 0
    assert Image.open(tmp_path / "out" / "grid.png").size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)  # prompts x sizes


def test_sampling_rules_are_condiff_samples(setup):
    """Resolution, guidance law (Eq. 4) and size mode are resolved exactly as `condiff sample` does."""
    from condiff.inference.generate import Generator
    from condiff.inference.spec import SamplingSpec
    from condiff.inference.pipeline import Pipeline

    inf = Pipeline.from_checkpoint(setup / "run")
    gen = Generator(inf, SamplingSpec(resolution=32, guidance=1.5, steps=4))
    assert gen.resolution == 32 and gen.resolved.latent_hw == (32, 32) and gen.guidance == pytest.approx(2.0)
    assert gen.size_cond.mode == "train-dist" and len(gen.timesteps) == 4
    assert Generator(inf, SamplingSpec(resolution=32, guidance=1.5, guidance_law=False)).guidance == 1.5
    fixed = Generator(inf, SamplingSpec(size_cond="fixed:40x48"))
    assert fixed.size_cond.mode == "fixed" and fixed.sizes([0, 1]).tolist() == [[40.0, 48.0]] * 2
    with pytest.raises(ValueError, match="--size-cond 'fixed:big'"):
        Generator(inf, SamplingSpec(size_cond="fixed:big"))
