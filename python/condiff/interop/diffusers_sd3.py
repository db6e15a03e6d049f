"""diffusers `SD3Transformer2DModel` <-> condiff `mmdit` with the full SD3 dual stream
(`context_stream="full"`, pooled projection, `pos_grid="sd3"`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from condiff.interop.rules import (Rule, apply_rules, check_convertible, check_pos_table, hidden_width, invert_rules,
                                   linear, linear_cat)
from condiff.models.posemb import sincos_pos_embed_2d


def _sd3_rules(depth: int, qk_norm: bool) -> list[Rule]:
    rules = (linear("x_embedder.proj", "pos_embed.proj")
             + linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
             + linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
             + linear("pooled_embedder.linear_1", "time_text_embed.text_embedder.linear_1")
             + linear("pooled_embedder.linear_2", "time_text_embed.text_embedder.linear_2")
             + linear("context_embedder", "context_embedder"))
    for i in range(depth):
        b, t = f"blocks.{i}", f"transformer_blocks.{i}"
        last = i == depth - 1  # SD3's last block is context_pre_only
        rules += (linear(f"{b}.adaLN_modulation.1", f"{t}.norm1.linear")
                  + linear(f"{b}.context_adaLN_modulation.1", f"{t}.norm1_context.linear", "swap" if last else "copy")
                  + linear_cat(f"{b}.attn.qkv", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"])
                  + linear_cat(f"{b}.attn.context_qkv",
                                [f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"])
                  + linear(f"{b}.attn.proj", f"{t}.attn.to_out.0")
                  + linear(f"{b}.mlp.fc1", f"{t}.ff.net.0.proj") + linear(f"{b}.mlp.fc2", f"{t}.ff.net.2"))
        if not last:
            rules += (linear(f"{b}.attn.context_proj", f"{t}.attn.to_add_out")
                      + linear(f"{b}.context_mlp.fc1", f"{t}.ff_context.net.0.proj")
                      + linear(f"{b}.context_mlp.fc2", f"{t}.ff_context.net.2"))
        if qk_norm:  # the last block's context queries feed no output: condiff has no norm for them
            norms = (("q_norm", "norm_q"), ("k_norm", "norm_k"), ("context_k_norm", "norm_added_k"))
            norms += () if last else (("context_q_norm", "norm_added_q"),)
            rules += [Rule(f"{b}.attn.{o}.weight", (f"{t}.attn.{d}.weight",)) for o, d in norms]
    # diffusers' AdaLayerNormContinuous emits (scale, shift); DiT's final layer (shift, scale)
    return rules + linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap") + linear(
        "final_layer.linear", "proj_out")


def to_condiff(cfg: dict, sd: dict[str, Tensor]) -> tuple[str, str, dict, dict[str, Tensor]]:
    src = "diffusers SD3Transformer2DModel"
    D, C, p, depth = hidden_width(cfg), cfg["in_channels"], cfg["patch_size"], cfg["num_layers"]
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
        check_pos_table(table, sincos_pos_embed_2d(D, max_size, max_size, base, kind="scaled"), src)
    # SD3's last block is context_pre_only: its context-query norm is a parameter that no output depends on
    theirs.pop(f"transformer_blocks.{depth - 1}.attn.norm_added_q.weight", None)
    ours = apply_rules(_sd3_rules(depth, qk is not None), theirs, src)
    kwargs = dict(hidden_size=D, depth=depth, num_heads=cfg["num_attention_heads"], patch_size=p, in_channels=C,
                  input_size=cfg["sample_size"], text_dim=cfg["joint_attention_dim"],
                  pooled_dim=cfg["pooled_projection_dim"], context_stream="full", qk_norm=qk is not None,
                  use_pooled=True, pos_grid="sd3", pos_max_size=max_size, base_size=base, control="none",
                  text_padding="zero")
    return "mmdit", "text", kwargs, ours


def from_condiff(model: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    c = model.config
    check_convertible(c, "SD3Transformer2DModel", context_stream="full", pos_grid="sd3", use_pooled=True,
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
