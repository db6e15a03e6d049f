"""Toy-scale metrics: the shapes feature network (deterministic, cached, accurate), the shapes Frechet distance
(FID's code path; 0 against itself, growing with corruption) and the content-change score (known cases)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from condiff.data import shapes
from condiff.eval import content_change as cc
from condiff.eval import shapes_features as sf
from condiff.eval.features import ResizeSpec, build_extractor, state_sha256
from condiff.eval.metrics.base import Stream
from condiff.eval.reference import center_crop_arr
from condiff.eval.statistics import fid_from_features

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = sf.ShapesNetSettings(presets=(("demo", 400), ("default", 400)), val_images=200, epochs=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ext(cache):
    """The feature network of SMALL settings, trained once for the module into a temporary cache."""
    return sf.shapes_extractor(cache_dir=cache, settings=SMALL)


@pytest.fixture(scope="module")
def default_cache(ext, cache, tmp_path_factory):
    """A cache holding ext's files under the DEFAULT settings' key: what the default extractor loads (same
    architecture), so that the CLI paths run without training the default network."""
    root = tmp_path_factory.mktemp("default_cache")
    (root / "shapes_features").mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(cache / "shapes_features" / f"{SMALL.key()}{suffix}",
                    root / "shapes_features" / f"{sf.ShapesNetSettings().key()}{suffix}")
    return root


def render(preset: str, n: int, res: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    """(n, 3, res, res) uint8 shapes images (ADM centre crop)."""
    imgs = [center_crop_arr(shapes.render(i, preset, seed).image, res) for i in range(start, start + n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    if sigma == 0:
        return images
    out = gaussian_blur(images.float(), kernel_size=2 * int(np.ceil(3 * sigma)) + 1, sigma=sigma)
    return out.round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------ feature network
def test_training_is_deterministic():
    tiny = sf.ShapesNetSettings(presets=(("demo", 64),), val_images=16, epochs=1)
    (a, info_a), (b, info_b) = (sf.train(tiny, ResizeSpec(size=sf.INPUT_SIZE)) for _ in range(2))
    assert state_sha256(a) == state_sha256(b) and info_a["accuracy"] == info_b["accuracy"]
    x = render("demo", 4, 32).float()
    assert not torch.equal(a(x), sf.ShapesNet().eval()(x))  # trained, not the initialisation


def test_extractor_is_cached(ext, cache, monkeypatch):
    x = render("demo", 8, 32, seed=3)
    np.testing.assert_array_equal(ext.features(x), ext.features(x))
    # the second request loads the cached weights (no training)
    monkeypatch.setattr(sf, "train", lambda *a: pytest.fail("retrained although cached"))
    again = sf.shapes_extractor(cache_dir=cache, settings=SMALL)
    assert again.weights_sha256 == ext.weights_sha256 and again.info == ext.info
    np.testing.assert_array_equal(again.features(x), ext.features(x))
    assert ext.name == f"shapes-cnn:{SMALL.key()}" and SMALL.key() != sf.ShapesNetSettings().key()


def test_extractor_accuracy_and_inputs(ext):
    acc = ext.info["accuracy"]
    assert set(acc) == {"demo", "default"} and set(acc["demo"]) == {*sf.HEADS, "all"}
    # demo: 2 colours, 2 shapes, always left/right; chance is 0.5 for colour1 and shape1
    assert acc["demo"]["colour1"] >= 0.95 and acc["demo"]["layout"] >= 0.95 and acc["demo"]["shape1"] >= 0.7
    assert acc["default"]["colour1"] >= 0.35  # chance 1/6 (these small settings see 400 default images)
    for res in (16, 24, 32, 64):  # any size in 16-64 px goes through the clean resize to 32 px
        assert ext.features(render("demo", 3, res)).shape == (3, SMALL.dim)
    with pytest.raises(ValueError, match="input is 32 px"):
        sf.load_or_train(SMALL, resize=ResizeSpec(size=64))


def test_labels_follow_canonical_order():
    entry = ("horizontal", ("red", "star"), ("blue", "circle"))
    assert sf.labels_of(entry) == {"colour1": 0, "shape1": 3, "colour2": 2, "shape2": 0, "layout": 1}
    assert sf.labels_of(("single", ("cyan", "square"))) == {"colour1": 5, "shape1": 1, "colour2": 6, "shape2": 4,
                                                             "layout": 0}


def test_build_extractor_shapes_loads_the_default_cache(default_cache, ext, monkeypatch):
    monkeypatch.setenv("CONDIFF_CACHE", str(default_cache))
    monkeypatch.setattr(sf, "train", lambda *a: pytest.fail("retrained although cached"))
    e = build_extractor("shapes")
    assert e.weights_sha256 == ext.weights_sha256 and e.info["accuracy"] == ext.info["accuracy"]
    with pytest.raises(ValueError, match="'shapes'"):
        build_extractor("shape")


@pytest.mark.slow
def test_default_extractor_accuracy(tmp_path, monkeypatch):
    """The default network (what `build_extractor("shapes")` trains): the bars benchmarks/RESULTS.md quotes."""
    monkeypatch.setenv("CONDIFF_CACHE", str(tmp_path))
    acc = build_extractor("shapes").info["accuracy"]
    assert acc["demo"]["all"] >= 0.95 and acc["default"]["colour1"] >= 0.9 and acc["default"]["shape1"] >= 0.8


# ------------------------------------------------------------------------------ shapes Frechet distance
def test_shapes_fd_is_fid_code_path_and_grows_with_corruption(ext, cache):
    from condiff.eval.metrics.shapes_fd import ShapesFd
    from condiff.eval.reference import shapes_reference_stats
    from condiff.eval.statistics import FidStats, frechet_distance

    n = 300
    clean = render("demo", n, 32, seed=7)  # other seed than the reference (0)

    def fd(images):
        m = ShapesFd(Stream(n), 32, "demo", ref_n=n, extractor=ext, cache_dir=cache, log=lambda s: None)
        m.update(images[: n // 2], range(n // 2))
        m.update(images[n // 2:], range(n // 2, n))
        return m.compute()["shapes_fd"]

    feats = ext.features(clean)
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-6)
    ref = shapes_reference_stats(ext, 32, "demo", n, cache_dir=cache, log=lambda s: None)
    assert frechet_distance(FidStats.from_features(feats), ref) == pytest.approx(fd(clean), rel=1e-6)
    ref_feats = ext.features(render("demo", n, 32, seed=0))
    assert ref.mu == pytest.approx(ref_feats.mean(0), abs=1e-5)
    base = fd(clean)
    blurred = [fd(blur(clean, s)) for s in (0.6, 1.2, 2.4)]
    assert base < blurred[0] < blurred[1] < blurred[2], (base, blurred)
    swapped = fd(clean[:, [2, 1, 0]])  # RGB -> BGR: red objects turn blue-ish, blue ones red-ish (off-palette)
    other = fd(render("default", n, 32, seed=7))
    # SMALL: clean 3.0 (the finite-sample bias), swapped 21, blur 1.2 px 16, other preset 1035
    for name, value, factor in (("swapped", swapped, 4), ("blur", blurred[1], 4), ("other preset", other, 100)):
        assert value > factor * base, (name, value, base)


def test_shapes_fd_checks_resolution_and_caches_reference(ext, cache):
    from condiff.eval.metrics.shapes_fd import ShapesFd

    m = ShapesFd(Stream(4), 32, "demo", ref_n=50, extractor=ext, cache_dir=cache, log=lambda s: None)
    files = sorted((cache / "fid_ref").glob("*.npz"))
    assert any(f.stem == m.reference.key for f in files)
    again = ShapesFd(Stream(4), 32, "demo", ref_n=50, extractor=ext, cache_dir=cache, log=pytest.fail)  # no recompute
    np.testing.assert_array_equal(again.reference.sigma, m.reference.sigma)
    with pytest.raises(ValueError, match=r"shapes-fd: expected \(B, 3, 32, 32\)"):
        m.update(render("demo", 2, 16), [0, 1])
    assert m.settings()["shapes_fd_accuracy"] == ext.info["accuracy"]


# ----------------------------------------------------------------------------------------- content change
def test_content_change_known_cases():
    a = render("demo", 16, 32)
    same = cc.content_change(a, a.clone())
    assert same["score"] == 0.0 and same["object_change"] == 0.0 and same["pixel_lowpass"] == 0.0 and same["n"] == 16
    mirrored = cc.content_change(a, a.flip(-1))  # two objects of two colours, left/right swapped
    assert mirrored["score"] > 0.8 and mirrored["object_change"] > 0.8
    unrelated = cc.content_change(a, render("demo", 16, 32, start=1000))
    assert unrelated["score"] > 0.6
    shifted = cc.content_change(a, torch.cat([a[..., :1], a[..., :-1]], -1))  # 1 px to the right
    assert shifted["score"] < 0.15 and shifted["displacement"] == pytest.approx(1 / 32, abs=0.01)
    g = torch.Generator().manual_seed(0)
    noisy = (a.float() + 8 * torch.randn(a.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
    assert cc.content_change(a, noisy)["score"] < 0.05
    assert mirrored["score"] > 5 * shifted["score"]


def test_content_change_hand_computed_object_terms():
    def square(colour, x0, size=64):
        img = np.full((size, size, 3), 20, np.uint8)
        img[24:36, x0:x0 + 12] = shapes.COLOURS[colour]
        return torch.from_numpy(img).permute(2, 0, 1)[None]

    moved = cc.content_change(square("red", 10), square("red", 18))  # 8 px of 64 = 0.125 of the side
    assert moved["object_change"] == pytest.approx(0.125 / cc.DISPLACEMENT_SCALE, abs=1e-9)
    assert moved["unmatched"] == 0.0 and moved["shape_change"] == 0.0
    recoloured = cc.content_change(square("red", 10), square("blue", 10))  # no same-colour match: 2 objects, unmatched
    assert recoloured["object_change"] == 1.0 and recoloured["unmatched"] == 1.0
    p = cc.lowpass_distance(cc.as_uint8(square("red", 10), "a")[0], cc.as_uint8(square("blue", 10), "b")[0])
    assert recoloured["score"] == pytest.approx(0.5 * (1.0 + min(1.0, p / cc.PIXEL_SCALE)))


def test_content_change_input_forms_and_errors():
    a = render("demo", 4, 32)
    b = a.flip(-1)
    ref = cc.content_change(a, b)
    as_pm1 = lambda x: x.float() / 127.5 - 1.0  # noqa: E731
    assert cc.content_change(as_pm1(a), as_pm1(b)) == ref
    assert cc.content_change(a.float() / 255, b.float() / 255, value_range=(0, 1)) == ref
    assert cc.content_change(a.numpy(), b.numpy()) == ref
    with pytest.raises(ValueError, match="images_b.*outside value_range"):
        cc.content_change(as_pm1(a), b.float())  # float 0..255 is not an accepted form
    with pytest.raises(ValueError, match="value_range=\\(0, 1\\)"):
        cc.content_change(a.float() / 255 * 2, b.float() / 255)
    with pytest.raises(ValueError, match="differ"):
        cc.content_change(a, b[:3])
    with pytest.raises(ValueError, match="images_a: expected \\(N >= 1, 3, H, W\\)"):
        cc.content_change(a[:, :1], b[:, :1])
    with pytest.raises(ValueError, match="images_a: expected \\(N >= 1"):
        cc.content_change(a[:0], b[:0])
    with pytest.raises(ValueError, match="uint8 or floating point.*int32"):
        cc.content_change(a.int(), b.int())
    with pytest.raises(ValueError, match="NaN"):
        cc.content_change(torch.full(a.shape, float("nan")), as_pm1(b))
    with pytest.raises(ValueError, match="torch tensor or numpy array"):
        cc.content_change(a.tolist(), b)


def test_sweep_change_and_metric_merge():
    from condiff.eval.metrics.content_change import ContentChange

    a = render("demo", 6, 32)
    sweeps = torch.stack([a, a, a.flip(-1)], dim=1)  # (6, K = 3, 3, 32, 32): sizes (32, 48, 64) say
    mirror = cc.content_change(a, a.flip(-1))
    out = cc.sweep_change(sweeps)
    assert out["score"] == pytest.approx(0.5 * mirror["score"]) and out["n"] == 12
    assert cc.sweep_change(sweeps, ref=2)["score"] == pytest.approx(mirror["score"])  # both others are unmirrored
    one = ContentChange(Stream(6, (32, 48, 64)))
    one.update(sweeps, range(6))
    ranks = [ContentChange(Stream(6, (32, 48, 64))) for _ in range(2)]
    ranks[0].update(sweeps[0::2], [0, 2, 4])
    ranks[1].update(sweeps[1::2], [1, 3, 5])
    ranks[0].merge([r.state() for r in ranks])
    assert ranks[0].compute() == one.compute()
    assert one.compute()["content_change"] == pytest.approx(out["score"])
    with pytest.raises(ValueError, match="reference size 40"):
        ContentChange(Stream(6, (32, 48, 64)), ref_size=40)
    with pytest.raises(ValueError, match="size-sweep stream"):
        ContentChange(Stream(6))
    with pytest.raises(ValueError, match="K >= 2"):
        cc.sweep_change(sweeps[:, :1])


# ------------------------------------------------------------------------------------------ condiff eval
def test_condiff_eval_shapes_fd_and_content_change(default_cache, ext, tmp_path, monkeypatch):
    """`condiff eval --metrics shapes-fd,content-change` on a tiny random class-conditional checkpoint."""
    from condiff.diffusion import Schedule
    from condiff.eval import manifest as M
    from condiff.eval.__main__ import main
    from condiff.io.checkpoint import save_checkpoint
    from condiff.models import create

    model = create("dit-tiny", conditioning="class", in_channels=3, input_size=16, num_classes=8, depth=1,
                   hidden_size=32, num_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    save_checkpoint(tmp_path / "run", 5, model_state=state, ema_state=state,
                    meta={"model": model.config, "schedule": Schedule().to_dict(), "text_encoder": None,
                          "autoencoder": None, "train_sizes": [[32, 32], [48, 64]]})
    monkeypatch.setattr(sf, "train", lambda *a: pytest.fail("retrained although cached"))
    assert main(["--checkpoint", str(tmp_path / "run"), "--metrics", "shapes-fd,content-change", "--n", "4",
                 "--steps", "1", "--prompts", "shapes:demo", "--shapes-ref-n", "20", "--lpips-prompts", "2",
                 "--lpips-sizes", "16,32", "--cache-dir", str(default_cache), "--out", str(tmp_path / "out"),
                 "--grid", "0"]) == 0
    m = M.load(tmp_path / "out")
    assert m.metrics["shapes_fd"] > 0 and 0.0 <= m.metrics["content_change"] <= 1.0
    assert m.metrics["content_change/n"] == 2  # 2 prompts x (2 sizes - 1)
    assert m.settings["shapes_fd_preset"] == "demo" and m.settings["shapes_fd_ref_n"] == 20
    assert m.settings["content_change_sizes"] == [16, 32] and m.settings["content_change_ref_size"] == 16
