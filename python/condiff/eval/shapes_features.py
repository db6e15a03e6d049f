"""A feature network for toy-scale Frechet distances: a small CNN trained once on the shapes dataset
(`condiff.data.shapes`), the offline stand-in for Inception-V3 (no pretrained weights exist here).

What it is trained to read (five softmax heads on one D-dimensional feature vector, the FD's features):
  colour1, shape1   the first object in canonical order (left of a left/right pair, top of an above/below
                    pair, the only object of a single): 6 colours, 4 shapes
  colour2, shape2   the second object, or "none" (single-object images): 7 and 5 classes
  layout            single / horizontal / vertical (so the object count too)
These are the quantities the shapes alignment score (`condiff.eval.align`) checks, and, because "first"
means "left", a horizontally mirrored set of two-object images gets other labels: features that separate
them make the FD sensitive to left/right (flip conditioning, paper Tab. 2c) as well as to colour, shape,
count and image quality.

Training data: both presets (`default` and `demo`, so that the features cover the demo models too),
every image ADM-centre-cropped to a resolution drawn from RESOLUTIONS (16-64 px, the range the toy
models generate at) and then brought to INPUT_SIZE by the extractor's own clean-fid resize: the network
sees exactly the pipeline `FeatureExtractor.features` applies at evaluation. Training is deterministic
(fixed seeds, `torch.use_deterministic_algorithms`, one intra-op thread, CPU), so the weights are a
function of `ShapesNetSettings` (and the torch build); they are cached as
`<cache>/shapes_features/<key>.safetensors` with `<key>.json` (settings, held-out accuracy per head and
preset, training time), `key` = sha256 of the settings. Held-out data: other seeds of the same presets.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from condiff.data import shapes
from condiff.eval.features import FeatureExtractor, ResizeSpec, default_cache_dir
from condiff.io.atomic import atomic_path, atomic_write_text

INPUT_SIZE = 32
RESOLUTIONS = (16, 24, 32, 48, 64)
FORMAT = 1  # bump when the architecture or the training procedure changes (part of the cache key)
HEADS: dict[str, tuple[str, ...]] = {
    "colour1": tuple(shapes.COLOURS),
    "shape1": shapes.SHAPES,
    "colour2": (*shapes.COLOURS, "none"),
    "shape2": (*shapes.SHAPES, "none"),
    "layout": ("single", *shapes.LAYOUTS),
}


@dataclass(frozen=True)
class ShapesNetSettings:
    """Everything the trained weights depend on; `key()` names the cache entry."""

    presets: tuple[tuple[str, int], ...] = (("default", 2400), ("demo", 600))  # (preset, training images)
    val_images: int = 400  # held-out images per preset
    train_seed: int = 1001  # shapes seed of the training images
    val_seed: int = 1002  # shapes seed of the held-out images
    seed: int = 0  # initialisation and batch order
    dim: int = 64  # feature dimension D
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3

    def key(self) -> str:
        text = json.dumps({"format": FORMAT, "input_size": INPUT_SIZE, "resolutions": RESOLUTIONS,
                           **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class ShapesNet(nn.Module):
    """(B, 3, 32, 32) float in [0, 255] -> features (B, dim) (`forward`), and head logits (`heads`)."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(),  # (B, 32, 16, 16)
            nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),  # (B, 64, 8, 8)
            nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(),  # (B, 64, 4, 4)
            nn.Flatten(),  # (B, 1024): no global pooling, positions (left/right) stay readable
            nn.Linear(64 * 4 * 4, dim), nn.ReLU(),  # (B, dim)
        )
        self.out = nn.ModuleDict({name: nn.Linear(dim, len(classes)) for name, classes in HEADS.items()})

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk((x - 128.0) / 128.0)  # (B, dim)

    def heads(self, x: Tensor) -> dict[str, Tensor]:
        f = self(x)
        return {name: head(f) for name, head in self.out.items()}  # name -> (B, classes)


def labels_of(entry: tuple) -> dict[str, int]:
    """Head targets of a shapes class-table entry (see the module docstring)."""
    objs = list(entry[1:]) + [("none", "none")] * (3 - len(entry))
    return {"colour1": HEADS["colour1"].index(objs[0][0]), "shape1": HEADS["shape1"].index(objs[0][1]),
            "colour2": HEADS["colour2"].index(objs[1][0]), "shape2": HEADS["shape2"].index(objs[1][1]),
            "layout": HEADS["layout"].index(entry[0])}


def render_set(preset: str, n: int, seed: int, prepare) -> tuple[Tensor, dict[str, Tensor]]:
    """n shapes images of `preset` / `seed`, sample i centre-cropped to RESOLUTIONS[i % 5] and `prepare`d:
    ((n, 3, INPUT_SIZE, INPUT_SIZE) float in [0, 255], {head: (n,) int64 targets})."""
    from condiff.eval.reference import center_crop_arr

    images, targets = [], {name: [] for name in HEADS}
    for i in range(n):
        s = shapes.render(i, preset, seed=seed)
        images.append(prepare(center_crop_arr(s.image, RESOLUTIONS[i % len(RESOLUTIONS)])[None])[0])
        for name, value in labels_of(s.entry).items():
            targets[name].append(value)
    return torch.stack(images), {name: torch.tensor(v) for name, v in targets.items()}


@torch.no_grad()
def accuracy(net: ShapesNet, x: Tensor, targets: dict[str, Tensor]) -> dict[str, float]:
    """Per-head accuracy and `all` (every head right) on (n, 3, S, S) images."""
    logits = net.heads(x)
    right = {name: (logits[name].argmax(1) == targets[name]) for name in HEADS}
    out = {name: float(r.float().mean()) for name, r in right.items()}
    out["all"] = float(torch.stack(list(right.values())).all(0).float().mean())
    return out


def train(settings: ShapesNetSettings, resize: ResizeSpec) -> tuple[ShapesNet, dict]:
    """Train the network (CPU, one thread, deterministic). Returns (net in eval mode, info)."""
    t0 = time.time()
    prep = FeatureExtractor(fn=lambda x: x, name="prepare", resize=resize).prepare
    parts = [render_set(p, n, settings.train_seed, prep) for p, n in settings.presets]
    x = torch.cat([p[0] for p in parts])  # (N, 3, S, S)
    y = {name: torch.cat([p[1][name] for p in parts]) for name in HEADS}
    t_data = time.time() - t0
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            net = ShapesNet(settings.dim)
            gen = torch.Generator().manual_seed(settings.seed)
            opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
            steps = settings.epochs * -(-len(x) // settings.batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=steps)
            net.train()
            for _ in range(settings.epochs):
                for idx in torch.randperm(len(x), generator=gen).split(settings.batch_size):
                    logits = net.heads(x[idx])
                    loss = sum(nn.functional.cross_entropy(logits[k], y[k][idx]) for k in HEADS)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            net.eval()
            t_train = time.time() - t0
            val = {p: accuracy(net, *render_set(p, settings.val_images, settings.val_seed, prep))
                   for p, _ in settings.presets}
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    info = {"settings": asdict(settings), "accuracy": val, "train_images": len(x),
            "data_seconds": round(t_data, 2), "train_seconds": round(t_train, 2),
            "torch": torch.__version__}
    return net, info


def load_or_train(settings: ShapesNetSettings = ShapesNetSettings(), cache_dir: str | os.PathLike | None = None,
                  resize: ResizeSpec | None = None) -> tuple[ShapesNet, dict]:
    """The trained network and its info (`<key>.json`), from the cache or trained now and cached."""
    from safetensors.torch import load_file, save_file

    resize = resize or ResizeSpec(size=INPUT_SIZE)
    if resize.size != INPUT_SIZE:
        raise ValueError(f"shapes features: the network's input is {INPUT_SIZE} px, got resize size {resize.size}")
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "shapes_features"
    key = settings.key()
    weights, meta = root / f"{key}.safetensors", root / f"{key}.json"
    net = ShapesNet(settings.dim)
    if weights.is_file() and meta.is_file():
        net.load_state_dict(load_file(str(weights)))
        return net.eval(), json.loads(meta.read_text())
    net, info = train(settings, resize)
    with atomic_path(weights, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    atomic_write_text(meta, json.dumps(info, indent=1))  # written last: both present = a complete entry
    return net, info


def shapes_extractor(device="cpu", batch_size: int = 64, cache_dir: str | os.PathLike | None = None,
                     settings: ShapesNetSettings = ShapesNetSettings()) -> FeatureExtractor:
    """`FeatureExtractor` of the shapes network (D = settings.dim), inputs resized to 32 px (clean bicubic);
    trained on first use (see the module docstring). `.info` holds the cached info, held-out accuracy
    included: `extractor.info["accuracy"][preset][head]`."""
    resize = ResizeSpec(size=INPUT_SIZE)
    net, info = load_or_train(settings, cache_dir, resize)
    return FeatureExtractor(fn=net.to(device), name=f"shapes-cnn:{settings.key()}", resize=resize,
                            device=device, batch_size=batch_size, info=info)
