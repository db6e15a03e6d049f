"""`condiff sample`: zoo smoke run, checkpoint run (stored schedule + sizes), determinism, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from condiff.diffusion.schedule import Schedule
from condiff.inference.generate import Generator
from condiff.inference.pipeline import Pipeline as Loaded
from condiff.inference.spec import SamplingSpec as Settings
from condiff.inference.spec import resolve as resolve_spec
from condiff.io.checkpoint import CheckpointMeta
from condiff.sample import main


def load_checkpoint(path, device):
    return Loaded.from_checkpoint(path, device)


def resolve(pipe, spec):
    return vars(resolve_spec(pipe, spec))


def semantic_conditions(pipe, class_ids, prompts, n_per):
    rows = [x for x in pipe.check_items(class_ids, prompts) for _ in range(n_per)]
    return rows, None, rows


def generate(pipe, rows, _null, spec, progress=False):
    gen = Generator(pipe, spec, rows)
    return gen.generate(), vars(gen.resolved)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run(tmp_path, name, *args):
    out = tmp_path / name
    rc = main([*args, "--steps", "2", "--quiet", "--out", str(out)])
    return rc, out


def pixels(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A dit-tiny pixel-space checkpoint with non-trivial weights, an Eq. 3 schedule and training sizes."""
    from condiff.models import create
    from condiff.io.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create("dit-tiny", in_channels=3, input_size=16, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():  # leave no zero-initialised layer: the output must depend on the condition
            p.add_(0.05 * torch.randn_like(p))
    run_dir = tmp_path_factory.mktemp("run")
    meta = {"model": model.config, "schedule": Schedule(base_resolution=8, resolution=16).to_dict(),
            "text_encoder": None, "autoencoder": None, "base_size": model.base_size,
            "train_sizes": [[40, 60], [100, 80], [64, 64]]}
    state = model.state_dict()
    save_checkpoint(run_dir, 10, model_state=state, ema_state=state, meta=meta)
    return run_dir


def test_zoo_smoke_run_writes_a_grid(tmp_path):
    rc, out = run(tmp_path, "zoo.png", "--model", "dit-tiny", "--class-ids", "1", "2", "3", "--raw-grid")
    assert rc == 0
    img = pixels(out)
    assert img.shape == (2 + 2 * 34, 2 + 2 * 34, 3) and img.dtype == np.uint8  # 3 images of 32 px, 2 per row
    record = json.loads(out.with_name("zoo.png.json").read_text())
    assert record["captions"] == ["class 1", "class 2", "class 3"] and record["resolution"] == 32


def test_default_grid_is_upscaled_and_captioned_per_row(tmp_path):
    """Default: one row per class, 32 px samples nearest-upscaled x3 to 96 px cells, a caption column on the
    left; --raw-grid: the same samples at their own pixels."""
    args = ["--model", "dit-tiny", "--class-ids", "1", "2", "--n-per-cond", "2"]
    _, raw = run(tmp_path, "raw.png", *args, "--raw-grid")
    _, big = run(tmp_path, "big.png", *args)
    raw, big = pixels(raw), pixels(big)
    assert raw.shape == (2 + 2 * 34, 2 + 2 * 34, 3)
    label_w = big.shape[1] - (2 + 2 * 98)
    assert big.shape[0] == 2 + 2 * 98 and label_w > 40  # 2 rows of 2 cells of 96 px + 2 px padding, captions
    for r in range(2):
        for c in range(2):
            tile = raw[2 + 34 * r: 34 + 34 * r, 2 + 34 * c: 34 + 34 * c]
            shown = big[2 + 98 * r: 98 + 98 * r, label_w + 2 + 98 * c: label_w + 98 + 98 * c]
            assert np.array_equal(shown, tile.repeat(3, 0).repeat(3, 1))
        band = big[2 + 98 * r: 98 + 98 * r, :label_w]
        assert (band < 128).any()  # the row's caption ("class 1", "class 2") is drawn
    assert (big[:, :label_w] >= 128).mean() > 0.9  # on a white column


def test_checkpoint_run_is_deterministic_and_uses_what_training_stored(tmp_path, checkpoint):
    args = ["--checkpoint", str(checkpoint), "--class-ids", "1", "7", "--n-per-cond", "2", "--guidance", "3", "--raw-grid"]
    rc, a = run(tmp_path, "a.png", *args)
    rc2, b = run(tmp_path, "b.png", *args)
    rc3, c = run(tmp_path, "c.png", *args, "--seed", "1")
    assert rc == rc2 == rc3 == 0
    assert np.array_equal(pixels(a), pixels(b))  # same seed and settings: the same image
    assert not np.array_equal(pixels(a), pixels(c))
    assert pixels(a).shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # 2 rows (one per class) of 2 images of 16 px
    rec = json.loads(a.with_name("a.png.json").read_text())
    assert rec["schedule"] == Schedule(base_resolution=8, resolution=16).to_dict()  # the stored (Eq. 3) schedule
    assert rec["size_cond"] == "train-dist"
    assert {tuple(s) for s in rec["control_l"]} <= {(40.0, 60.0), (100.0, 80.0), (64.0, 64.0)}
    # the stored schedule says "fine-tuned 8 -> 16 px": --guidance is lambda at the 8 px base, Eq. 4 with s = 2
    assert rec["guidance_resolution"] == 8.0 and rec["guidance"] == 5.0


def test_guidance_law_and_fixed_size_at_another_resolution(tmp_path, checkpoint):
    rc, out = run(tmp_path, "hr.png", "--checkpoint", str(checkpoint), "--class-ids", "2", "--guidance", "1.5",
                  "--resolution", "32", "--orig-size", "512", "--sampler", "heun", "--guidance-resolution", "16", "--raw-grid")
    assert rc == 0
    rec = json.loads(out.with_name("hr.png.json").read_text())
    assert rec["guidance"] == 2.0  # Eq. 4: s = 32 / 16 = 2, lambda 1.5 -> 2.0
    assert rec["size_cond"] == "fixed:512" and rec["control_l"] == [[512.0, 512.0]]
    assert pixels(out).shape == (32, 32, 3)  # a single image: make_grid adds no padding
    loaded = load_checkpoint(str(checkpoint), "cpu")
    assert resolve(loaded, Settings(guidance=1.5, resolution=32, guidance_law=False))["guidance"] == 1.5
    assert resolve(loaded, Settings(guidance=1.5, resolution=32))["guidance"] == 3.0  # s = 32 / 8
    assert resolve(loaded, Settings(guidance=1.5, resolution=8))["guidance"] == 1.5  # at the base
    # no stored Eq. 3 base: the positional-grid anchor (App. C) gives it: base_size 4 x patch 2 = 8 px
    from condiff.models import create

    kept = Loaded(create("dit-tiny", in_channels=3, input_size=16, base_size=4), Schedule(), None, None, CheckpointMeta())
    r = resolve(kept, Settings(guidance=1.5))
    assert r["guidance_resolution"] == 8.0 and r["resolution"] == 16 and r["guidance"] == 2.0
    # opt-in Eq. 3 for the sampling resolution composes with the stored rescaling (base 8 -> 32)
    r = resolve(loaded, Settings(resolution=32, rescale_schedule=True))
    assert r["schedule"] == Schedule(base_resolution=8, resolution=32)
    assert resolve(loaded, Settings(resolution=32))["schedule"] == loaded.schedule


@pytest.mark.parametrize("hw", [(16, 32), (32, 16)])
def test_size_samples_any_aspect_and_records_its_conditioning(tmp_path, checkpoint, hw):
    """--size H W: H x W images from a model trained at 16 x 16; phi_h's aspect = W / H and the size
    conditions go to grid.png.json; lambda follows Eq. 4 with the pixel-count s = sqrt(H W) / base."""
    h, w = hw
    rc, out = run(tmp_path, "grid.png", "--checkpoint", str(checkpoint), "--class-ids", "2", "5", "--size", str(h),
                  str(w), "--guidance", "1.5", "--raw-grid", "--nrow", "2")
    assert rc == 0
    assert pixels(out).shape == (h + 4, 2 * w + 6, 3)  # 1 row of 2 H x W images, 2 px padding
    rec = json.loads(out.with_name("grid.png.json").read_text())
    assert rec["size"] == [h, w] and rec["aspect"] == w / h and rec["latent_hw"] == [h, w]
    assert [row[4] for row in rec["control_h"]] == [w / h] * 2  # aspect_ratio conditioning
    assert rec["size_cond"] == "train-dist" and rec["size_bucket"] is None  # one stored list: drawn from it
    for (top, left, ch, cw, aspect, flip), (oh, ow) in zip(rec["control_h"], rec["control_l"]):
        assert [oh, ow] in [[40.0, 60.0], [100.0, 80.0], [64.0, 64.0]]
        assert cw / ch == pytest.approx(w / h) and (ch == oh or cw == ow) and flip == 0.0  # full centred crop
    s = (h * w) ** 0.5 / 8  # the stored Eq. 3 base is 8 px
    assert rec["guidance_scale_s"] == pytest.approx(s) and rec["guidance"] == pytest.approx(1 + s * 0.5)
    rc, sq = run(tmp_path, "sq.png", "--checkpoint", str(checkpoint), "--class-ids", "2", "5", "--raw-grid",
                 "--guidance", "1.5", "--nrow", "2")
    assert json.loads(sq.with_name("sq.png.json").read_text())["size"] == [16, 16]  # default: the trained size


def test_size_draws_from_the_nearest_aspect_bucket(tmp_path, checkpoint):
    """A per-bucket training size distribution ({"HxW": [[h, w], ...]}): train-dist draws from the bucket
    whose aspect is nearest the requested output's."""
    from condiff.io.checkpoint import read_meta, resolve_checkpoint, save_checkpoint

    src = read_meta(resolve_checkpoint(str(checkpoint))).to_dict()
    model = load_checkpoint(str(checkpoint), "cpu").model
    buckets = {"16x16": [[64, 64]], "12x20": [[300, 500], [60, 100]], "20x12": [[500, 300]]}
    meta = {k: src[k] for k in ("model", "schedule", "text_encoder", "autoencoder", "base_size")}
    save_checkpoint(tmp_path / "run", 10, model_state=model.state_dict(), ema_state=model.state_dict(),
                    meta={**meta, "train_sizes_by_bucket": buckets})
    for hw, bucket in (((16, 32), "12x20"), ((32, 16), "20x12"), ((16, 16), "16x16")):
        rc, out = run(tmp_path, "b.png", str(tmp_path / "run"), "--class-ids", "1", "--n-per-cond", "3",
                      "--size", *map(str, hw), "--raw-grid")
        rec = json.loads(out.with_name("b.png.json").read_text())
        assert rc == 0 and rec["size_bucket"] == bucket and rec["size_cond"] == "train-dist"
        assert all(row in buckets[bucket] for row in rec["control_l"])


def test_generate_depends_on_condition_and_guidance(checkpoint):
    loaded = load_checkpoint(str(checkpoint), "cpu")
    assert isinstance(loaded, Loaded) and loaded.schedule == Schedule(base_resolution=8, resolution=16)
    cond, null, _ = semantic_conditions(loaded, [1, 7], None, 1)
    base = Settings(steps=2, guidance=1.0, size_cond="output")
    x1, _ = generate(loaded, cond, null, base, progress=False)
    x4, _ = generate(loaded, cond, null, Settings(steps=2, guidance=4.0, size_cond="output"), progress=False)
    assert x1.shape == (2, 3, 16, 16) and x1.min() >= -1 and x1.max() <= 1
    assert not torch.allclose(x1, x4, atol=1e-3)
    # batch size does not change the result (noise is drawn for all samples up front)
    xb, _ = generate(loaded, cond, null, Settings(steps=2, guidance=1.0, size_cond="output", batch_size=1),
                     progress=False)
    torch.testing.assert_close(xb, x1, rtol=1e-4, atol=1e-4)
    # bf16 autocast of the model forward: close to fp32, not identical
    xh, _ = generate(loaded, cond, null, Settings(steps=2, guidance=1.0, size_cond="output", precision="bf16"),
                     progress=False)
    assert xh.dtype == torch.float32 and not torch.equal(xh, x1)
    assert (xh - x1).abs().mean() < 0.05 * x1.abs().mean()  # x0 = (x - b eps) / a amplifies bf16 errors at t = 999


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class-ids", "10"], "outside [0, 10)"),
        (["--prompts", "a cat"], "class-conditional; give --class-ids"),
        (["--class-ids", "1", "--size-cond", "fixed"], "--size-cond 'fixed': expected auto | train-dist"),
        (["--class-ids", "1", "--resolution", "21"], "multiple of the patch size"),
        (["--class-ids", "1", "--sampler", "heun", "--eta", "1"], "--eta applies to ddim only"),
        (["--prompts-file", "/nonexistent/prompts.txt"], "--prompts-file /nonexistent/prompts.txt: no such file"),
        (["--class-ids", "1", "--orig-size", "1", "2", "3"], "--orig-size takes H or H W"),
        (["--class-ids", "1", "--size", "16", "21"], "--size 21: the latent side 21 must be a multiple of the patch"),
        (["--class-ids", "1", "--size", "16", "0"], "--size 0: must be a positive multiple"),
        (["--class-ids", "1", "--size", "16", "32", "--resolution", "16"], "give one of them"),
    ],
)
def test_bad_arguments_give_clear_errors(tmp_path, checkpoint, capsys, args, message):
    rc, _ = run(tmp_path, "x.png", "--checkpoint", str(checkpoint), *args)
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--guidance", "--control-guidance"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_guidance_weights_must_be_finite_and_non_negative(flag, value, capsys):
    from condiff.sample import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--model", "dit-tiny", "--class-ids", "1", flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}: expected a finite number >= 0, got '{value}'" in capsys.readouterr().err


def test_missing_checkpoint(tmp_path, capsys):
    rc, _ = run(tmp_path, "x.png", "--checkpoint", str(tmp_path / "nope"), "--class-ids", "1")
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_latent_checkpoint_decodes_through_its_autoencoder(tmp_path):
    """A latent model (4 channels) + a (tiny, random) diffusers AutoencoderKL stored in the checkpoint."""
    from diffusers import AutoencoderKL

    from condiff.models import create
    from condiff.io.checkpoint import save_checkpoint

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, scaling_factor=0.5)
    vae.save_pretrained(str(tmp_path / "vae"))
    model = create("dit-tiny", input_size=8, num_classes=4)  # 4 latent channels, 8x8 latents = 16 px
    meta = {"model": model.config, "schedule": Schedule().to_dict(), "text_encoder": None,
            "autoencoder": {"kind": "diffusers", "path": str(tmp_path / "vae")}}
    save_checkpoint(tmp_path / "run", 1, model_state=model.state_dict(), ema_state=None, meta=meta)
    loaded = load_checkpoint(str(tmp_path / "run"), "cpu")
    seen = []
    decode = loaded.autoencoder.decode
    loaded.autoencoder.decode = lambda z: seen.append(z) or decode(z)
    cond, null, _ = semantic_conditions(loaded, [0, 3], None, 1)
    images, r = generate(loaded, cond, null, Settings(steps=1), progress=False)
    assert r["ae_factor"] == 2 and r["latent_hw"] == (8, 8) and r["resolution"] == 16
    assert seen[0].shape == (2, 4, 8, 8) and images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, decode(seen[0]).clamp(-1, 1))
    # a latent checkpoint without an autoencoder (e.g. converted from DiT) takes one on the command line
    meta["autoencoder"] = None
    save_checkpoint(tmp_path / "bare", 1, model_state=model.state_dict(), ema_state=None, meta=meta)
    rc = main(["--checkpoint", str(tmp_path / "bare"), "--class-ids", "1", "--steps", "1", "--quiet",
               "--out", str(tmp_path / "bare.png")])
    assert rc == 2
    rc = main(["--checkpoint", str(tmp_path / "bare"), "--class-ids", "1", "--steps", "1", "--quiet",
               "--autoencoder", str(tmp_path / "vae"), "--raw-grid", "--out", str(tmp_path / "bare.png")])
    assert rc == 0 and pixels(tmp_path / "bare.png").shape == (16, 16, 3)


def test_text_zoo_model_uses_the_empty_prompt_as_null(tmp_path):
    loaded = Loaded.from_zoo("mmdit-ours-tiny", "text", "cpu")
    cond, null, captions = semantic_conditions(loaded, None, ["a red square", "a blue circle"], 1)
    null, empty = loaded.null_cond(), loaded.text_encoder.encode([""])
    assert torch.equal(null.text, empty.states) and torch.equal(null.text_lengths, empty.lengths)
    assert loaded.semantic_cond(cond).text.shape[0] == 2 and captions == ["a red square", "a blue circle"]
    images, r = generate(loaded, cond, null, Settings(steps=1, guidance=3.0, resolution=16), progress=False)
    assert images.shape == (2, 3, 16, 16)
    assert r["guidance"] == 2.0  # Eq. 4 downwards: s = 16 / 32 = 0.5


@pytest.mark.slow
def test_end_to_end_train_then_sample(tmp_path):
    """make-shards -> 3 training steps of the tiny mmDiT-ours recipe -> condiff sample on the run directory."""
    from condiff.data.make_shards import main as make_shards
    from condiff.train.__main__ import main as train

    assert make_shards(["shapes", "--preset", "demo", "--n", "64", "--out", str(tmp_path / "shapes")]) == 0
    recipe = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "mmdit_ours.yaml"
    assert train(["--config", str(recipe), f"run_dir={tmp_path / 'run'}",
                  f"data.shards={tmp_path / 'shapes'}", "steps=3", "save_every=3", "batch_size=8",
                  "log.sample_every=0", "data.workers=0", "log.progress=false"]) == 0
    rc, out = run(tmp_path, "s.png", "--checkpoint", str(tmp_path / "run"), "--class-ids", "0", "1", "2", "--raw-grid")
    assert rc == 0 and pixels(out).shape == (2 + 2 * 18, 2 + 2 * 18, 3)
    rec = json.loads(out.with_name("s.png.json").read_text())
    meta = json.loads((tmp_path / "run" / "step_00000003" / "meta.json").read_text())
    assert rec["size_cond"] == "train-dist" and rec["schedule"] == meta["schedule"]
    assert {tuple(s) for s in rec["control_l"]} <= {tuple(map(float, s)) for s in meta["train_sizes"]}


def test_positional_run_directory_and_old_spellings(tmp_path, checkpoint):
    """`condiff sample RUN` (README / demo) equals `--checkpoint RUN`; --orig-size stays a hidden alias."""
    from condiff.cli import main as condiff

    a, b = tmp_path / "pos.png", tmp_path / "flag.png"
    assert condiff(["sample", str(checkpoint), "--class-ids", "1", "--steps", "1", "--quiet", "--out", str(a)]) == 0
    assert main(["--checkpoint", str(checkpoint), "--class-ids", "1", "--steps", "1", "--quiet", "--out", str(b)]) == 0
    assert np.array_equal(pixels(a), pixels(b))
    rc, c = run(tmp_path, "old.png", str(checkpoint), "--class-ids", "1", "--orig-size", "40", "50")
    assert rc == 0 and json.loads(c.with_name("old.png.json").read_text())["size_cond"] == "fixed:40x50"
    assert "--orig-size" not in build_parser_help()


def build_parser_help():
    from condiff.sample import build_parser

    return build_parser().format_help()


def test_condiff_align_command(capsys):
    from condiff.cli import main as condiff

    assert condiff(["align", "--n", "16", "--resolution", "32"]) == 0
    assert capsys.readouterr().out.startswith("| preset | resolution | ground truth")


def test_prompts_outside_the_training_captions_get_one_note(tmp_path, capsys):
    """A text checkpoint whose run records its shapes set (as the demo's does): a note, not an error."""
    from condiff.data import shapes
    from condiff.data.make_shards import write_shapes
    from condiff.io.checkpoint import save_checkpoint

    info = write_shapes(str(tmp_path / "data"), 4, preset="demo")
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(info))
    pipe = Loaded.from_zoo("mmdit-ours-tiny", "text", "cpu")
    meta = {**pipe.meta.to_dict(), "config": {"data": {"shards": str(tmp_path / "data")}}}
    save_checkpoint(tmp_path / "run", 1, model_state=pipe.model.state_dict(), ema_state=None, meta=meta)
    known = shapes.class_names(shapes.get_config("demo"))
    common = ["--checkpoint", str(tmp_path / "run"), "--resolution", "16", "--steps", "1", "--quiet"]
    assert main([*common, "--prompts", known[0], known[1], "--out", str(tmp_path / "in.png")]) == 0
    assert "note" not in capsys.readouterr().err
    assert main([*common, "--prompts", known[0], "a green star", "a green star", "--out", str(tmp_path / "out.png")]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "1 of 2 prompts" in err and "'a green star'" in err and f"{len(known)} captions" in err
    assert (tmp_path / "out.png").is_file()
