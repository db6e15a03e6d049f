"""Aspect buckets: bucket sets, nearest-bucket assignment, one-bucket full batches, split without
duplicates, deterministic order, exact resume with partial batches waiting, per-bucket counts."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from condiff.data import shapes
from condiff.data.buckets import (SDXL_BUCKETS, BucketCrop, bucket_key, generate_buckets, nearest_bucket,
                                  parse_bucket_key, resolve_buckets)
from condiff.data.loader import LoaderConfig, ShardLoader, merge_positions
from condiff.data.make_shards import write_shapes
from condiff.data.transforms import apply_crop, to_tensor

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BUCKETS = [[16, 32], [24, 24], [32, 16]]  # wide, square, tall


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("wide"))
    write_shapes(out, n=48, seed=0, preset="wide", shard_size=12, size_range=(16, 24))  # 4 shards x 12
    return out


def _cfg(shards, **kw):
    base = dict(shards=shards, batch_size=4, resolution=24, buckets=BUCKETS, epochs=1, drop_last=False,
                shuffle_buffer=8, conditioning="text")
    base.update(kw)
    return LoaderConfig(**base)


def test_generator_respects_budget_multiple_and_aspect_range():
    for area, m in [(256 * 256, 16), (512 * 512, 32), (64 * 64, 8)]:
        b = generate_buckets(area, m)
        assert all(h % m == 0 and w % m == 0 and h * w <= area for h, w in b)
        assert all(0.25 <= w / h <= 4.0 for h, w in b)
        side = math.isqrt(area) // m * m
        assert (side, side) in b
        assert [w / h for h, w in b] == sorted(w / h for h, w in b)
        assert {(w, h) for h, w in b} == set(b)  # the rule is symmetric
        assert min(w / h for h, w in b) <= 0.3 and max(w / h for h, w in b) >= 3.3
    assert generate_buckets(256 * 256, 16, max_aspect=2.0) == [b for b in generate_buckets(256 * 256, 16) if 0.5 <= b[1] / b[0] <= 2]


def test_sdxl_preset_is_the_published_table_scaled():
    assert len(SDXL_BUCKETS) == 40
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in SDXL_BUCKETS)
    assert all(0.9 * 1024**2 <= h * w <= 1024**2 for h, w in SDXL_BUCKETS)
    assert SDXL_BUCKETS[0] == (512, 2048) and SDXL_BUCKETS[20] == (1024, 1024) and SDXL_BUCKETS[-1] == (2048, 512)
    b256 = resolve_buckets("sdxl", 256, multiple=16)
    assert b256[0] == (128, 512) and b256[20] == (256, 256) and len(b256) == 40
    assert resolve_buckets("sdxl", 1024, multiple=64) == list(SDXL_BUCKETS)
    with pytest.raises(ValueError, match="data.buckets.*multiple of 32"):
        resolve_buckets("sdxl", 256, multiple=32)  # 128x496: 496 is not a multiple of 32


@pytest.mark.parametrize("spec,message", [
    ("sdlx", "data.buckets: unknown bucket preset 'sdlx'"),
    ("16x30,32x16", "data.buckets: bucket.*16x30.*not a multiple of 16"),
    (",", "data.buckets: unknown bucket preset"),
    ("16x0", "data.buckets: '16x0' is not a bucket"),
    ("16x32,16x32", "lists a bucket twice"),
    ("auto:x", "auto:MAX_ASPECT"),
])
def test_bad_bucket_specs_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_buckets(spec, 32, multiple=16)


def test_explicit_list_auto_and_none():
    assert resolve_buckets("", 256) is None and resolve_buckets("none", 256) is None
    assert resolve_buckets("16x32, 32x16", 32, multiple=16) == [(16, 32), (32, 16)]
    assert resolve_buckets("auto", 32, multiple=16) == generate_buckets(32 * 32, 16)
    assert parse_bucket_key(bucket_key((128, 512))) == (128, 512)
    with pytest.raises(ValueError, match="LoaderConfig.buckets"):
        LoaderConfig(shards="x", buckets=[])
    with pytest.raises(ValueError, match="LoaderConfig.buckets"):
        LoaderConfig(shards="x", buckets=[[16, 0]])


def test_nearest_bucket_is_nearest_in_log_aspect():
    b = [(16, 32), (24, 24), (32, 16)]
    assert nearest_bucket(b, 100, 300) == 0  # 3:1 -> 2:1
    assert nearest_bucket(b, 100, 142) == 0 and nearest_bucket(b, 100, 141) == 1  # sqrt(2) = 1.4142 is the log midpoint
    assert nearest_bucket(b, 300, 100) == 2 and nearest_bucket(b, 50, 50) == 1


def test_bucket_crop_records_bucket_aspect_and_reproduces_pixels():
    rng_seed = 3
    for i in range(12):
        img = shapes.render(i, "wide", 0).image
        crop = BucketCrop([tuple(b) for b in BUCKETS], strategy="mix", flip_prob=0.5)
        bucket, x, ch, cl, p = crop(img, np.random.default_rng(rng_seed))
        w, h = img.size
        assert bucket == tuple(BUCKETS[nearest_bucket([tuple(b) for b in BUCKETS], h, w)])
        assert x.shape == (3, *bucket)
        assert ch[4] == np.float32(bucket[1] / bucket[0])  # aspect = the bucket's width / height
        assert ch[:4].tolist() == [p.top, p.left, p.size, p.box_width] and ch[5] == float(p.flip)
        assert cl.tolist() == [h, w]
        assert torch.equal(to_tensor(apply_crop(img, p, bucket)), x)  # the recorded box reproduces the pixels


def test_every_batch_is_one_full_bucket_and_counts_add_up(wide_dir):
    loader = ShardLoader(_cfg(wide_dir, drop_last=True, epochs=2))
    batches = list(loader)
    for b in batches:
        assert b["image"].shape == (4, 3, *b["bucket"])  # full batch of one bucket: no padding
        assert torch.allclose(b["control_h"][:, 4], torch.full((4,), b["bucket"][1] / b["bucket"][0]))
    counts = loader.bucket_counts()
    assert set(counts) == {"16x32", "24x24", "32x16"}
    assert sum(counts.values()) == 4 * len(batches) and all(v > 0 for v in counts.values())
    assert Counter(bucket_key(b["bucket"]) for b in batches) == {k: v // 4 for k, v in counts.items()}
    assert "per bucket" in loader.report()


def test_bucket_follows_the_image_aspect(wide_dir):
    crop_buckets = [tuple(b) for b in BUCKETS]
    for b in ShardLoader(_cfg(wide_dir)):
        for key, cl in zip(b["key"], b["control_l"]):
            oh, ow = cl.tolist()
            assert crop_buckets[nearest_bucket(crop_buckets, oh, ow)] == b["bucket"], key


@pytest.mark.parametrize("num_workers,world_size", [(0, 1), (2, 1), (0, 3), (2, 2)])
def test_every_sample_once_per_epoch_across_ranks_and_workers(wide_dir, num_workers, world_size):
    keys, views = [], {}
    for rank in range(world_size):
        for b in ShardLoader(_cfg(wide_dir, num_workers=num_workers, rank=rank, world_size=world_size, crop="mix")):
            keys += b["key"]
            views.update({k: h.tolist() for k, h in zip(b["key"], b["control_h"])})
    assert len(keys) == 48 and len(set(keys)) == 48
    ref = {k: h.tolist() for b in ShardLoader(_cfg(wide_dir, crop="mix")) for k, h in zip(b["key"], b["control_h"])}
    assert views == ref  # a sample's view depends neither on workers nor on ranks


def test_batch_order_is_deterministic_from_the_seed(wide_dir):
    def order(seed):
        return [(b["bucket"], b["key"]) for b in ShardLoader(_cfg(wide_dir, seed=seed, epochs=2))]

    assert order(0) == order(0)
    assert order(0) != order(1)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [3, 5])
def test_resume_with_partial_buckets_waiting_is_exact(wide_dir, num_workers, stop):
    cfg = _cfg(wide_dir, num_workers=num_workers, epochs=3, drop_last=True, crop="mix")
    ref = [(b["key"], b["image"]) for b in ShardLoader(cfg)]
    first = ShardLoader(cfg)
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    assert any(v[2] for v in state["slots"].values())  # samples are waiting in partial batches
    resumed = ShardLoader(cfg)
    resumed.load_state_dict(state)
    rest = [(b["key"], b["image"]) for b in resumed]
    assert len(ref) == stop + len(rest)
    for (k1, x1), (k2, x2) in zip(ref[stop:], rest):
        assert k1 == k2 and torch.equal(x1, x2)


def test_two_rank_resume_with_buckets(wide_dir):
    cfgs = [_cfg(wide_dir, rank=r, world_size=2, epochs=2, drop_last=True) for r in range(2)]
    refs = [[b["key"] for b in ShardLoader(c)] for c in cfgs]
    states = []
    for cfg in cfgs:
        loader = ShardLoader(cfg)
        it = iter(loader)
        for _ in range(2):
            next(it)
        states.append(loader.state_dict())
    merged = dict(states[0], slots=merge_positions([s["slots"] for s in states]))
    for cfg, ref in zip(cfgs, refs):
        loader = ShardLoader(cfg)
        loader.load_state_dict(merged)
        assert [b["key"] for b in loader] == ref[2:]
