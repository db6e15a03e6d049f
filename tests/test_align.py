"""The analytic shapes-alignment detector on the dataset's own images: ground truth ~100 %, shuffled
captions at the chance level a perfect detector gets, mirrored images break left/right only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from condiff.data import shapes
from condiff.eval import align as A
from condiff.eval.reference import center_crop_arr


@pytest.fixture(scope="module")
def default64():
    return A.validate("default", 64, n=160, seed=11)


@pytest.fixture(scope="module")
def demo32():
    return A.validate("demo", 32, n=160, seed=12)


def test_ground_truth_default_preset(default64):
    r = default64["ground_truth"]
    assert r["n"] == 160 and r["n_relation"] > 100  # both one- and two-object captions are covered
    assert r["colour"] >= 0.99 and r["count"] >= 0.99
    assert r["shape"] >= 0.99 and r["relation"] >= 0.99
    assert r["overall"] >= 0.98


def test_ground_truth_demo_preset_at_32px(demo32):
    r = demo32["ground_truth"]
    assert r["colour"] == 1.0 and r["relation"] == 1.0
    assert r["overall"] >= 0.98


def test_ground_truth_demo_preset_at_16px():
    """`condiff demo` trains at 16 px: objects are 5-6 px wide there."""
    r = A.validate("demo", 16, n=96, seed=13)["ground_truth"]
    assert r["colour"] == 1.0 and r["relation"] == 1.0 and r["overall"] >= 0.97


@pytest.mark.parametrize("which", ["default64", "demo32"])
def test_shuffled_captions_at_chance(which, request):
    r = request.getfixturevalue(which)
    got, chance, truth = r["shuffled"], r["oracle"], r["ground_truth"]
    for m in ("colour", "shape", "overall"):
        assert abs(got[m] - chance[m]) <= 0.06, (m, got[m], chance[m])
        assert got[m] < truth[m] or truth[m] == chance[m] == 1.0
    assert got["overall"] < 0.3
    assert got["relation"] <= chance["relation"] + 0.08


@pytest.mark.parametrize("which", ["default64", "demo32"])
def test_mirrored_images_swap_left_and_right(which, request):
    """A horizontal flip keeps colours and shapes and makes left/right relations wrong (identical-object
    pairs, possible in the default preset, are right in either order)."""
    r = request.getfixturevalue(which)["mirrored"]
    assert r["n"] > 50 and r["colour"] >= 0.99 and r["shape"] >= 0.99
    assert r["relation_given_found"] <= (0.0 if which == "demo32" else 0.08)


def test_score_images_float_and_uint8_agree():
    samples = [shapes.render(i, "demo", seed=3) for i in range(16)]
    u8 = torch.from_numpy(np.stack([center_crop_arr(s.image, 32) for s in samples])).permute(0, 3, 1, 2)
    caps = [s.caption for s in samples]
    assert A.score_images(u8.float() / 127.5 - 1, caps) == A.score_images(u8, caps)
    assert A.score_images(u8, caps)["overall"] >= 0.9


def test_detect_reads_a_known_image():
    s = shapes.render(3, "default", seed=0)
    dets = A.detect(np.asarray(s.image))
    objs = s.entry[1:]
    assert sorted((d.colour, d.shape) for d in dets) == sorted(objs)
    if s.entry[0] == "horizontal":
        left = min(dets, key=lambda d: d.x)
        assert (left.colour, left.shape) == objs[0]


def test_empty_image_and_bad_input():
    r = A.score_images(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), ["a red circle", "a blue square above a red star"])
    assert r["colour"] == 0.0 and r["overall"] == 0.0 and r["n_relation"] == 1
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        A.score_images(torch.zeros(2, 3, 8, 8), ["a red circle"])
    with pytest.raises(ValueError, match="shapes grammar"):
        A.score_images(torch.zeros(1, 3, 8, 8), ["a photo of a dog"])


def test_robust_to_blur_noise_dimming():
    """Generated images are soft, noisy and off-colour: a Gaussian blur, N(0, 40/255) pixel noise, 30 %
    dimming and 40 % desaturation keep every attribute readable at 32 px."""
    from PIL import Image, ImageFilter

    samples = [shapes.render(i, "demo", seed=21) for i in range(48)]
    base = np.stack([center_crop_arr(s.image, 32) for s in samples])
    caps = [s.caption for s in samples]
    rng = np.random.default_rng(0)
    degraded = {
        "blur": np.stack([np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(1.0))) for a in base]),
        "noise": np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8),
        "dim": (base * 0.7).astype(np.uint8),
        "desaturate": (0.6 * base + 0.4 * base.mean(3, keepdims=True)).astype(np.uint8),
    }
    for name, imgs in degraded.items():
        r = A.score_images(torch.from_numpy(imgs).permute(0, 3, 1, 2), caps)
        assert r["colour"] == 1.0 and r["relation"] == 1.0 and r["overall"] >= 0.95, (name, r)
