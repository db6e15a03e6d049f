"""Exponential moving average of a model's parameters (what sampling uses by default).

    ema <- d * ema + (1 - d) * theta,   d(step) = min(decay, (1 + step) / (warmup + step))

`warmup` > 0 gives the classic warm-up (TF/Keras use warmup = 10): early averages are short, so the
EMA tracks the fast-moving young weights instead of the random init; warmup = 0 uses `decay` from the
first update. Before `start_step` the EMA simply copies the weights (d = 0).

The shadow tensors live next to the parameters and have their type: with FSDP2 they are DTensors
sharded like the parameters (each rank averages only its shard; `lerp_` is elementwise), with DDP
plain replicated tensors. `state_dict()` returns a FULL model state dict (buffers included, keyed
like `model.state_dict()`) so the EMA file loads straight into a fresh model for inference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _full(t: Tensor) -> Tensor:
    """Gather a (possibly sharded) DTensor into a plain tensor; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: int = 10, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup < 0:
            raise ValueError(f"EMA warmup must be >= 0, got {warmup}")
        self.decay, self.warmup, self.start_step = float(decay), int(warmup), int(start_step)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().clone().float() for n in self.names]

    def decay_at(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.warmup == 0:
            return self.decay
        return min(self.decay, (1.0 + step) / (self.warmup + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the current weights in; `step` is the optimizer step just taken (0-based)."""
        d = self.decay_at(step)
        params = dict(model.named_parameters())
        current = [params[n].detach().float() for n in self.names]
        torch._foreach_lerp_(self.shadow, current, 1.0 - d)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """Full state dict (parameters replaced by their averages, buffers from `model`), CPU tensors.

        Collective under FSDP2: every rank must call it (gathering the shards); materialised on rank 0
        only (other ranks of a process group get {}), so host memory holds one copy per node at most."""
        import torch.distributed as dist

        keep = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        shadow = dict(zip(self.names, self.shadow))
        out = {}
        for name, value in model.state_dict().items():
            full = _full(shadow.get(name, value).detach())
            if keep:
                out[name] = full.to("cpu", dtype=value.dtype)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load averages from a full state dict (keys as `model.state_dict()`); shards are cut locally."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state is missing parameters {missing[:8]}")
        for name, shadow in zip(self.names, self.shadow):
            full = state[name].float()
            if hasattr(shadow, "full_tensor"):  # DTensor: take this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                shadow.copy_(distribute_tensor(full.to(shadow.device), shadow.device_mesh, shadow.placements))
            else:
                shadow.copy_(full.to(shadow.device))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s parameters with the averages (same sharding as at construction)."""
        params = dict(model.named_parameters())
        for name, shadow in zip(self.names, self.shadow):
            params[name].copy_(shadow.to(params[name].dtype))
