"""Multi-aspect training: `data.buckets` in the recipes and the trainer, per-bucket logs and size
distributions, and an exact mid-epoch resume of a text-conditioned mmdit-ours on two-plus buckets, on
pixels and on precomputed latents, all from `condiff train`."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from condiff.cli import main as cli
from condiff.data.loader import LoaderConfig, ShardLoader
from condiff.data.make_shards import write_shapes
from condiff.io import checkpoint as ck
from condiff.models.zoo import model_config
from condiff.train.config import load_config
from condiff.train.data import BucketSizes, input_multiple, resolve_train_buckets

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
BUCKETS = "8x16,12x12,16x8"
TINY_TEXT = [
    "model.name=mmdit-ours-tiny", "model.conditioning=text",
    "model.kwargs={in_channels: 3, input_size: 8, depth: 2, hidden_size: 32, num_heads: 2, text_dim: 32, pooled_dim: 32}",
    "text.encoder={kind: tiny-clip, dim: 32, max_length: 16}",
    "data.resolution=12", f"data.buckets={BUCKETS}", "data.workers=0", "data.shuffle_buffer=16",
    "batch_size=4", "log.progress=false", "log.every=1", "optim.warmup_steps=2", "ema.decay=0.9",
]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("wide"))
    write_shapes(out, n=64, seed=0, preset="wide", shard_size=16, size_range=(12, 20))  # 4 shards x 16
    return out


def test_cc12m_recipes_train_on_buckets_imagenet_stays_square(training_recipes):
    seen = 0
    for path in training_recipes:
        cfg = load_config(path)
        arch = dataclasses.asdict(model_config(cfg.model.name, cfg.model.conditioning, **cfg.model.kwargs))
        factor = 1 if cfg.autoencoder.config.get("kind", "pixels") == "pixels" else 8  # SD-VAE
        buckets = resolve_train_buckets(cfg.data, input_multiple(arch, factor))  # sides fit every model
        if "cc12m" in cfg.data.shards:
            assert buckets is not None and len(buckets) > 2, path
            assert [cfg.data.resolution] * 2 in buckets and min(w / h for h, w in buckets) <= 0.25 + 1e-9, path
            seen += 1
        else:
            assert buckets is None, path
    assert seen >= 8


@pytest.mark.parametrize("bucket,message", [
    ("8x15,12x12", "data.buckets: bucket(s) 8x15 have a side that is not a multiple of 2"),
    ("sdxll", "data.buckets: unknown bucket preset 'sdxll'"),
])
def test_bad_buckets_are_one_line_config_errors(wide, tmp_path, capsys, bucket, message):
    assert cli(["train", *TINY_TEXT, f"data.shards={wide}", f"data.buckets={bucket}", "steps=1",
                f"run_dir={tmp_path}/r"]) == 2
    assert message in capsys.readouterr().err


def _train(root, name, steps, *extra):
    assert cli(["train", *TINY_TEXT, *extra, f"run_dir={root}/{name}", f"steps={steps}", "save_every=3"]) == 0
    return Path(root) / name


def _assert_same_weights(a: Path, b: Path) -> None:
    for which in ("model", "ema"):
        wa, wb = ck.load_weights(a, which), ck.load_weights(b, which)
        assert set(wa) == set(wb)
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{which}:{k} differs after resume"
    oa, ob = ck.load_pt(a, "optim.pt"), ck.load_pt(b, "optim.pt")
    for k in oa["state"]:
        assert torch.equal(oa["state"][k]["exp_avg_sq"], ob["state"][k]["exp_avg_sq"])


def test_text_mmdit_on_buckets_resumes_exactly_mid_epoch(wide, tmp_path):
    """3 + resume + 3 steps == 6 steps, bit for bit, with samples waiting in partial buckets at the save;
    per-bucket throughput in the log, per-bucket sizes and counts in the checkpoint."""
    data = [f"data.shards={wide}", "log.sample_prompts=[a red circle]", "log.sample_steps=2", "log.sample_per_prompt=1"]
    full = _train(tmp_path, "full", 6, *data)
    split = _train(tmp_path, "split", 3, *data)
    mid = ck.read_meta(split / "step_00000003")
    assert any(v[2] for v in mid.data_position["slots"].values())  # mid-epoch, partial buckets waiting
    assert mid.data_position["slots"]["0"][0] == 0  # still epoch 0 (64 samples, 12 drawn)
    _train(tmp_path, "split", 6, *data)
    _assert_same_weights(full / "step_00000006", split / "step_00000006")

    meta = ck.read_meta(full / "step_00000006")
    counts = meta.counters["bucket_images"]
    assert sum(counts.values()) == meta.counters["images_seen"] == 24 and len(counts) >= 2
    assert ck.read_meta(split / "step_00000006").counters["bucket_images"] == counts  # counts survive the resume
    assert set(meta.train_sizes_by_bucket) == set(counts) <= {"8x16", "12x12", "16x8"}
    for key, sizes in meta.train_sizes_by_bucket.items():
        assert len(sizes) == counts[key]
        h, w = (int(v) for v in key.split("x"))
        if h != w:  # originals in a non-square bucket lean the bucket's way
            assert all((ow > oh) == (w > h) for oh, ow in sizes)
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    per_bucket = [r["bucket_img_per_s"] for r in records]
    assert all(len(b) == 1 and set(b) <= set(counts) and list(b.values())[0] > 0 for b in per_bucket)  # one bucket a step
    preview = json.loads((full / "samples" / "final.png.json").read_text())
    assert preview["size_bucket"] == "12x12"  # the square preview draws the square bucket's training sizes
    _sample_both_aspects(full)


def _sample_both_aspects(run: Path, strict: bool = True) -> None:
    """`condiff sample --size` at 2:1 and 1:2: the aspect conditioning is the output's W / H and the size
    conditions come from the trained bucket of that aspect (grid.png.json)."""
    meta = ck.read_meta(run / "step_00000006")
    for (h, w), bucket in (((8, 16), "8x16"), ((16, 8), "16x8")):
        out = run / f"grid_{h}x{w}.png"
        assert cli(["sample", str(run), "--prompts", "a red circle", "a blue square", "--size", str(h), str(w),
                    "--steps", "2", "--quiet", "--out", str(out)]) == 0
        rec = json.loads(out.with_name(out.name + ".json").read_text())
        assert rec["size"] == [h, w] and [row[4] for row in rec["control_h"]] == [w / h] * 2
        assert bucket in meta.train_sizes_by_bucket or not strict  # seed 0 trains on both in 6 steps
        if bucket in meta.train_sizes_by_bucket:
            assert rec["size_bucket"] == bucket
            assert all([int(v) for v in row] in meta.train_sizes_by_bucket[bucket] for row in rec["control_l"])


def test_text_mmdit_on_bucketed_latents_resumes_exactly(wide, tmp_path, capsys):
    """`condiff precompute --buckets` (two views per image, flips) then the same exact resume on latents."""
    lat = str(tmp_path / "lat")
    assert cli(["precompute", wide, "--out", lat, "--resolution", "12", "--buckets", BUCKETS, "--multiple", "2",
                "--views", "2", "--crop", "mix", "--text-encoder", "tiny-clip", "--text-max-length", "16",
                "--dtype", "fp32", "--device", "cpu"]) == 0
    loader = ShardLoader(LoaderConfig(shards=lat, batch_size=4, conditioning="text", epochs=1, drop_last=False,
                                      crop="mix", buckets=[[8, 16], [12, 12], [16, 8]]))
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 64
    assert all(b["latent"].shape[-2:] == b["bucket"] for b in batches)  # pixel autoencoder: latent = bucket
    assert len({b["bucket"] for b in batches}) >= 2
    # each stored view is the image's bucket crop: pixels autoencoder, so latent view 0 == BucketCrop's output
    import numpy as np
    from safetensors.torch import load as st_load

    from condiff.data import shapes
    from condiff.data.buckets import BucketCrop
    from condiff.data.loader import _seed_int, iter_raw_samples

    crop = BucketCrop([(8, 16), (12, 12), (16, 8)], strategy="mix", flip_prob=0.0)
    source = shapes.get_config("wide", size_range=(12, 20))  # the fixture's shapes
    for raw in list(iter_raw_samples(sorted(str(p) for p in Path(lat).glob("*.tar")), {}))[:6]:
        t, meta = st_load(raw["safetensors"]), json.loads(raw["json"])
        bucket, x, ch, cl, _ = crop(shapes.render(int(raw["__key__"]), source, 0).image,
                                    np.random.default_rng(_seed_int(0, 0, raw["__key__"])))
        assert t["latent"].shape == (4, 3, *bucket) and meta["precompute"]["bucket"] == f"{bucket[0]}x{bucket[1]}"
        torch.testing.assert_close(t["latent"][0], x)
        torch.testing.assert_close(t["latent"][1], x.flip(-1))  # its mirror
        assert t["control_h"][:, 4].tolist() == [bucket[1] / bucket[0]] * 4
    with pytest.raises(ValueError, match=r"data.buckets none \(square\) differ .* hold buckets"):
        ShardLoader(LoaderConfig(shards=lat, conditioning="text", crop="mix"))
    data = [f"data.shards={lat}", "data.crop=mix", "text.encoder.dim=64",  # the tiny-clip that precompute used
            "model.kwargs={in_channels: 3, input_size: 8, depth: 2, hidden_size: 32, num_heads: 2, text_dim: 64, pooled_dim: 64}"]
    assert cli(["train", *TINY_TEXT, *data, "data.buckets=auto", f"run_dir={tmp_path}/other", "steps=1"]) == 2
    assert "data.buckets [[24, 6]" in capsys.readouterr().err  # other buckets than the precompute's: one line
    full = _train(tmp_path, "full", 6, *data)
    _train(tmp_path, "split", 3, *data)
    split = _train(tmp_path, "split", 6, *data)
    _assert_same_weights(full / "step_00000006", split / "step_00000006")
    assert len(ck.read_meta(full / "step_00000006").counters["bucket_images"]) >= 2
    _sample_both_aspects(full, strict=False)


_DDP_WORKER = r"""
import sys
from condiff.train.config import load_config
from condiff.train.loop import Trainer
from condiff.train import distributed as D

root, shards, tiny = sys.argv[1], sys.argv[2], sys.argv[3:]
info = D.init("cpu")
common = tiny + [f"data.shards={shards}", "save_every=3", "parallel=ddp", "batch_size=8"]
Trainer(load_config(overrides=common + [f"run_dir={root}/full", "steps=6"]), info).run()
Trainer(load_config(overrides=common + [f"run_dir={root}/split", "steps=3"]), info).run()
Trainer(load_config(overrides=common + [f"run_dir={root}/split", "steps=6"]), info).run()
D.shutdown()
"""


@pytest.mark.slow  # ~40 s: two gloo processes
def test_two_rank_bucketed_run_resumes_exactly(wide, tmp_path, torchrun):
    """torchrun, 2 ranks (each its own bucket per step): 3 + resume + 3 == 6 steps bit for bit; the per-bucket
    image counts cover both ranks."""

    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    torchrun([str(script), str(tmp_path), wide, *TINY_TEXT], timeout=600)
    _assert_same_weights(tmp_path / "full" / "step_00000006", tmp_path / "split" / "step_00000006")
    meta = ck.read_meta(tmp_path / "split" / "step_00000006")
    assert sum(meta.counters["bucket_images"].values()) == meta.counters["images_seen"] == 48
    assert len(meta.data_position["slots"]) == 2


def test_bucket_sizes_of_every_rank_merge_per_bucket_with_a_cap():
    r0 = {"16x16": [[16, 16], [20, 20]], "16x32": [[10, 30]]}
    r1 = {"16x32": [[12, 34], [11, 33], [14, 36]]}
    assert BucketSizes.merge([r0, r1], cap=8) == {"16x16": [[16, 16], [20, 20]],
                                                  "16x32": [[10, 30], [12, 34], [11, 33], [14, 36]]}
    # over the cap: evenly strided over the concatenation (both ranks represented)
    assert BucketSizes.merge([r0, r1], cap=2)["16x32"] == [[10, 30], [11, 33]]
    acc = BucketSizes(cap=3)
    acc.add((16, 32), torch.tensor([[10.4, 29.6], [12.0, 34.0], [1.0, 1.0], [2.0, 2.0]]))
    assert acc.sizes == {"16x32": [[10, 30], [12, 34], [1, 1]]}
