"""The training loop: one code path for a laptop CPU, one GPU, and many nodes (torchrun).

One optimizer step (App. C recipe):
    for each of `grad_accum` micro-batches on this rank:
        batch -> (pixels | VAE latents) x0, `Cond` (class ids | text-encoder states, control metadata,
                 both already dropped per sample for guidance by the data stream)
        loss = diffusion_loss(model, x0, cond, schedule)   # eps-prediction, schedule.weighting (App. C: "edm")
        (loss / grad_accum).backward()                      # DDP all-reduces on the last micro-batch
    grad_norm = clip(grads, optim.grad_clip)
    lr = constant lr with linear warm-up; Adam(W) step; EMA update (provisional, `guard.StepGuard`)
    if the loss, grad_norm or the updated weights / EMA are non-finite on ANY rank: roll the step back
        (counted; `max_nonfinite` in a row stop the run; a run ending inside a streak fails, unsaved)
    every log.every: JSONL record (+ TensorBoard); every save_every: atomic checkpoint;
    every log.sample_every: EMA sample grid.

Exact resume: the checkpoint holds the model, EMA, optimizer (full, unsharded), the per-rank torch
RNG states and the per-rank data positions; restoring them makes the continued run bit-identical to
an uninterrupted one (tested with 2 gloo processes). Sample grids draw from their own generator so
they never perturb the training RNG stream.
"""

from __future__ import annotations

import contextlib
import atexit
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from condiff.conditioning.cond import Cond
from condiff.data.buckets import bucket_key
from condiff.inference.grid import save_grid
from condiff.io import checkpoint as ckpt
from condiff.train import distributed as D
from condiff.train.config import ConfigError, TrainConfig, dump_config
from condiff.train.data import (BucketSizes, TrainStream, check_shards, dataset_info, ensure_builtin_shards, input_multiple,
                                merge_positions, resolve_train_buckets, rounded_sizes)
from condiff.train.ema import EMA
from condiff.io.phema import load_checkpoint_state
from condiff.train.guard import StepGuard
from condiff.train.phema import PowerEMA


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps, or a run that ends inside a streak of them: the run stops
    with exit status 3; the last good checkpoint is kept and named."""


# ------------------------------------------------------------------------------------------ helpers
def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                             "python_pos": random.getstate()[2]}
    np_state = np.random.get_state()
    state["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"] = int(np_state[2])
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class CachedTextEncoder:
    """Wraps a frozen `TextEncoder`, memoising per-caption encodings (small caption vocabularies, e.g.
    the shapes demo: each distinct caption goes through the encoder once). Returns the same
    TextBatch fields: states (B, T, C), lengths (B,), pooled (B, Cp)."""

    def __init__(self, encoder: Any, capacity: int):
        self.encoder, self.capacity = encoder, capacity
        self.cache: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.encoder, name)

    def precompute(self, captions: list[str]) -> None:
        todo = [c for c in dict.fromkeys(captions) if c not in self.cache]
        for i in range(0, len(todo), 64):
            chunk = todo[i : i + 64]
            out = self.encoder.encode(chunk)
            for j, cap in enumerate(chunk):
                if len(self.cache) < self.capacity:
                    pooled = out.pooled[j] if getattr(out, "pooled", None) is not None else None
                    self.cache[cap] = (out.states[j].detach(), out.lengths[j].detach(), pooled)

    def encode(self, captions: list[str]):
        missing = [c for c in captions if c not in self.cache]
        if missing and len(self.cache) + len(set(missing)) <= self.capacity:
            self.precompute(missing)
            missing = []
        if missing:
            return self.encoder.encode(captions)
        rows = [self.cache[c] for c in captions]
        from types import SimpleNamespace

        pooled = torch.stack([r[2] for r in rows]) if rows[0][2] is not None else None
        return SimpleNamespace(states=torch.stack([r[0] for r in rows]), lengths=torch.stack([r[1] for r in rows]),
                               pooled=pooled)


def build_text_encoder(cfg: TrainConfig):
    if cfg.model.conditioning != "text":
        return None
    from condiff.conditioning.text import build_text_encoder as build

    encoder = build(cfg.text.encoder)
    if hasattr(encoder, "eval"):
        encoder.eval()
    return CachedTextEncoder(encoder, cfg.text.cache) if cfg.text.cache > 0 else encoder


def build_autoencoder(cfg: TrainConfig):
    from condiff.data.autoencoder import build_autoencoder as build

    return build(cfg.autoencoder.config).eval()


def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """Keyword arguments for `condiff.models.create`: the recipe's `model.kwargs` plus, for class-
    conditional models, the class count of the data. Widths that depend on the text encoder or the
    autoencoder (text widths, input channels) are stated in the recipe, where they are visible; a stated
    width that contradicts them is a ConfigError when the recipe loads (`config.check_model`)."""
    kw: dict[str, Any] = {"control_fields": list(cfg.data.control_fields)}  # the Table 2c switch (DataConfig)
    if cfg.model.conditioning == "class" and num_classes:
        kw["num_classes"] = num_classes
    kw.update(cfg.model.kwargs)
    return kw


def build_model(cfg: TrainConfig, kwargs: dict) -> nn.Module:
    from condiff.models import create

    return create(cfg.model.name, conditioning=cfg.model.conditioning, **kwargs)


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """A run: model, schedule, EMA, optimizer and data built from a `TrainConfig`, in this order of
    precedence: `run_dir`'s latest checkpoint (resume: architecture, schedule, weights, optimizer, RNG and
    data position all come from it; recipe changes to `model.*` are ignored), else `init_from`
    (transfer), else a fresh model. `run()` trains to `cfg.steps`; `train_step()` is one optimizer step."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo | None = None):
        self.cfg = cfg
        self.info = info or D.init(cfg.device)
        self.device = self.info.device
        world = self.info.world_size
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by world_size x grad_accum = "
                             f"{world} x {cfg.grad_accum}")
        self.micro_batch = cfg.batch_size // (world * cfg.grad_accum)
        self.run_dir = Path(cfg.run_dir)
        seed_everything(cfg.seed)  # identical on every rank: FSDP2 shards a model each rank initialised
        self.lock = None
        if self.info.is_main:  # one trainer per run directory; then remove what killed saves left behind
            self.lock = ckpt.RunLock(self.run_dir).acquire()
            atexit.register(self.lock.release)
            for stale in ckpt.clean_stale(self.run_dir):
                self.log_text(f"removed {stale.name} (left by an interrupted save or deletion)")
            dump_config(cfg, self.run_dir / "config.yaml")
        D.barrier()

        resume_from = self._resume_source()
        meta = ckpt.read_meta(resume_from) if resume_from else None
        self.text_encoder = build_text_encoder(cfg)
        self.autoencoder = build_autoencoder(cfg)

        self.step = 0
        if self.info.is_main:
            ensure_builtin_shards(cfg.data)
        D.barrier()
        check_shards(cfg.data, cfg.model.conditioning)
        self.num_classes = cfg.data.num_classes or int(dataset_info(cfg.data.shards).get("num_classes", 0))
        if cfg.model.conditioning == "class" and not self.num_classes:
            raise ConfigError("data.num_classes: class-conditional training needs the class count (set data.num_classes, "
                             "or shards written by `condiff make-shards` with a dataset.json)")
        if meta is not None:
            arch = dict(meta.model)
        else:
            from condiff.models import model_config

            arch = dataclasses.asdict(model_config(cfg.model.name, cfg.model.conditioning, **model_kwargs(cfg, self.num_classes)))
        buckets = resolve_train_buckets(cfg.data, input_multiple(arch, self.autoencoder.downsample))
        self.data = TrainStream(cfg.data, conditioning=cfg.model.conditioning, batch_size=self.micro_batch,
                                rank=self.info.rank, world_size=world, seed=cfg.seed, num_classes=self.num_classes,
                                null_text=self._null_text(), buckets=buckets)
        if meta is not None and meta.data_position:
            self.data.load_state_dict(meta.data_position)
        # original sizes seen in training (this rank's; `save` gathers every rank's). A checkpoint's lists already
        # hold every rank's: rank 0 carries them on, so that the next gather counts them once.
        resumed = meta is not None and self.info.is_main
        self.train_sizes: list[list[int]] = list(meta.train_sizes) if resumed else []
        self.train_sizes_by_bucket = BucketSizes(meta.train_sizes_by_bucket if resumed else None)
        # images per bucket ("HxW"): all ranks up to the resumed checkpoint, this rank since then / since the last log
        self.bucket_images_resumed = Counter(meta.counters.get("bucket_images", {}) if meta else {})
        self.rank_buckets: Counter = Counter()
        self.window_buckets: Counter = Counter()
        self.transfer_info: dict[str, Any] | None = None

        if meta is not None:  # resume: the architecture and schedule are the checkpoint's
            self.model = ckpt.build_model_from_meta(meta)
            from condiff.diffusion import Schedule

            self.schedule = Schedule.from_dict(meta.schedule)
            self.transfer_info = meta.transfer
        elif cfg.init_from:
            from condiff.train.transfer import transfer_init

            kwargs = model_kwargs(cfg, self.num_classes)
            self.model, self.schedule, self.transfer_info = transfer_init(cfg, kwargs, log=self.log_text)
        else:
            from condiff.diffusion import Schedule

            self.model = build_model(cfg, model_kwargs(cfg, self.num_classes))
            self.schedule = Schedule(**cfg.schedule.kwargs)
        self.model.to(self.device)
        self.model_config = dict(self.model.config)

        if cfg.activation_checkpointing:
            D.apply_activation_checkpointing(self.model)
        parallel = cfg.parallel if cfg.parallel != "auto" else ("ddp" if self.info.enabled else "none")
        self.parallel = parallel
        # FSDP2 shards `self.model` in place; DDP returns a wrapper used for forward/backward only
        self.fwd_model = D.wrap_model(self.model, self.info, parallel, mixed_bf16=cfg.precision == "bf16")
        if cfg.compile:
            self.fwd_model = torch.compile(self.fwd_model)
        # ema.kind: exp -> self.ema only; power -> power profiles, self.ema is the first one (ema.safetensors,
        # sample grids); both -> the two side by side
        self.phema = PowerEMA(self.model, cfg.ema.sigma_rels) if cfg.ema.kind != "exp" else None
        self.ema = self.phema.profiles[0] if cfg.ema.kind == "power" else EMA(self.model, cfg.ema.decay,
                                                                               cfg.ema.warmup, cfg.ema.start_step)
        seed_everything(cfg.seed * 1000 + self.info.rank + 1)  # per-rank streams (noise, timesteps) from here on
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
        self.lr = cfg.effective_lr()
        self.optimizer = opt_cls(params, lr=self.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                 weight_decay=cfg.optim.weight_decay)
        self.guard = StepGuard(params, self.optimizer, self.ema)
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.images_seen = 0
        if resume_from is not None:
            self._resume(resume_from, meta)

    def _null_text(self):
        """Encoding of "" (the null caption) for shards with precomputed text states."""
        if self.text_encoder is None:
            return None
        with torch.no_grad():
            return self.text_encoder.encode([""])

    # -------------------------------------------------------------------------------- persistence
    def log_text(self, msg: str) -> None:
        if self.info.is_main:
            print(f"[condiff.train] {msg}", file=sys.stderr, flush=True)

    def _resume_source(self) -> Path | None:
        """The checkpoint to resume from: the newest that verifies (all of model, EMA, optimizer, RNG and,
        for ema.kind=power|both, post-hoc EMA profiles present with the sizes and hashes meta.json records).
        Newer ones that do not verify are moved to run_dir/rejected/ with a warning naming the file."""
        cfg = self.cfg
        existing = ckpt.list_checkpoints(self.run_dir)
        if not cfg.resume:
            if existing and not cfg.overwrite:
                raise ConfigError(f"resume=false: {self.run_dir} already holds checkpoints ({existing[-1].name} is the "
                                  f"newest); set overwrite=true to delete them, or choose another run_dir")
            if existing and self.info.is_main:
                for old in existing:
                    ckpt.remove_checkpoint(old)
                (self.run_dir / ckpt.LATEST).unlink(missing_ok=True)
                self.log_text(f"overwrite=true: deleted {len(existing)} checkpoints of {self.run_dir}")
            D.barrier()
            return None
        require = ("ema.safetensors", "optim.pt", "rng.pt") + (("phema.safetensors",) if cfg.ema.kind != "exp" else ())
        found, skipped = ckpt.resumable_checkpoint(self.run_dir, require)
        D.barrier()  # every rank has verified before rank 0 moves anything
        if found is None and skipped:
            newest, problems = next(iter(skipped.items()))
            fixable = all(p.endswith(": missing") and not p.startswith(str(newest / "model.safetensors"))
                          for p in problems)
            if not (cfg.resume_partial and fixable):
                raise ConfigError(f"{self.run_dir}: no checkpoint can be resumed exactly: " + "; ".join(problems)
                                  + (". Set resume_partial=true to resume from it anyway" if fixable else ""))
            self.log_text(f"WARNING resume_partial=true: resuming from {newest} although " + "; ".join(problems)
                          + ": missing state restarts from scratch (not an exact resume)")
            return newest
        for bad, problems in skipped.items():
            self.log_text(f"WARNING skipping checkpoint {bad.name}: " + "; ".join(problems)
                          + f"; moved to {self.run_dir / 'rejected' / bad.name}")
            if self.info.is_main:
                (self.run_dir / "rejected").mkdir(exist_ok=True)
                target = self.run_dir / "rejected" / bad.name
                os.replace(bad, target if not target.exists() else target.with_name(f"{bad.name}-{os.getpid()}"))
        D.barrier()
        return found

    def _resume(self, path: Path, meta: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        D.load_full_state_dict(self.model, ckpt.load_weights(path, "model"))
        ema_state = ckpt.load_weights(path, "ema") if (path / "ema.safetensors").is_file() else ckpt.load_weights(path, "model")
        self.ema.load_state_dict(ema_state)
        if self.phema is not None:
            self.phema.load_state_dict(load_checkpoint_state(path, self.cfg.ema.kind))
        optim = ckpt.load_pt(path, "optim.pt")
        if optim is not None:
            set_optimizer_state_dict(self.model, self.optimizer, optim,
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        rng = ckpt.load_pt(path, "rng.pt")
        if rng is not None and len(rng) == self.info.world_size:
            _set_rng_state(rng[self.info.rank], self.device)
        elif rng is not None:
            self.log_text(f"resume: checkpoint has RNG states for {len(rng)} ranks, this run has "
                          f"{self.info.world_size}: RNG streams restart from the seed (not bit-exact)")
        self.step = int(meta.step)
        counters = meta.counters
        self.nonfinite_total = int(counters.get("nonfinite_total", 0))
        self.images_seen = int(counters.get("images_seen", 0))
        self.log_text(f"resumed from {path} at step {self.step}")

    def save(self) -> Path | None:
        """Collective: every rank gathers; rank 0 writes the checkpoint atomically."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        model_state = D.full_state_dict(self.model)
        ema_state = self.ema.state_dict(self.model)
        extra = {"phema": self.phema.state_dict(self.model)} if self.phema is not None else None
        optim_state = get_optimizer_state_dict(self.model, self.optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rng = D.all_gather_object(_rng_state(self.device))
        train_sizes = ckpt.cap_sizes([row for part in D.all_gather_object(self.train_sizes) for row in part])
        sizes_by_bucket = BucketSizes.merge(D.all_gather_object(self.train_sizes_by_bucket.sizes))
        positions = merge_positions(D.all_gather_object(self.data.state_dict()))
        bucket_images = dict(sum(D.all_gather_object(self.rank_buckets), self.bucket_images_resumed.copy()))
        path = None
        if self.info.is_main:
            meta = ckpt.CheckpointMeta(
                model=self.model_config, schedule=self.schedule.to_dict(),
                text_encoder=getattr(self.text_encoder, "config", None), autoencoder=self.autoencoder.config,
                base_size=getattr(self.model, "base_size", None), train_sizes=train_sizes,
                train_sizes_by_bucket=sizes_by_bucket,
                data_position=positions, world_size=self.info.world_size, config=self.cfg.to_dict(),
                transfer=self.transfer_info,
                counters={"nonfinite_total": self.nonfinite_total, "images_seen": self.images_seen,
                          "bucket_images": bucket_images})
            keep = self.cfg.keep_last if self.cfg.keep_last > 0 else None
            path = ckpt.save_checkpoint(self.run_dir, self.step, model_state=model_state, ema_state=ema_state,
                                        meta=meta, optim_state=optim_state, rng_state=rng, keep_last=keep,
                                        extra_weights=extra)
        D.barrier()
        return path

    # -------------------------------------------------------------------------------- one step
    def prepare(self, batch: dict[str, Any]) -> tuple[Tensor, Cond]:
        """Batch dict -> (x0 (B, C, H, W) on device: pixels or latents, Cond on device)."""
        from condiff.data.conditions import build_cond

        if "latent" in batch:
            x0 = batch["latent"].to(self.device)
        else:
            with torch.no_grad():
                x0 = self.autoencoder.encode(batch["image"].to(self.device))
        if "control_l" in batch and len(self.train_sizes) < ckpt.TRAIN_SIZES_CAP:
            self.train_sizes.extend(rounded_sizes(batch["control_l"]))
        if "bucket" in batch:
            self.window_buckets[bucket_key(batch["bucket"])] += x0.shape[0]
            self.rank_buckets[bucket_key(batch["bucket"])] += x0.shape[0]
            if "control_l" in batch:
                self.train_sizes_by_bucket.add(batch["bucket"], batch["control_l"])
        with torch.no_grad():
            cond = build_cond(batch, self.text_encoder, device=self.device)
        if self.cfg.model.conditioning == "class":
            cond.text = cond.text_lengths = cond.pooled = None
        else:
            cond.labels = None
        return x0, cond

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        from condiff.diffusion.loss import diffusion_loss

        cfg = self.cfg
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x0, cond = self.prepare(next(self.data))
            sync = micro == cfg.grad_accum - 1
            no_sync = self.fwd_model.no_sync() if (not sync and hasattr(self.fwd_model, "no_sync")) else contextlib.nullcontext()
            with no_sync, self._autocast():
                loss, _ = diffusion_loss(self.fwd_model, x0, cond, self.schedule, weighting=cfg.schedule.weighting,
                                          snr_gamma=cfg.schedule.snr_gamma)
            (loss.float() / cfg.grad_accum).backward()
            loss_sum += loss.detach().float() / cfg.grad_accum
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = self.lr * min(1.0, (self.step + 1) / cfg.optim.warmup_steps) if cfg.optim.warmup_steps > 0 else self.lr
        # take the step (and EMA update) provisionally, then measure the new weights (guard.py)
        self.guard.snapshot()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if cfg.ema.kind != "power":  # kind=power: self.ema is a power profile, updated with the others below
            self.ema.update(self.model, self.step)
        weights_sq = self.guard.updated_sq().to(self.device)
        # agree across ranks: mean loss, and "all finite" (loss, gradient, new weights and EMA; a
        # failure on one rank rolls the step back everywhere)
        flags = [torch.isfinite(loss_sum), torch.isfinite(grad_norm), torch.isfinite(weights_sq)]
        stats = torch.stack([loss_sum.detach(), torch.stack(flags).all().float()]).detach()
        stats = D.all_reduce_sum(stats.clone())
        world = self.info.world_size
        finite = bool(stats[1] == world)
        if finite:
            self.nonfinite_streak = 0
        else:
            self.guard.restore()
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
        if self.phema is not None:  # skipped steps too: the weights did not move, the power profile stays exact
            self.phema.update(self.model, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.images_seen += cfg.batch_size
        return {"loss": float(stats[0] / world), "grad_norm": float(grad_norm), "lr": lr, "finite": finite}

    # -------------------------------------------------------------------------------- run
    def run(self, final_grid: bool = True) -> dict[str, Any]:
        """Train up to cfg.steps (resumed runs continue), save, plot the loss curve and (final_grid, when
        the recipe lists prompts or labels) write samples/final.png. Returns a summary dict."""
        cfg = self.cfg
        logger = MetricsLogger(self.run_dir, enabled=self.info.is_main, tensorboard=cfg.log.tensorboard)
        bar = None
        if self.info.is_main and cfg.log.progress and self.step < cfg.steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        t_start = time.perf_counter()
        t_window, window_steps, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
        start_step = self.step
        last_save, save_pending = self.step, False
        try:
            while self.step < cfg.steps:
                out = self.train_step()
                window_steps += 1
                if out["finite"]:
                    window_loss += out["loss"]
                    window_n += 1
                if not out["finite"]:
                    self.log_text(f"step {self.step}: non-finite loss, gradient or updated weights (loss={out['loss']}, "
                                  f"grad_norm={out['grad_norm']}), update rolled back "
                                  f"({self.nonfinite_streak} in a row, {self.nonfinite_total} in total)")
                    if self.nonfinite_streak >= cfg.max_nonfinite:
                        raise NonFiniteError(
                            f"{self.nonfinite_streak} consecutive non-finite steps (max_nonfinite={cfg.max_nonfinite}) "
                            f"at step {self.step}: stopping. The last good checkpoint is "
                            f"{ckpt.latest_checkpoint(self.run_dir) or '(none yet)'}; lower optim.lr, check the data, "
                            f"or raise max_nonfinite.")
                if bar is not None:
                    elapsed = max(time.perf_counter() - t_window, 1e-9)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", img_s=f"{window_steps * cfg.batch_size / elapsed:.1f}",
                                    refresh=False)
                    bar.update(1)
                if self.step % cfg.log.every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - t_window
                    window_buckets = sum(D.all_gather_object(self.window_buckets), Counter())  # every rank's images
                    self.window_buckets = Counter()
                    logger.log({"step": self.step, "loss": window_loss / max(window_n, 1), "grad_norm": out["grad_norm"],
                                "lr": out["lr"], "img_per_s": window_steps * cfg.batch_size / max(elapsed, 1e-9),
                                "sec_per_step": elapsed / max(window_steps, 1), "nonfinite_total": self.nonfinite_total,
                                "images_seen": self.images_seen, "data_skipped": self.data.skipped(),
                                "bucket_img_per_s": {k: v / max(elapsed, 1e-9) for k, v in sorted(window_buckets.items())},
                                "time": time.time()})
                    t_window, window_steps, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
                if cfg.log.sample_every and self.step % cfg.log.sample_every == 0 and self.step < cfg.steps:
                    self.sample_grid(self.run_dir / "samples" / f"step_{self.step:08d}.png")
                if self.step % cfg.save_every == 0:
                    save_pending = True
                if self.phema is not None and cfg.ema.snapshot_every and self.step % cfg.ema.snapshot_every == 0:
                    self.phema.snapshot(self.model, self.run_dir, self.step, write=self.info.is_main)
                if save_pending and self.nonfinite_streak == 0:  # never checkpoint inside a non-finite streak
                    self.save()
                    last_save, save_pending = self.step, False
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        if self.nonfinite_streak:  # the weights are those of step (self.step - streak): report, do not save
            raise NonFiniteError(
                f"the run ended inside a streak of {self.nonfinite_streak} non-finite steps (steps "
                f"{self.step - self.nonfinite_streak + 1}..{self.step} rolled back): not saved. The last good "
                f"checkpoint is {ckpt.latest_checkpoint(self.run_dir) or '(none yet)'}; lower optim.lr or check the data.")
        if last_save != self.step or not ckpt.latest_checkpoint(self.run_dir):
            self.save()
        if self.phema is not None and cfg.ema.snapshot_every and self.step % cfg.ema.snapshot_every and self.step > start_step:
            self.phema.snapshot(self.model, self.run_dir, self.step, write=self.info.is_main)  # the final weights
        wall = time.perf_counter() - t_start
        summary = {"steps": self.step, "steps_this_run": self.step - start_step, "wall_s": wall,
                   "sec_per_step": wall / (self.step - start_step) if self.step > start_step else None, "nonfinite_total": self.nonfinite_total,
                   "run_dir": str(self.run_dir)}
        # the training result is saved: a failing extra (plotting dependency, preview) is a warning
        if self.info.is_main:
            try:
                plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            except Exception as e:  # noqa: BLE001 (any failure of an optional output)
                self.log_text(f"warning: loss curve not written ({type(e).__name__}: {e}); the run is complete")
        if final_grid and (cfg.log.sample_prompts or cfg.log.sample_labels):
            try:
                summary["grid"] = str(self.sample_grid(self.run_dir / "samples" / "final.png"))
            except Exception as e:  # noqa: BLE001
                self.log_text(f"warning: final sample grid not written ({type(e).__name__}: {e}); the run is complete")
        return summary

    # -------------------------------------------------------------------------------- samples
    def sample_grid(self, path: Path) -> Path | None:
        """EMA sample grid (rows = prompts / labels, columns = samples). Collective (gathers EMA)."""
        ema_state = self.ema.state_dict(self.model)
        if not self.info.is_main:
            return None
        from condiff.models import create

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # building a model draws init weights: keep the training stream
            model = create(**self.model_config)
        model.load_state_dict(ema_state)
        model.to(self.device).eval()
        gen = preview_generator(model, self.schedule, self.cfg, text_encoder=self.text_encoder,
                                autoencoder=self.autoencoder, train_sizes=self.train_sizes,
                                train_sizes_by_bucket=self.train_sizes_by_bucket.sizes, device=self.device)
        return save_grid(gen.generate(), path, nrow=self.cfg.log.sample_per_prompt, min_cell=64,
                         record={**gen.record(), "step": self.step})


def preview_generator(model: nn.Module, schedule: Any, cfg: TrainConfig, *, text_encoder=None, autoencoder=None,
                      train_sizes=(), train_sizes_by_bucket=None, device="cpu", seed: int = 1234):
    """The `condiff.inference.generate.Generator` of a training grid: rows = prompts (or labels) x
    sample_per_prompt, DDIM over log.sample_steps, lambda = log.sample_guidance and size conditioning
    log.sample_size_cond read exactly as `condiff sample` reads --guidance and --size-cond."""
    from condiff.inference.generate import Generator
    from condiff.inference.pipeline import Pipeline
    from condiff.inference.spec import SamplingSpec

    items = cfg.log.sample_prompts if cfg.model.conditioning == "text" else [int(x) for x in cfg.log.sample_labels]
    rows = [x for x in items for _ in range(cfg.log.sample_per_prompt)]
    meta = ckpt.CheckpointMeta(model=dict(model.config), schedule=schedule.to_dict(), train_sizes=list(train_sizes),
                               train_sizes_by_bucket=dict(train_sizes_by_bucket or {}))
    pipe = Pipeline(model, schedule, text_encoder, autoencoder, meta, source="training preview", weights="ema")
    spec = SamplingSpec(seed=seed, sampler="ddim", steps=cfg.log.sample_steps, guidance=cfg.log.sample_guidance,
                        size_cond=cfg.log.sample_size_cond, batch_size=max(1, len(rows)))
    return Generator(pipe, spec, rows, device=device)


class MetricsLogger:
    """JSONL metrics (`metrics.jsonl`, one record per log interval, appended across resumes) and,
    optionally, TensorBoard scalars (`tb/`)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("log.tensorboard=true needs the tensorboard package (pip install tensorboard)") from e
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(metrics: Path, out: Path) -> Path | None:
    """Loss vs step from metrics.jsonl (matplotlib, Agg backend); None when there is nothing to plot."""
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if math.isfinite(r.get("loss", float("nan")))]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, loss, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; sets up and tears down the process group when launched by torchrun."""
    info = D.init(cfg.device)
    try:
        return Trainer(cfg, info).run()
    finally:
        D.shutdown()
