"""Webdataset shard reader: splitting without duplicates, seeded shuffling, exact resume, bad input."""

import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from condiff.data import shapes
from condiff.data.loader import LoaderConfig, ShardLoader, merge_positions
from condiff.io.shards import expand_shards
from condiff.data.make_shards import write_shapes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    write_shapes(out, n=40, seed=0, preset="demo", shard_size=10)  # 4 shards x 10 samples
    return out


def _cfg(shards, **kw):
    base = dict(shards=shards, batch_size=4, resolution=16, epochs=1, drop_last=False, shuffle_buffer=8)
    base.update(kw)
    return LoaderConfig(**base)


def _keys(loader):
    return [k for b in loader for k in b["key"]]


def _jpeg(arr_or_img, fmt="JPEG", **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_batch_contract(shapes_dir):
    batch = next(iter(ShardLoader(_cfg(shapes_dir, conditioning="class"))))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    assert batch["control_h"].shape == (4, 6) and batch["control_l"].shape == (4, 2)
    assert batch["control_h"].dtype == batch["control_l"].dtype == torch.float32
    assert len(batch["caption"]) == len(batch["key"]) == 4
    # the original size recorded by make-shards is what the loader reports
    for key, cl in zip(batch["key"], batch["control_l"]):
        w, h = shapes.render(int(key), "demo", 0).image.size
        assert cl.tolist() == [h, w]
    meta = json.load(open(os.path.join(shapes_dir, "dataset.json")))
    assert meta["num_classes"] == 8


@pytest.mark.parametrize("num_workers,world_size", [(0, 1), (2, 1), (0, 3), (2, 2)])
def test_every_sample_exactly_once_per_epoch(shapes_dir, num_workers, world_size):
    keys = []
    for rank in range(world_size):
        keys += _keys(ShardLoader(_cfg(shapes_dir, num_workers=num_workers, rank=rank, world_size=world_size)))
    assert len(keys) == 40 and len(set(keys)) == 40


def test_views_do_not_depend_on_workers_or_ranks(shapes_dir):
    def views(**kw):
        out = {}
        for b in ShardLoader(_cfg(shapes_dir, crop="mix", **kw)):
            out.update({k: (h.tolist(), x) for k, h, x in zip(b["key"], b["control_h"], b["image"])})
        return out

    a = views(num_workers=0)
    b = {**views(num_workers=2, rank=0, world_size=2), **views(num_workers=2, rank=1, world_size=2)}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0]
        torch.testing.assert_close(a[k][1], b[k][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank 2"):
        ShardLoader(_cfg(shapes_dir, rank=2, world_size=2))


def test_fewer_shards_than_slots_splits_samples(shapes_dir):
    one = os.path.join(shapes_dir, "shard-000000.tar")
    keys = []
    for rank in range(2):
        keys += _keys(ShardLoader(_cfg(one, num_workers=2, rank=rank, world_size=2)))
    assert sorted(keys) == [f"{i:09d}" for i in range(10)]


def test_seeded_shuffle(shapes_dir):
    a = _keys(ShardLoader(_cfg(shapes_dir, seed=1)))
    b = _keys(ShardLoader(_cfg(shapes_dir, seed=1)))
    c = _keys(ShardLoader(_cfg(shapes_dir, seed=2)))
    assert a == b and a != c and sorted(a) == sorted(c)
    assert a != sorted(a)
    two = _keys(ShardLoader(_cfg(shapes_dir, seed=1, epochs=2)))
    assert sorted(two[:40]) == sorted(two[40:]) and two[:40] != two[40:]  # a new order each epoch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_stream(shapes_dir, num_workers):
    cfg = _cfg(shapes_dir, epochs=None, num_workers=num_workers, crop="mix", drop_last=True)
    full = ShardLoader(cfg)
    it = iter(full)
    ref = [next(it) for _ in range(14)]  # > 1 epoch: 40 samples = 10 batches
    first = ShardLoader(cfg)
    it = iter(first)
    for _ in range(6):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    resumed = ShardLoader(cfg)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for want in ref[6:]:
        got = next(it)
        assert got["key"] == want["key"]
        torch.testing.assert_close(got["image"], want["image"], rtol=0, atol=0)
        torch.testing.assert_close(got["control_h"], want["control_h"], rtol=0, atol=0)


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_resume_at_odd_and_even_batch_counts_continues_the_worker_rotation(shapes_dir, num_workers):
    """DataLoader takes batches from its workers round-robin starting at worker 0; a position saved
    after any batch count resumes with the worker whose batch is due (not worker 0)."""
    cfg = _cfg(shapes_dir, epochs=None, num_workers=num_workers, drop_last=True, shuffle_buffer=4)
    it = iter(ShardLoader(cfg))
    ref = [next(it)["key"] for _ in range(9)]
    for saved_at in (4, 5):
        first = ShardLoader(cfg)
        it = iter(first)
        for _ in range(saved_at):
            next(it)
        resumed = ShardLoader(cfg)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        it = iter(resumed)
        got = [next(it)["key"] for _ in range(9 - saved_at)]
        assert got == ref[saved_at:], f"{num_workers} workers, saved after {saved_at} batches"


def test_two_rank_resume_from_a_merged_position(shapes_dir):
    cfgs = [_cfg(shapes_dir, epochs=None, rank=r, world_size=2, drop_last=True, shuffle_buffer=4) for r in range(2)]
    refs = []
    for cfg in cfgs:
        it = iter(ShardLoader(cfg))
        refs.append([next(it)["key"] for _ in range(8)])
    states = []
    for cfg in cfgs:
        loader = ShardLoader(cfg)
        it = iter(loader)
        for _ in range(3):
            next(it)
        states.append(loader.state_dict())
    merged = dict(states[0], slots=merge_positions([s["slots"] for s in states]))
    assert sorted(merged["slots"]) == ["0", "1"]
    for cfg, ref in zip(cfgs, refs):
        loader = ShardLoader(cfg)
        loader.load_state_dict(merged)
        it = iter(loader)
        assert [next(it)["key"] for _ in range(5)] == ref[3:]


def test_position_checks_and_merge(shapes_dir):
    loader = ShardLoader(_cfg(shapes_dir, num_workers=0))
    next(iter(loader))
    state = loader.state_dict()
    assert state["slots"] == {"0": [0, state["slots"]["0"][1], []]} and state["world_size"] == 1
    other = ShardLoader(_cfg(shapes_dir, num_workers=2))
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)
    other = ShardLoader(_cfg(shapes_dir, seed=5))
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    other = ShardLoader(_cfg(shapes_dir, buckets=[[16, 32], [32, 16]]))
    with pytest.raises(ValueError, match="buckets"):
        other.load_state_dict(state)
    assert merge_positions([{"0": [1, 2]}, {"1": [0, 5]}]) == {"0": [1, 2], "1": [0, 5]}


def test_shard_specs(shapes_dir):
    all4 = expand_shards(shapes_dir)
    assert len(all4) == 4
    assert expand_shards(os.path.join(shapes_dir, "shard-{000000..000001}.tar")) == all4[:2]
    assert expand_shards(os.path.join(shapes_dir, "shard-00000[23].tar")) == all4[2:]
    assert expand_shards([all4[0], all4[3]]) == [all4[0], all4[3]]
    assert expand_shards(f"{all4[0]}::{all4[1]}") == all4[:2]
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_shards(os.path.join(shapes_dir, "nope-{0..1}.tar"))


def _write(path, samples):
    with TarWriter(path) as w:
        for s in samples:
            w.write(s)


def test_img2dataset_layout_json_caption_webp_and_original_size(tmp_path):
    # img2dataset: caption in txt or json, stored image resized from an original of known size
    rgb = np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)
    _write(str(tmp_path / "a.tar"), [
        {"__key__": "000", "jpg": _jpeg(rgb), "txt": "a cat", "json": {"original_width": 160, "original_height": 100, "width": 80, "height": 50}},
        {"__key__": "001", "webp": _jpeg(rgb, "WEBP"), "json": {"caption": "from json", "width": 80, "height": 50}},
    ])
    batch = next(iter(ShardLoader(_cfg(str(tmp_path / "a.tar"), conditioning="text", shuffle_buffer=0, flip_prob=0.0, crop="center"))))
    assert batch["caption"] == ["a cat", "from json"]
    assert "label" not in batch
    assert batch["control_l"].tolist() == [[100.0, 160.0], [50.0, 80.0]]
    # centre crop of the 50 x 80 stored image: rows 0..50, cols 15..65 -> doubled in original pixels
    assert batch["control_h"][0].tolist() == [0.0, 30.0, 100.0, 100.0, 1.0, 0.0]
    assert batch["control_h"][1].tolist() == [0.0, 15.0, 50.0, 50.0, 1.0, 0.0]


def test_bad_samples_are_skipped_counted_and_named(tmp_path, caplog):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    good = _jpeg(rgb)
    cmyk = _jpeg(Image.fromarray(rgb).convert("CMYK"))
    samples = [
        {"__key__": "good", "jpg": good, "cls": 1, "txt": "x"},
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "cls": 1},
        {"__key__": "truncated", "jpg": good[: len(good) // 2], "cls": 1},
        {"__key__": "nolabel", "jpg": good, "txt": "no cls"},
        {"__key__": "noimage", "txt": "nothing", "cls": 2},
        {"__key__": "tiny", "png": _jpeg(rgb[:5, :7], "PNG"), "cls": 1},
        {"__key__": "gray", "png": _jpeg(rgb[..., 0], "PNG"), "cls": 3},
        {"__key__": "cmyk", "jpg": cmyk, "cls": 4},
        {"__key__": "alpha", "png": _jpeg(Image.fromarray(rgb).convert("RGBA"), "PNG"), "cls": 5},
        {"__key__": "badjson", "jpg": good, "cls": 1, "json": b"{not json"},
        {"__key__": "badcls", "jpg": good, "cls": b"dog"},
    ]
    _write(str(tmp_path / "bad.tar"), samples)
    loader = ShardLoader(_cfg(str(tmp_path / "bad.tar"), conditioning="class", min_size=8, shuffle_buffer=0))
    with caplog.at_level(logging.WARNING, logger="condiff.data"):
        keys = _keys(loader)
    assert keys == ["good", "gray", "cmyk", "alpha"]
    s = loader.stats
    assert s["read"] == len(samples) and s["samples"] == 4
    assert s["skipped_corrupt_image"] == 2 and s["skipped_missing_label"] == s["skipped_bad_label"] == 1 and s["skipped_no_image"] == 1
    assert s["skipped_too_small"] == 1 and s["skipped_bad_json"] == 1
    assert s["converted_L"] == s["converted_CMYK"] == s["converted_RGBA"] == 1
    for key in ("corrupt", "truncated", "nolabel", "noimage", "tiny", "badjson", "badcls"):
        assert any(repr(key) in r.getMessage() for r in caplog.records), key
    assert "skipped" in loader.report() and "converted" in loader.report()
    # text data: the sample without a caption is the one skipped
    text = ShardLoader(_cfg(str(tmp_path / "bad.tar"), conditioning="text", min_size=0, shuffle_buffer=0))
    assert _keys(text) == ["good", "nolabel"] and text.stats["skipped_missing_caption"] == 7


def test_truncated_and_missing_tar_do_not_stop_the_stream(shapes_dir, tmp_path):
    src = os.path.join(shapes_dir, "shard-000000.tar")
    data = open(src, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])  # cut in the middle of a member
    good = os.path.join(shapes_dir, "shard-000001.tar")
    loader = ShardLoader(_cfg([str(cut), good], shuffle_shards=False, shuffle_buffer=0))
    keys = _keys(loader)
    assert 10 + 2 <= len(keys) < 20 and len(set(keys)) == len(keys)
    assert set(f"{i:09d}" for i in range(10, 20)) <= set(keys)  # the next shard is read whole
    assert loader.stats["shard_errors"] >= 1
    # a shard deleted after listing: counted, the others still read
    gone = tmp_path / "gone.tar"
    gone.write_bytes(data)
    loader = ShardLoader(_cfg([str(gone), good], shuffle_shards=False))
    gone.unlink()
    assert len(_keys(loader)) == 10 and loader.stats["shard_errors"] == 1


def test_no_readable_sample_is_a_clear_error(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(RuntimeError, match="no readable sample"):
        _keys(ShardLoader(_cfg(str(tmp_path / "junk.tar"))))
    with pytest.raises(ValueError, match="conditioning"):
        LoaderConfig(shards="x", conditioning="labels")


def test_no_usable_sample_is_a_clear_error_not_an_endless_loop(tmp_path):
    _write(str(tmp_path / "a.tar"), [{"__key__": f"{i}", "png": _jpeg(np.zeros((4, 4, 3), np.uint8), "PNG"), "cls": 0} for i in range(3)])
    with pytest.raises(RuntimeError, match="no usable sample.*missing_caption"):
        next(iter(ShardLoader(_cfg(str(tmp_path / "a.tar"), conditioning="text", epochs=None))))
