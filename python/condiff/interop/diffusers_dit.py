"""diffusers `DiTTransformer2DModel` <-> condiff `dit`.
"""

from __future__ import annotations

from torch import Tensor, nn

from condiff.interop.rules import (Rule, apply_rules, check_convertible, check_grid, eps_rows, hidden_width,
                                   invert_rules, linear, linear_cat, require)


def _diffusers_dit_rules(depth: int) -> list[Rule]:
    emb = [f"transformer_blocks.{i}.norm1.emb" for i in range(depth)]
    rules = (linear("x_embedder.proj", "pos_embed.proj")
             + [Rule(f"t_embedder.mlp.{j}.{p}", tuple(f"{e}.timestep_embedder.linear_{k}.{p}" for e in emb), "tied")
                for j, k in ((0, 1), (2, 2)) for p in ("weight", "bias")]
             + [Rule("y_embedder.embedding_table.weight",
                     tuple(f"{e}.class_embedder.embedding_table.weight" for e in emb), "tied")])
    for i in range(depth):
        b, t = f"blocks.{i}", f"transformer_blocks.{i}"
        rules += (linear(f"{b}.adaLN_modulation.1", f"{t}.norm1.linear")
                  + linear_cat(f"{b}.attn.qkv", [f"{t}.attn1.to_q", f"{t}.attn1.to_k", f"{t}.attn1.to_v"])
                  + linear(f"{b}.attn.proj", f"{t}.attn1.to_out.0")
                  + linear(f"{b}.mlp.fc1", f"{t}.ff.net.0.proj") + linear(f"{b}.mlp.fc2", f"{t}.ff.net.2"))
    return rules + linear("final_layer.adaLN_modulation.1", "proj_out_1") + linear("final_layer.linear", "proj_out_2")


def to_condiff(cfg: dict, sd: dict[str, Tensor]) -> tuple[str, str, dict, dict[str, Tensor]]:
    src = "diffusers DiTTransformer2DModel"
    require(cfg, src, norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
             norm_elementwise_affine=False, upcast_attention=False)
    C, p, depth = cfg["in_channels"], cfg["patch_size"], cfg["num_layers"]
    out_c = cfg.get("out_channels") or C
    if out_c not in (C, 2 * C):
        raise ValueError(f"{src}: out_channels {out_c} must be in_channels ({C}) or twice it (learned sigma)")
    ours = apply_rules(_diffusers_dit_rules(depth), sd, src)
    if out_c == 2 * C:
        for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
            ours[k] = eps_rows(ours[k], p, C)
    kwargs = dict(hidden_size=hidden_width(cfg), depth=depth, num_heads=cfg["num_attention_heads"], patch_size=p,
                  in_channels=C, num_classes=cfg["num_embeds_ada_norm"], input_size=cfg["sample_size"],
                  pos_grid="scaled", pos_interp_scale=1.0, base_size=cfg["sample_size"] // p, control="none",
                  t_freq_shift=1.0)
    return "dit", "class", kwargs, ours


def from_condiff(model: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    c = model.config
    check_convertible(c, "DiTTransformer2DModel", pos_grid="scaled", t_freq_shift=1.0, control="none",
                       learn_sigma=False)
    cfg = dict(num_attention_heads=c["num_heads"], attention_head_dim=c["hidden_size"] // c["num_heads"],
               in_channels=c["in_channels"], out_channels=c["in_channels"], num_layers=c["depth"],
               sample_size=c["input_size"], patch_size=c["patch_size"], num_embeds_ada_norm=c["num_classes"],
               norm_eps=1e-6, activation_fn="gelu-approximate", norm_type="ada_norm_zero",
               norm_elementwise_affine=False)
    check_grid(c, base=c["input_size"] // c["patch_size"], interp=1.0, target="DiTTransformer2DModel")
    sd = invert_rules(_diffusers_dit_rules(c["depth"]), model.state_dict(), "DiTTransformer2DModel")
    return "DiTTransformer2DModel", cfg, sd
