"""FID features, statistics and reference sets: parity with clean-fid (distance, features, end to end),
sanity, reference-statistics cache."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from condiff.eval import features, reference, statistics
from condiff.io.images import to_uint8
from condiff.io.shards import expand_shards

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _images(n: int, seed: int, size: int = 32, shift: float = 0.0) -> torch.Tensor:
    """(n, 3, size, size) smooth random images in [-1, 1], brightened by `shift`."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (x + 0.2 * torch.randn(n, 3, size, size, generator=g) + shift).clamp(-1, 1)


def test_frechet_distance_equals_cleanfid():
    from cleanfid.fid import fid_from_feats

    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16)).astype(np.float32)
    b = (rng.normal(size=(150, 16)) * 1.3 + 0.4).astype(np.float32)
    ours = statistics.fid_from_features(a, b)
    ref = fid_from_feats(a, b)
    assert ours == pytest.approx(ref, rel=1e-10)
    # closed form for this case is far from 0: the check is not vacuous
    assert ours > 1.0


def test_fid_self_zero_and_grows_with_shift():
    ext = features.random_extractor(dim=16, size=32)
    base = ext.features(_images(64, 0))
    assert statistics.fid_from_features(base, base) == pytest.approx(0.0, abs=1e-6)
    fids = [statistics.fid_from_features(base, ext.features(_images(64, 1, shift=s))) for s in (0.0, 0.2, 0.5)]
    assert fids[0] < fids[1] < fids[2]
    assert fids[2] > 10 * fids[0]


def test_in_memory_features_match_cleanfid_folder_pipeline(tmp_path):
    """Our in-memory path (quantise, clean resize, extractor) == clean-fid reading the same PNGs."""
    from cleanfid import fid as cf

    ext = features.random_extractor(dim=8, size=299)  # the real "clean" resize: PIL bicubic float to 299
    imgs = _images(6, 3, size=40)
    for i, u8 in enumerate(to_uint8(imgs)):
        Image.fromarray(u8).save(tmp_path / f"{i:03d}.png")
    ours = ext.features(imgs)
    theirs = cf.get_folder_features(str(tmp_path), ext.fn, num_workers=0, batch_size=4,
                                    device=torch.device("cpu"), mode="clean", verbose=False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_fid_equals_cleanfid_compute_fid(tmp_path):
    from cleanfid import fid as cf

    ext = features.random_extractor(dim=8, size=48)
    a, b = _images(20, 4), _images(20, 5, shift=0.3)
    for name, imgs in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        for i, u8 in enumerate(to_uint8(imgs)):
            Image.fromarray(u8).save(tmp_path / name / f"{i:03d}.png")
    theirs = cf.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), custom_feat_extractor=ext.fn,
                            custom_fn_resize=ext.resize.build(), num_workers=0, batch_size=8,
                            device=torch.device("cpu"), verbose=False)
    ours = statistics.fid_from_features(ext.features(a), ext.features(b))
    assert ours == pytest.approx(theirs, rel=1e-6)


def _write_shards(dirpath: Path, n_shards: int, per_shard: int, seed: int, corrupt: bool = False) -> str:
    import webdataset as wds

    imgs = to_uint8(_images(n_shards * per_shard, seed, size=24))
    for s in range(n_shards):
        with wds.TarWriter(str(dirpath / f"ref-{s:03d}.tar")) as w:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(imgs[s * per_shard + i]).save(buf, format="PNG")
                w.write({"__key__": f"{s:03d}{i:04d}", "png": buf.getvalue(), "txt": "x"})
            if corrupt:
                w.write({"__key__": f"{s:03d}bad", "png": b"not a png", "txt": "x"})
    return str(dirpath) + "/ref-{000..%03d}.tar" % (n_shards - 1)


def test_reference_stats_cached_under_content_hash(tmp_path, monkeypatch):
    (tmp_path / "shards").mkdir()
    spec = _write_shards(tmp_path / "shards", 2, 6, seed=7, corrupt=True)
    ext = features.random_extractor(dim=8, size=32)
    logs = []
    ref = reference.reference_stats(spec, ext, 16, cache_dir=tmp_path / "cache", log=logs.append)
    assert ref.n == 12 and len(ref.key) == 32
    assert "2 skipped" in logs[0]
    assert (tmp_path / "cache" / "fid_ref" / f"{ref.key}.npz").is_file()
    # second call hits the cache: no image is read
    monkeypatch.setattr(reference, "shard_moments", lambda *a, **k: pytest.fail("cache miss"))
    again = reference.reference_stats(spec, ext, 16, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.mu, ref.mu)
    assert again.key == ref.key
    # the key depends on the extractor, the resolution and the shard bytes
    files = expand_shards(spec)
    other_ext = features.random_extractor(dim=8, size=32, seed=1)
    assert reference.reference_key(files, other_ext, 16, None, tmp_path / "cache") != ref.key
    assert reference.reference_key(files, ext, 20, None, tmp_path / "cache") != ref.key
    retrained = features.random_extractor(dim=8, size=32)  # same name, other weights
    with torch.no_grad():
        retrained.fn.convs[0].bias.add_(1.0)
    retrained.weights_sha256 = features.state_sha256(retrained.fn)
    assert retrained.name == ext.name and reference.reference_key(files, retrained, 16, None, tmp_path / "cache") != ref.key
    with open(files[0], "ab") as f:
        f.write(b"\0" * 512)
    assert reference.reference_key(files, ext, 16, None, tmp_path / "cache") != ref.key


def test_reference_stats_match_direct_features(tmp_path):
    (tmp_path / "shards").mkdir()
    spec = _write_shards(tmp_path / "shards", 1, 8, seed=9)
    ext = features.random_extractor(dim=8, size=32)
    ref = reference.reference_stats(spec, ext, 24, cache_dir=tmp_path / "cache", log=lambda s: None)
    direct = statistics.FidStats.from_features(ext.features(_images(8, 9, size=24)))
    np.testing.assert_allclose(ref.mu, direct.mu, rtol=1e-6, atol=1e-6)


def test_missing_inception_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        features.resolve_inception_path(tmp_path / "nowhere")
    msg = str(err.value)
    assert features.INCEPTION_FILE in msg and features.INCEPTION_ENV in msg and "--inception" in msg
    looked = msg.split("Looked in:")[1].split()
    assert looked == [str(tmp_path / "nowhere"), str(tmp_path / "cache" / features.INCEPTION_FILE)]  # never /tmp


def test_bad_extractor_spec():
    with pytest.raises(ValueError, match="random"):
        features.build_extractor("resnet")


def test_moments_equal_np_cov_and_merge():
    rng = np.random.default_rng(1)
    a = rng.normal(3.0, 0.5, size=(50, 6))
    b = rng.normal(2.0, 1.5, size=(70, 6))
    direct = statistics.FidStats.from_features(np.concatenate([a, b]))
    merged = statistics.Moments().update(a[:20]).update(a[20:]).merge(statistics.Moments().update(b)).stats()
    assert merged.n == 120
    np.testing.assert_allclose(merged.mu, direct.mu, rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, direct.sigma, rtol=1e-10, atol=1e-12)
