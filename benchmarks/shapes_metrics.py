"""The toy-scale metrics on known corruptions of real shapes images (benchmarks/RESULTS.md, "Toy-scale metrics").

  shapes FD: 500 images (seed 7) against the cached reference of 2000 (seed 0) at each preset / resolution:
             clean, Gaussian blur (sigma in 32-px pixels, scaled with the resolution), N(0, 20) pixel noise,
             RGB -> BGR, mirrored, the other preset; and the seconds the reference statistics took.
  content change: 64 images (seed 0) against themselves, shifted right by 1 px, N(0, 8) noise, mirrored,
             and 64 unrelated images (indices 1000+); cells "score (object_change / pixel_lowpass)"; pairs/s.

Run: `PYTHONPATH=python OMP_NUM_THREADS=1 python benchmarks/shapes_metrics.py [--cache-dir DIR]`
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torchvision.transforms.functional import gaussian_blur

from condiff.data import shapes
from condiff.eval.content_change import content_change
from condiff.eval.metrics.base import Stream
from condiff.eval.metrics.shapes_fd import ShapesFd
from condiff.eval.reference import center_crop_arr
from condiff.eval.shapes_features import shapes_extractor


def render(preset: str, n: int, res: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    """(n, 3, res, res) uint8 shapes images (ADM centre crop)."""
    imgs = [center_crop_arr(shapes.render(i, preset, seed).image, res) for i in range(start, start + n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def noise(images: torch.Tensor, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (images.float() + std * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    out = gaussian_blur(images.float(), kernel_size=2 * int(np.ceil(3 * sigma)) + 1, sigma=sigma)
    return out.round().clamp(0, 255).to(torch.uint8)


def fd_table(cache_dir, n: int = 500, ref_n: int = 2000) -> None:
    ext = shapes_extractor(cache_dir=cache_dir)
    print("| preset @ px | clean | blur 0.6 | blur 1.2 | blur 2.4 | noise 20 | RGB->BGR | mirrored | other preset "
          "| reference s |\n|---|---|---|---|---|---|---|---|---|---|")
    for preset, res in (("demo", 16), ("demo", 32), ("default", 32), ("default", 64)):
        t0 = time.time()
        ShapesFd(Stream(n), res, preset, ref_n=ref_n, extractor=ext, cache_dir=cache_dir, log=lambda s: None)
        t_ref = time.time() - t0

        def fd(images):
            m = ShapesFd(Stream(n), res, preset, ref_n=ref_n, extractor=ext, cache_dir=cache_dir, log=lambda s: None)
            m.update(images, range(n))
            return m.compute()["shapes_fd"]

        clean = render(preset, n, res, seed=7)
        other = render("default" if preset == "demo" else "demo", n, res, seed=7)
        row = [fd(clean), *(fd(blur(clean, s * res / 32)) for s in (0.6, 1.2, 2.4)), fd(noise(clean, 20)),
               fd(clean[:, [2, 1, 0]]), fd(clean.flip(-1)), fd(other)]
        print(f"| {preset} @ {res} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {t_ref:.1f} |", flush=True)


def content_change_table(n: int = 64) -> None:
    print("| preset @ px | identical | 1 px shift | noise 8 | mirrored | unrelated | pairs/s |\n|---|---|---|---|---|---|---|")
    for preset in ("demo", "default"):
        for res in (16, 32, 64):
            a = render(preset, n, res)
            others = (a, torch.cat([a[..., :1], a[..., :-1]], -1), noise(a, 8), a.flip(-1),
                      render(preset, n, res, start=1000))
            t0, cells = time.time(), []
            for b in others:
                r = content_change(a, b)
                cells.append(f"{r['score']:.3f} ({r['object_change']:.2f} / {r['pixel_lowpass']:.3f})")
            rate = len(others) * n / (time.time() - t0)
            print(f"| {preset} @ {res} | " + " | ".join(cells) + f" | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()
    fd_table(args.cache_dir)
    content_change_table()
