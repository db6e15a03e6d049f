"""PixArt-alpha (Chen et al. 2024, PixArt-alpha/PixArt-alpha `PixArt`): adaLN-single + cross-attention.

adaLN-single: one shared `t_block` (SiLU, Linear(D, 6D)) maps c = t_emb (+ control) to six modulation
vectors for all blocks; each block adds its own learnable `scale_shift_table` (6, D) (init N(0, 1/D)).
Every block: self-attention (modulated, gated) -> cross-attention to the condition tokens (unmodulated,
ungated; output projection zero-initialised) -> MLP (modulated, gated). Final layer `T2IFinalLayer`:
(shift, scale) = scale_shift_table (2, D) + t_emb, zero-initialised output linear.
Conditions: text = caption projection `y_embedder.y_proj` (Mlp text_dim -> D -> D, GELU-tanh) of the
padded text states as cross-attention tokens; class (the paper's ImageNet PixArt) = the class embedding
as a single cross-attention token. PixArt's learned null caption (`y_embedding`) is not used: the null
text is the encoding of "" (condiff's convention, `Cond`), so CFG needs no special token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from condiff.conditioning.cond import Cond
from condiff.conditioning.labels import LabelEmbedder
from condiff.models.layers import Attention, CrossAttention, Mlp, gated, modulate
from condiff.models.transformer import Backbone, BackboneConfig


class PixArtBlock(nn.Module):
    """PixArt-alpha block: adaLN-single modulated self-attention, cross-attention, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: Tensor, t6: Tensor, y: Tensor, *, impl: str = "sdpa", backend: str | None = None) -> Tensor:
        """x (B, N, D); t6 (B, 6D) shared adaLN-single output; y (B, M, D) condition tokens -> (B, N, D)."""
        B = x.shape[0]
        mods = self.scale_shift_table[None] + t6.reshape(B, 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(1)
        a, _ = self.attn(modulate(x, shift_msa, scale_msa, backend), impl=impl, backend=backend)
        x = gated(x, gate_msa, a, backend)
        x = x + self.cross_attn(x, y, impl=impl)
        return gated(x, gate_mlp, self.mlp(modulate(x, shift_mlp, scale_mlp, backend)), backend)


class T2IFinalLayer(nn.Module):
    """PixArt's final layer: (shift, scale) = scale_shift_table (2, D) + t_emb; zero-initialised linear."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: Tensor, t: Tensor, backend: str | None = None) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).unbind(1)  # (B, D) each
        return self.linear(modulate(x, shift, scale, backend))  # (B, N, p*p*C_out)


class CaptionEmbedder(nn.Module):
    """Caption projection of PixArt: y_proj = Mlp(text_dim -> D -> D)."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.y_proj = Mlp(text_dim, dim, dim)

    def forward(self, text: Tensor) -> Tensor:
        return self.y_proj(text)  # (B, T, D)


@dataclass
class PixArtConfig(BackboneConfig):
    """PixArt-alpha: class (one cross-attention token) or text (caption projection) conditioning."""


class PixArtAlpha(Backbone):
    """PixArt-alpha. forward(x_t, t, cond) -> eps (B, C, H, W)."""

    config_cls = PixArtConfig

    def __init__(self, cfg: PixArtConfig):
        super().__init__(cfg)
        D = cfg.hidden_size
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        if cfg.conditioning == "text":
            self.y_embedder = CaptionEmbedder(cfg.text_dim, D)
        else:
            self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        self.blocks = nn.ModuleList([PixArtBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = T2IFinalLayer(D, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """PixArt's init: xavier linears (`init_common`); N(0, 0.02) for t_block and the caption MLP;
        scale-shift tables N(0, 1/D); zero cross-attention output projections and final linear (so a fresh
        model predicts 0). Re-runnable after `to_empty` from the meta device."""
        self.init_common()
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        if self.cfg.conditioning == "text":
            nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
            nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        D = self.cfg.hidden_size
        for table in [b.scale_shift_table for b in self.blocks] + [self.final_layer.scale_shift_table]:
            table.copy_(torch.randn(table.shape, device=table.device, dtype=table.dtype) / D**0.5)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def condition_tokens(self, cond: Cond, batch_size: int) -> Tensor:
        """(B, M, D) cross-attention tokens: the class token (M = 1) or the projected text states (M = T)."""
        if self.cfg.conditioning == "class":
            return self.y_embedder(self.labels(cond, batch_size))[:, None]  # (B, 1, D)
        return self.y_embedder(self.text_states(cond, batch_size))  # (B, T, D)

    def run_blocks(self, x: Tensor, c: Tensor, cond: Cond, grid: tuple[int, int]) -> Tensor:
        """x (B, N, D), c = t_emb + control (B, D) -> (B, N, D)."""
        t6 = self.t_block(c)  # (B, 6D) adaLN-single
        y = self.condition_tokens(cond, x.shape[0]).to(x.dtype)  # (B, M, D)
        for block in self.blocks:
            x = block(x, t6, y, **self.run)
        return x
