"""`shapes`: a procedural, download-free dataset of coloured shapes with spatial-relation captions.

Every sample is a function of `(seed, index)` only (numpy `default_rng([seed, index])`), so a shard set
is reproducible and can be generated in parallel. An image holds one or two coloured objects on a dark,
low-saturation background, rendered WITHOUT anti-aliasing at its own ("original") size; originals vary
in size and aspect ratio, so that:
  * text alignment is measurable: colours/shapes/relation are parsed back from a caption
    (`parse_caption`) and detected analytically from pixels (object colours are saturated and bright,
    backgrounds are dark and desaturated: see `COLOURS`, `_background`);
  * flip conditioning is measurable: the caption describes the UNFLIPPED original, so a model trained
    with flip metadata must swap left/right when asked for flip=1;
  * size conditioning is measurable: small originals are aliased and become blocky when upsampled.

Vocabulary (module constants, used by the shapes alignment detector, condiff.eval.align):
  COLOURS  name -> RGB; SHAPES names; LAYOUTS ("horizontal": left/right, "vertical": above/below).
Class ids: `class_table(config)` lists every valid (layout, objects) combination in a fixed order;
the class id is the index in that list (so no id is unused). Objects are listed in canonical order:
left-to-right ("horizontal") or top-to-bottom ("vertical"); a one-object class has layout "single".
Caption grammar (`make_caption`):
  single      "a {colour} {shape}"
  horizontal  "a {c1} {s1} to the left of a {c2} {s2}"  |  "a {c2} {s2} to the right of a {c1} {s1}"
  vertical    "a {c1} {s1} above a {c2} {s2}"           |  "a {c2} {s2} below a {c1} {s1}"
(the second form of each pair only when `config.paraphrase`).

Placement: objects are placed inside the central square of side min(H, W) (with a margin), so a
global crop of a non-square original keeps them; horizontal layouts put the first object's centre in
the left half and the second's in the right half (vertical: top / bottom), with no overlap.

Presets: `PRESETS["default"]` (6 colours, 4 shapes, 1-2 objects, both layouts, 4 background kinds,
originals 48-256 px with aspect 3:4..4:3) and `PRESETS["demo"]` (2 colours, 2 shapes, always two
objects of different colours left/right, near-solid black backgrounds, square originals 32-64 px:
8 classes), sized for the ten-minute CPU demo at 32 px (see notes/cpu-training-budget.md), and
`PRESETS["wide"]` (the default vocabulary with originals from 1:4 to 4:1, log-uniform) for multi-aspect
training with aspect buckets (`condiff.data.buckets`).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (235, 220, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 215, 225),
}
"""Object colours: saturated (HSV saturation >= 0.8) and bright (max channel >= 200)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
LAYOUTS: tuple[str, ...] = ("horizontal", "vertical")
RELATIONS: dict[str, tuple[str, str]] = {
    # layout -> (relation with the canonical first object as subject, relation with the second as subject)
    "horizontal": ("to the left of", "to the right of"),
    "vertical": ("above", "below"),
}
BACKGROUNDS: tuple[str, ...] = ("solid", "noise", "gradient", "texture")
BACKGROUND_MAX_VALUE = 100
"""Every background pixel channel is <= this value and has low saturation (see `_background`)."""


@dataclass(frozen=True)
class ShapesConfig:
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    n_objects: tuple[int, ...] = (1, 2)  # allowed object counts per image
    layouts: tuple[str, ...] = LAYOUTS  # layouts for two-object images
    distinct_colours: bool = False  # two objects must differ in colour
    backgrounds: tuple[str, ...] = BACKGROUNDS
    size_range: tuple[int, int] = (48, 256)  # short side of the original, pixels (uniform)
    aspect_range: tuple[float, float] = (0.75, 4 / 3)  # width / height of the original (log-uniform)
    object_scale: tuple[float, float] = (0.22, 0.34)  # object size / short side (uniform)
    paraphrase: bool = True  # use both caption forms of each relation

    def __post_init__(self):
        bad = [c for c in self.colours if c not in COLOURS]
        if bad:
            raise ValueError(f"ShapesConfig.colours: unknown colour(s) {bad}; expected names from {list(COLOURS)}")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad:
            raise ValueError(f"ShapesConfig.shapes: unknown shape(s) {bad}; expected names from {list(SHAPES)}")
        if not set(self.n_objects) <= {1, 2} or not self.n_objects:
            raise ValueError(f"ShapesConfig.n_objects must be a non-empty subset of (1, 2), got {self.n_objects}")
        if 2 in self.n_objects and (not self.layouts or not set(self.layouts) <= set(LAYOUTS)):
            raise ValueError(f"ShapesConfig.layouts must be a non-empty subset of {LAYOUTS}, got {self.layouts}")
        if not self.backgrounds or not set(self.backgrounds) <= set(BACKGROUNDS):
            raise ValueError(f"ShapesConfig.backgrounds must be a non-empty subset of {BACKGROUNDS}")
        if self.distinct_colours and 2 in self.n_objects and len(self.colours) < 2:
            raise ValueError("ShapesConfig.distinct_colours needs at least two colours")
        if not (len(self.aspect_range) == 2 and 0 < self.aspect_range[0] <= self.aspect_range[1]):
            raise ValueError(f"ShapesConfig.aspect_range must be (lo, hi) with 0 < lo <= hi (width / height), got {self.aspect_range}")
        if not (8 <= self.size_range[0] <= self.size_range[1]):
            raise ValueError(f"ShapesConfig.size_range must satisfy 8 <= lo <= hi, got {self.size_range}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(d: dict) -> "ShapesConfig":
        return ShapesConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESETS: dict[str, ShapesConfig] = {
    "default": ShapesConfig(),
    "demo": ShapesConfig(
        colours=("red", "blue"),
        shapes=("circle", "square"),
        n_objects=(2,),
        layouts=("horizontal",),
        distinct_colours=True,
        backgrounds=("solid",),
        size_range=(32, 64),
        aspect_range=(1.0, 1.0),
        object_scale=(0.32, 0.4),
        paraphrase=False,
    ),
    "wide": ShapesConfig(aspect_range=(0.25, 4.0)),
}


def get_config(preset: str | ShapesConfig | dict = "default", **overrides) -> ShapesConfig:
    """A `ShapesConfig` from a preset name, a dict or a config, with field overrides."""
    if isinstance(preset, ShapesConfig):
        cfg = preset
    elif isinstance(preset, dict):
        cfg = ShapesConfig.from_dict(preset)
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise ValueError(f"unknown shapes preset {preset!r}; expected one of {list(PRESETS)}")
    return replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def parse_overrides(items: list[str]) -> dict:
    """`["colours=red,blue", "size_range=16,24", "paraphrase=false"]` -> ShapesConfig field overrides
    (tuple fields split on commas and cast to the field's element type). ValueError names a bad item."""
    defaults = ShapesConfig()
    out: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not hasattr(defaults, name):
            raise ValueError(f"shapes override {item!r}: expected FIELD=VALUE with FIELD in {list(defaults.to_dict())}")
        default = getattr(defaults, name)
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[name] = value.lower() in ("true", "1")
            elif isinstance(default, tuple):
                cast = type(default[0])
                out[name] = tuple(cast(v.strip()) for v in value.split(",") if v.strip())
            else:
                out[name] = type(default)(value)
        except ValueError:
            raise ValueError(f"shapes override {item!r}: cannot read {value!r} as the type of {name} (default {default!r})") from None
    return out


# ----------------------------------------------------------------------------------------- vocabulary
def class_table(config: ShapesConfig) -> list[tuple]:
    """All classes in id order: ("single", (colour, shape)) or (layout, (c1, s1), (c2, s2)),
    objects in canonical order (left-to-right / top-to-bottom)."""
    objects = list(itertools.product(config.colours, config.shapes))
    table: list[tuple] = []
    if 1 in config.n_objects:
        table += [("single", o) for o in objects]
    if 2 in config.n_objects:
        for layout in config.layouts:
            for a, b in itertools.product(objects, objects):
                if config.distinct_colours and a[0] == b[0]:
                    continue
                table.append((layout, a, b))
    return table


def num_classes(config: ShapesConfig) -> int:
    return len(class_table(config))


def class_names(config: ShapesConfig) -> list[str]:
    """One canonical caption per class id (what `condiff sample` prints for a class)."""
    return [make_caption(entry) for entry in class_table(config)]


def all_captions(config: ShapesConfig) -> list[str]:
    """Every caption `render` can write under `config` (both forms of a relation when `config.paraphrase`)."""
    out = []
    for entry in class_table(config):
        out.append(make_caption(entry))
        if config.paraphrase and entry[0] != "single":
            out.append(make_caption(entry, swap=True))
    return out


def make_caption(entry: tuple, swap: bool = False) -> str:
    """The caption of a class-table entry; `swap` names the second object first (paraphrase)."""
    layout = entry[0]
    if layout == "single":
        colour, shape = entry[1]
        return f"a {colour} {shape}"
    (c1, s1), (c2, s2) = entry[1], entry[2]
    rel_first, rel_second = RELATIONS[layout]
    if swap:
        return f"a {c2} {s2} {rel_second} a {c1} {s1}"
    return f"a {c1} {s1} {rel_first} a {c2} {s2}"


_OBJ = r"an? (?P<c{i}>[a-z]+) (?P<s{i}>[a-z]+)"
_CAPTION_RE = re.compile(
    "^" + _OBJ.format(i=1) + r"(?: (?P<rel>to the left of|to the right of|above|below) " + _OBJ.format(i=2) + ")?$"
)


def parse_caption(caption: str) -> tuple:
    """Inverse of `make_caption`: the class-table entry (layout, objects in canonical order).

    Accepts both paraphrases, any casing and surrounding whitespace / a trailing period.
    Raises ValueError naming the caption when it is outside the grammar or vocabulary.
    """
    text = caption.strip().lower().rstrip(".")
    m = _CAPTION_RE.match(text)
    if m is None:
        raise ValueError(f"caption {caption!r} is not in the shapes grammar (e.g. 'a red circle to the left of a blue square')")
    objs = [(m.group("c1"), m.group("s1"))]
    if m.group("rel"):
        objs.append((m.group("c2"), m.group("s2")))
    for colour, shape in objs:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"caption {caption!r}: unknown colour {colour!r} or shape {shape!r}")
    if len(objs) == 1:
        return ("single", objs[0])
    rel = m.group("rel")
    layout = "horizontal" if rel in RELATIONS["horizontal"] else "vertical"
    if rel == RELATIONS[layout][1]:  # "to the right of" / "below": subject is the second object
        objs = objs[::-1]
    return (layout, objs[0], objs[1])


def class_of_caption(caption: str, config: ShapesConfig) -> int:
    """Class id of a caption under `config` (ValueError if the class is not in the config)."""
    entry = parse_caption(caption)
    table = class_table(config)
    if entry not in table:
        raise ValueError(f"caption {caption!r} describes {entry}, which is not a class of this shapes config")
    return table.index(entry)


# ------------------------------------------------------------------------------------------ rendering
@dataclass
class ShapesSample:
    image: Image.Image  # RGB, original size
    label: int
    caption: str
    entry: tuple  # class-table entry
    boxes: list[list[int]] = field(default_factory=list)  # per object [x0, y0, x1, y1], canonical order

    @property
    def meta(self) -> dict:
        w, h = self.image.size
        objs = self.entry[1:]
        return {
            "width": w,
            "height": h,
            "layout": self.entry[0],
            "objects": [{"colour": c, "shape": s, "box": b} for (c, s), b in zip(objs, self.boxes)],
        }


def _background(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """A dark, low-saturation background (H, W, 3) uint8, every channel <= BACKGROUND_MAX_VALUE."""
    base = rng.uniform(0, 60)
    tint = rng.uniform(-8, 8, size=3)  # slight colour cast, keeps saturation low
    if kind == "solid":
        img = np.broadcast_to(base + tint, (h, w, 3)) + rng.normal(0, 1.5, size=(h, w, 1))
    elif kind == "noise":
        img = base + tint + rng.normal(0, 10, size=(h, w, 1))
    elif kind == "gradient":
        other = rng.uniform(0, 80)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        t = (np.cos(angle) * xx / max(w - 1, 1) + np.sin(angle) * yy / max(h - 1, 1))
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        img = (base + (other - base) * t)[..., None] + tint
    elif kind == "texture":  # blurry blobs: low-resolution noise upsampled bilinearly
        cells = rng.integers(3, 9)
        coarse = rng.normal(0, 18, size=(cells, cells)).astype(np.float32)
        up = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))
        img = (base + up)[..., None] + tint
    else:
        raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUNDS}")
    return np.clip(img, 0, BACKGROUND_MAX_VALUE).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: float, rgb) -> list[int]:
    r = d / 2
    box = [round(cx - r), round(cy - r), round(cx + r), round(cy + r)]
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return box


def render(index: int, config: ShapesConfig | str = "default", seed: int = 0) -> ShapesSample:
    """Sample `index` of the shapes dataset with `seed` (pure function of its arguments)."""
    cfg = get_config(config) if not isinstance(config, ShapesConfig) else config
    rng = np.random.default_rng([int(seed), int(index)])
    table = class_table(cfg)
    label = int(rng.integers(len(table)))
    entry = table[label]
    short = int(rng.integers(cfg.size_range[0], cfg.size_range[1] + 1))
    aspect = math.exp(rng.uniform(math.log(cfg.aspect_range[0]), math.log(cfg.aspect_range[1])))  # w / h
    if aspect >= 1:
        h, w = short, max(short, round(short * aspect))
    else:
        w, h = short, max(short, round(short / aspect))
    bg = _background(rng, cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))], h, w)
    image = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(image)
    # central square region (x0, y0, side) with a margin, where objects live
    side = short
    ox, oy = (w - side) / 2, (h - side) / 2
    margin = 0.06 * side
    objs = entry[1:]
    d = [rng.uniform(*cfg.object_scale) * side for _ in objs]
    centres = []
    if entry[0] == "single":
        lo, hi = margin + d[0] / 2, side - margin - d[0] / 2
        centres.append((rng.uniform(lo, hi), rng.uniform(lo, hi)))
    else:
        # along the layout axis: first object in [0, side/2), second in [side/2, side), no overlap
        half = side / 2
        a0 = rng.uniform(margin + d[0] / 2, max(margin + d[0] / 2, half - d[0] / 2 - 1))
        a1 = rng.uniform(min(half + d[1] / 2 + 1, side - margin - d[1] / 2), side - margin - d[1] / 2)
        a1 = max(a1, a0 + (d[0] + d[1]) / 2 + 1)
        b = [rng.uniform(margin + di / 2, side - margin - di / 2) for di in d]  # across the axis
        if entry[0] == "horizontal":
            centres = [(a0, b[0]), (a1, b[1])]
        else:
            centres = [(b[0], a0), (b[1], a1)]
    boxes = [
        _draw(draw, shape, ox + cx, oy + cy, di, COLOURS[colour])
        for (colour, shape), (cx, cy), di in zip(objs, centres, d)
    ]
    swap = cfg.paraphrase and entry[0] != "single" and bool(rng.integers(2))
    return ShapesSample(image=image, label=label, caption=make_caption(entry, swap=swap), entry=entry, boxes=boxes)


class ShapesDataset:
    """Map-style view: `ds[i]` is `render(i, config, seed)`; `len(ds) == n`."""

    def __init__(self, n: int, config: ShapesConfig | str = "default", seed: int = 0):
        self.n, self.config, self.seed = int(n), get_config(config) if not isinstance(config, ShapesConfig) else config, seed
        self.num_classes = num_classes(self.config)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> ShapesSample:
        if not 0 <= i < self.n:
            raise IndexError(f"shapes index {i} out of range [0, {self.n})")
        return render(i, self.config, self.seed)


# ------------------------------------------------------------------------- real photos (scikit-image)
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "colorwheel", "camera", "coins", "moon", "clock", "page", "text", "logo",
)
"""Images shipped inside scikit-image (no download): RGB ones of several sizes/aspects, grayscale
ones (camera, coins, moon, clock, page, text) and one RGBA (logo); real pixels for crop/size tests."""


def skimage_photos(names: tuple[str, ...] = PHOTO_NAMES) -> list[tuple[str, Image.Image]]:
    """[(name, PIL image in its native mode: RGB, L or RGBA)] for the scikit-image sample photos."""
    import skimage.data

    out = []
    for name in names:
        arr = getattr(skimage.data, name)()
        out.append((name, Image.fromarray(arr)))
    return out
