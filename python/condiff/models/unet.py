"""SDXL-style UNet (Podell et al. 2024; Rombach et al. 2022), the paper's UNet baseline (Sec. 4, Table A1).

The structure is the one of SDXL's `UNetModel` (generative-models `openaimodel.py`), base network only (the
paper's footnote 1: no refiner):

    conv_in -> [ResBlock (+ SpatialTransformer)] x num_res_blocks (+ Downsample) per level
            -> middle: ResBlock, SpatialTransformer, ResBlock
            -> [ResBlock on concat(h, skip) (+ SpatialTransformer)] x (num_res_blocks + 1) (+ Upsample) per level
            -> GroupNorm, SiLU, conv_out (zero-initialised)

* ResBlock: GroupNorm-SiLU-conv3x3, + Linear(SiLU(emb)) added per channel, GroupNorm-SiLU-conv3x3 (zero-init),
  1x1 skip conv when the width changes (SDXL: `use_scale_shift_norm=False`).
* SpatialTransformer (`use_linear=True`): GroupNorm, Linear in, `depth` x [self-attention, cross-attention
  to the context, GEGLU MLP x4], each pre-LayerNorm, Linear out (zero-init).
* Embedding: emb = MLP(sinusoidal(t)) + MLP(adm vector) [+ control embedding c_emb (Eq. 1)]: SDXL's
  "vector conditioning" (`num_classes="sequential"`, `adm_in_channels`).

Conditioning (our reading, documented because the paper gives only the parameter counts of Table A1):
* class: a table of `num_classes + 1` embeddings of width `class_dim` (the last row is the null class, see
  `Cond`); the class embedding is the single cross-attention token AND the adm vector. The class-cond default
  (ch 256, mult [1,2,4], attention at levels 2-3, depth 1, class width 1024) gives 398.1M params, 95.3 / 390.3 GFLOPs at 256 / 512 px, against the paper's 401.75M, 95.38 / 390.
* text: the text-encoder states (B, T, text_dim), padded by the model's padding mode, are the
  cross-attention context; the pooled vector (B, pooled_dim) is the adm vector. No standard width fits the paper's
  three text cells (notes/table-a1.md); the default (ch 288, attention at levels 2-3 with depth 3, middle 3, CLIP-L
  context 768, pooled 768) is the closest on all three: 875.8M (+1.3%; 872.6M without the control embedder),
  197.5 (+4.1%) / 800.3 (-2.4%) GFLOPs against 864.31M, 189.78 / 819.56.
* control (`"additive"`, SDXL's, the default of every backbone; `"disentangled"`, Eq. 1; or `"none"`): the
  `ControlEmbedder` of `condiff.conditioning.control` is added to the timestep embedding; `Cond.control_keep`
  drops it per row. Its 3.1M parameters are counted in the sizes below.

Faithfulness: with `control="none"` (text) the model computes exactly diffusers' `UNet2DConditionModel` built
with SDXL's block types, linear projections and a "projection" class embedding of the pooled vector
(`condiff.interop.diffusers_unet`, tests/test_convert.py checks outputs and a round trip of the weights).

Zero-init (ADM/SDXL): the last conv of every ResBlock, the output projection of every SpatialTransformer and
conv_out are zero, so an untrained model predicts exactly 0 and every block starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condiff.conditioning.cond import Cond
from condiff.conditioning.labels import LabelEmbedder
from condiff.models.base import DiffusionModel, ModelConfig
from condiff.models.layers import attention, timestep_embedding

UNET_CONFIGS: dict[str, dict[str, dict]] = {
    # name -> conditioning -> architecture. "unet-sdxl" is the paper's Table A1 model.
    "unet-sdxl": {
        "class": dict(model_channels=256, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 1, 1),
                      transformer_depth_middle=1, head_channels=64, class_dim=1024),
        "text": dict(model_channels=288, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 3, 3),
                     transformer_depth_middle=3, head_channels=64, text_dim=768, pooled_dim=768),
    },
    # CPU-sized (about 1M params): same structure, two levels.
    "unet-sdxl-tiny": {
        "class": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                      transformer_depth_middle=1, head_channels=16, class_dim=64, norm_groups=8),
        "text": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                     transformer_depth_middle=1, head_channels=16, text_dim=64, pooled_dim=64, norm_groups=8),
    },
}


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (ADM's `zero_module`) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """SDXL residual block: h = conv(SiLU(GN(x))) + Linear(SiLU(emb)); out = skip(x) + zero_conv(SiLU(GN(h)))."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, norm_groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def zero_init(self) -> None:
        zero_module(self.out_layers[-1])  # the block starts as its skip path

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # x (B, C, H, W), emb (B, E)
        h = self.in_layers(x)  # (B, C', H, W)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)  # (B, C', H, W)


class Attention(nn.Module):
    """Multi-head (cross-)attention as in LDM's `CrossAttention`: q, k, v without bias, output Linear with bias."""

    def __init__(self, dim: int, context_dim: int | None, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, impl: str = "sdpa") -> Tensor:
        # x (B, N, D); context (B, M, Dc) or None = self-attention; impl: see `condiff.models.layers.attention`
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in
                   (self.to_q(x), self.to_k(context), self.to_v(context)))  # (B, H, L, d) each
        out = attention(q, k, v, impl)  # (B, H, N, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, D)


class GEGLU(nn.Module):
    """LDM feed-forward: Linear(D, 2 * 4D) -> a * GELU(gate) -> Linear(4D, D)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D)
        a, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, 4D) each
        return self.out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """LDM `BasicTransformerBlock`: x += SA(LN(x)); x += CA(LN(x), context); x += FF(LN(x))."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.ff = GEGLU(dim)

    def forward(self, x: Tensor, context: Tensor, impl: str) -> Tensor:  # x (B, N, D), context (B, M, Dc)
        x = x + self.attn1(self.norm1(x), impl=impl)
        x = x + self.attn2(self.norm2(x), context, impl)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, Linear in, `depth` TransformerBlocks over the H*W tokens, zero-init Linear out, + residual."""

    def __init__(self, channels: int, context_dim: int, depth: int, head_channels: int, norm_groups: int = 32):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"SpatialTransformer: channels {channels} not divisible by head_channels {head_channels}")
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, context_dim, channels // head_channels, head_channels) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)

    def zero_init(self) -> None:
        zero_module(self.proj_out)  # the block starts as the identity

    def forward(self, x: Tensor, context: Tensor, impl: str = "sdpa") -> Tensor:  # x (B, C, H, W)
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, H*W, C)
        for block in self.blocks:
            tokens = block(tokens, context, impl)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """3x3 conv, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2, then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNetStage(nn.Module):
    """One entry of the encoder/decoder list: a ResBlock, optionally followed by a SpatialTransformer and a
    resampler (exactly one of the three is the resampler-only stage Downsample at the end of an encoder level)."""

    def __init__(self, res: ResBlock | None, attn: SpatialTransformer | None, resample: nn.Module | None):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, impl: str) -> Tensor:
        if self.res is not None:
            x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, context, impl)
        if self.resample is not None:
            x = self.resample(x)
        return x


@dataclass
class UNetConfig(ModelConfig):
    """The UNet's fields on top of `ModelConfig` (saved in `model.config`; `create(**model.config)` rebuilds).

    out_channels: predicted channels. model_channels: width of level 1; channel_mult: per level. num_res_blocks:
    ResBlocks per encoder level (decoder: +1). transformer_depth: per level (0 = no attention);
    transformer_depth_middle. head_channels: channels per attention head. class_dim: width of the class
    embedding (class-cond: the cross-attention token and the adm vector). Text-cond: the cross-attention
    context is the text states (text_dim wide), the adm vector the pooled vector (pooled_dim wide).
    norm_groups: GroupNorm groups. dropout: ResBlock dropout. input_size: the UNet has no positional grid, so
    this only tells samplers the default size and the guidance law (Eq. 4) its base resolution.
    """

    name: str = "unet-sdxl"
    out_channels: int = 4
    model_channels: int = 256
    channel_mult: list = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 2
    transformer_depth: list = field(default_factory=lambda: [0, 1, 1])
    transformer_depth_middle: int = 1
    head_channels: int = 64
    class_dim: int = 1024
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.channel_mult, self.transformer_depth = list(self.channel_mult), list(self.transformer_depth)
        self.check_positive("out_channels", "model_channels", "num_res_blocks", "head_channels", "class_dim",
                            "norm_groups")
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(f"{self.name}: transformer_depth {self.transformer_depth} needs one entry per level of "
                             f"channel_mult {self.channel_mult}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.input_size % factor:
            raise ValueError(f"{self.name}: input_size {self.input_size} must be divisible by {factor}")

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context: the class embedding or the text states."""
        return self.class_dim if self.conditioning == "class" else self.text_dim

    @property
    def adm_dim(self) -> int:
        """Width of the vector conditioning (SDXL's adm): the class embedding or the pooled text vector."""
        return self.class_dim if self.conditioning == "class" else self.pooled_dim


class UNet(DiffusionModel):
    """SDXL-style UNet, called as `model(x_t, t, cond) -> eps` (see the module docstring); config `UNetConfig`.

    The shared preamble (`DiffusionModel.forward`) gives emb = MLP(sinusoidal(t)) + control + MLP(adm vector).
    """

    config_cls = UNetConfig

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        mc, groups = cfg.model_channels, cfg.norm_groups
        self.out_channels = cfg.out_channels
        emb_dim = 4 * mc

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(nn.Linear(cfg.adm_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = LabelEmbedder(cfg.num_classes, cfg.class_dim) if cfg.conditioning == "class" else None
        self.control_embed = self.make_control_embedder(emb_dim)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, groups, cfg.dropout)

        def attn(ch: int, depth: int) -> SpatialTransformer | None:
            return SpatialTransformer(ch, cfg.context_dim, depth, cfg.head_channels, groups) if depth else None

        self.conv_in = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(UNetStage(res(ch, mult * mc), attn(mult * mc, cfg.transformer_depth[level]), None))
                ch = mult * mc
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(UNetStage(None, None, Downsample(ch)))
                skip_channels.append(ch)
        self.middle = nn.ModuleList([
            UNetStage(res(ch, ch), attn(ch, cfg.transformer_depth_middle), None), UNetStage(res(ch, ch), None, None)
        ])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                cout = mult * mc
                upsample = Upsample(cout) if level and i == cfg.num_res_blocks else None
                self.up.append(UNetStage(res(ch + skip_channels.pop(), cout), attn(cout, cfg.transformer_depth[level]),
                                         upsample))
                ch = cout
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.downsample_factor = 2 ** (len(cfg.channel_mult) - 1)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """(Re-)initialise every parameter and computed buffer: PyTorch's default init of every layer, N(0, 0.02)
        class table, zero-output control embedder, then ADM/SDXL's zero-init (last conv of every ResBlock, output
        projection of every SpatialTransformer, conv_out), so a fresh model predicts exactly 0. Called by the
        constructor; call it again after `model.to_empty(device=...)` of a meta-device model."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)):
                m.reset_parameters()
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.embedding_table.weight, std=0.02)
        if self.control_embed is not None:
            self.control_embed.reset_parameters()
        for m in self.modules():
            if isinstance(m, (ResBlock, SpatialTransformer)):
                m.zero_init()
        zero_module(self.out[-1])

    @property
    def control_embedder(self):
        """The control embedder (stored as `control_embed`, SDXL-style naming of the UNet's state dict)."""
        return self.control_embed

    @property
    def param_dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def embed_timestep(self, t: Tensor) -> Tensor:
        return self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(self.param_dtype))  # (B, E)

    def class_vector(self, cond: Cond, batch_size: int) -> Tensor:
        return self.class_embed(self.labels(cond, batch_size))  # (B, class_dim)

    def vector_condition(self, cond: Cond, batch_size: int) -> Tensor:
        """SDXL's vector conditioning MLP(adm): the class embedding or the pooled text vector -> (B, E)."""
        adm = self.class_vector(cond, batch_size) if self.cfg.conditioning == "class" else self.pooled(cond, batch_size)
        return self.label_emb(adm.to(self.param_dtype))

    def context(self, cond: Cond, batch_size: int) -> Tensor:
        """Cross-attention context (B, M, context_dim): the class token (M = 1) or the padded text states."""
        if self.cfg.conditioning == "class":
            return self.class_vector(cond, batch_size)[:, None, :]
        return self.text_states(cond, batch_size)

    def denoise(self, x: Tensor, emb: Tensor, cond: Cond) -> Tensor:
        """x (B, C, H, W) noisy latents, H and W divisible by 2^(levels-1); emb (B, E) -> eps (B, C_out, H, W)."""
        b, c, h, w = x.shape
        if h % self.downsample_factor or w % self.downsample_factor:
            raise ValueError(f"{self.cfg.name}: x must be (B, {c}, H, W) with H, W divisible by "
                             f"{self.downsample_factor}, got {tuple(x.shape)}")
        context, impl = self.context(cond, b).to(x.dtype), self.attn_impl
        hs = [self.conv_in(x)]  # skip activations
        for stage in self.down:
            hs.append(stage(hs[-1], emb, context, impl))
        h = hs[-1]
        for stage in self.middle:
            h = stage(h, emb, context, impl)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb, context, impl)
        return self.out(h)  # (B, C_out, H, W)


_LEGACY_CONTROL_KEYS = {"gamma": "gamma", "alpha": "gamma_alpha", "k": "gamma_k", "freq_dim": "control_freq_dim"}


def _legacy_kwargs(conditioning: str, kwargs: dict) -> dict:
    """Configs written before the shared field names (context_dim / adm_dim / control_kwargs) -> current names."""
    kwargs = dict(kwargs)
    width = "class_dim" if conditioning == "class" else "text_dim"
    if "context_dim" in kwargs:
        kwargs.setdefault(width, kwargs.pop("context_dim"))
    if "adm_dim" in kwargs:
        adm = kwargs.pop("adm_dim")
        if conditioning == "text":
            kwargs.setdefault("pooled_dim", adm)
        elif adm != kwargs.get("class_dim", adm):
            raise ValueError(f"UNet: class conditioning uses the class embedding as context and adm vector, so "
                             f"adm_dim ({adm}) must equal the class width ({kwargs['class_dim']})")
    for key, value in (kwargs.pop("control_kwargs", None) or {}).items():
        if key not in _LEGACY_CONTROL_KEYS:
            raise ValueError(f"UNet: unknown control_kwargs key {key!r}; known: {sorted(_LEGACY_CONTROL_KEYS)}")
        kwargs.setdefault(_LEGACY_CONTROL_KEYS[key], value)
    return kwargs


def unet_config(name: str = "unet-sdxl", conditioning: str = "class", **overrides) -> UNetConfig:
    """Resolve a named UNet config (`UNET_CONFIGS`) for a conditioning, with keyword overrides (unknown keys raise
    ValueError naming them)."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {name!r}; known: {sorted(UNET_CONFIGS)}")
    if conditioning not in UNET_CONFIGS[name]:
        raise ValueError(f"UNet {name!r}: conditioning must be one of {sorted(UNET_CONFIGS[name])}, "
                         f"got {conditioning!r}")
    kwargs = {**UNET_CONFIGS[name][conditioning], **_legacy_kwargs(conditioning, overrides)}
    kwargs["name"], kwargs["conditioning"] = name, conditioning
    valid = {f.name for f in fields(UNetConfig)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"create({name!r}): unknown option(s) {unknown}; valid options: {sorted(valid)}")
    return UNetConfig(**kwargs)


def build_unet(name: str = "unet-sdxl", conditioning: str = "class", **overrides) -> UNet:
    """Build a named UNet config (`UNET_CONFIGS`) for a conditioning, with keyword overrides."""
    return UNet(unet_config(name, conditioning, **overrides))
