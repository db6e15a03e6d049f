"""Generation deterministic per global sample index: `condiff sample`, `condiff eval` (split across ranks)
and training previews all sample through `Generator`.

Sample i (0 <= i < n) is a pure function of (pipeline, spec, rows, i), whatever the batch size, the
number of ranks or which rank draws it (up to float reduction order):
  * initial noise: N(0, I) of shape (C, h, w) (the latent grid of the output H x W) from a CPU
    `torch.Generator` seeded with `index_seed(seed, i)` (numpy's SeedSequence of (seed, i): the CPU
    generator keeps only 32 bits of its seed, so `seed * 2^32 + i` would ignore the seed);
  * condition: `rows[i % len(rows)]`, a class id or a prompt (eval's class models: rows = every class,
    ADM's balanced protocol; `condiff sample`: each requested id / prompt repeated --n-per-cond times);
  * size conditioning phi_l (Table 2b, `condiff.inference.spec`): fixed, the output size, drawn from the
    training sizes, or uniform over a range, random draws from the same per-index generator (after the
    noise); phi_h is a full centred crop, un-flipped unless `spec.flip` = 1 (`condiff.diffusion.size_cond`);
  * deterministic samplers (DDIM with eta = 0, DPM-Solver++(2M), Heun) add no noise; DDIM with eta > 0
    draws its per-step noise from one generator per batch seeded with the batch's first index (so eta > 0
    depends on the batching).
  * shape: the output H x W (`--size` / `--resolution`), or with mixed aspects (`spec.aspects`, eval) the
    shape aspects[i % k] (`spec.resolve_shapes`: each with its own Eq. 4 lambda and size bucket); a batch
    holds one shape.
Rank r of W takes the indices r, r + W, r + 2W, ...; results carry their indices so gathered lists can
be put back in global order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from condiff.conditioning.cond import Cond
from condiff.diffusion.guidance import ControlGuidance
from condiff.diffusion.sampling import get_sampler
from condiff.diffusion.size_cond import full_crop_control_h, inference_control
from condiff.inference.pipeline import Pipeline
from condiff.inference.spec import Resolved, SamplingSpec, resolve_shapes


def index_seed(seed: int, i: int, stream: int = 0) -> int:
    """A well-mixed 32-bit seed for (seed, sample index, stream)."""
    return int(np.random.SeedSequence([seed, i, stream]).generate_state(1)[0])


def rank_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Global indices handled by `rank`: rank, rank + W, ... (disjoint, covering range(n) over ranks)."""
    return list(range(rank, n, world_size))


class Generator:
    """Turns global indices into images (B, 3, H, W) in [-1, 1] with one pipeline.

    rows: the conditions cycled over the indices (class ids or prompts); None = every class of a class
    model (required for text models). captions: for class models, optional names, one per class id (the
    captions text metrics such as `align` read)."""

    def __init__(self, pipeline: Pipeline, spec: SamplingSpec, rows: list | None = None,
                 captions: list[str] | None = None, device: str | torch.device = "cpu"):
        self.pipe, self.spec, self.device = pipeline, spec, torch.device(device)
        self.model = pipeline.model
        self.conditioning, self.has_control = pipeline.conditioning, pipeline.has_control
        self.num_classes = pipeline.num_classes
        self.shapes = resolve_shapes(pipeline, spec)  # one Resolved per output shape (mixed aspects: several)
        self.resolved = r = self.shapes[0]
        self.resolution, self.train_resolution, self.guidance = r.resolution, r.train_resolution, r.guidance
        self.size = r.size  # output (H, W) pixels
        self.schedule, self.spacing, self.timesteps, self.size_cond = r.schedule, r.spacing, r.timesteps, r.size_cond
        if self.conditioning == "text":
            if not rows:
                raise ValueError("a text-conditioned model needs prompts (--prompts)")
            if pipeline.text_encoder is None:
                raise ValueError("the checkpoint is text-conditioned but has no text encoder (meta.json 'text_encoder')")
        elif captions and len(captions) != self.num_classes:
            raise ValueError(f"--prompts: {len(captions)} class names for a model with {self.num_classes} classes "
                             "(class models take one name per class id, used as the caption of its samples)")
        self.rows = list(rows) if rows else list(range(self.num_classes))
        self.captions = list(captions) if captions else None
        self.sampler = get_sampler(spec.sampler)
        self.null_cond = pipeline.null_cond(self.device)

    # ------------------------------------------------------------------ per-index inputs
    def caption(self, i: int) -> str | None:
        """The text sample i was asked for (its prompt, or its class name if given); None if unknown."""
        row = self.rows[i % len(self.rows)]
        if self.conditioning == "text":
            return row
        return self.captions[row] if self.captions and row < len(self.captions) else None

    def index_generator(self, i: int) -> torch.Generator:
        return torch.Generator().manual_seed(index_seed(self.spec.seed, i))

    def shape(self, i: int) -> Resolved:
        """The resolved output shape of global sample i (module docstring)."""
        return self.shapes[i % len(self.shapes)]

    def noise(self, i: int) -> Tensor:
        """(C, h, w) initial noise of global sample i."""
        return self.noise_from(self.index_generator(i), self.shape(i))

    def sizes(self, indices: list[int]) -> Tensor:
        """(B, 2) phi_l of the samples (see the module docstring)."""
        sc = self.size_cond
        if sc.mode in ("train-dist", "uniform"):
            rows = []
            for i in indices:
                g, r = self.index_generator(i), self.shape(i)
                self.noise_from(g, r)  # the noise comes first
                rows.append(inference_control(1, r.size, size_distribution=r.size_distribution,
                                              size_range=sc.range, generator=g)[1])
            return torch.cat(rows)
        return torch.cat([inference_control(1, self.shape(i).size, size=sc.size)[1] for i in indices])

    def noise_from(self, g: torch.Generator, r: Resolved) -> Tensor:
        h, w = r.latent_hw
        return torch.randn(r.channels, h, w, generator=g)  # (C, h, w)

    def cond(self, indices: list[int], sizes: Tensor | None = None) -> Cond:
        cond = self.pipe.semantic_cond([self.rows[i % len(self.rows)] for i in indices], self.device)
        if self.has_control:  # a model with control "none" ignores it; leaving it out skips the eps(0,s) row
            control_l = self.sizes(indices) if sizes is None else sizes
            control_h = torch.cat([full_crop_control_h(control_l[j:j + 1], self.shape(i).size)  # aspect W / H
                                   for j, i in enumerate(indices)])
            control_h[:, 5] = float(self.spec.flip)  # (B, 6): the flip field of phi_h (Table 2c)
            cond = replace(cond, control_h=control_h.to(self.device), control_l=control_l.to(self.device))
        return cond

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Cond, first_index: int = 0,
               callback: Callable[[dict], None] | None = None) -> Tensor:
        """Noise (B, C, h, w) + Cond -> images (B, 3, H, W) float32 in [-1, 1] on the device; the lambda,
        schedule and timesteps of sample `first_index`'s shape (a batch holds one shape)."""
        r = self.shape(first_index)
        model_fn = ControlGuidance(self.model, self.null_cond, lam=r.guidance, beta=self.spec.control_guidance)
        gen = torch.Generator(device=self.device).manual_seed(index_seed(self.spec.seed, first_index, 1))
        options = {"eta": self.spec.eta} if self.spec.sampler == "ddim" else {}
        autocast = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
                    if self.spec.precision == "bf16" else nullcontext())
        with autocast:
            x0 = self.sampler(model_fn, noise.to(self.device), r.timesteps, cond, schedule=r.schedule,
                              generator=gen, callback=callback, **options)
        x0 = x0.float()
        if self.pipe.autoencoder is not None:
            x0 = self.pipe.autoencoder.decode(x0)
        return x0.float().clamp(-1, 1)

    def images(self, indices: list[int], callback: Callable[[dict], None] | None = None) -> Tensor:
        """Images (B, 3, H, W) of samples of one shape."""
        noise = torch.stack([self.noise(i) for i in indices])
        return self.sample(noise, self.cond(indices), indices[0], callback)

    def shape_batches(self, rank: int = 0, world_size: int = 1, n: int | None = None) -> list[list[int]]:
        """This rank's share of range(n) (default: one per row) in batches of at most `spec.batch_size`
        indices of one shape (shape by shape, indices in order within each)."""
        mine = rank_indices(len(self.rows) if n is None else n, rank, world_size)
        k, bs = len(self.shapes), self.spec.batch_size
        groups = [[i for i in mine if i % k == s] for s in range(k)] if k > 1 else [mine]
        return [g[start:start + bs] for g in groups for start in range(0, len(g), bs)]

    def batches(self, rank: int = 0, world_size: int = 1, n: int | None = None,
                callback: Callable[[dict], None] | None = None) -> Iterator[tuple[list[int], Tensor]]:
        """Yield (global indices, images) for this rank's share of range(n) (`shape_batches`)."""
        for idx in self.shape_batches(rank, world_size, n):
            yield idx, self.images(idx, callback)

    def num_batches(self, rank: int = 0, world_size: int = 1, n: int | None = None) -> int:
        return len(self.shape_batches(rank, world_size, n))

    def generate(self, n: int | None = None, progress: bool = False) -> Tensor:
        """All n images (default: one per row) in index order, on the CPU (one output shape: mixed aspects
        give images of several shapes, read them from `batches`)."""
        from tqdm.auto import tqdm

        if len(self.shapes) > 1:
            raise ValueError("Generator.generate returns one (N, 3, H, W) tensor: with mixed aspects "
                             "(spec.aspects) iterate Generator.batches instead")

        bar = tqdm(total=self.num_batches(n=n) * len(self.timesteps), desc="sampling", unit="step",
                   disable=not progress, file=sys.stderr)
        out = [x.cpu() for _, x in self.batches(n=n, callback=lambda _: bar.update(1))]
        bar.close()
        return torch.cat(out)

    def record(self) -> dict:
        """What shaped the images (JSON-able): source, weights, spec, resolved settings (the lambda
        actually used is `guidance`)."""
        out = {"source": self.pipe.source, "weights": self.pipe.weights, "autoencoder": self.pipe.meta.autoencoder,
               "spec": self.spec.to_dict(), **self.resolved.to_record()}
        if len(self.shapes) > 1:  # mixed aspects: what differs per shape (sample i has shapes[i % k])
            keys = ("size", "aspect", "latent_hw", "guidance_scale_s", "guidance", "size_bucket")
            out["shapes"] = [{k: r.to_record()[k] for k in keys} for r in self.shapes]
        return out
