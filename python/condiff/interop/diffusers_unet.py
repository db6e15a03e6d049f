"""diffusers `UNet2DConditionModel` with SDXL's block types (linear projections, "projection" class
embedding = the pooled vector) <-> condiff `unet-sdxl` (text).
"""

from __future__ import annotations

from torch import Tensor, nn

from condiff.interop.rules import Rule, apply_rules, check_convertible, invert_rules, linear, require


def _unet_rules(levels: int, num_res_blocks: int, depth: list[int], depth_middle: int) -> list[Rule]:
    """condiff UNet stage lists <-> diffusers down_blocks / mid_block / up_blocks (same order of modules)."""

    def res(ours: str, theirs: str) -> list[Rule]:
        return (linear(f"{ours}.in_layers.0", f"{theirs}.norm1") + linear(f"{ours}.in_layers.2", f"{theirs}.conv1")
                + linear(f"{ours}.emb_layers.1", f"{theirs}.time_emb_proj")
                + linear(f"{ours}.out_layers.0", f"{theirs}.norm2") + linear(f"{ours}.out_layers.3", f"{theirs}.conv2"))

    def skip(ours: str, theirs: str) -> list[Rule]:
        return linear(f"{ours}.skip", f"{theirs}.conv_shortcut")

    def attn(ours: str, theirs: str, n: int) -> list[Rule]:
        rules = (linear(f"{ours}.norm", f"{theirs}.norm") + linear(f"{ours}.proj_in", f"{theirs}.proj_in")
                 + linear(f"{ours}.proj_out", f"{theirs}.proj_out"))
        for b in range(n):
            o, t = f"{ours}.blocks.{b}", f"{theirs}.transformer_blocks.{b}"
            for k in ("norm1", "norm2", "norm3"):
                rules += linear(f"{o}.{k}", f"{t}.{k}")
            for a in ("attn1", "attn2"):
                rules += [Rule(f"{o}.{a}.to_{x}.weight", (f"{t}.{a}.to_{x}.weight",)) for x in "qkv"]
                rules += linear(f"{o}.{a}.to_out", f"{t}.{a}.to_out.0")
            rules += linear(f"{o}.ff.proj", f"{t}.ff.net.0.proj") + linear(f"{o}.ff.out", f"{t}.ff.net.2")
        return rules

    rules = (linear("time_embed.0", "time_embedding.linear_1") + linear("time_embed.2", "time_embedding.linear_2")
             + linear("label_emb.0", "class_embedding.linear_1") + linear("label_emb.2", "class_embedding.linear_2")
             + linear("conv_in", "conv_in") + linear("out.0", "conv_norm_out") + linear("out.2", "conv_out"))
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
            rules += linear(f"down.{k}.resample.conv", f"down_blocks.{level}.downsamplers.0.conv")
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
                rules += linear(f"{o}.resample.conv", f"{t}.upsamplers.0.conv")
            k += 1
    return rules


_UNET_FIXED = dict(act_fn="silu", center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
                   use_linear_projection=True, class_embed_type="projection", norm_eps=1e-5, downsample_padding=1,
                   dual_cross_attention=False, only_cross_attention=False, upcast_attention=False,
                   resnet_time_scale_shift="default", time_embedding_type="positional", addition_embed_type=None,
                   encoder_hid_dim=None, time_cond_proj_dim=None, mid_block_type="UNetMidBlock2DCrossAttn",
                   attention_type="default", class_embeddings_concat=False, resnet_out_scale_factor=1.0,
                   conv_in_kernel=3, conv_out_kernel=3)


def to_condiff(cfg: dict, sd: dict[str, Tensor]) -> tuple[str, str, dict, dict[str, Tensor]]:
    src = "diffusers UNet2DConditionModel"
    require(cfg, src, **_UNET_FIXED)
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


def from_condiff(model: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    c = model.config
    check_convertible(c, "UNet2DConditionModel", conditioning="text", control="none")
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
