"""`condiff precompute`: encode a shard set into shards of latents (and text-encoder states).

For each input shard (in `expand_shards` order) one output shard `latent-%06d.tar` is written
atomically (`writer.py`); a rerun skips the output shards that exist, so an interrupted run resumes
(the settings are stored in `precompute.json` and a rerun with different settings is refused).

Per sample the output holds the original `json` (plus a `precompute` entry), `txt` and `cls` as they
were, and a `safetensors` member with
  latent     (A, C, h, w)  `dtype`   A views of the image, encoded by the autoencoder: `--views K` crops
                                    (strategy `--crop`, crop k drawn with a numpy RNG seeded by
                                    (seed, k, key)), and with `--flip` (default) each crop also mirrored:
                                    A = 2K, views [crop 0, crop 0 mirrored, crop 1, ...]; `--no-flip`: A = K;
  control_h  (A, 6) float32          the exact control metadata of each view (`transforms.py`);
  control_l  (2,)   float32          original [height, width];
  text       (L, C) `dtype`          text-encoder states of the caption's L valid tokens (padding is
                                    not stored: the loader pads with zeros up to `text_max_length`,
                                    and the models' padding mode overwrites padding positions anyway);
  pooled     (Cp,)  `dtype`          pooled text embedding.
CROPS ARE DRAWN AT PRECOMPUTE TIME: training on these shards sees the K stored crops per image (the loader
draws one view per sample and epoch, deterministically: a flip with the training flip probability, then one
of the crops), not a fresh crop each epoch; use K > 1 for crop augmentation (Fig. 8c's strategies). The
training config must ask for what the views hold: `data.crop` equal to `--crop`, and `data.flip` only if
the shards were written with `--flip` (otherwise the loader refuses, naming both). `--views 1 --crop center
--no-flip` stores the plain centre crop.
ASPECT BUCKETS (`--buckets SPEC`, the `data.buckets` syntax of `buckets.py`, pixel budget `--resolution`^2,
sides multiples of `--multiple`, by default 2 x the autoencoder factor, i.e. a patch-2 transformer): each
image goes to the bucket nearest its aspect and all its views are crops of that bucket's aspect, resized to
it, so its latent is (A, C, H / f, W / f) for its bucket (H, W); control_h's aspect_ratio is the bucket's
W / H. `precompute.json` then records `buckets` (the resolved list), `bucket_spec` and `downsample` (f), and
each sample's json `precompute.bucket` ("HxW"). The loader batches these latents by bucket; training must
ask for the same buckets (`data.buckets`, checked).
`null_text.safetensors` (states (1, T, C), lengths (1,), pooled (1, Cp)) holds the encoding of the
empty prompt "" for condition dropout (`conditions.apply_dropout(..., null_text=...)`).

Before starting, an estimate of the output size (from the first shard's sample count) is printed;
after the first batch, an estimate of the time; a tqdm bar shows progress.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter

import numpy as np
import torch

from condiff.io.shards import expand_shards

from .autoencoder import build_autoencoder
from .buckets import BucketCrop, bucket_key, resolve_buckets
from .loader import _FLIP, LoaderConfig, SkipSample, _seed_int, _warn_skip, iter_raw_samples, load_image, parse_fields
from .writer import ShardSetWriter

log = logging.getLogger("condiff.data")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_null_text(out_dir: str):
    """The empty-prompt `TextBatch` stored by precompute in `out_dir`."""
    from safetensors.torch import load_file

    from condiff.conditioning.text import TextBatch

    t = load_file(os.path.join(out_dir, "null_text.safetensors"))
    return TextBatch(t["states"].float(), t["lengths"].long(), t["pooled"].float())


class Precomputer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        ae_cfg = {"kind": args.autoencoder}
        if args.autoencoder == "diffusers":
            ae_cfg.update(path=args.autoencoder_path, sample=args.vae_sample)
        self.autoencoder = build_autoencoder(ae_cfg).to(self.device)
        self.text_encoder = None
        if args.text_encoder != "none":
            from condiff.conditioning.text import build_text_encoder

            tcfg = {"kind": args.text_encoder}
            if args.text_path:
                tcfg["path"] = args.text_path
            if args.text_max_length:
                tcfg["max_length"] = args.text_max_length
            self.text_encoder = build_text_encoder(tcfg).to(self.device)
        conditioning = args.conditioning or ("text" if self.text_encoder is not None else "class")
        self.cfg = LoaderConfig(shards=args.shards, resolution=args.resolution, crop=args.crop, flip_prob=0.0,
                                conditioning=conditioning, min_size=args.min_size)
        multiple = args.multiple or 2 * self.autoencoder.downsample
        self.buckets = resolve_buckets(args.buckets, args.resolution, multiple, where="--buckets")
        if self.buckets is not None and multiple % self.autoencoder.downsample:
            raise ValueError(f"--multiple {multiple} must be a multiple of the autoencoder factor {self.autoencoder.downsample}")
        self.transform = BucketCrop(self.buckets, args.resolution, args.crop, flip_prob=0.0)  # mirrors are added explicitly
        self.stored_views = args.views * (2 if args.flip else 1)
        self.stats: Counter = Counter()
        self.settings = {
            "autoencoder": self.autoencoder.config,
            "text_encoder": None if self.text_encoder is None else self.text_encoder.config,
            "resolution": args.resolution, "crop": args.crop, "flip": args.flip,
            "views": args.views, "dtype": args.dtype, "seed": args.seed,
            "conditioning": conditioning, "min_size": args.min_size,
        }
        if self.buckets is not None:
            self.settings.update(buckets=[list(b) for b in self.buckets], bucket_spec=args.buckets,
                                 downsample=self.autoencoder.downsample)

    # ---------------------------------------------------------------------------------- estimates
    def bytes_per_sample(self) -> int:
        a = self.args
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        h = a.resolution // self.autoencoder.downsample
        n = self.stored_views * (self.autoencoder.latent_channels * h * h * itemsize + 6 * 4) + 8
        if self.text_encoder is not None:  # upper bound: every prompt as long as max_length
            n += (self.text_encoder.max_length * self.text_encoder.dim + self.text_encoder.pooled_dim) * itemsize
        return n + 2048  # json / txt / cls / safetensors header / tar headers (measured order of magnitude)

    # ------------------------------------------------------------------------------------- encode
    def _flush(self, items: list, writer: ShardSetWriter) -> None:
        from safetensors.torch import save as st_save

        if not items:
            return
        latents = [None] * len(items)  # per item (A, C, h, w): encoded bucket by bucket (one shape per call)
        for bucket in dict.fromkeys(it["bucket"] for it in items):
            idx = [j for j, it in enumerate(items) if it["bucket"] == bucket]
            views = torch.stack([v[0] for j in idx for v in items[j]["views"]])  # (n * A, 3, H, W)
            out = []
            for i in range(0, views.shape[0], self.args.batch_size):
                out.append(self.autoencoder.encode(views[i : i + self.args.batch_size].to(self.device)).cpu())
            out = torch.cat(out).to(self.dtype).unflatten(0, (len(idx), self.stored_views))  # (n, A, C, h, w)
            for j, lat in zip(idx, out):
                latents[j] = lat
        text = None
        if self.text_encoder is not None:
            text = self.text_encoder.encode([it["out"]["caption"] for it in items]).to("cpu")
        for j, it in enumerate(items):
            tensors = {
                "latent": latents[j].contiguous(),
                "control_h": torch.from_numpy(np.stack([v[1] for v in it["views"]])),
                "control_l": torch.from_numpy(it["views"][0][2]),
            }
            meta = dict(it["meta"])
            if text is not None:
                n = int(text.lengths[j])
                tensors["text"] = text.states[j, :n].to(self.dtype).contiguous()
                tensors["pooled"] = text.pooled[j].to(self.dtype).contiguous()
                meta["text_max_length"] = self.text_encoder.max_length
            meta["precompute"] = {k: self.settings[k] for k in ("resolution", "crop", "views", "flip", "dtype")}
            if self.buckets is not None:
                meta["precompute"]["bucket"] = bucket_key(it["bucket"])
            sample = {"__key__": it["out"]["key"], "safetensors": st_save(tensors), "json": meta}
            raw = it["raw"]
            for field in ("txt", "cls"):
                if field in raw:
                    sample[field] = raw[field]
            writer.write(sample)
        self.stats["written"] += len(items)

    def run_shard(self, src: str, writer: ShardSetWriter, bar, on_batch=None) -> None:
        a = self.args
        items: list = []
        for raw in iter_raw_samples([src], self.stats):
            self.stats["read"] += 1
            key = raw.get("__key__", "?")
            try:
                out, meta = parse_fields(raw, self.cfg)
                image, orig = load_image(raw, meta, self.cfg, self.stats)
            except SkipSample as exn:
                _warn_skip(self.stats, exn.reason, key, src, exn)
                bar.update(1)
                continue
            views = []
            for v in range(a.views):
                bucket, x, control_h, control_l, _ = self.transform(image, np.random.default_rng(_seed_int(a.seed, v, key)), orig)
                views.append((x, control_h, control_l))
                if a.flip:  # the same crop mirrored (apply_crop mirrors after the resize: exactly x.flip(-1))
                    mirrored_h = control_h.copy()
                    mirrored_h[_FLIP] = 1.0
                    views.append((x.flip(-1), mirrored_h, control_l))
            items.append({"raw": raw, "out": out, "meta": meta, "views": views, "bucket": bucket})
            if len(items) * self.stored_views >= a.batch_size:
                self._flush(items, writer)
                bar.update(len(items))
                items = []
                if on_batch is not None:
                    on_batch()
        self._flush(items, writer)
        bar.update(len(items))


def _count_samples(path: str) -> int:
    c: Counter = Counter()
    return sum(1 for _ in iter_raw_samples([path], c))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="condiff precompute", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="input shard spec: path, glob, brace list, folder, or several joined by '::'")
    p.add_argument("--out", required=True, help="output folder (latent-%%06d.tar, precompute.json, null_text.safetensors)")
    p.add_argument("--autoencoder", default="pixels", choices=["pixels", "diffusers"])
    p.add_argument("--autoencoder-path", default=None, help="local diffusers AutoencoderKL folder (for --autoencoder diffusers)")
    p.add_argument("--vae-sample", action="store_true", help="store a posterior sample instead of the posterior mean")
    p.add_argument("--text-encoder", default="none", choices=["none", "minilm", "clip", "tiny-clip"])
    p.add_argument("--text-path", default=None, help="local folder of the text encoder (clip: required)")
    p.add_argument("--text-max-length", type=int, default=None)
    p.add_argument("--conditioning", default=None, choices=["class", "text", "none"], help="default: text with a text encoder, else class")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--buckets", default="", help="aspect buckets: sdxl | auto | auto:MAX_ASPECT | HxW,HxW,... "
                   "(pixel budget --resolution^2; default: square crops)")
    p.add_argument("--multiple", type=int, default=0, help="bucket sides must be multiples of this (default: 2 x the "
                   "autoencoder factor, for patch-2 transformers; e.g. 32 for the SDXL UNet on the SD-VAE)")
    p.add_argument("--crop", default="center", choices=["global", "local", "mix", "center"])
    p.add_argument("--views", type=int, default=1, help="crops stored per image (K; the loader draws one per epoch)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="also store every crop mirrored (needed to train with data.flip=true; default on)")
    p.add_argument("--min-size", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=32, help="images per autoencoder call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.views < 1:
        p.error("--views must be >= 1")
    try:
        inputs = expand_shards(args.shards)
        pre = Precomputer(args)
    except (FileNotFoundError, ValueError) as exn:
        print(f"precompute: {exn}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    os.makedirs(args.out, exist_ok=True)
    settings_path = os.path.join(args.out, "precompute.json")
    settings = dict(pre.settings, inputs=[os.path.abspath(s) for s in inputs])
    if os.path.exists(settings_path):
        old = json.load(open(settings_path))
        if old != json.loads(json.dumps(settings)):
            diff = sorted(k for k in settings if old.get(k) != json.loads(json.dumps(settings)).get(k))
            print(f"precompute: {args.out} holds a precompute with other settings ({', '.join(diff)}); use another --out", file=sys.stderr)
            return 2
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    if pre.text_encoder is not None:
        from safetensors.torch import save_file

        null = pre.text_encoder.encode([""]).to("cpu")
        save_file({"states": null.states, "lengths": null.lengths, "pooled": null.pooled}, os.path.join(args.out, "null_text.safetensors"))

    def writer_for(i: int) -> ShardSetWriter:  # one output shard per input shard, same index
        return ShardSetWriter(args.out, shard_size=2**62, prefix="latent", start=i, write_empty=True)

    todo = [i for i in range(len(inputs)) if not os.path.exists(writer_for(i).path(i))]
    per_shard = _count_samples(inputs[todo[0]]) if todo else 0
    n_est = per_shard * len(todo)
    print(f"precompute: {len(inputs)} input shard(s), {len(inputs) - len(todo)} already done; "
          f"estimate for the rest: ~{n_est} samples (first shard x {len(todo)}), "
          f"~{n_est * pre.bytes_per_sample() / 2**20:.1f} MiB ({pre.bytes_per_sample()} B/sample, upper bound)")
    t0 = time.time()
    first = {"done": False}

    def on_batch():
        if not first["done"]:
            first["done"] = True
            rate = pre.stats["written"] / max(time.time() - t0, 1e-9)
            print(f"precompute: first batch at {rate:.1f} samples/s -> estimated time ~{n_est / max(rate, 1e-9) / 60:.1f} min")

    with tqdm(total=n_est, unit="img", desc="precompute") as bar:
        for i in todo:
            with writer_for(i) as w:
                pre.run_shard(inputs[i], w, bar, on_batch)
    skipped = {k: v for k, v in pre.stats.items() if k.startswith("skipped_") or k == "shard_errors"}
    print(f"precompute: wrote {pre.stats['written']} samples in {time.time() - t0:.1f} s to {args.out}; skipped {skipped or 'none'}")
    return 0
