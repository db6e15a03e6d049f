"""LPIPS size-diversity (paper Sec. 3, "Evaluation", and Tab. 2a): how much the image changes when only the
size conditioning changes.

Protocol: for each prompt, K generations (paper: K = 10) with the same seed, prompt and initial noise but
a different size conditioning phi_l = (size, size); sizes smaller than the target resolution are excluded
(the paper's "LPIPS/HR"; `include_low=True` keeps them, the paper's plain "LPIPS" column with sizes
[64, 128, 256, 512, 1024]). Score of a prompt = mean LPIPS over the K (K - 1) / 2 pairs; the reported
number = mean over prompts (paper: 10k prompts). Lower = the size condition changes less of the image
(better disentangled semantics and size: Tab. 2a, 0.04 with the power-cosine schedule vs 0.33 uniform).
`size_sweep` builds the sampler inputs of a batch of prompts; `condiff.eval.metrics.lpips.LpipsSize`
scores each sweep (`mean_pairwise_lpips`) and averages.

Default sizes (the paper does not list its ten): `default_sizes(resolution)` = 10 sizes evenly spaced
from the resolution to 4 x the resolution (256 -> 256 ... 1024, covering Tab. 2a's 256, 512, 1024).

LPIPS through the `lpips` package (v0.1, its shipped linear-layer weights). The backbone (AlexNet by
default, or VGG16) needs torchvision's ImageNet weights, which cannot be downloaded here: give them as a
local file (`backbone_path`, `$CONDIFF_LPIPS_BACKBONE`, or torch hub's cache
`$TORCH_HOME/hub/checkpoints/<torchvision file name>`), or use `random_backbone=True` (`pnet_rand`) for
offline tests, whose numbers are not comparable with the paper's.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
import numpy as np
import torch
from torch import Tensor

BACKBONE_ENV = "CONDIFF_LPIPS_BACKBONE"
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
BACKBONE_URLS = {"alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                 "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth"}


def default_sizes(resolution: int, k: int = 10) -> list[int]:
    """`k` sizes evenly spaced in [resolution, 4 resolution], rounded to integers."""
    return [int(round(s)) for s in np.linspace(resolution, 4 * resolution, k)]


def protocol_sizes(sizes: list[int], resolution: int, include_low: bool = False) -> list[int]:
    """The sizes used: those >= resolution unless `include_low`; at least two are needed for a pair."""
    used = [int(s) for s in sizes if include_low or s >= resolution]
    if len(used) < 2:
        raise ValueError(f"LPIPS size protocol: sizes {list(sizes)} leave {used} at resolution {resolution} "
                         "(sizes below the resolution are excluded); give at least two sizes >= the resolution")
    return used


def _backbone_file(net: str, backbone_path: str | os.PathLike | None) -> Path:
    fname = BACKBONE_FILES[net]
    hub = Path(torch.hub.get_dir()) / "checkpoints" / fname
    candidates = [Path(p) for p in (backbone_path, os.environ.get(BACKBONE_ENV)) if p] + [hub]
    for c in candidates:
        c = c / fname if c.is_dir() else c
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"LPIPS-{net} needs torchvision's ImageNet weights '{fname}' for its backbone and nothing may be "
        f"downloaded here. Fetch {BACKBONE_URLS[net]} on a machine with internet, then pass "
        f"--lpips-backbone PATH, or set {BACKBONE_ENV}=PATH, or copy it to {hub}. For an offline smoke test "
        f"use a random backbone (--lpips-random; numbers not comparable with the paper's).")


def lpips_model(net: str = "alex", backbone_path: str | os.PathLike | None = None, random_backbone: bool = False,
                device="cpu"):
    """`lpips.LPIPS` (v0.1, shipped linear layers) with the backbone's weights from a local file, or a
    random backbone drawn with seed 0 (the same on every rank and run)."""
    import warnings

    import lpips

    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS net {net!r}: expected one of {list(BACKBONE_FILES)}")
    file = None if random_backbone else _backbone_file(net, backbone_path)
    # lpips calls torchvision with the deprecated `pretrained=` argument; the random trunk is seeded so
    # that every rank (and every run) gets the same network
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(0)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if file is not None:
        # lpips' slices hold torchvision's `features` modules under their original indices: slice1.0 = features.0
        state = torch.load(file, map_location="cpu", weights_only=True)
        for name, module in model.net.named_modules():
            if name.count(".") == 1 and name.startswith("slice") and any(True for _ in module.parameters()):
                prefix = f"features.{name.split('.')[1]}."
                sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                try:
                    module.load_state_dict(sub)
                except RuntimeError as exn:
                    raise ValueError(f"{file}: not torchvision {net} weights ({prefix}*: {exn})") from exn
    return model.to(device).eval()


MIN_SIZE = 64
"""Images with a side below this are upsampled (bilinear) to it first: the AlexNet / VGG trunks need
about 32 px to run at all and LPIPS was calibrated on 64 px patches."""


@torch.no_grad()
def mean_pairwise_lpips(images: Tensor, model) -> float:
    """Mean LPIPS over all pairs of (K, 3, H, W) images in [-1, 1] (see MIN_SIZE)."""
    k, _, h, w = images.shape
    if min(h, w) < MIN_SIZE:
        scale = MIN_SIZE / min(h, w)
        images = torch.nn.functional.interpolate(images, size=(round(h * scale), round(w * scale)),
                                                 mode="bilinear", align_corners=False)
    pairs = list(itertools.combinations(range(k), 2))
    if not pairs:
        raise ValueError("mean_pairwise_lpips: need at least two images")
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    return float(model(images[i], images[j]).mean())


def size_sweep(noise: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor]:
    """The protocol's sampler inputs for P prompts: noise (P, C, h, w) -> (noise (P K, C, h, w), sizes
    (P K, 2) float (orig_height, orig_width)), each prompt's noise repeated for its K sizes (rows p K .. p K + K
    - 1 belong to prompt p, in the order of `sizes`)."""
    k = len(sizes)
    size_t = torch.tensor([[s, s] for s in sizes], dtype=torch.float32)  # (K, 2)
    return noise.repeat_interleave(k, dim=0), size_t.repeat(noise.shape[0], 1)
