"""The manifest every evaluation result carries: enough to reproduce the number.

Written by `save(manifest, out_dir)` as `manifest.json` (the record; `load` reads it back, and
`load(save(m)) == m`) plus `report.md` (a human-readable Markdown table). The image grid of the first
samples is written beside them by `condiff.inference.grid.save_grid` (`grid.png` + `grid.png.json`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from condiff.io.atomic import atomic_write_text

LIBRARIES = ("condiff", "torch", "torchvision", "numpy", "clean-fid", "lpips", "transformers", "scipy", "pillow")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a number depends on ("absent" when not installed)."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    if out["condiff"] == "absent":  # running from a source tree (PYTHONPATH), not installed
        import condiff

        out["condiff"] = f"{condiff.__version__} (source)"
    out["cuda"] = torch.version.cuda or "none"
    return out


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 (first 16 hex) over a checkpoint's weights and meta: every `*.safetensors` and `meta.json`
    of a checkpoint directory (sorted by name), or the bytes of a single file."""
    p = Path(path)
    files = [p] if p.is_file() else sorted([*p.glob("*.safetensors"), *p.glob("meta.json")])
    if not files:
        raise FileNotFoundError(f"checkpoint {p}: no *.safetensors / meta.json to hash")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class Manifest:
    """One evaluation run. Units: `resolution` in pixels; `guidance` is the lambda of Eq. 2 actually used
    (after Eq. 4; what was given is in settings) and `control_guidance` is beta of Eq. 2; `size_cond` is the inference-time size conditioning (e.g. "fixed:256", "train-dist")."""

    checkpoint: str
    checkpoint_hash: str
    sampler: str
    steps: int
    guidance: float
    control_guidance: float
    size_cond: str
    n: int
    seed: int
    resolution: int
    metrics: dict[str, float] = field(default_factory=dict)
    reference: dict[str, str] = field(default_factory=dict)  # e.g. {"train": "<stats hash>", "val": ...}
    settings: dict = field(default_factory=dict)  # everything else that shaped the number (JSON-able)
    libraries: dict[str, str] = field(default_factory=library_versions)
    world_size: int = 1
    command: str = field(default_factory=lambda: " ".join(sys.argv))
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @staticmethod
    def from_dict(d: dict) -> "Manifest":
        names = {f.name for f in fields(Manifest)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"manifest: unknown field(s) {unknown}; expected a subset of {sorted(names)}")
        missing = sorted(f.name for f in fields(Manifest) if f.name not in d and f.default is f.default_factory)
        if missing:
            raise ValueError(f"manifest: missing field(s) {missing}")
        return Manifest(**d)

    def to_markdown(self) -> str:
        """Two Markdown tables: the metrics, then the protocol (one row per field)."""
        lines = ["# condiff evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in self.metrics.items()]
        lines += ["", "| protocol | value |", "|---|---|"]
        for f in fields(self):
            if f.name == "metrics":
                continue
            value = getattr(self, f.name)
            if isinstance(value, dict):
                value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
            lines.append(f"| {f.name} | {_fmt(value)} |")
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace("|", "\\|")


def save(manifest: Manifest, out_dir: str | os.PathLike) -> Path:
    """Write `manifest.json` and `report.md` into `out_dir` (atomically); return the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("manifest.json", json.dumps(manifest.to_dict(), indent=2) + "\n"),
                       ("report.md", manifest.to_markdown())):
        atomic_write_text(out / name, text)
    return out / "manifest.json"


def load(path: str | os.PathLike) -> Manifest:
    """Read a manifest from `manifest.json` or from the directory holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        return Manifest.from_dict(json.loads(p.read_text()))
    except json.JSONDecodeError as exn:
        raise ValueError(f"manifest {p}: not valid JSON ({exn})") from exn
