"""diffusers `PixArtTransformer2DModel` <-> condiff `pixart-alpha` (text).
"""

from __future__ import annotations

from torch import Tensor, nn

from condiff.interop.rules import (Rule, apply_rules, check_convertible, check_grid, eps_rows, hidden_width,
                                   invert_rules, linear, linear_cat, require)


def _pixart_rules(depth: int) -> list[Rule]:
    rules = (linear("x_embedder.proj", "pos_embed.proj")
             + linear("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1")
             + linear("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2")
             + linear("t_block.1", "adaln_single.linear")
             + linear("y_embedder.y_proj.fc1", "caption_projection.linear_1")
             + linear("y_embedder.y_proj.fc2", "caption_projection.linear_2"))
    for i in range(depth):
        b, t = f"blocks.{i}", f"transformer_blocks.{i}"
        rules += ([Rule(f"{b}.scale_shift_table", (f"{t}.scale_shift_table",))]
                  + linear_cat(f"{b}.attn.qkv", [f"{t}.attn1.to_q", f"{t}.attn1.to_k", f"{t}.attn1.to_v"])
                  + linear(f"{b}.attn.proj", f"{t}.attn1.to_out.0")
                  + linear(f"{b}.cross_attn.q_linear", f"{t}.attn2.to_q")
                  + linear_cat(f"{b}.cross_attn.kv_linear", [f"{t}.attn2.to_k", f"{t}.attn2.to_v"])
                  + linear(f"{b}.cross_attn.proj", f"{t}.attn2.to_out.0")
                  + linear(f"{b}.mlp.fc1", f"{t}.ff.net.0.proj") + linear(f"{b}.mlp.fc2", f"{t}.ff.net.2"))
    return (rules + [Rule("final_layer.scale_shift_table", ("scale_shift_table",))]
            + linear("final_layer.linear", "proj_out"))


def _pixart_interp(cfg: dict) -> float:
    """diffusers' PixArt interpolation scale: the config's, else max(sample_size // 64, 1)."""
    scale = cfg.get("interpolation_scale")
    return float(scale if scale is not None else max(cfg["sample_size"] // 64, 1))


def to_condiff(cfg: dict, sd: dict[str, Tensor]) -> tuple[str, str, dict, dict[str, Tensor]]:
    src = "diffusers PixArtTransformer2DModel"
    require(cfg, src, norm_type="ada_norm_single", activation_fn="gelu-approximate", attention_bias=True,
             norm_elementwise_affine=False, norm_eps=1e-6, upcast_attention=False, attention_type="default")
    D, C, p, depth = hidden_width(cfg), cfg["in_channels"], cfg["patch_size"], cfg["num_layers"]
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
            ours[k] = eps_rows(ours[k], p, C)
    kwargs = dict(hidden_size=D, depth=depth, num_heads=cfg["num_attention_heads"], patch_size=p, in_channels=C,
                  input_size=cfg["sample_size"], text_dim=cfg["caption_channels"], pos_grid="scaled",
                  pos_interp_scale=_pixart_interp(cfg), base_size=cfg["sample_size"] // p, control="none",
                  text_padding="zero")
    return "pixart-alpha", "text", kwargs, ours


def from_condiff(model: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    c = model.config
    check_convertible(c, "PixArtTransformer2DModel", conditioning="text", pos_grid="scaled", control="none",
                       learn_sigma=False, t_freq_shift=0.0, use_pooled=False)
    check_grid(c, base=c["input_size"] // c["patch_size"], interp=c["pos_interp_scale"],
                target="PixArtTransformer2DModel")
    D = c["hidden_size"]
    cfg = dict(num_attention_heads=c["num_heads"], attention_head_dim=D // c["num_heads"],
               in_channels=c["in_channels"], out_channels=c["in_channels"], num_layers=c["depth"],
               cross_attention_dim=D, sample_size=c["input_size"], patch_size=c["patch_size"],
               interpolation_scale=c["pos_interp_scale"], use_additional_conditions=False,
               caption_channels=c["text_dim"], norm_eps=1e-6)
    sd = invert_rules(_pixart_rules(c["depth"]), model.state_dict(), "PixArtTransformer2DModel")
    return "PixArtTransformer2DModel", cfg, sd
