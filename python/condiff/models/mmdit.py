"""mmDiT (SD3, Esser et al. 2024) and the paper's improved mmDiT (`mmdit-ours`).

The semantic condition is a context sequence joined with the image tokens in every block's attention
(`condiff.ops.joint_attention`: per-head RMSNorm of q and k for each stream, one softmax over the
concatenated sequence): one class token (class-cond) or the projected, padded text states (text-cond).
Never added into adaLN: the adaLN input is c = t_emb (+ control embedding) (+ pooled-text projection).

Three designs of the context stream (`context_stream`), docs/table-a1.md:
  shared  the context tokens are ordinary tokens of the sequence: the image stream's q,k,v, projection,
          MLP and adaLN process them too (in-context tokens). Default for class-cond: matches Table A1's
          mmDiT-XL/2 class-cond count (675.1M + control).
  light   the context tokens get their own q,k,v (and q/k norms) per block and share the image stream's
          output projection, MLP and adaLN. Default for text-cond: matches Table A1's 791.64M
          (+28 (3d^2 + 3d) over the class model). The last block computes no context output.
  full    SD3's dual stream, structurally like diffusers' `JointTransformerBlock`: the context stream has its
          own adaLN-Zero (6 D), q,k,v, q/k norms, output projection and MLP; the last block is
          `context_pre_only` (adaLN with 2 D (shift, scale), no projection / MLP); the pooled text projection
          is added to the timestep embedding. For loading SD3 weights (1347.8M at XL/2 text).
          Chunk orders are DiT's (shift, scale, gate, ...); diffusers' AdaLayerNormContinuous (norm_out and
          the pre-only context norm) is (scale, shift): converters swap the halves.
`mmdit-ours` = the same backbone with disentangled control (Eq. 1, power-cosine gamma alpha = 8) and
noisy-replicate text padding (Eq. 7); `mmdit` = SDXL-style additive control and zero padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from condiff.conditioning.cond import Cond
from condiff.conditioning.labels import LabelEmbedder
from condiff.models.dit import DiTBlock
from condiff.models.layers import Attention, FinalLayer, Mlp, gated, modulate
from condiff.models.transformer import Backbone, BackboneConfig

CONTEXT_STREAMS = ("auto", "shared", "light", "full")


class JointBlock(nn.Module):
    """SD3 dual-stream block: each stream has its own adaLN-Zero, q,k,v (+RMSNorm), projection and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, qk_norm: bool = True,
                 context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        hidden = int(dim * mlp_ratio)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, context="full", context_pre_only=context_pre_only)
        self.mlp = Mlp(dim, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.context_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if context_pre_only else 6) * dim))
        self.context_mlp = None if context_pre_only else Mlp(dim, hidden)

    def zero_init(self) -> None:
        for lin in (self.adaLN_modulation[1], self.context_adaLN_modulation[1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, c: Tensor, context: Tensor, *, impl: str = "sdpa", backend: str | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D), c (B, D), context (B, M, D) -> (x, context | None if context_pre_only)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        mods_c = self.context_adaLN_modulation(c).chunk(2 if self.context_pre_only else 6, dim=1)
        h_c = modulate(context, mods_c[0], mods_c[1], backend)  # (B, M, D)
        a_x, a_c = self.attn(modulate(x, shift_msa, scale_msa, backend), h_c, impl=impl, backend=backend)
        x = gated(x, gate_msa, a_x, backend)
        x = gated(x, gate_mlp, self.mlp(modulate(x, shift_mlp, scale_mlp, backend)), backend)  # (B, N, D)
        if self.context_pre_only:
            return x, None
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = mods_c
        context = gated(context, c_gate_msa, a_c, backend)
        context = gated(context, c_gate_mlp, self.context_mlp(modulate(context, c_shift_mlp, c_scale_mlp, backend)),
                        backend)  # (B, M, D)
        return x, context


@dataclass
class MMDiTConfig(BackboneConfig):
    """mmDiT: `context_stream` in auto | shared | light | full (auto: shared for class, light for text);
    `qk_norm` RMSNorm on q and k (SD3 / the paper: on)."""

    context_stream: str = "auto"
    qk_norm: bool = True
    use_pooled: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.context_stream not in CONTEXT_STREAMS:
            raise ValueError(f"{self.name or 'mmdit'}: context_stream must be one of {CONTEXT_STREAMS}, "
                             f"got {self.context_stream!r}")
        if self.context_stream == "auto":
            self.context_stream = "shared" if self.conditioning == "class" else "light"


class MMDiT(Backbone):
    """mmDiT: joint attention over [image tokens, context tokens]. forward(x_t, t, cond) -> eps (B, C, H, W)."""

    config_cls = MMDiTConfig

    def __init__(self, cfg: MMDiTConfig):
        super().__init__(cfg)
        D, stream = cfg.hidden_size, cfg.context_stream
        if cfg.conditioning == "text":
            self.context_embedder = nn.Linear(cfg.text_dim, D)
        else:
            self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        last = cfg.depth - 1
        if stream == "full":
            blocks = [JointBlock(D, cfg.num_heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm, context_pre_only=i == last)
                      for i in range(cfg.depth)]
        elif stream == "light":
            blocks = [DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm, context="light",
                               context_pre_only=i == last) for i in range(cfg.depth)]
        else:
            blocks = [DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm) for _ in range(cfg.depth)]
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    def run_blocks(self, x: Tensor, c: Tensor, cond: Cond, grid: tuple[int, int]) -> Tensor:
        """x (B, N, D), c = t_emb + control [+ pooled] (B, D) -> (B, N, D)."""
        ctx = self.context_tokens(cond, x.shape[0]).to(x.dtype)  # (B, M, D)
        if self.cfg.context_stream == "shared":
            N = x.shape[1]
            h = torch.cat([x, ctx], dim=1)  # (B, N + M, D): context tokens are ordinary tokens
            for block in self.blocks:
                h, _ = block(h, c, **self.run)
            return h[:, :N]
        for block in self.blocks:
            x, ctx = block(x, c, ctx, **self.run)
        return x
