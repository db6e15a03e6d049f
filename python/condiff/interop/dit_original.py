"""facebookresearch/DiT `.pt` checkpoints -> condiff `dit` (one way: it is a reference release).

Its fixed `pos_embed` (an `arange` sin-cos grid) becomes `pos_grid="arange"`; its learned-sigma output
(8 channels) keeps the epsilon half, or all of it with `keep_sigma=True` (`learn_sigma=True`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from condiff.interop.rules import Rule, apply_rules, check_pos_table, eps_rows, linear
from condiff.models.posemb import sincos_pos_embed_2d


DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # facebookresearch/DiT S, B, L, XL


def _dit_block_rules(i: int) -> list[Rule]:
    """Identical names in facebookresearch/DiT and condiff (condiff's layers follow DiT's naming)."""
    b = f"blocks.{i}"
    return (linear(f"{b}.attn.qkv", f"{b}.attn.qkv") + linear(f"{b}.attn.proj", f"{b}.attn.proj")
            + linear(f"{b}.mlp.fc1", f"{b}.mlp.fc1") + linear(f"{b}.mlp.fc2", f"{b}.mlp.fc2")
            + linear(f"{b}.adaLN_modulation.1", f"{b}.adaLN_modulation.1"))


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
    check_pos_table(sd["pos_embed"], sincos_pos_embed_2d(D, grid, grid, kind="arange"), src)
    rules = (linear("x_embedder.proj", "x_embedder.proj")
             + linear("t_embedder.mlp.0", "t_embedder.mlp.0") + linear("t_embedder.mlp.2", "t_embedder.mlp.2")
             + [Rule("y_embedder.embedding_table.weight", ("y_embedder.embedding_table.weight",))]
             + [r for i in range(depth) for r in _dit_block_rules(i)]
             + linear("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1")
             + linear("final_layer.linear", "final_layer.linear"))
    theirs = {k: v for k, v in sd.items() if k != "pos_embed"}
    ours = apply_rules(rules, theirs, src)
    if learned_sigma and not keep_sigma:
        for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
            ours[k] = eps_rows(ours[k], p, C)
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
