"""Crop/flip transforms: the control metadata describes exactly what was done to the pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from condiff.conditioning.cond import CONTROL_H_FIELDS, CONTROL_L_FIELDS
from condiff.data import shapes
from condiff.data.transforms import CROP_RATIOS, CropTransform, apply_crop, sample_crop, to_rgb, to_tensor
from condiff.io.images import to_uint8

H = {name: i for i, name in enumerate(CONTROL_H_FIELDS)}
L = {name: i for i, name in enumerate(CONTROL_L_FIELDS)}


def _reapply(src: np.ndarray, control_h: np.ndarray, resolution, resample) -> np.ndarray:
    """Independent re-application of the metadata: numpy slicing, PIL resize, numpy mirror."""
    top, left = int(control_h[H["crop_top"]]), int(control_h[H["crop_left"]])
    h, w = int(control_h[H["crop_height"]]), int(control_h[H["crop_width"]])
    crop = src[top : top + h, left : left + w]
    out_h, out_w = (resolution, resolution) if isinstance(resolution, int) else resolution
    out = np.asarray(Image.fromarray(crop).resize((out_w, out_h), resample))
    return out[:, ::-1] if control_h[H["flip"]] == 1.0 else out


@pytest.mark.parametrize("strategy", ["global", "local", "mix", "center"])
def test_metadata_reapplied_to_real_photo_reproduces_pixels(strategy):
    (name, photo), = shapes.skimage_photos(("coffee",))  # 600 x 400 real photo
    src = np.asarray(photo)
    t = CropTransform(64, strategy, flip_prob=0.5)
    flips = set()
    for i in range(12):
        x, control_h, control_l, _ = t(photo, np.random.default_rng(i))
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert control_h.shape == (6,) and control_l.shape == (2,)
        assert control_l.tolist() == [400.0, 600.0]  # [orig_height, orig_width]
        assert control_h[H["aspect_ratio"]] == control_h[H["crop_width"]] / control_h[H["crop_height"]] == 1.0
        np.testing.assert_array_equal(to_uint8(x), _reapply(src, control_h, 64, Image.BICUBIC))
        lo, hi = CROP_RATIOS[strategy]
        ratio = control_h[H["crop_height"]] / 400
        assert lo - 1e-2 <= ratio <= hi + 1e-2
        flips.add(float(control_h[H["flip"]]))
    if strategy != "center":
        assert flips == {0.0, 1.0}


@pytest.mark.parametrize("strategy", ["global", "local", "center"])
def test_non_square_crop_carries_its_real_aspect(strategy):
    """A (H, W) target takes crops of aspect W / H; control_h's aspect_ratio is that box's width / height."""
    (name, photo), = shapes.skimage_photos(("coffee",))  # 600 x 400
    src = np.asarray(photo)
    for target in ((32, 64), (48, 24)):
        t = CropTransform(target, strategy, flip_prob=0.5)
        for i in range(6):
            x, control_h, _, p = t(photo, np.random.default_rng(i))
            assert x.shape == (3, *target)
            aspect = control_h[H["aspect_ratio"]]
            assert aspect == pytest.approx(control_h[H["crop_width"]] / control_h[H["crop_height"]], rel=1e-6)
            assert aspect == pytest.approx(target[1] / target[0], rel=0.02) and p.width is not None
            np.testing.assert_array_equal(to_uint8(x), _reapply(src, control_h, target, Image.BICUBIC))


def test_coordinate_image_nearest_pins_box_and_flip_semantics():
    # pixel (y, x) encodes its own coordinates: the output corners tell where the crop was taken.
    h, w = 200, 250
    yy, xx = np.mgrid[0:h, 0:w]
    src = np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.uint8)
    img = Image.fromarray(src)
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = sample_crop(h, w, "local", rng, flip_prob=0.5)
        out = np.asarray(apply_crop(img, p, p.size, "nearest"))  # no resize: pure crop (+ mirror)
        control_h, _ = p.control((h, w))
        top, left, size = control_h[H["crop_top"]], control_h[H["crop_left"]], control_h[H["crop_height"]]
        col0 = out[0, -1] if control_h[H["flip"]] else out[0, 0]  # the source's left edge
        assert (col0[0], col0[1]) == (top, left)
        col1 = out[-1, 0] if control_h[H["flip"]] else out[-1, -1]
        assert (col1[0], col1[1]) == (top + size - 1, left + size - 1)


def test_crop_ratio_distributions():
    rng = np.random.default_rng(0)
    for strategy, (lo, hi) in CROP_RATIOS.items():
        ratios = np.array([sample_crop(1000, 1500, strategy, rng).size / 1000 for _ in range(400)])
        assert ratios.min() >= lo - 1e-3 and ratios.max() <= hi + 1e-3
        if lo < hi:  # fills the range (uniform)
            assert ratios.min() < lo + 0.05 * (hi - lo) + 1e-3 and ratios.max() > hi - 0.05 * (hi - lo)
            assert abs(ratios.mean() - (lo + hi) / 2) < 0.03
    with pytest.raises(ValueError, match="crop strategy"):
        sample_crop(10, 10, "random", rng)


def test_box_positions_cover_the_image_and_stay_inside():
    rng = np.random.default_rng(1)
    tops, lefts = [], []
    for _ in range(300):
        p = sample_crop(100, 300, "global", rng)
        assert 0 <= p.top and p.top + p.size <= 100 and 0 <= p.left and p.left + p.size <= 300
        tops.append(p.top), lefts.append(p.left)
    assert min(lefts) < 20 and max(lefts) > 180  # uniform over the long side


def test_original_size_scales_box_to_original_pixels():
    # a stored copy at half size of a 400 x 600 original (img2dataset resize): box in original pixels
    p = sample_crop(200, 300, "global", np.random.default_rng(0), flip_prob=0.0)
    control_h, control_l = p.control((200, 300), (400.0, 600.0))
    assert control_l.tolist() == [400.0, 600.0]
    np.testing.assert_allclose(control_h[:4], [2 * p.top, 2 * p.left, 2 * p.size, 2 * p.size])
    assert control_h[H["aspect_ratio"]] == 1.0 and control_h[H["flip"]] == 0.0


def test_small_image_upsampled_and_one_pixel_image():
    img = Image.new("RGB", (5, 3), (10, 200, 30))
    x, control_h, control_l, _ = CropTransform(16, "local")(img, np.random.default_rng(0))
    assert x.shape == (3, 16, 16)
    assert control_l.tolist() == [3.0, 5.0] and 1 <= control_h[H["crop_height"]] <= 3
    x, control_h, _, _ = CropTransform(8, "mix")(Image.new("RGB", (1, 1)), np.random.default_rng(0))
    assert control_h[:4].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_to_tensor_range_and_inverse():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    x = to_tensor(Image.fromarray(arr))
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(to_uint8(x), arr)


def test_to_rgb_conversions():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((0, 0), (0, 0, 255, 255))  # opaque blue stays blue
    out, mode = to_rgb(rgba)
    assert mode == "RGBA" and out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    half = Image.new("LA", (2, 2), (0, 128))  # half-transparent black over white
    assert to_rgb(half)[0].getpixel((0, 0))[0] in (127, 128)
    gray, mode = to_rgb(Image.new("L", (2, 2), 77))
    assert mode == "L" and gray.getpixel((0, 0)) == (77, 77, 77)
    cmyk, mode = to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))  # pure red ink
    assert mode == "CMYK" and cmyk.getpixel((0, 0)) == (255, 0, 0)
    i16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert to_rgb(i16)[0].getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 255, 0] + [0] * 765)
    assert to_rgb(pal)[0].getpixel((0, 0)) == (0, 255, 0)
    same = Image.new("RGB", (2, 2))
    assert to_rgb(same) == (same, None)


def test_bad_transform_arguments():
    with pytest.raises(ValueError, match="flip_prob"):
        CropTransform(32, "global", flip_prob=1.5)
    with pytest.raises(ValueError, match="resample"):
        CropTransform(32, "global", resample="cubic")
