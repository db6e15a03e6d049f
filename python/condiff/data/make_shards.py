"""`condiff make-shards`: write webdataset shards that `condiff.data.loader` reads.

Sources (first positional argument):
  shapes              the procedural dataset (`condiff.data.shapes`), `--n`, `--seed`, `--preset`,
                      and `--set FIELD=VALUE` overrides of its config (e.g. `--set colours=red,green,blue
                      --set n_objects=1,2 --set size_range=16,24 --set backgrounds=solid,noise`)
  photos              the photos shipped with scikit-image (`shapes.skimage_photos`)
  DIR                 an image folder; each sub-folder is a class (ids in sorted name order, written to
                      `classes.json`); images directly in DIR have no label. A sidecar `<stem>.txt`
                      next to an image becomes its caption.
  FILE.csv|.jsonl     rows with `path` (relative to the file's folder or absolute), optional
                      `caption` and `label`.

Each sample: the image bytes unchanged when JPEG/PNG/WebP (other formats are re-encoded as PNG),
`json` with width/height and original_width/original_height (the decoded size, i.e. the original),
the source path, and `txt` (caption) / `cls` (label) when known. Keys are running numbers.
Unreadable images are skipped, counted and named in a warning. Shards are `shard-%06d.tar`, written
atomically (see `writer.py`); `dataset.json` in the output folder summarises the set.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys

from PIL import Image

from condiff.io.images import IMAGE_EXTS

from . import shapes as shapes_mod
from .writer import ShardSetWriter

log = logging.getLogger("condiff.data")

_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS)


def encode_image_bytes(data: bytes) -> tuple[str, bytes, int, int]:
    """(extension, bytes, width, height) for raw image file bytes; keeps JPEG/PNG/WebP bytes as they
    are and re-encodes other formats losslessly as PNG. Raises on unreadable data."""
    img = Image.open(io.BytesIO(data))
    img.load()
    w, h = img.size
    ext = _KEEP_FORMATS.get(img.format or "")
    if ext is not None:
        return ext, data, w, h
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "png", buf.getvalue(), w, h


def pil_png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _sample(key: int, ext: str, data: bytes, w: int, h: int, source: str, caption=None, label=None, extra=None) -> dict:
    meta = {"width": w, "height": h, "original_width": w, "original_height": h, "source": source}
    meta.update(extra or {})
    s = {"__key__": f"{key:09d}", ext: data, "json": meta}
    if caption is not None:
        s["txt"] = caption
        meta["caption"] = caption
    if label is not None:
        s["cls"] = int(label)
        meta["label"] = int(label)
    return s


def _write_info(out: str, info: dict) -> dict:
    """Write `dataset.json` (a summary of the shard set) and return `info`."""
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def write_shapes(out: str, n: int, seed: int = 0, preset: str = "default", shard_size: int = 1000, **overrides) -> dict:
    """`n` shapes samples (`shapes.render(i, config, seed)`) with `preset` + field `overrides`."""
    cfg = shapes_mod.get_config(preset, **overrides)
    with ShardSetWriter(out, shard_size) as w:
        for i in range(n):
            s = shapes_mod.render(i, cfg, seed)
            img_w, img_h = s.image.size
            w.write(_sample(i, "png", pil_png_bytes(s.image), img_w, img_h, f"shapes:{seed}:{i}", s.caption, s.label, {"shapes": s.meta}))
    info = {
        "source": "shapes",
        "preset": preset,
        "config": cfg.to_dict(),
        "seed": seed,
        "n": n,
        "num_classes": shapes_mod.num_classes(cfg),
        "class_names": shapes_mod.class_names(cfg),
        "shards": [os.path.basename(p) for p in w.paths],
    }
    return _write_info(out, info)


def write_photos(out: str, shard_size: int = 1000) -> dict:
    with ShardSetWriter(out, shard_size) as w:
        names = []
        for i, (name, img) in enumerate(shapes_mod.skimage_photos()):
            img_w, img_h = img.size
            w.write(_sample(i, "png", pil_png_bytes(img), img_w, img_h, f"skimage:{name}", caption=f"a photo: {name}", label=i))
            names.append(name)
    info = {"source": "skimage", "n": len(names), "num_classes": len(names), "class_names": names, "shards": [os.path.basename(p) for p in w.paths]}
    return _write_info(out, info)


def _list_folder(root: str) -> tuple[list[tuple[str, int | None]], list[str]]:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items: list[tuple[str, int | None]] = []
    for f in sorted(os.listdir(root)):
        if f.lower().endswith(_IMAGE_SUFFIXES) and os.path.isfile(os.path.join(root, f)):
            items.append((os.path.join(root, f), None))
    for cid, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            for f in sorted(files):
                if f.lower().endswith(_IMAGE_SUFFIXES):
                    items.append((os.path.join(dirpath, f), cid))
    return items, classes


def _read_table(path: str) -> list[dict]:
    base = os.path.dirname(os.path.abspath(path))
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as exn:
                        raise ValueError(f"{path}:{ln}: not a JSON object: {exn}") from None
    for ln, r in enumerate(rows, 1):
        if not r.get("path"):
            raise ValueError(f"{path}: row {ln} has no 'path' field (expected columns path[, caption][, label])")
        if not os.path.isabs(r["path"]):
            r["path"] = os.path.join(base, r["path"])
    return rows


def write_files(out: str, items: list[dict], shard_size: int = 1000, **info) -> dict:
    """items: dicts with path, optional caption, label. Returns summary with the skipped paths."""
    skipped = []
    with ShardSetWriter(out, shard_size) as w:
        key = 0
        for it in items:
            path = it["path"]
            try:
                with open(path, "rb") as f:
                    ext, data, img_w, img_h = encode_image_bytes(f.read())
            except Exception as exn:
                log.warning("make-shards: skipping %s: %s: %s", path, type(exn).__name__, exn)
                skipped.append(path)
                continue
            caption = it.get("caption")
            if caption is None:
                side = os.path.splitext(path)[0] + ".txt"
                if os.path.isfile(side):
                    with open(side, encoding="utf-8") as f:
                        caption = f.read().strip()
            label = it.get("label")
            label = None if label in (None, "") else int(label)
            w.write(_sample(key, ext, data, img_w, img_h, path, caption, label))
            key += 1
    info.update(n=key, skipped=skipped, shards=[os.path.basename(p) for p in w.paths])
    return _write_info(out, info)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="condiff make-shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="shapes | photos | an image folder | a .csv / .jsonl of path[,caption][,label]")
    p.add_argument("--out", required=True, help="output folder for shard-%%06d.tar")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--n", type=int, default=10000, help="shapes: number of samples")
    p.add_argument("--seed", type=int, default=0, help="shapes: dataset seed")
    p.add_argument("--preset", default="default", choices=sorted(shapes_mod.PRESETS), help="shapes: preset")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="shapes: config override (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.source == "shapes":
        try:
            overrides = shapes_mod.parse_overrides(args.set)
            shapes_mod.get_config(args.preset, **overrides)
        except ValueError as exn:
            print(f"make-shards: {exn}", file=sys.stderr)
            return 2
        info = write_shapes(args.out, args.n, args.seed, args.preset, args.shard_size, **overrides)
    elif args.source == "photos":
        info = write_photos(args.out, args.shard_size)
    elif os.path.isdir(args.source):
        listed, classes = _list_folder(args.source)
        if not listed:
            print(f"make-shards: no images ({', '.join(_IMAGE_SUFFIXES)}) under {args.source}", file=sys.stderr)
            return 2
        items = [{"path": pth, "label": cid} for pth, cid in listed]
        info = write_files(args.out, items, args.shard_size, source=os.path.abspath(args.source), num_classes=len(classes), class_names=classes)
        with open(os.path.join(args.out, "classes.json"), "w") as f:
            json.dump({"classes": classes, "class_to_id": {c: i for i, c in enumerate(classes)}}, f, indent=1)
    elif os.path.isfile(args.source) and args.source.endswith((".csv", ".jsonl")):
        try:
            rows = _read_table(args.source)
        except ValueError as exn:
            print(f"make-shards: {exn}", file=sys.stderr)
            return 2
        info = write_files(args.out, rows, args.shard_size, source=os.path.abspath(args.source))
    else:
        print(f"make-shards: source {args.source!r} is not 'shapes', 'photos', a folder, or an existing .csv/.jsonl file", file=sys.stderr)
        return 2
    skipped = info.get("skipped", [])
    print(f"make-shards: wrote {info['n']} samples in {len(info['shards'])} shard(s) to {args.out}" + (f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""))
    return 0
