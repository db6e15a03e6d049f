"""Loader throughput (samples/s) with 0, 1 and 2 DataLoader workers.

Two shard sets, written once per session into a temporary folder:
  shapes  the `demo` shapes preset (PNG originals of 32-64 px) read at 32 px, global crops;
  jpeg    real photos (scikit-image's RGB photos, random crops re-encoded as JPEG at quality 90,
          short side 300-600 px, aspect 3:4..4:3) read at 256 px, global crops.
Each round reads `N` samples from a fresh loader (worker start-up included, as at the start of a
run or after a resume). samples/s = N / mean round time, stored in `extra_info`.

Run: PYTHONPATH=python python -m pytest benchmarks/test_bench_data.py --benchmark-only -q
"""

import io

import numpy as np
import pytest
from PIL import Image

from condiff.data import shapes
from condiff.data.loader import LoaderConfig, ShardLoader
from condiff.data.make_shards import write_shapes
from condiff.data.writer import ShardSetWriter

N = 512  # samples per round


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data")
    write_shapes(str(root / "shapes"), n=1024, seed=0, preset="demo", shard_size=128)
    rng = np.random.default_rng(0)
    photos = [img for _, img in shapes.skimage_photos(("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"))]
    with ShardSetWriter(str(root / "jpeg"), shard_size=128) as w:
        for i in range(1024):
            src = photos[i % len(photos)]
            short = int(rng.integers(300, 601))
            aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
            size = (max(short, round(short * aspect)), short) if aspect >= 1 else (short, max(short, round(short / aspect)))
            img = src.resize(size, Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            w.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "cls": i % 6, "json": {"width": size[0], "height": size[1]}})
    return {"shapes": (str(root / "shapes"), 32), "jpeg": (str(root / "jpeg"), 256)}


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("dataset", ["shapes", "jpeg"])
def test_loader_throughput(benchmark, shard_sets, dataset, workers):
    path, resolution = shard_sets[dataset]
    cfg = LoaderConfig(shards=path, batch_size=32, resolution=resolution, crop="global", num_workers=workers, shuffle_buffer=256)

    def run():
        n = 0
        for batch in ShardLoader(cfg):
            n += len(batch["key"])
            if n >= N:
                return n

    n = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    assert n >= N
    benchmark.extra_info["samples_per_s"] = round(N / benchmark.stats.stats.mean, 1)
    benchmark.extra_info["resolution"] = resolution


def test_bucket_vs_square_throughput(tmp_path):
    """Aspect buckets vs square crops on the same shards in one run (rounds interleaved, so machine load hits
    both alike): samples/s, pixels/s and the ratio; padding waste = the share of batch rows or pixels that
    are not a sample's own pixels (0 by construction: every batch is one bucket, full size, no padding).

    Shards: the `wide` shapes preset (originals 1:4 .. 4:1, short side 48-256 px), 1024 samples; output a
    64^2 pixel budget: square 64 x 64 crops vs `auto` buckets (sides multiples of 16, 1:4 .. 4:1)."""
    import time

    from condiff.data.buckets import resolve_buckets

    write_shapes(str(tmp_path / "wide"), n=1024, seed=0, preset="wide", shard_size=128)
    buckets = [list(b) for b in resolve_buckets("auto", 64, multiple=16)]
    cfgs = {
        "square": LoaderConfig(shards=str(tmp_path / "wide"), batch_size=32, resolution=64, crop="global", shuffle_buffer=256),
        "buckets": LoaderConfig(shards=str(tmp_path / "wide"), batch_size=32, resolution=64, buckets=buckets, crop="global",
                                shuffle_buffer=256),
    }
    times = {k: [] for k in cfgs}
    stats = {k: {"samples": 0, "pixels": 0, "rows": 0, "partial": 0, "buckets": set()} for k in cfgs}
    for _ in range(3):
        for name, cfg in cfgs.items():
            t0, n = time.perf_counter(), 0
            for batch in ShardLoader(cfg):
                s = stats[name]
                x = batch["image"]
                s["rows"] += x.shape[0]
                s["partial"] += x.shape[0] < cfg.batch_size
                s["pixels"] += x.shape[0] * x.shape[2] * x.shape[3]
                s["buckets"].add(batch["bucket"])
                assert x.shape[2:] == batch["bucket"]
                n += len(batch["key"])
                if n >= N:
                    break
            times[name].append(time.perf_counter() - t0)
            stats[name]["samples"] += n
    out = {}
    for name in cfgs:
        s, t = stats[name], sum(times[name])
        out[name] = {"samples_per_s": round(s["samples"] / t, 1), "mpixels_per_s": round(s["pixels"] / t / 1e6, 3),
                     "padding_waste": 1 - s["samples"] / s["rows"], "partial_batches": s["partial"],
                     "buckets_used": len(s["buckets"])}
        assert out[name]["padding_waste"] == 0 and s["partial"] == 0
    out["ratio_buckets_over_square"] = round(out["buckets"]["samples_per_s"] / out["square"]["samples_per_s"], 3)
    print(out)
