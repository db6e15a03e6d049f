"""Step rollback for the non-finite guard: an optimizer step (and its EMA update) that leaves a
non-finite weight is undone.

The trainer snapshots everything a step writes -- the parameters, the optimizer's per-parameter
state (Adam: step, exp_avg, exp_avg_sq) and every tensor the EMA object holds -- into buffers
allocated once and refreshed with one fused copy per step, takes the step, and measures the result
with one fused norm: `updated_sq()` = sum over the new parameters and EMA tensors of ||t||^2 in
fp32. It is non-finite when any weight is NaN/inf, and also when the weights exploded (|t| beyond
~1.8e19, where the fp32 square overflows: a model whose forward can no longer be finite). The trainer
folds that flag into its one all-reduce of step statistics; on any rank's failure every rank calls
`restore()` and the state is bit-identical to before the step.

Memory: one extra copy of the parameters, the optimizer state and the EMA (Adam + one EMA: about 4x
the parameter bytes), on the device, local shards only under FSDP2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2); plain tensors pass through."""
    return t.to_local() if hasattr(t, "to_local") else t


def object_tensors(obj: Any) -> list[Tensor]:
    """Every tensor an object holds in its attributes (directly, or in lists / tuples / dicts), in a
    fixed order: the EMA's shadow weights whatever form the EMA takes."""
    out: list[Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(value[k])

    for name in sorted(vars(obj)):
        walk(vars(obj)[name])
    return out


class StepGuard:
    """Snapshot / measure / restore one optimizer step of `params`, `optimizer` and `ema`."""

    def __init__(self, params: list[Tensor], optimizer: torch.optim.Optimizer, ema: Any):
        self.params, self.optimizer, self.ema = params, optimizer, ema
        self._buffers: dict[int, Tensor] = {}
        self._opt_keys: dict[int, list[str] | None] = {}

    def _live(self) -> list[Tensor]:
        """Local views of every tensor a step writes, in snapshot order (optimizer state included
        only for parameters that already have state; `_opt_keys` records which)."""
        live = [_local(p.data) for p in self.params]
        self._opt_keys = {}
        for p in self.params:
            state = self.optimizer.state.get(p)
            keys = sorted(k for k, v in state.items() if isinstance(v, Tensor)) if state else None
            self._opt_keys[id(p)] = keys
            live.extend(_local(state[k]) for k in keys or ())
        live.extend(_local(t) for t in object_tensors(self.ema))
        return live

    @torch.no_grad()
    def snapshot(self) -> None:
        live = self._live()
        bufs = []
        for i, t in enumerate(live):
            buf = self._buffers.get(i)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
                buf = self._buffers[i] = torch.empty_like(t)
            bufs.append(buf)
        self._saved_keys = dict(self._opt_keys)
        self._count = len(live)
        torch._foreach_copy_(bufs, live)

    @torch.no_grad()
    def updated_sq(self) -> Tensor:
        """Sum of ||t||^2 (fp32 scalar) over the parameters and the EMA tensors as they are now."""
        tensors = [_local(p.data) for p in self.params] + [_local(t) for t in object_tensors(self.ema)]
        tensors = [t for t in tensors if t.numel() and t.is_floating_point()]
        if not tensors:
            return torch.zeros(())
        norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
        return torch.stack([n.to(norms[0].device) for n in norms]).square().sum()

    @torch.no_grad()
    def restore(self) -> None:
        """Undo everything since `snapshot()`: parameters, optimizer state (state that the step created
        is dropped again), EMA tensors."""
        for p in self.params:
            if self._saved_keys.get(id(p)) is None:
                self.optimizer.state.pop(p, None)
        live = [_local(p.data) for p in self.params]
        for p in self.params:
            keys = self._saved_keys.get(id(p))
            live.extend(_local(self.optimizer.state[p][k]) for k in keys or ())
        live.extend(_local(t) for t in object_tensors(self.ema))
        if len(live) != self._count:
            raise RuntimeError(f"StepGuard.restore: {len(live)} tensors now, {self._count} at the snapshot")
        torch._foreach_copy_(live, [self._buffers[i] for i in range(self._count)])
