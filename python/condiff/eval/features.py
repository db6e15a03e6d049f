"""FID feature extraction from memory, with clean-fid's conventions: images -> uint8 -> "clean" resize ->
a feature network (clean-fid's Inception-V3, or any custom extractor).

Conventions (clean-fid's, so that our numbers equal what `cleanfid.fid.compute_fid` reports on the same
images written as PNG files):
  * Images are quantised to uint8 first (what saving a PNG would do): x in [-1, 1] -> round(127.5 (x + 1)).
  * "clean" resize: each channel resized as a float32 PIL image ('F' mode) with bicubic filtering to
    299 x 299, clipped to [0, 255], no re-quantisation (`cleanfid.resize.make_resizer("PIL", False,
    "bicubic", (299, 299))`).
  * The extractor receives (B, 3, S, S) float32 in [0, 255] and returns (B, D) features: clean-fid's
    Inception-V3 TorchScript (pool3, D = 2048), or any custom extractor (clean-fid's
    `custom_feat_extractor`), e.g. `random_extractor()` for offline tests.
Statistics and the distance: `condiff.eval.statistics`; reference sets: `condiff.eval.reference`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from condiff.io.images import to_uint8

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "CONDIFF_INCEPTION"


def default_cache_dir() -> Path:
    """`$CONDIFF_CACHE` or `$XDG_CACHE_HOME/condiff` (default `~/.cache/condiff`)."""
    if os.environ.get("CONDIFF_CACHE"):
        return Path(os.environ["CONDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "condiff"


@dataclass(frozen=True)
class ResizeSpec:
    """clean-fid resize (library, quantize_after, filter, size). Part of the reference-statistics key."""

    library: str = "PIL"
    quantize_after: bool = False
    filter: str = "bicubic"
    size: int = 299

    def build(self) -> Callable[[np.ndarray], np.ndarray]:
        from cleanfid.resize import make_resizer

        return make_resizer(self.library, self.quantize_after, self.filter, (self.size, self.size))


@dataclass
class FeatureExtractor:
    """`fn((B, 3, S, S) float32 in [0, 255]) -> (B, D)`, with the resize it expects and a stable name.

    `weights_sha256` identifies the weights; with `name` and the resize it keys the reference-statistics
    cache (`condiff.eval.reference.reference_key`). Computed from `fn`'s state dict when `fn` is an
    `nn.Module` and none is given; a plain callable keeps "" (then `name` alone must identify it)."""

    fn: Callable[[Tensor], Tensor]
    name: str
    resize: ResizeSpec = field(default_factory=ResizeSpec)
    device: torch.device | str = "cpu"
    batch_size: int = 64
    weights_sha256: str = ""
    info: dict = field(default_factory=dict)  # what reports quote about the extractor (e.g. its accuracy)

    def __post_init__(self):
        self._resizer = self.resize.build()
        if not self.weights_sha256 and isinstance(self.fn, nn.Module):
            self.weights_sha256 = state_sha256(self.fn)

    def prepare(self, images_u8: np.ndarray) -> Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, S, S) float32 in [0, 255], clean-fid's per-image resize."""
        out = [torch.from_numpy(np.ascontiguousarray(self._resizer(img)).transpose(2, 0, 1).astype(np.float32))
               for img in images_u8]
        return torch.stack(out)

    @torch.no_grad()
    def features(self, images: Tensor | np.ndarray) -> np.ndarray:
        """Images (B, 3, H, W) in [-1, 1] or uint8 -> features (B, D) float32 numpy."""
        u8 = to_uint8(images)
        feats = []
        for i in range(0, len(u8), self.batch_size):
            x = self.prepare(u8[i:i + self.batch_size]).to(self.device)
            feats.append(self.fn(x).float().reshape(x.shape[0], -1).cpu().numpy())
        return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)


def state_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """Find clean-fid's Inception TorchScript file without downloading.

    Looked up in order: `path` (the file, or a directory holding it), `$CONDIFF_INCEPTION`,
    `<cache>/inception-2015-12-05.pt` (see `default_cache_dir`). Never a fixed path in a world-writable
    directory (clean-fid's own `/tmp` download location is not searched: anyone could plant a file there)."""
    candidates: list[Path] = []
    for p in (path, os.environ.get(INCEPTION_ENV)):
        if p:
            p = Path(p)
            candidates.append(p / INCEPTION_FILE if p.is_dir() else p)
    candidates.append(default_cache_dir() / INCEPTION_FILE)
    for c in candidates:
        if c.is_file():
            if c.name != INCEPTION_FILE:
                raise ValueError(f"Inception weights {c}: clean-fid loads the file by its name; rename it "
                                 f"to {INCEPTION_FILE} (same directory)")
            return c
    tried = "\n  ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"FID needs clean-fid's Inception-V3 TorchScript weights '{INCEPTION_FILE}' and nothing may be "
        f"downloaded here. Fetch it on a machine with internet from\n  {INCEPTION_URL}\nthen pass "
        f"--inception PATH (file or directory), or set {INCEPTION_ENV}=PATH, or copy it to "
        f"{default_cache_dir() / INCEPTION_FILE}. Looked in:\n  {tried}")


def inception_extractor(path: str | os.PathLike | None = None, device="cpu", batch_size: int = 64) -> FeatureExtractor:
    """clean-fid's Inception-V3 (pool3, 2048-d) in "clean" mode, from a local file (no download)."""
    from cleanfid.inception_torchscript import InceptionV3W

    file = resolve_inception_path(path)
    model = InceptionV3W(str(file.parent), download=False, resize_inside=False).to(device).eval()
    return FeatureExtractor(fn=model, name=f"inception-v3-cleanfid:{INCEPTION_FILE}", resize=ResizeSpec(),
                            device=device, batch_size=batch_size)


class RandomConvNet(nn.Module):
    """Small fixed-seed random CNN: (B, 3, S, S) in [0, 255] -> (B, dim). For offline tests only."""

    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, dim, 3, 2, 1)])
        for conv in self.convs:  # explicit seeded init, independent of the global RNG
            nn.init.normal_(conv.weight, std=(2.0 / conv.weight[0].numel()) ** 0.5, generator=gen)
            nn.init.normal_(conv.bias, std=0.1, generator=gen)

    def forward(self, x: Tensor) -> Tensor:
        h = (x - 128.0) / 128.0  # (B, 3, S, S) in [-1, 1]
        for conv in self.convs:
            h = torch.relu(conv(h))
        return h.mean(dim=(2, 3))  # (B, dim)


def random_extractor(dim: int = 32, size: int = 64, seed: int = 0, device="cpu", batch_size: int = 64) -> FeatureExtractor:
    """A clean-fid custom feature extractor made of a random CNN, resizing to `size` (clean bicubic)."""
    net = RandomConvNet(dim, seed).to(device).eval()
    return FeatureExtractor(fn=net, name=f"random-conv:dim={dim}:seed={seed}", resize=ResizeSpec(size=size),
                            device=device, batch_size=batch_size)


def build_extractor(spec: str | None, device="cpu", batch_size: int = 64) -> FeatureExtractor:
    """CLI form: `inception` (default; weights located by `resolve_inception_path`), `inception:PATH`,
    `shapes` (a small CNN trained once on the shapes dataset and cached: `condiff.eval.shapes_features`),
    or `random[:DIM[:SIZE[:SEED]]]` (offline tests)."""
    spec = spec or "inception"
    kind, _, rest = spec.partition(":")
    if kind == "inception":
        return inception_extractor(rest or None, device, batch_size)
    if kind == "random":
        args = [int(a) for a in rest.split(":") if a] if rest else []
        if len(args) > 3:
            raise ValueError(f"feature extractor {spec!r}: expected random[:DIM[:SIZE[:SEED]]]")
        return random_extractor(*args, device=device, batch_size=batch_size)
    if spec == "shapes":
        from condiff.eval.shapes_features import shapes_extractor

        return shapes_extractor(device, batch_size)
    raise ValueError(f"feature extractor {spec!r}: expected 'inception', 'inception:PATH', 'shapes' or "
                     "'random[:DIM[:SIZE[:SEED]]]'")
