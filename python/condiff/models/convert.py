"""Checkpoint interop: facebookresearch/DiT checkpoints and diffusers transformers <-> condiff models.

Supported (a converted model computes the source model's function to float32 rounding, tests/test_convert.py):
  * facebookresearch/DiT `.pt` checkpoints (a raw state dict, or a training checkpoint {"model", "ema", ...})
    -> `dit` (one way: it is a reference release). Its fixed `pos_embed` (an `arange` sin-cos grid) becomes
    `pos_grid="arange"`; its learned-sigma output (8 channels) keeps the epsilon half (the paper trains without
    learned sigma), or all of it with `keep_sigma=True` (`learn_sigma=True`: forward still returns eps).
  * diffusers `DiTTransformer2DModel` <-> `dit`; `PixArtTransformer2DModel` <-> `pixart-alpha` (text);
    `SD3Transformer2DModel` <-> `mmdit` with the full SD3 dual stream (`context_stream="full"`, pooled
    projection, `pos_grid="sd3"`); `UNet2DConditionModel` with SDXL's block types (linear projections,
    "projection" class embedding = the pooled vector) <-> `unet-sdxl` (text). Both directions;
    `from_diffusers` / `to_diffusers` work on diffusers model objects (diffusers needed),
    `diffusers_to_condiff` / `condiff_to_diffusers` on plain (config, state dict).

Conventions: every conversion is a table of `Rule`s (ours <- theirs), run forwards or backwards, so the two
directions cannot drift apart. Converted models have `control="none"` (the sources have no control embedder);
the timestep convention is the same (DDPM t in [0, 1000)). What the models compute is the source's function,
not its training objective: SD3 predicts a flow velocity, the others epsilon.

Known deviations (not ours to fix): diffusers' `DiTTransformer2DModel` normalises its MLP input with
`norm_eps` (1e-5 by default) where the original DiT (and condiff) uses 1e-6; converting such a model is exact
for `norm_eps=1e-6` and differs by a relative ~2e-6 otherwise (tests: < 1e-3). SD3's last block keeps a
context-query RMSNorm weight that no output depends on (context_pre_only); condiff has none: it is dropped,
and written back as ones.

CLI (`condiff convert`):
  condiff convert dit-original CKPT.pt OUT_DIR [--keep-sigma] [--num-heads H]
  condiff convert from-diffusers DIFFUSERS_MODEL_DIR OUT_DIR      (config.json + *.safetensors)
  condiff convert to-diffusers CONDIFF_CHECKPOINT OUT_DIR          (writes config.json + safetensors)
OUT_DIR of the first two is a condiff checkpoint (step 0) that `condiff sample` loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from condiff.models.posemb import sincos_pos_embed_2d

# ---------------------------------------------------------------------------------------------------------------
# Rule engine
# ---------------------------------------------------------------------------------------------------------------


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


def _linear(ours: str, theirs: str, kind: str = "copy") -> list[Rule]:
    """weight + bias rules of one Linear."""
    return [Rule(f"{ours}.weight", (f"{theirs}.weight",), kind), Rule(f"{ours}.bias", (f"{theirs}.bias",), kind)]


def _linear_cat(ours: str, theirs: list[str]) -> list[Rule]:
    return [Rule(f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs), "cat") for p in ("weight", "bias")]


def _check_pos_table(table: Tensor, expected: Tensor, source: str) -> None:
    table = table.reshape(expected.shape).float()
    if not torch.allclose(table, expected, atol=1e-4):
        err = (table - expected).abs().max().item()
        raise ValueError(f"{source}: its positional table differs from the sin-cos grid condiff recomputes "
                         f"(max abs diff {err:.2e}); a learned or differently built table cannot be converted")


def _eps_rows(weight_or_bias: Tensor, patch: int, channels: int) -> Tensor:
    """Rows of a final projection with output layout (p, q, c) over 2C channels -> the first C (epsilon)."""
    t = weight_or_bias.reshape(patch * patch, 2 * channels, *weight_or_bias.shape[1:])
    return t[:, :channels].reshape(patch * patch * channels, *weight_or_bias.shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# facebookresearch/DiT
# ---------------------------------------------------------------------------------------------------------------

DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # facebookresearch/DiT S, B, L, XL


def _dit_block_rules(i: int) -> list[Rule]:
    """Identical names in facebookresearch/DiT and condiff (condiff's layers follow DiT's naming)."""
    b = f"blocks.{i}"
    return (_linear(f"{b}.attn.qkv", f"{b}.attn.qkv") + _linear(f"{b}.attn.proj", f"{b}.attn.proj")
            + _linear(f"{b}.mlp.fc1", f"{b}.mlp.fc1") + _linear(f"{b}.mlp.fc2", f"{b}.mlp.fc2")
            + _linear(f"{b}.adaLN_modulation.1", f"{b}.adaLN_modulation.1"))


def facebook_dit_to_condiff(state_dict: dict[str, Tensor], keep_sigma: bool = False,
                            num_heads: int | None = None) -> tuple[dict, dict[str, Tensor]]:
    """A facebookresearch/DiT state dict -> (create() kwargs, condiff `dit` state dict).

    The architecture is read from the tensors (width, depth, patch, channels, classes, learned sigma, trained
    grid); the head count cannot be, so it comes from DiT's configs by width (`DIT_HEADS`) or `num_heads`.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    src = "facebookresearch/DiT checkpoint"
    if "x_embedder.proj.weight" not in sd:
        raise KeyError(f"{src}: no 'x_embedder.proj.weight'; keys start with {sorted(sd)[:5]}")
    D, C, p, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = num_heads or DIT_HEADS.get(D)
    if heads is None:
        raise ValueError(f"{src}: width {D} is not one of DiT's configs {DIT_HEADS}; pass num_heads")
    n_out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if n_out not in (C, 2 * C):
        raise ValueError(f"{src}: final layer has {n_out} channels per pixel, expected {C} or {2 * C}")
    learned_sigma = n_out == 2 * C
    num_patches = sd["pos_embed"].shape[1]
    grid = int(round(num_patches ** 0.5))
    _check_pos_table(sd["pos_embed"], sincos_pos_embed_2d(D, grid, grid, kind="arange"), src)
    rules = (_linear("x_embedder.proj", "x_embedder.proj")
             + _linear("t_embedder.mlp.0", "t_embedder.mlp.0") + _linear("t_embedder.mlp.2", "t_embedder.mlp.2")
             + [Rule("y_embedder.embedding_table.weight", ("y_embedder.embedding_table.weight",))]
             + [r for i in range(depth) for r in _dit_block_rules(i)]
             + _linear("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1")
             + _linear("final_layer.linear", "final_layer.linear"))
    theirs = {k: v for k, v in sd.items() if k != "pos_embed"}
    ours = apply_rules(rules, theirs, src)
    if learned_sigma and not keep_sigma:
        for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
            ours[k] = _eps_rows(ours[k], p, C)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    kwargs = dict(hidden_size=D, depth=depth, num_heads=heads, patch_size=p, in_channels=C,
                  num_classes=rows - 1, input_size=grid * p, pos_grid="arange", control="none",
                  learn_sigma=learned_sigma and keep_sigma)
    if rows < 2:
        raise ValueError(f"{src}: the class table has {rows} row(s); condiff needs num_classes + 1 (null class)")
    return kwargs, ours


def load_facebook_dit(path_or_state: str | Path | dict, keep_sigma: bool = False, num_heads: int | None = None,
                      use_ema: bool = True) -> nn.Module:
    """Load a facebookresearch/DiT checkpoint (path or state dict) into a condiff `dit` model (eval mode)."""
    from condiff.models import create

    state = path_or_state
    if not isinstance(state, dict):
        path = Path(path_or_state)
        if not path.is_file():
            raise FileNotFoundError(f"DiT checkpoint {path} does not exist (download e.g. DiT-XL-2-256x256.pt from "
                                    "the facebookresearch/DiT release and pass its local path)")
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "x_embedder.proj.weight" not in state:  # a training checkpoint {"model", "ema", "opt", "args"}
        key = "ema" if (use_ema and "ema" in state) else "model"
        if key not in state:
            raise KeyError(f"DiT checkpoint: neither a state dict nor a training checkpoint (keys {sorted(state)[:6]})")
        state = state[key]
    kwargs, sd = facebook_dit_to_condiff(state, keep_sigma, num_heads)
    model = create("dit", "class", **kwargs)
    model.load_state_dict(sd)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------------------------


def _dim(cfg: dict) -> int:
    return int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])


def _require(cfg: dict, source: str, **expected) -> None:
    for k, v in expected.items():
        if cfg.get(k, v) != v:
            raise ValueError(f"{source}: config {k}={cfg.get(k)!r} is not supported (condiff needs {v!r})")


# --- DiTTransformer2DModel -------------------------------------------------------------------------------------

def _diffusers_dit_rules(depth: int) -> list[Rule]:
    emb = [f"transformer_blocks.{i}.norm1.emb" for i in range(depth)]
    rules = (_linear("x_embedder.proj", "pos_embed.proj")
             + [Rule(f"t_embedder.mlp.{j}.{p}", tuple(f"{e}.timestep_embedder.linear_{k}.{p}" for e in emb), "tied")
                for j, k in ((0, 1), (2, 2)) for p in ("weight", "bias")]
             + [Rule("y_embedder.embedding_table.weight",
                     tuple(f"{e}.class_embedder.embedding_table.weight" for e in emb), "tied")])
    for i in range(depth):
        b, t = f"blocks.{i}", f"transformer_blocks.{i}"
        rules += (_linear(f"{b}.adaLN_modulation.1", f"{t}.norm1.linear")
                  + _linear_cat(f"{b}.attn.qkv", [f"{t}.attn1.to_q", f"{t}.attn1.to_k", f"{t}.attn1.to_v"])
                  + _linear(f"{b}.attn.proj", f"{t}.attn1.to_out.0")
                  + _linear(f"{b}.mlp.fc1", f"{t}.ff.net.0.proj") + _linear(f"{b}.mlp.fc2", f"{t}.ff.net.2"))
    return rules + _linear("final_layer.adaLN_modulation.1", "proj_out_1") + _linear("final_layer.linear", "proj_out_2")


def _dit_from_diffusers(cfg: dict, sd: dict[str, Tensor]) -> tuple[str, str, dict, dict[str, Tensor]]:
    src = "diffusers DiTTransformer2DModel"
    _require(cfg, src, norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
             norm_elementwise_affine=False, upcast_attention=False)
    C, p, depth = cfg["in_channels"], cfg["patch_size"], cfg["num_layers"]
    out_c = cfg.get("out_channels") or C
    if out_c not in (C, 2 * C):
        raise ValueError(f"{src}: out_channels {out_c} must be in_channels ({C}) or twice it (learned sigma)")
    ours = apply_rules(_diffusers_dit_rules(depth), sd, src)
    if out_c == 2 * C:
        for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
            ours[k] = _eps_rows(ours[k], p, C)
    kwargs = dict(hidden_size=_dim(cfg), depth=depth, num_heads=cfg["num_attention_heads"], patch_size=p,
                  in_channels=C, num_classes=cfg["num_embeds_ada_norm"], input_size=cfg["sample_size"],
                  pos_grid="scaled", pos_interp_scale=1.0, base_size=cfg["sample_size"] // p, control="none",
                  t_freq_shift=1.0)
    return "dit", "class", kwargs, ours


def _dit_to_diffusers(model: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    c = model.config
    _check_convertible(c, "DiTTransformer2DModel", pos_grid="scaled", t_freq_shift=1.0, control="none",
                       learn_sigma=False)
    cfg = dict(num_attention_heads=c["num_heads"], attention_head_dim=c["hidden_size"] // c["num_heads"],
               in_channels=c["in_channels"], out_channels=c["in_channels"], num_layers=c["depth"],
               sample_size=c["input_size"], patch_size=c["patch_size"], num_embeds_ada_norm=c["num_classes"],
               norm_eps=1e-6, activation_fn="gelu-approximate", norm_type="ada_norm_zero",
               norm_elementwise_affine=False)
    _check_grid(c, base=c["input_size"] // c["patch_size"], interp=1.0, target="DiTTransformer2DModel")
    sd = invert_rules(_diffusers_dit_rules(c["depth"]), model.state_dict(), "DiTTransformer2DModel")
    return "DiTTransformer2DModel", cfg, sd


# --- SD3Transformer2DModel -------------------------------------------------------------------------------------

def _sd3_rules(depth: int, qk_norm: bool) -> list[Rule]:
    rules = (_linear("x_embedder.proj", "pos_embed.proj")
             + _linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
             + _linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
             + _linear("pooled_embedder.linear_1", "time_text_embed.text_embedder.linear_1")
             + _linear("pooled_embedder.linear_2", "time_text_embed.text_embedder.linear_2")
             + _linear("context_embedder", "context_embedder"))
    for i in range(depth):
        b, t = f"blocks.{i}", f"transformer_blocks.{i}"
        last = i == depth - 1  # SD3's last block is context_pre_only
        rules += (_linear(f"{b}.adaLN_modulation.1", f"{t}.norm1.linear")
                  + _linear(f"{b}.context_adaLN_modulation.1", f"{t}.norm1_context.linear", "swap" if last else "copy")
                  + _linear_cat(f"{b}.attn.qkv", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"])
                  + _linear_cat(f"{b}.attn.context_qkv",
                                [f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"])
                  + _linear(f"{b}.attn.proj", f"{t}.attn.to_out.0")
                  + _linear(f"{b}.mlp.fc1", f"{t}.ff.net.0.proj") + _linear(f"{b}.mlp.fc2", f"{t}.ff.net.2"))
        if not last:
            rules += (_linear(f"{b}.attn.context_proj", f"{t}.attn.to_add_out")
                      + _linear(f"{b}.context_mlp.fc1", f"{t}.ff_context.net.0.proj")
                      + _linear(f"{b}.context_mlp.fc2", f"{t}.ff_context.net.2"))
        if qk_norm:  # the last block's context queries feed no output: condiff has no norm for them
            norms = (("q_norm", "norm_q"), ("k_norm", "norm_k"), ("context_k_norm", "norm_added_k"))
            norms += () if last else (("context_q_norm", "norm_added_q"),)
            rules += [Rule(f"{b}.attn.{o}.weight", (f"{t}.attn.{d}.weight",)) for o, d in norms]
    # diffusers' AdaLayerNormContinuous emits (scale, shift); DiT's final layer (shift, scale)
    return rules + _linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap") + _linear(
        "final_layer.linear", "proj_out")


def _sd3_from_diffusers(cfg: dict, sd: dict[str, Tensor]) -> tuple[str, str, dict, dict[str, Tensor]]:
    src = "diffusers SD3Transformer2DModel"
    D, C, p, depth = _dim(cfg), cfg["in_channels"], cfg["patch_size"], cfg["num_layers"]
    if cfg.get("dual_attention_layers"):
        raise ValueError(f"{src}: dual_attention_layers (SD3.5 MMDiT-X) are not supported")
    if (cfg.get("out_channels") or C) != C:
        raise ValueError(f"{src}: out_channels {cfg.get('out_channels')} != in_channels {C} is not supported")
    if cfg["caption_projection_dim"] != D:
        raise ValueError(f"{src}: caption_projection_dim {cfg['caption_projection_dim']} must equal the width {D}")
    qk = cfg.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise ValueError(f"{src}: qk_norm {qk!r} not supported (None or 'rms_norm')")
    max_size, base = cfg["pos_embed_max_size"], cfg["sample_size"] // p
    theirs = dict(sd)
    table = theirs.pop("pos_embed.pos_embed", None)
    if table is not None:
        _check_pos_table(table, sincos_pos_embed_2d(D, max_size, max_size, base, kind="scaled"), src)
    # SD3's last block is context_pre_only: its context-query norm is a parameter that no output depends on
    theirs.pop(f"transformer_blocks.{depth - 1}.attn.norm_added_q.weight", None)
    ours = apply_rules(_sd3_rules(depth, qk is not None), theirs, src)
    kwargs = dict(hidden_size=D, depth=depth, num_heads=cfg["num_attention_heads"], patch_size=p, in_channels=C,
                  input_size=cfg["sample_size"], text_dim=cfg["joint_attention_dim"],
                  pooled_dim=cfg["pooled_projection_dim"], context_stream="full", qk_norm=qk is not None,
                  use_pooled=True, pos_grid="sd3", pos_max_size=max_size, base_size=base, control="none",
                  text_padding="zero")
    return "mmdit", "text", kwargs, ours


def _sd3_to_diffusers(model: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    c = model.config
    _check_convertible(c, "SD3Transformer2DModel", context_stream="full", pos_grid="sd3", use_pooled=True,
                       control="none", learn_sigma=False, t_freq_shift=0.0, conditioning="text")
    D, p = c["hidden_size"], c["patch_size"]
    if c["base_size"] != c["input_size"] // p or c["pos_interp_scale"] != 1.0:
        raise ValueError("to SD3Transformer2DModel: diffusers anchors the grid at base_size = input_size / patch "
                         f"with interpolation scale 1; this model has base_size {c['base_size']}, scale "
                         f"{c['pos_interp_scale']}")
    cfg = dict(sample_size=c["input_size"], patch_size=p, in_channels=c["in_channels"], num_layers=c["depth"],
               attention_head_dim=D // c["num_heads"], num_attention_heads=c["num_heads"],
               joint_attention_dim=c["text_dim"], caption_projection_dim=D, pooled_projection_dim=c["pooled_dim"],
               out_channels=c["in_channels"], pos_embed_max_size=c["pos_max_size"],
               qk_norm="rms_norm" if c["qk_norm"] else None)
    sd = invert_rules(_sd3_rules(c["depth"], c["qk_norm"]), model.state_dict(), "SD3Transformer2DModel")
    if c["qk_norm"]:  # the unused context-query norm of SD3's last block: RMSNorm's initial value
        sd[f"transformer_blocks.{c['depth'] - 1}.attn.norm_added_q.weight"] = torch.ones(D // c["num_heads"])
    mx = c["pos_max_size"]
    sd["pos_embed.pos_embed"] = sincos_pos_embed_2d(D, mx, mx, c["base_size"], kind="scaled")[None]
    return "SD3Transformer2DModel", cfg, sd


# --- PixArtTransformer2DModel ----------------------------------------------------------------------------------

def _pixart_rules(depth: int) -> list[Rule]:
    rules = (_linear("x_embedder.proj", "pos_embed.proj")
             + _linear("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1")
             + _linear("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2")
             + _linear("t_block.1", "adaln_single.linear")
             + _linear("y_embedder.y_proj.fc1", "caption_projection.linear_1")
             + _linear("y_embedder.y_proj.fc2", "caption_projection.linear_2"))
    for i in range(depth):
        b, t = f"blocks.{i}", f"transformer_blocks.{i}"
        rules += ([Rule(f"{b}.scale_shift_table", (f"{t}.scale_shift_table",))]
                  + _linear_cat(f"{b}.attn.qkv", [f"{t}.attn1.to_q", f"{t}.attn1.to_k", f"{t}.attn1.to_v"])
                  + _linear(f"{b}.attn.proj", f"{t}.attn1.to_out.0")
                  + _linear(f"{b}.cross_attn.q_linear", f"{t}.attn2.to_q")
                  + _linear_cat(f"{b}.cross_attn.kv_linear", [f"{t}.attn2.to_k", f"{t}.attn2.to_v"])
                  + _linear(f"{b}.cross_attn.proj", f"{t}.attn2.to_out.0")
                  + _linear(f"{b}.mlp.fc1", f"{t}.ff.net.0.proj") + _linear(f"{b}.mlp.fc2", f"{t}.ff.net.2"))
    return (rules + [Rule("final_layer.scale_shift_table", ("scale_shift_table",))]
            + _linear("final_layer.linear", "proj_out"))


def _pixart_interp(cfg: dict) -> float:
    """diffusers' PixArt interpolation scale: the config's, else max(sample_size // 64, 1)."""
    scale = cfg.get("interpolation_scale")
    return float(scale if scale is not None else max(cfg["sample_size"] // 64, 1))


def _pixart_from_diffusers(cfg: dict, sd: dict[str, Tensor]) -> tuple[str, str, dict, dict[str, Tensor]]:
    src = "diffusers PixArtTransformer2DModel"
    _require(cfg, src, norm_type="ada_norm_single", activation_fn="gelu-approximate", attention_bias=True,
             norm_elementwise_affine=False, norm_eps=1e-6, upcast_attention=False, attention_type="default")
    D, C, p, depth = _dim(cfg), cfg["in_channels"], cfg["patch_size"], cfg["num_layers"]
    additional = cfg.get("use_additional_conditions")
    if additional or (additional is None and cfg["sample_size"] == 128):
        raise ValueError(f"{src}: use_additional_conditions (PixArt-alpha 1024's resolution / aspect embedders) is "
                         "not supported: condiff's control conditioning replaces it")
    if not cfg.get("caption_channels"):
        raise ValueError(f"{src}: caption_channels is required (condiff's PixArt projects the text states)")
    if cfg.get("cross_attention_dim", D) != D:
        raise ValueError(f"{src}: cross_attention_dim {cfg['cross_attention_dim']} must equal the width {D}")
    out_c = cfg.get("out_channels") or C
    if out_c not in (C, 2 * C):
        raise ValueError(f"{src}: out_channels {out_c} must be in_channels ({C}) or twice it (learned sigma)")
    ours = apply_rules(_pixart_rules(depth), sd, src)
    if out_c == 2 * C:
        for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
            ours[k] = _eps_rows(ours[k], p, C)
    kwargs = dict(hidden_size=D, depth=depth, num_heads=cfg["num_attention_heads"], patch_size=p, in_channels=C,
                  input_size=cfg["sample_size"], text_dim=cfg["caption_channels"], pos_grid="scaled",
                  pos_interp_scale=_pixart_interp(cfg), base_size=cfg["sample_size"] // p, control="none",
                  text_padding="zero")
    return "pixart-alpha", "text", kwargs, ours


def _pixart_to_diffusers(model: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    c = model.config
    _check_convertible(c, "PixArtTransformer2DModel", conditioning="text", pos_grid="scaled", control="none",
                       learn_sigma=False, t_freq_shift=0.0, use_pooled=False)
    _check_grid(c, base=c["input_size"] // c["patch_size"], interp=c["pos_interp_scale"],
                target="PixArtTransformer2DModel")
    D = c["hidden_size"]
    cfg = dict(num_attention_heads=c["num_heads"], attention_head_dim=D // c["num_heads"],
               in_channels=c["in_channels"], out_channels=c["in_channels"], num_layers=c["depth"],
               cross_attention_dim=D, sample_size=c["input_size"], patch_size=c["patch_size"],
               interpolation_scale=c["pos_interp_scale"], use_additional_conditions=False,
               caption_channels=c["text_dim"], norm_eps=1e-6)
    sd = invert_rules(_pixart_rules(c["depth"]), model.state_dict(), "PixArtTransformer2DModel")
    return "PixArtTransformer2DModel", cfg, sd


# --- UNet2DConditionModel (SDXL-style UNet, text-conditioned) ----------------------------------------------------

def _unet_rules(levels: int, num_res_blocks: int, depth: list[int], depth_middle: int) -> list[Rule]:
    """condiff UNet stage lists <-> diffusers down_blocks / mid_block / up_blocks (same order of modules)."""

    def res(ours: str, theirs: str) -> list[Rule]:
        return (_linear(f"{ours}.in_layers.0", f"{theirs}.norm1") + _linear(f"{ours}.in_layers.2", f"{theirs}.conv1")
                + _linear(f"{ours}.emb_layers.1", f"{theirs}.time_emb_proj")
                + _linear(f"{ours}.out_layers.0", f"{theirs}.norm2") + _linear(f"{ours}.out_layers.3", f"{theirs}.conv2"))

    def skip(ours: str, theirs: str) -> list[Rule]:
        return _linear(f"{ours}.skip", f"{theirs}.conv_shortcut")

    def attn(ours: str, theirs: str, n: int) -> list[Rule]:
        rules = (_linear(f"{ours}.norm", f"{theirs}.norm") + _linear(f"{ours}.proj_in", f"{theirs}.proj_in")
                 + _linear(f"{ours}.proj_out", f"{theirs}.proj_out"))
        for b in range(n):
            o, t = f"{ours}.blocks.{b}", f"{theirs}.transformer_blocks.{b}"
            for k in ("norm1", "norm2", "norm3"):
                rules += _linear(f"{o}.{k}", f"{t}.{k}")
            for a in ("attn1", "attn2"):
                rules += [Rule(f"{o}.{a}.to_{x}.weight", (f"{t}.{a}.to_{x}.weight",)) for x in "qkv"]
                rules += _linear(f"{o}.{a}.to_out", f"{t}.{a}.to_out.0")
            rules += _linear(f"{o}.ff.proj", f"{t}.ff.net.0.proj") + _linear(f"{o}.ff.out", f"{t}.ff.net.2")
        return rules

    rules = (_linear("time_embed.0", "time_embedding.linear_1") + _linear("time_embed.2", "time_embedding.linear_2")
             + _linear("label_emb.0", "class_embedding.linear_1") + _linear("label_emb.2", "class_embedding.linear_2")
             + _linear("conv_in", "conv_in") + _linear("out.0", "conv_norm_out") + _linear("out.2", "conv_out"))
    k = 0
    for level in range(levels):
        for j in range(num_res_blocks):
            o, t = f"down.{k}", f"down_blocks.{level}"
            rules += res(f"{o}.res", f"{t}.resnets.{j}")
            if j == 0 and level > 0:  # the width changes at the first ResBlock of a level
                rules += skip(f"{o}.res", f"{t}.resnets.{j}")
            if depth[level]:
                rules += attn(f"{o}.attn", f"{t}.attentions.{j}", depth[level])
            k += 1
        if level != levels - 1:
            rules += _linear(f"down.{k}.resample.conv", f"down_blocks.{level}.downsamplers.0.conv")
            k += 1
    rules += (res("middle.0.res", "mid_block.resnets.0") + attn("middle.0.attn", "mid_block.attentions.0", depth_middle)
              + res("middle.1.res", "mid_block.resnets.1"))
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(num_res_blocks + 1):
            o, t = f"up.{k}", f"up_blocks.{i}"
            rules += res(f"{o}.res", f"{t}.resnets.{j}") + skip(f"{o}.res", f"{t}.resnets.{j}")  # input = concat
            if depth[level]:
                rules += attn(f"{o}.attn", f"{t}.attentions.{j}", depth[level])
            if level and j == num_res_blocks:
                rules += _linear(f"{o}.resample.conv", f"{t}.upsamplers.0.conv")
            k += 1
    return rules


_UNET_FIXED = dict(act_fn="silu", center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
                   use_linear_projection=True, class_embed_type="projection", norm_eps=1e-5, downsample_padding=1,
                   dual_cross_attention=False, only_cross_attention=False, upcast_attention=False,
                   resnet_time_scale_shift="default", time_embedding_type="positional", addition_embed_type=None,
                   encoder_hid_dim=None, time_cond_proj_dim=None, mid_block_type="UNetMidBlock2DCrossAttn",
                   attention_type="default", class_embeddings_concat=False, resnet_out_scale_factor=1.0,
                   conv_in_kernel=3, conv_out_kernel=3)


def _unet_from_diffusers(cfg: dict, sd: dict[str, Tensor]) -> tuple[str, str, dict, dict[str, Tensor]]:
    src = "diffusers UNet2DConditionModel"
    _require(cfg, src, **_UNET_FIXED)
    widths = list(cfg["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"{src}: block_out_channels {widths} must be multiples of the first")
    levels = len(widths)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    depth_cfg = cfg.get("transformer_layers_per_block", 1)
    depth_cfg = [depth_cfg] * levels if isinstance(depth_cfg, int) else list(depth_cfg)
    depth = [d if t == "CrossAttnDownBlock2D" else 0 for d, t in zip(depth_cfg, down)]
    expect_up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)]
    if any(t not in ("DownBlock2D", "CrossAttnDownBlock2D") for t in down) or up != expect_up:
        raise ValueError(f"{src}: block types {down} / {up} are not an SDXL-style UNet (expected Down/CrossAttnDown "
                         f"blocks mirrored by {expect_up})")
    if isinstance(cfg["layers_per_block"], (list, tuple)) or cfg.get("reverse_transformer_layers_per_block"):
        raise ValueError(f"{src}: per-level layers_per_block / asymmetric transformer depths are not supported")
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]  # diffusers' legacy name: head COUNT
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    attn_levels = [i for i in range(levels) if depth[i]] + [levels - 1]
    head_ch = {widths[i] // heads[i] for i in attn_levels}
    if len(head_ch) != 1:
        raise ValueError(f"{src}: condiff's UNet has one head width; these levels give {sorted(head_ch)}")
    ours = apply_rules(_unet_rules(levels, cfg["layers_per_block"], depth, depth_cfg[-1]), sd, src)
    kwargs = dict(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], model_channels=ch,
                  channel_mult=[w // ch for w in widths], num_res_blocks=cfg["layers_per_block"],
                  transformer_depth=depth, transformer_depth_middle=depth_cfg[-1], head_channels=head_ch.pop(),
                  text_dim=cfg["cross_attention_dim"], pooled_dim=cfg["projection_class_embeddings_input_dim"],
                  norm_groups=cfg["norm_num_groups"], control="none", text_padding="zero",
                  input_size=cfg.get("sample_size") or 32)
    return "unet-sdxl", "text", kwargs, ours


def _unet_to_diffusers(model: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    c = model.config
    _check_convertible(c, "UNet2DConditionModel", conditioning="text", control="none")
    if c["transformer_depth_middle"] != (c["transformer_depth"][-1] or 1):
        raise ValueError("to UNet2DConditionModel: diffusers' middle block has the last level's transformer depth "
                         f"({c['transformer_depth'][-1]}); this model has {c['transformer_depth_middle']}")
    levels, ch = len(c["channel_mult"]), c["model_channels"]
    widths = [m * ch for m in c["channel_mult"]]
    depth = c["transformer_depth"]
    cfg = dict(_UNET_FIXED, sample_size=c["input_size"], in_channels=c["in_channels"],
               out_channels=c["out_channels"], block_out_channels=widths, layers_per_block=c["num_res_blocks"],
               down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
               up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
               transformer_layers_per_block=[d or c["transformer_depth_middle"] for d in depth],
               attention_head_dim=[w // c["head_channels"] for w in widths], cross_attention_dim=c["text_dim"],
               projection_class_embeddings_input_dim=c["pooled_dim"], norm_num_groups=c["norm_groups"])
    sd = invert_rules(_unet_rules(levels, c["num_res_blocks"], depth, c["transformer_depth_middle"]),
                      model.state_dict(), "UNet2DConditionModel")
    return "UNet2DConditionModel", cfg, sd


# --- registry ----------------------------------------------------------------------------------------------------

FROM_DIFFUSERS: dict[str, Callable] = {
    "DiTTransformer2DModel": _dit_from_diffusers,
    "SD3Transformer2DModel": _sd3_from_diffusers,
    "PixArtTransformer2DModel": _pixart_from_diffusers,
    "UNet2DConditionModel": _unet_from_diffusers,
}
TO_DIFFUSERS: dict[str, Callable] = {  # condiff family -> converter
    "dit": _dit_to_diffusers,
    "mmdit": _sd3_to_diffusers,
    "pixart-alpha": _pixart_to_diffusers,
    "unet-sdxl": _unet_to_diffusers,
}


def _check_convertible(config: dict, target: str, **required) -> None:
    bad = {k: config.get(k) for k, v in required.items() if config.get(k) != v}
    if bad:
        raise ValueError(f"to {target}: the model's config {bad} has no diffusers counterpart "
                         f"(needs {dict((k, required[k]) for k in bad)})")


def _check_grid(config: dict, base: float, interp: float, target: str) -> None:
    if config["base_size"] != base or config["pos_interp_scale"] != interp:
        raise ValueError(f"to {target}: diffusers anchors the positional grid at base_size {base} with "
                         f"interpolation scale {interp}; the model has {config['base_size']} / "
                         f"{config['pos_interp_scale']}")


def _family(config: dict) -> str:
    from condiff.models.zoo import FAMILIES, _family_of

    return _family_of(config["name"], FAMILIES)


def diffusers_to_condiff(class_name: str, config: dict, state_dict: dict[str, Tensor]
                         ) -> tuple[str, str, dict, dict[str, Tensor]]:
    """(diffusers class name, its config dict, its state dict) -> (condiff name, conditioning, create() kwargs,
    condiff state dict). Needs no diffusers install."""
    if class_name not in FROM_DIFFUSERS:
        raise ValueError(f"diffusers class {class_name!r} is not supported; supported: {sorted(FROM_DIFFUSERS)}")
    return FROM_DIFFUSERS[class_name](dict(config), state_dict)


def condiff_to_diffusers(model: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    """A condiff model -> (diffusers class name, config dict, state dict)."""
    family = _family(model.config)
    if family not in TO_DIFFUSERS:
        raise ValueError(f"condiff family {family!r} has no diffusers counterpart; convertible: {sorted(TO_DIFFUSERS)}")
    return TO_DIFFUSERS[family](model)


def from_diffusers(model) -> nn.Module:
    """A diffusers transformer model object -> the equivalent condiff model (eval mode)."""
    from condiff.models import create

    name, conditioning, kwargs, sd = diffusers_to_condiff(type(model).__name__, dict(model.config), model.state_dict())
    ours = create(name, conditioning, **kwargs)
    ours.load_state_dict(sd)
    return ours.eval()


def to_diffusers(model: nn.Module):
    """A condiff model -> the equivalent diffusers model object (eval mode; needs diffusers)."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - diffusers is a test dependency
        raise ImportError("to_diffusers needs the diffusers package (pip install diffusers)") from e
    class_name, cfg, sd = condiff_to_diffusers(model)
    theirs = getattr(diffusers, class_name)(**cfg)
    theirs.load_state_dict(sd)
    return theirs.eval()


# ---------------------------------------------------------------------------------------------------------------
# CLI (cli-level: it may import the checkpoint writer of condiff.train, lazily)
# ---------------------------------------------------------------------------------------------------------------

# The DDPM schedule each source was trained with (condiff.diffusion.Schedule fields); SD3 is a rectified-flow
# model, for which no DDPM schedule applies: the paper's pinned schedule is stored and the note says so.
SOURCE_SCHEDULES = {
    "facebookresearch/DiT": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000),
    "DiTTransformer2DModel": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000),
    "PixArtTransformer2DModel": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000),
    "SD3Transformer2DModel": None,
}


def read_diffusers_dir(path: str | Path) -> tuple[str, dict, dict[str, Tensor]]:
    """A diffusers model directory (config.json + *.safetensors, sharded or not) -> (class name, config, state)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a diffusers model directory, e.g. the "
                                f"'transformer' folder of a pipeline)")
    config = json.loads(cfg_file.read_text())
    if "_class_name" not in config:
        raise ValueError(f"{cfg_file}: no '_class_name' field; not a diffusers model config")
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:  # sharded: the files the (first, i.e. non-variant) index names
        files = sorted({path / f for f in json.loads(index[0].read_text())["weight_map"].values()})
    elif (path / "diffusion_pytorch_model.safetensors").is_file():  # not a variant such as *.fp16.safetensors
        files = [path / "diffusion_pytorch_model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (.bin weights are not read: convert them to "
                                "safetensors first)")
    state = {}
    for f in files:
        state.update(load_file(f))
    return config.pop("_class_name"), {k: v for k, v in config.items() if not k.startswith("_")}, state


def _write_condiff(out: Path, model: nn.Module, source: str, schedule: dict | None) -> Path:
    from condiff.diffusion import Schedule
    from condiff.train.checkpoint import save_checkpoint

    sched = Schedule(**schedule) if schedule else Schedule()
    note = ("DDPM schedule of the source" if schedule else
            "the source is not a DDPM model (rectified flow); the stored schedule is condiff's default")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = dict(model=model.config, schedule=sched.to_dict(), text_encoder=None, autoencoder=None,
                base_size=model.config.get("base_size"), train_sizes=[], data_position=None, config=None,
                transfer=None, converted_from=dict(source=source, schedule_note=note))
    return save_checkpoint(out, 0, model_state=state, ema_state=state, meta=meta)


def _write_diffusers_dir(out: Path, class_name: str, cfg: dict, state: dict[str, Tensor]) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors atomically (temporary dir, then rename)."""
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "diffusion_pytorch_model.safetensors")
        (tmp / "config.json").write_text(json.dumps({"_class_name": class_name, **cfg}, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="condiff convert", description="Convert DiT / diffusers checkpoints to "
                                     "and from condiff checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dit-original", help="facebookresearch/DiT .pt checkpoint -> condiff checkpoint")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, help="run directory to write (step_00000000/ inside)")
    p.add_argument("--keep-sigma", action="store_true", help="keep the learned-sigma channels (learn_sigma=True)")
    p.add_argument("--num-heads", type=int, default=None, help="heads, if the width is not one of DiT's configs")
    p.add_argument("--no-ema", action="store_true", help="training checkpoints: load 'model' instead of 'ema'")
    p = sub.add_parser("from-diffusers", help="diffusers model directory -> condiff checkpoint")
    p.add_argument("model_dir", type=Path)
    p.add_argument("out", type=Path, help="run directory to write (step_00000000/ inside)")
    p = sub.add_parser("to-diffusers", help="condiff checkpoint (or run directory) -> diffusers model directory")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, help="directory to write (config.json + diffusion_pytorch_model.safetensors)")
    p.add_argument("--raw", action="store_true", help="convert the raw weights instead of the EMA weights")
    args = parser.parse_args(argv)
    from condiff.models import create

    try:
        if args.command == "dit-original":
            model = load_facebook_dit(args.checkpoint, args.keep_sigma, args.num_heads, use_ema=not args.no_ema)
            ckpt = _write_condiff(args.out, model, "facebookresearch/DiT", SOURCE_SCHEDULES["facebookresearch/DiT"])
        elif args.command == "from-diffusers":
            class_name, cfg, state = read_diffusers_dir(args.model_dir)
            name, conditioning, kwargs, sd = diffusers_to_condiff(class_name, cfg, state)
            model = create(name, conditioning, **kwargs)
            model.load_state_dict(sd)
            ckpt = _write_condiff(args.out, model, class_name, SOURCE_SCHEDULES.get(class_name))
        else:
            from condiff.train.checkpoint import build_model_from_meta, load_weights, read_meta, resolve_checkpoint

            src = resolve_checkpoint(args.checkpoint)
            model = build_model_from_meta(read_meta(src))
            which = "model" if args.raw or not (src / "ema.safetensors").is_file() else "ema"
            model.load_state_dict(load_weights(src, which))
            class_name, cfg, state = condiff_to_diffusers(model)
            ckpt = _write_diffusers_dir(args.out, class_name, cfg, state)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"condiff convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {ckpt}")
    return 0
