"""Post-hoc EMA tracking during training (EDM2, Karras et al. 2024, Sec. 3.1): power-function EMA profiles
updated every step; their snapshots and the after-training reconstruction live in `condiff.io.phema`
(the math and the on-disk format are documented there).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from condiff.io.phema import power_beta, sigma_key, sigma_rel_to_gamma, write_snapshot
from condiff.train.ema import EMA


class PowerProfile(EMA):
    """One power-function EMA (sigma_rel): `EMA`'s storage, sharding and I/O with beta_t of EDM2."""

    def __init__(self, model: nn.Module, sigma_rel: float):
        super().__init__(model, decay=0.0, warmup=0)
        self.sigma_rel = float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(self.sigma_rel)

    def decay_at(self, step: int) -> float:
        """`step` is the 0-based optimizer step just taken: t = step + 1."""
        return power_beta(self.gamma, step + 1)


class PowerEMA:
    """The power-function EMA profiles of a run (`ema.sigma_rels`), updated after every optimizer step
    (skipped non-finite steps included: the weights did not move, and the profile stays exact)."""

    def __init__(self, model: nn.Module, sigma_rels: list[float]):
        if not sigma_rels:
            raise ValueError("ema.sigma_rels: expected at least one sigma_rel for the power EMA")
        keys = [sigma_key(s) for s in sigma_rels]
        if len(set(keys)) != len(keys):
            raise ValueError(f"ema.sigma_rels: duplicate values {sigma_rels}")
        self.profiles = [PowerProfile(model, s) for s in sigma_rels]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        for profile in self.profiles:
            profile.update(model, step)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """Every profile's full state dict, keys "<sigma_rel>/<name>" (collective under FSDP2, like EMA)."""
        return {f"{sigma_key(p.sigma_rel)}/{k}": v for p in self.profiles for k, v in p.state_dict(model).items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for p in self.profiles:
            prefix = sigma_key(p.sigma_rel) + "/"
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                raise KeyError(f"power EMA state has no profile sigma_rel={prefix[:-1]} "
                               f"(found {sorted({k.split('/')[0] for k in state})}); ema.sigma_rels changed?")
            p.load_state_dict(sub)

    def snapshot(self, model: nn.Module, run_dir: str | os.PathLike, step: int, write: bool = True) -> list[Path]:
        """Write one snapshot file per profile for `step` (the number of optimizer steps taken) into
        run_dir/phema/. Collective under FSDP2 (every rank gathers); only callers with write=True write."""
        out = []
        for p in self.profiles:
            state = p.state_dict(model)
            if write:
                out.append(write_snapshot(run_dir, step, p.sigma_rel, p.gamma, state))
        return out
