"""DiT (Peebles & Xie 2023, facebookresearch/DiT) and Att-DiT (the class as tokens in attention).

DiT: adaLN-Zero blocks; the condition vector c = t_emb + y_emb (+ control) modulates every block.
Att-DiT (the paper's "DiT with the class conditioning within the attention layer", Sec. 3.1): c = t_emb
(+ control) only; the class embedding is a context token with its own q, k, v in every block that joins
the image tokens' self-attention (`Attention(context="light")`): it is updated by its attention output
through the block's shared output projection (no MLP), and the last block only uses its k, v. This is the
design whose parameter count matches Table A1 (786.7M + control embedders; docs/table-a1.md).
For text, Att-DiT's context tokens are the projected text states, and every block also gets a
cross-attention layer to them (PixArt-style, no norm), which matches Table A1's +148.85M = 28 (4d^2 + 4d).

Init (DiT): xavier-uniform linears, N(0, 0.02) embeddings, zero adaLN modulations and zero final layer, so
a fresh model predicts exactly 0 and every block is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from condiff.conditioning.cond import Cond
from condiff.conditioning.labels import LabelEmbedder
from condiff.models.layers import Attention, CrossAttention, FinalLayer, Mlp, gated, modulate
from condiff.models.transformer import Backbone, BackboneConfig


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block, with the options the other backbones need.

    qk_norm: RMSNorm on q and k (mmDiT). context: None or "light" (a context stream with its own q, k, v that
    shares this block's adaLN, output projection [and MLP if context_mlp]); context_pre_only: the context
    output is not computed (last block). cross_attn: a cross-attention layer to `cross` tokens after the
    self-attention (Att-DiT text). skip: a long skip input (B, N, D) fused by `skip_linear` (mDT / U-ViT).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, qk_norm: bool = False,
                 context: str | None = None, context_mlp: bool = True, context_pre_only: bool = False,
                 cross_attn: bool = False, skip: bool = False):
        super().__init__()
        self.context_mlp, self.context_pre_only = context_mlp, context_pre_only
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, context=context, context_pre_only=context_pre_only)
        self.cross_attn = CrossAttention(dim, num_heads) if cross_attn else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def zero_init(self) -> None:
        nn.init.zeros_(self.adaLN_modulation[1].weight)  # adaLN-Zero: the block starts as the identity
        nn.init.zeros_(self.adaLN_modulation[1].bias)
        if self.cross_attn is not None:
            nn.init.zeros_(self.cross_attn.proj.weight)  # PixArt: zero cross-attention output
            nn.init.zeros_(self.cross_attn.proj.bias)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None, *, skip: Tensor | None = None,
                cross: Tensor | None = None, attn_bias: Tensor | None = None, impl: str = "sdpa",
                backend: str | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D); c (B, D); context (B, M, D) | None; skip (B, N, D); cross (B, M', D);
        attn_bias (B|1, H, N, N) additive self-attention bias (mDT). Returns (x (B, N, D), context | None)."""
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h_c = modulate(context, shift_msa, scale_msa, backend) if context is not None else None  # (B, M, D)
        a_x, a_c = self.attn(modulate(x, shift_msa, scale_msa, backend), h_c, impl=impl, backend=backend,
                             bias=attn_bias)
        x = gated(x, gate_msa, a_x, backend)  # (B, N, D)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, cross, impl=impl)
        if context is None or self.context_pre_only:
            context = None
        else:
            context = gated(context, gate_msa, a_c, backend)  # (B, M, D)
        if context is not None and self.context_mlp:  # image and context tokens share the MLP: one pass
            N = x.shape[1]
            xc = torch.cat([x, context], dim=1)  # (B, N + M, D)
            xc = gated(xc, gate_mlp, self.mlp(modulate(xc, shift_mlp, scale_mlp, backend)), backend)
            return xc[:, :N], xc[:, N:]
        x = gated(x, gate_mlp, self.mlp(modulate(x, shift_mlp, scale_mlp, backend)), backend)
        return x, context


@dataclass
class DiTConfig(BackboneConfig):
    """DiT: class-conditional only (the paper's DiT-XL/2 w/ LN)."""

    def __post_init__(self):
        super().__post_init__()
        if self.conditioning != "class":
            raise ValueError(f"{self.name or 'dit'}: DiT is class-conditional only (the paper's DiT); for text use "
                             "dit-att, pixart-alpha or mmdit")


class DiT(Backbone):
    """DiT with adaLN-Zero: c = t_emb + y_emb (+ control) modulates every block. forward(x_t, t, cond) -> eps."""

    config_cls = DiTConfig
    class_in_adaln = True

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg)
        D = cfg.hidden_size
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    def run_blocks(self, x: Tensor, c: Tensor, cond: Cond, grid: tuple[int, int]) -> Tensor:
        """x (B, N, D), c = t_emb + control + y_emb (B, D) -> (B, N, D)."""
        for block in self.blocks:
            x, _ = block(x, c, **self.run)
        return x


@dataclass
class AttDiTConfig(BackboneConfig):
    """Att-DiT: class (or text) tokens in attention. Text adds a cross-attention layer per block (see module doc)."""


class AttDiT(Backbone):
    """DiT whose semantic condition enters through attention (context tokens with own q, k, v), not adaLN."""

    config_cls = AttDiTConfig

    def __init__(self, cfg: AttDiTConfig):
        super().__init__(cfg)
        D, text = cfg.hidden_size, cfg.conditioning == "text"
        if text:
            self.context_embedder = nn.Linear(cfg.text_dim, D)
        else:
            self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        self.blocks = nn.ModuleList([
            DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, context="light", context_mlp=False,
                     context_pre_only=(i == cfg.depth - 1), cross_attn=text)
            for i in range(cfg.depth)
        ])
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    def run_blocks(self, x: Tensor, c: Tensor, cond: Cond, grid: tuple[int, int]) -> Tensor:
        """x (B, N, D), c = t_emb + control (B, D) (no class in adaLN) -> (B, N, D)."""
        ctx = self.context_tokens(cond, x.shape[0]).to(x.dtype)  # (B, M, D)
        cross = ctx if self.cfg.conditioning == "text" else None
        for block in self.blocks:
            x, ctx = block(x, c, ctx, cross=cross, **self.run)
        return x

