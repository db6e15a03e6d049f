"""The procedural `shapes` dataset: determinism, vocabulary, captions that match the pixels."""

import colorsys

import numpy as np
import pytest

from condiff.data import shapes


def test_deterministic_by_seed_and_index():
    a, b = shapes.render(7, "default", seed=3), shapes.render(7, "default", seed=3)
    assert a.caption == b.caption and a.label == b.label
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    c = shapes.render(7, "default", seed=4)
    assert a.image.size != c.image.size or not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@pytest.mark.parametrize("preset", ["default", "demo", "wide"])
def test_caption_parses_back_to_label_and_objects_are_where_the_caption_says(preset):
    cfg = shapes.get_config(preset)
    swapped = 0
    for i in range(60):
        s = shapes.render(i, cfg, seed=0)
        assert shapes.class_of_caption(s.caption, cfg) == s.label
        assert shapes.parse_caption(s.caption) == s.entry == shapes.class_table(cfg)[s.label]
        swapped += s.caption != shapes.make_caption(s.entry)
        img = np.asarray(s.image)
        w, h = s.image.size
        assert cfg.size_range[0] <= min(w, h) <= cfg.size_range[1]
        assert cfg.aspect_range[0] - 0.02 <= w / h <= cfg.aspect_range[1] + 0.02
        boxes = s.boxes
        if s.entry[0] == "horizontal":
            assert (boxes[0][0] + boxes[0][2]) < (boxes[1][0] + boxes[1][2])  # first object left of second
        if s.entry[0] == "vertical":
            assert (boxes[0][1] + boxes[0][3]) < (boxes[1][1] + boxes[1][3])
        for (colour, _), (x0, y0, x1, y1) in zip(s.entry[1:], boxes):
            cy, cx = (y0 + y1) // 2, (x0 + x1) // 2  # centre pixel of every shape is inside it
            assert tuple(img[cy, cx]) == shapes.COLOURS[colour]
            assert 0 <= x0 and x1 < w and 0 <= y0 and y1 < h
    if cfg.paraphrase:
        assert 5 < swapped < 55  # both caption forms are used
    else:
        assert swapped == 0


def test_backgrounds_are_dark_and_desaturated_objects_are_not():
    for name, (r, g, b) in shapes.COLOURS.items():
        _, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        assert s >= 0.8 and v * 255 >= 200, name
    cfg = shapes.get_config("default", n_objects=[1])
    for i in range(20):
        s = shapes.render(i, cfg, seed=1)
        img = np.asarray(s.image).astype(int)
        x0, y0, x1, y1 = s.boxes[0]
        mask = np.ones(img.shape[:2], bool)
        mask[max(0, y0 - 1) : y1 + 2, max(0, x0 - 1) : x1 + 2] = False
        bg = img[mask]
        assert bg.max() <= shapes.BACKGROUND_MAX_VALUE
        assert (bg.max(-1) - bg.min(-1)).max() <= 40  # low chroma


def test_vocabulary_and_class_table():
    demo = shapes.PRESETS["demo"]
    table = shapes.class_table(demo)
    assert len(table) == shapes.num_classes(demo) == 8  # 4 left objects x 2 right objects of the other colour
    assert all(a[0] != b[0] for _, a, b in table)
    assert shapes.class_names(demo)[0] == "a red circle to the left of a blue circle"
    default = shapes.PRESETS["default"]
    k = len(default.colours) * len(default.shapes)
    assert shapes.num_classes(default) == k + 2 * k * k
    assert len(set(shapes.class_names(default))) == shapes.num_classes(default)
    # both paraphrases and the single form parse back
    assert shapes.parse_caption("A blue square to the right of a red star.") == ("horizontal", ("red", "star"), ("blue", "square"))
    assert shapes.parse_caption("a cyan triangle below a green circle") == ("vertical", ("green", "circle"), ("cyan", "triangle"))
    assert shapes.parse_caption("a yellow star") == ("single", ("yellow", "star"))
    with pytest.raises(ValueError, match="grammar"):
        shapes.parse_caption("two red circles")
    with pytest.raises(ValueError, match="unknown colour"):
        shapes.parse_caption("a pink circle")
    with pytest.raises(ValueError, match="not a class"):
        shapes.class_of_caption("a yellow star", demo)


def test_wide_preset_spans_one_to_four_both_ways():
    aspects = [s.image.size[0] / s.image.size[1] for s in (shapes.render(i, "wide", 0) for i in range(200))]
    assert min(aspects) < 0.3 and max(aspects) > 3.3  # 1:4 .. 4:1, log-uniform
    assert 0.25 - 0.02 <= min(aspects) and max(aspects) <= 4.0 + 0.02
    assert sum(a < 1 for a in aspects) > 60 and sum(a > 1 for a in aspects) > 60
    with pytest.raises(ValueError, match="aspect_range"):
        shapes.get_config("default", aspect_range=(0.0, 2.0))


def test_configurable_and_validated():
    cfg = shapes.get_config("demo", size_range=[16, 16], colours=["green", "yellow", "cyan"])
    s = shapes.render(0, cfg, 0)
    assert s.image.size == (16, 16) and shapes.num_classes(cfg) == 6 * 4
    assert shapes.ShapesConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown colour"):
        shapes.get_config("default", colours=("red", "pink"))
    with pytest.raises(ValueError, match="preset"):
        shapes.get_config("hard")
    with pytest.raises(ValueError, match="n_objects"):
        shapes.get_config("default", n_objects=(3,))
    o = shapes.parse_overrides(["n_objects=1", "aspect_range=1,2", "paraphrase=false", "colours=red, blue"])
    assert o == {"n_objects": (1,), "aspect_range": (1.0, 2.0), "paraphrase": False, "colours": ("red", "blue")}
    with pytest.raises(ValueError, match="size_range"):
        shapes.parse_overrides(["size_range=big"])


def test_class_balance():
    labels = [shapes.render(i, "demo", 0).label for i in range(800)]
    counts = np.bincount(labels, minlength=8)
    assert counts.min() > 60 and counts.max() < 140  # uniform over 8 classes (100 expected)


def test_dataset_view_and_photos():
    ds = shapes.ShapesDataset(5, "demo", seed=2)
    assert len(ds) == 5 and ds.num_classes == 8 and ds[4].caption == shapes.render(4, "demo", 2).caption
    with pytest.raises(IndexError):
        ds[5]
    photos = dict(shapes.skimage_photos(("coffee", "camera", "logo")))
    assert photos["coffee"].size == (600, 400) and photos["coffee"].mode == "RGB"
    assert photos["camera"].mode == "L" and photos["logo"].mode == "RGBA"
