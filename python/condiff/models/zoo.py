"""Named model configurations and `create(name, conditioning, **overrides)`.

A name is `<family>` or `<family>-<size>`: families in `FAMILIES` (a registry: family -> builder), sizes
of the transformer families in `SIZES` (DiT's S/B/L/XL with patch 2, any `/p` patch works, plus a CPU
`tiny`); a bare family name is the paper's XL/2. Precedence: config-class defaults < `FAMILY_DEFAULTS`
< size preset < overrides. `model.config` holds every resolved field (name included), so
`create(**model.config)` rebuilds the same architecture.

Hook for other backbones: `register_family(name, model_cls, config)` where `config(name, conditioning,
**overrides)` returns the family's resolved config (it parses its own size names) and `model_cls(config)`
builds the model; `create` dispatches to the longest registered family that prefixes the name, and
`model_config` resolves (and validates) the config without building anything.

Defaults chosen to reproduce Table A1 at XL/2 (docs/table-a1.md; measured in tests/test_models.py):
every backbone carries control embedders (the paper's counts run 3.6-5.8M above the reference codebases):
the baselines SDXL-style additive, `mmdit-ours` the disentangled Eq. 1 pair (E_h, E_l) with the
power-cosine gamma (alpha = 8) and noisy-replicate text padding.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields

from condiff.models.base import DiffusionModel, ModelConfig
from condiff.models.dit import AttDiT, DiT
from condiff.models.mdt import MDTv2
from condiff.models.mmdit import MMDiT
from condiff.models.pixart import PixArtAlpha
from condiff.models.transformer import Backbone, BackboneConfig
from condiff.models.unet import UNet, unet_config

SIZES: dict[str, dict] = {
    "tiny": dict(depth=4, hidden_size=128, num_heads=4),
    "s": dict(depth=12, hidden_size=384, num_heads=6),
    "b": dict(depth=12, hidden_size=768, num_heads=12),
    "l": dict(depth=24, hidden_size=1024, num_heads=16),
    "xl": dict(depth=28, hidden_size=1152, num_heads=16),
}
"""Transformer sizes (DiT Table 1). A size name is `<size>/<patch>` (e.g. `xl/2`, `s/4`); `tiny` means patch 2."""

DEFAULT_SIZE = "xl/2"

TRANSFORMERS: dict[str, type[Backbone]] = {
    "dit": DiT,
    "dit-att": AttDiT,
    "mdt-v2": MDTv2,
    "pixart-alpha": PixArtAlpha,
    "mmdit": MMDiT,
    "mmdit-ours": MMDiT,
}
"""Transformer families -> model class (its `config_cls` holds the fields)."""

FAMILY_DEFAULTS: dict[str, dict] = {
    "dit": dict(control="additive"),
    "dit-att": dict(control="additive"),
    "mdt-v2": dict(control="additive"),
    "pixart-alpha": dict(control="additive", text_padding="zero"),
    "mmdit": dict(control="additive", text_padding="zero"),
    "mmdit-ours": dict(control="disentangled", gamma="power-cosine", gamma_alpha=8.0,
                       text_padding="noisy-replicate"),
}
"""Per-family overrides of the config-class defaults (see the module docstring)."""

FAMILY_SIZE_DEFAULTS: dict[str, dict[str, dict]] = {"mdt-v2": {"tiny": dict(decode_layers=2)}}
"""Per-family, per-size extra defaults (e.g. mDT's decoder depth at the tiny size)."""


def parse_size(size: str) -> dict:
    """'xl/2' -> dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2); 'tiny' -> patch 2."""
    m = re.fullmatch(r"(tiny|s|b|l|xl)(?:/(\d+))?", size)
    if m is None or (m.group(2) is None and m.group(1) != "tiny"):
        raise ValueError(f"unknown model size {size!r}; sizes are tiny or <s|b|l|xl>/<patch> (e.g. xl/2, s/4)")
    return {**SIZES[m.group(1)], "patch_size": int(m.group(2) or 2)}


def transformer_config(name: str, conditioning: str = "class", **overrides) -> BackboneConfig:
    """Config of a transformer-family name: family defaults < size preset < overrides (unknown keys raise)."""
    family = _family_of(name, TRANSFORMERS)
    size = name[len(family) + 1:] if len(name) > len(family) else DEFAULT_SIZE
    size_key = size.split("/")[0]
    cls = TRANSFORMERS[family]
    kwargs = {**FAMILY_DEFAULTS.get(family, {}), **parse_size(size),
              **FAMILY_SIZE_DEFAULTS.get(family, {}).get(size_key, {}), **overrides}
    kwargs["name"], kwargs["conditioning"] = name, conditioning
    valid = {f.name for f in fields(cls.config_cls)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"create({name!r}): unknown option(s) {unknown}; valid options: {sorted(valid)}")
    return cls.config_cls(**kwargs)


@dataclass(frozen=True)
class Family:
    """A registered backbone family: its model class (built as `model_cls(config)`) and the resolver
    `config(name, conditioning, **overrides) -> ModelConfig` that parses the family's size names."""

    model_cls: type[DiffusionModel]
    config: Callable[..., ModelConfig]


FAMILIES: dict[str, Family] = {family: Family(cls, transformer_config) for family, cls in TRANSFORMERS.items()}
"""Registry: family name -> `Family`. `register_family` adds to it."""


def register_family(family: str, model_cls: type[DiffusionModel], config: Callable[..., ModelConfig]) -> None:
    """Register a backbone family (e.g. 'unet-sdxl') whose `config` resolver parses its own size names."""
    FAMILIES[family] = Family(model_cls, config)


register_family("unet-sdxl", UNet, unet_config)  # models/unet.py: `unet-sdxl` (the paper's) and `unet-sdxl-tiny`


def _family_of(name: str, registry) -> str:
    matches = [f for f in registry if name == f or name.startswith(f + "-")]
    if not matches:
        raise ValueError(f"unknown model {name!r}; families: {sorted(FAMILIES)}, sizes: tiny, s/2, b/2, l/2, xl/2")
    return max(matches, key=len)


def family_of(name: str) -> str:
    """The registered family a model name belongs to (the longest matching prefix)."""
    return _family_of(name, FAMILIES)


def model_config(name: str, conditioning: str = "class", **overrides) -> ModelConfig:
    """The resolved, validated config `create(name, conditioning, **overrides)` would build, without building
    the model (recipes are checked with it when they load). Raises ValueError naming a wrong key or value."""
    if conditioning not in ("class", "text"):
        raise ValueError(f"create({name!r}): conditioning must be 'class' or 'text', got {conditioning!r}")
    return FAMILIES[family_of(name)].config(name, conditioning, **overrides)


def create(name: str, conditioning: str = "class", **overrides) -> DiffusionModel:
    """Build a model by name, e.g. create("mmdit-ours-xl/2", conditioning="text", text_dim=384).

    Every model is called as `model(x_t, t, cond)` -> eps (B, C, H, W) and has a JSON-able `model.config`
    with `create(**model.config)` rebuilding it.
    """
    cfg = model_config(name, conditioning, **overrides)
    return FAMILIES[family_of(name)].model_cls(cfg)


def available() -> list[str]:
    """Every family x size name of the transformer zoo (registered non-transformer families by family name)."""
    sizes = ["tiny", "s/2", "b/2", "l/2", "xl/2"]
    out = [f"{f}-{s}" for f in TRANSFORMERS for s in sizes]
    return out + [f for f in FAMILIES if f not in TRANSFORMERS]
