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
* class: a table of `num_classes + 1` embeddings of width `context_dim` (the last row is the null class, see
  `Cond`); the class embedding is the single cross-attention token AND the adm vector (so `adm_dim ==
  context_dim`). The class-cond default (ch 256, mult [1,2,4], attention at levels 2-3, depth 1, context and adm
  1024) gives 398.1M params, 95.3 / 390.3 GFLOPs at 256 / 512 px, against the paper's 401.75M, 95.38 / 390.
* text: the text-encoder states (B, T, context_dim), padded by the model's padding mode, are the
  cross-attention context; the pooled vector (B, adm_dim) is the adm vector. No standard width fits the paper's
  three text cells (notes/table-a1.md); the default (ch 288, attention at levels 2-3 with depth 3, middle 3, CLIP-L
  context 768, pooled 768) is the closest on all three: 875.8M (+1.3%; 872.6M without the control embedder),
  197.5 (+4.1%) / 800.3 (-2.4%) GFLOPs against 864.31M, 189.78 / 819.56.
* control (`"additive"`, SDXL's, the default of every backbone; `"disentangled"`, Eq. 1; or `"none"`): the
  `ControlEmbedder` of `condiff.conditioning.control` is added to the timestep embedding; `Cond.control_keep`
  drops it per row. Its 3.1M parameters are counted in the sizes below.

Faithfulness: with `control="none"` (text) the model computes exactly diffusers' `UNet2DConditionModel` built
with SDXL's block types, linear projections and a "projection" class embedding of the pooled vector
(`condiff.models.convert`, tests/test_convert.py checks outputs and a round trip of the weights).

Zero-init (ADM/SDXL): the last conv of every ResBlock, the output projection of every SpatialTransformer and
conv_out are zero, so an untrained model predicts exactly 0 and every block starts as the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condiff.conditioning.cond import CONTROL_GROUPS, Cond
from condiff.conditioning.control import ControlEmbedder, check_control_fields
from condiff.conditioning.labels import LabelEmbedder, check_labels
from condiff.conditioning.padding import noise_amplitude, pad_text
from condiff.models.layers import attention, resolve_attn_impl, timestep_embedding

UNET_CONFIGS: dict[str, dict[str, dict]] = {
    # name -> conditioning -> architecture. "unet-sdxl" is the paper's Table A1 model.
    "unet-sdxl": {
        "class": dict(model_channels=256, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 1, 1),
                      transformer_depth_middle=1, head_channels=64, context_dim=1024, adm_dim=1024),
        "text": dict(model_channels=288, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 3, 3),
                     transformer_depth_middle=3, head_channels=64, context_dim=768, adm_dim=768),
    },
    # CPU-sized (about 1M params): same structure, two levels.
    "unet-sdxl-tiny": {
        "class": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                      transformer_depth_middle=1, head_channels=16, context_dim=64, adm_dim=64, norm_groups=8),
        "text": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                     transformer_depth_middle=1, head_channels=16, context_dim=64, adm_dim=64, norm_groups=8),
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
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

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
        self.proj_out = zero_module(nn.Linear(channels, channels))

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


class UNet(nn.Module):
    """SDXL-style UNet, called as `model(x_t, t, cond) -> eps` (see the module docstring).

    Args (all saved in `self.config`, which rebuilds the model through `condiff.models.create(**config)`):
      conditioning: "class" or "text". num_classes: class count (class-cond; +1 null row).
      in_channels/out_channels: latent channels. model_channels: width of level 1; channel_mult: per level.
      num_res_blocks: ResBlocks per encoder level (decoder: +1). transformer_depth: per level (0 = no attention);
      transformer_depth_middle. head_channels: channels per attention head. context_dim: cross-attention
      context width (class embedding or text states). adm_dim: width of the vector conditioning.
      text_padding / text_noise_beta / text_noise_reading / text_noise_at_inference: padding mode of the text
      states and the reading of beta_txt (`condiff.conditioning.padding`).
      control: "none", "additive" (SDXL) or "disentangled" (Eq. 1): the control embedding added to the timestep
      embedding; control_kwargs: the other `ControlEmbedder` options (gamma, alpha, k, freq_dim); control_fields:
      the conditioned control groups (`cond.CONTROL_GROUPS`, default all).
      norm_groups: GroupNorm groups. dropout: ResBlock dropout. attn_impl: None (module default) | "sdpa" |
      "math" (explicit matmuls), see `condiff.models.layers.attention_impl`. input_size: training resolution in
      latent cells (32 = 256 px SD-VAE latents); the UNet has no positional grid, so this only tells samplers
      the default size and the guidance law (Eq. 4) its base resolution, as for the transformers.
    """

    def __init__(
        self,
        conditioning: str = "class",
        num_classes: int = 1000,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 256,
        channel_mult: tuple[int, ...] = (1, 2, 4),
        num_res_blocks: int = 2,
        transformer_depth: tuple[int, ...] = (0, 1, 1),
        transformer_depth_middle: int = 1,
        head_channels: int = 64,
        context_dim: int = 1024,
        adm_dim: int = 1024,
        text_padding: str = "zero",
        text_noise_beta: float = 0.0,
        text_noise_reading: str = "variance",
        text_noise_at_inference: bool = False,
        control: str = "additive",
        control_kwargs: dict | None = None,
        control_fields: list | tuple = tuple(CONTROL_GROUPS),
        norm_groups: int = 32,
        dropout: float = 0.0,
        attn_impl: str | None = None,
        input_size: int = 32,
        name: str = "unet-sdxl",
    ):
        super().__init__()
        if conditioning not in ("class", "text"):
            raise ValueError(f"UNet: conditioning must be 'class' or 'text', got {conditioning!r}")
        if len(transformer_depth) != len(channel_mult):
            raise ValueError(
                f"UNet: transformer_depth {list(transformer_depth)} needs one entry per level of channel_mult "
                f"{list(channel_mult)}"
            )
        if conditioning == "class" and adm_dim != context_dim:
            raise ValueError(f"UNet: class conditioning uses the class embedding as context and adm vector, so "
                             f"adm_dim ({adm_dim}) must equal context_dim ({context_dim})")
        noise_amplitude(text_noise_beta, text_noise_reading)  # validates both: a clear error at construction
        self.config = dict(
            name=name, conditioning=conditioning, num_classes=num_classes, in_channels=in_channels,
            out_channels=out_channels, model_channels=model_channels, channel_mult=list(channel_mult),
            num_res_blocks=num_res_blocks, transformer_depth=list(transformer_depth),
            transformer_depth_middle=transformer_depth_middle, head_channels=head_channels,
            context_dim=context_dim, adm_dim=adm_dim, text_padding=text_padding, text_noise_beta=text_noise_beta,
            text_noise_reading=text_noise_reading, text_noise_at_inference=text_noise_at_inference,
            control=control, control_kwargs=dict(control_kwargs or {}),
            control_fields=list(check_control_fields(control_fields, f"{name}: control_fields")), norm_groups=norm_groups, dropout=dropout,
            attn_impl=attn_impl, input_size=input_size,
        )
        self.conditioning, self.num_classes = conditioning, num_classes
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.text_padding, self.text_noise_beta, self.attn_impl = text_padding, text_noise_beta, attn_impl
        emb_dim = 4 * model_channels

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(nn.Linear(adm_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = LabelEmbedder(num_classes, context_dim) if conditioning == "class" else None
        self.control_embed = (ControlEmbedder(emb_dim, control, fields=tuple(control_fields), **(control_kwargs or {}))
                              if control != "none" else None)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, norm_groups, dropout)

        def attn(ch: int, depth: int) -> SpatialTransformer | None:
            return SpatialTransformer(ch, context_dim, depth, head_channels, norm_groups) if depth else None

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(UNetStage(res(ch, mult * model_channels), attn(mult * model_channels,
                                                                                transformer_depth[level]), None))
                ch = mult * model_channels
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(UNetStage(None, None, Downsample(ch)))
                skip_channels.append(ch)
        self.middle = nn.ModuleList([
            UNetStage(res(ch, ch), attn(ch, transformer_depth_middle), None), UNetStage(res(ch, ch), None, None)
        ])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                cout = mult * model_channels
                upsample = Upsample(cout) if level and i == num_res_blocks else None
                self.up.append(UNetStage(res(ch + skip_channels.pop(), cout), attn(cout, transformer_depth[level]),
                                         upsample))
                ch = cout
        self.out = nn.Sequential(
            nn.GroupNorm(norm_groups, ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        )
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        if input_size % self.downsample_factor:
            raise ValueError(f"UNet: input_size {input_size} must be divisible by {self.downsample_factor}")

    def _context(self, cond: Cond, batch: int) -> tuple[Tensor, Tensor]:
        """-> cross-attention context (B, M, context_dim), adm vector (B, adm_dim)."""
        if self.conditioning == "class":
            c = self.class_embed(check_labels(cond.labels, self.num_classes, batch))  # (B, context_dim)
            return c[:, None, :], c
        if cond.text is None or cond.pooled is None:
            raise ValueError("UNet(conditioning='text'): cond.text (B, T, C) and cond.pooled (B, C_pool) are required")
        if cond.text.shape[0] != batch or cond.text.shape[-1] != self.config["context_dim"]:
            raise ValueError(f"UNet: cond.text must be ({batch}, T, {self.config['context_dim']}), "
                             f"got {tuple(cond.text.shape)}")
        if cond.pooled.shape != (batch, self.config["adm_dim"]):
            raise ValueError(f"UNet: cond.pooled must be ({batch}, {self.config['adm_dim']}), "
                             f"got {tuple(cond.pooled.shape)}")
        text = cond.text
        if cond.text_lengths is not None:
            beta = noise_amplitude(self.text_noise_beta, self.config["text_noise_reading"], training=self.training,
                                   at_inference=self.config["text_noise_at_inference"])
            text = pad_text(text, cond.text_lengths, self.text_padding, beta)
        return text, cond.pooled

    def example_inputs(self, batch_size: int = 1, input_size: int | None = None, device=None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Cond]:
        """Random (x_t, t, cond) of the right shapes (tests, FLOP counting, smoke runs), with control metadata."""
        cfg, b = self.config, batch_size
        device = device or next(self.parameters()).device
        side = input_size or cfg["input_size"]
        x = torch.randn(b, self.in_channels, side, side, generator=generator).to(device)
        t = (torch.rand(b, generator=generator) * 999).to(device)
        size = float(side * 8)
        control = dict(control_h=torch.tensor([[0.0, 0.0, size, size, 1.0, 0.0]]).repeat(b, 1).to(device),
                       control_l=torch.tensor([[size, size]]).repeat(b, 1).to(device))
        if self.conditioning == "class":
            labels = torch.randint(0, self.num_classes, (b,), generator=generator).to(device)
            return x, t, Cond(labels=labels, **control)
        text = torch.randn(b, 77, cfg["context_dim"], generator=generator).to(device)
        pooled = torch.randn(b, cfg["adm_dim"], generator=generator).to(device)
        lengths = torch.randint(1, 78, (b,), generator=generator).to(device)
        return x, t, Cond(text=text, text_lengths=lengths, pooled=pooled, **control)

    def forward(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """x (B, C, H, W) noisy latents, H and W divisible by 2^(levels-1); t (B,) float DDPM timesteps in
        [0, T); cond: `Cond`. -> eps prediction (B, C, H, W)."""
        b, c, h, w = x.shape
        if c != self.in_channels or h % self.downsample_factor or w % self.downsample_factor:
            raise ValueError(f"UNet: x must be (B, {self.in_channels}, H, W) with H, W divisible by "
                             f"{self.downsample_factor}, got {tuple(x.shape)}")
        t = t.expand(b) if t.dim() == 0 else t
        context, adm = self._context(cond, b)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))  # (B, E)
        emb = emb + self.label_emb(adm.to(emb.dtype))
        if self.control_embed is not None:
            emb = emb + self.control_embed(t, cond, b).to(emb.dtype)
        context, impl = context.to(x.dtype), resolve_attn_impl(self.attn_impl)

        hs = [self.conv_in(x)]  # skip activations
        for stage in self.down:
            hs.append(stage(hs[-1], emb, context, impl))
        h = hs[-1]
        for stage in self.middle:
            h = stage(h, emb, context, impl)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb, context, impl)
        return self.out(h)  # (B, C_out, H, W)


def build_unet(name: str = "unet-sdxl", conditioning: str = "class", **overrides) -> UNet:
    """Build a named UNet config (`UNET_CONFIGS`) for a conditioning, with keyword overrides."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {name!r}; known: {sorted(UNET_CONFIGS)}")
    if conditioning not in UNET_CONFIGS[name]:
        raise ValueError(f"UNet {name!r}: conditioning must be one of {sorted(UNET_CONFIGS[name])}, "
                         f"got {conditioning!r}")
    kwargs = {**UNET_CONFIGS[name][conditioning], **overrides}
    return UNet(conditioning=conditioning, name=name, **kwargs)
