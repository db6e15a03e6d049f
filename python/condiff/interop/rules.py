"""The rule engine of checkpoint conversion: a conversion is a table of `Rule`s (ours <- theirs) run forwards
(`apply_rules`) or backwards (`invert_rules`), so the two directions cannot drift apart, plus the checks the
format modules share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rule:
    """ours <- theirs. kind: "copy" (one tensor), "cat" (ours = cat(theirs, dim 0); backwards: equal chunks),
    "swap" (ours = the two halves of theirs swapped along dim 0: (scale, shift) <-> (shift, scale)),
    "tied" (ours = theirs[0]; every theirs must hold the same tensor; backwards: copied to all)."""

    ours: str
    theirs: tuple[str, ...]
    kind: str = "copy"


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def apply_rules(rules: list[Rule], theirs: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Their state dict -> ours. Every key of `theirs` must be consumed by a rule (no silent drops)."""
    out, used = {}, set()
    for r in rules:
        missing = [k for k in r.theirs if k not in theirs]
        if missing:
            raise KeyError(f"{source}: state dict lacks {missing} (needed for {r.ours})")
        ts = [theirs[k] for k in r.theirs]
        used.update(r.theirs)
        if r.kind == "copy":
            out[r.ours] = ts[0]
        elif r.kind == "cat":
            out[r.ours] = torch.cat(ts, dim=0)
        elif r.kind == "swap":
            out[r.ours] = _swap_halves(ts[0])
        elif r.kind == "tied":
            for k, t in zip(r.theirs[1:], ts[1:]):
                if not torch.equal(t, ts[0]):
                    raise ValueError(f"{source}: {k} differs from {r.theirs[0]}; condiff's model has ONE {r.ours} "
                                     f"shared by all blocks, so per-block copies must be identical")
            out[r.ours] = ts[0]
        else:
            raise ValueError(f"unknown rule kind {r.kind!r}")
    unused = sorted(set(theirs) - used)
    if unused:
        raise KeyError(f"{source}: unexpected keys {unused[:8]}{' ...' if len(unused) > 8 else ''} "
                       f"(an architecture option this converter does not support)")
    return out


def invert_rules(rules: list[Rule], ours: dict[str, Tensor], target: str) -> dict[str, Tensor]:
    """Our state dict -> theirs (the rules run backwards). Every key of `ours` must be consumed."""
    out, used = {}, set()
    for r in rules:
        if r.ours not in ours:
            raise KeyError(f"to {target}: condiff state dict lacks {r.ours}")
        t = ours[r.ours]
        used.add(r.ours)
        if r.kind == "copy":
            out[r.theirs[0]] = t
        elif r.kind == "cat":
            for k, chunk in zip(r.theirs, t.chunk(len(r.theirs), dim=0)):
                out[k] = chunk.clone()
        elif r.kind == "swap":
            out[r.theirs[0]] = _swap_halves(t)
        elif r.kind == "tied":
            for k in r.theirs:
                out[k] = t.clone()
    unused = sorted(set(ours) - used)
    if unused:
        raise KeyError(f"to {target}: condiff parameters {unused[:8]} have no counterpart (e.g. a control "
                       f"embedder: convert models built with control='none')")
    return out


def linear(ours: str, theirs: str, kind: str = "copy") -> list[Rule]:
    """weight + bias rules of one Linear."""
    return [Rule(f"{ours}.weight", (f"{theirs}.weight",), kind), Rule(f"{ours}.bias", (f"{theirs}.bias",), kind)]


def linear_cat(ours: str, theirs: list[str]) -> list[Rule]:
    return [Rule(f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs), "cat") for p in ("weight", "bias")]


def check_pos_table(table: Tensor, expected: Tensor, source: str) -> None:
    table = table.reshape(expected.shape).float()
    if not torch.allclose(table, expected, atol=1e-4):
        err = (table - expected).abs().max().item()
        raise ValueError(f"{source}: its positional table differs from the sin-cos grid condiff recomputes "
                         f"(max abs diff {err:.2e}); a learned or differently built table cannot be converted")


def eps_rows(weight_or_bias: Tensor, patch: int, channels: int) -> Tensor:
    """Rows of a final projection with output layout (p, q, c) over 2C channels -> the first C (epsilon)."""
    t = weight_or_bias.reshape(patch * patch, 2 * channels, *weight_or_bias.shape[1:])
    return t[:, :channels].reshape(patch * patch * channels, *weight_or_bias.shape[1:])


def hidden_width(cfg: dict) -> int:
    return int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])


def require(cfg: dict, source: str, **expected) -> None:
    for k, v in expected.items():
        if cfg.get(k, v) != v:
            raise ValueError(f"{source}: config {k}={cfg.get(k)!r} is not supported (condiff needs {v!r})")


def check_convertible(config: dict, target: str, **required) -> None:
    bad = {k: config.get(k) for k, v in required.items() if config.get(k) != v}
    if bad:
        raise ValueError(f"to {target}: the model's config {bad} has no diffusers counterpart "
                         f"(needs {dict((k, required[k]) for k in bad)})")


def check_grid(config: dict, base: float, interp: float, target: str) -> None:
    if config["base_size"] != base or config["pos_interp_scale"] != interp:
        raise ValueError(f"to {target}: diffusers anchors the positional grid at base_size {base} with "
                         f"interpolation scale {interp}; the model has {config['base_size']} / "
                         f"{config['pos_interp_scale']}")
