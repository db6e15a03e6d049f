"""mDT-v2 (Masked Diffusion Transformer v2, Gao et al. 2023, sail-sg/MDT `MDTv2`).

Layout (MDTv2): (depth - decode_layers) / 2 encoder-in blocks, as many encoder-out blocks with U-ViT long
skips (`skip_linear` on [x, skip]), one side-interpolater block, `decode_layers` decoder blocks whose skip
is the embedded input; every block is DiT's adaLN-Zero block (c = t_emb + y_emb (+ control)) with a
learnable relative position bias (BEiT-style table) in its self-attention.

Masking (training only): `model(x_t, t, cond, mask_ratio=r)` drops a random fraction
r + U(0, mask_ratio_jitter) of the image tokens (one fraction per call, per-sample random sets, as MDT)
before the encoder; the side-interpolater fills the dropped positions with the learned `mask_token`, adds
positions, runs its block and keeps its output only at masked positions (kept tokens pass unchanged);
the decoder then predicts the full image. `mask_ratio=None` (default, sampling) is the full pass.

Two-pass loss (MDTv2 training): loss = MSE(model(x_t, t, cond), eps) + MSE(model(x_t, t, cond,
mask_ratio=model.mask_ratio), eps), the same x_t, t, eps for both passes, both over all pixels (the
masked pass must reconstruct the masked tokens from context). `model.mask_ratio` (config, 0.3 as MDTv2's
training script) is the hook the loss reads.

Deviations from sail-sg/MDT, for resolution transfer (App. C): positions are the fixed sin-cos table of the
actual grid (`pos_grid`) at the input and again before the decoder (MDT learns both copies from a sin-cos
init); the relative position table is sized for the base grid (`base_size`, kept by `init_from`) and
resampled to other grids like the absolute grid (`RelativePositionBias`), so a 256 -> 512 transfer loads
every weight and the model runs at any resolution (at the base grid it is exactly MDT's bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from condiff.conditioning.cond import Cond
from condiff.conditioning.labels import LabelEmbedder
from condiff.models.dit import DiTBlock
from condiff.models.layers import FinalLayer
from condiff.models.transformer import Backbone, BackboneConfig


class RelativePositionBias(nn.Module):
    """Learnable per-head bias of every 2D offset between tokens (BEiT / MDT); table ((2Wh-1)(2Ww-1)+3, H).

    The table is sized for the BASE grid (Wh, Ww) = the model's `base_size` (the grid it was, or its source
    was, trained at), so a 256 -> 512 transfer loads it unchanged. On another grid (gh, gw) the table is
    resampled like the absolute sin-cos grid of App. C (`resample=True`, pos_grid "rectified"): positions
    span [0, base] at any resolution, so a token offset d on the gh grid is the offset d (Wh-1)/(gh-1) of the
    base grid, read from the table by bilinear interpolation. A non-square grid_h x grid_w grid has the
    step of the square grid with the same token count (`posemb`'s rectified convention): the same scale on
    both axes, and a wide grid reads w offsets the base window did not have (offsets past the table's edge
    take its edge, as BEiT clamps). On a grid with the base token count the scale is 1: the table itself. `resample=False` (integer grids such as "arange") reads integer offsets and
    clamps those beyond the base window (MDT's bias at the base grid).
    The 3 extra rows of BEiT's table (cls-token entries) are kept for state-dict compatibility; unused.
    """

    def __init__(self, window: tuple[int, int], num_heads: int, resample: bool = True):
        super().__init__()
        self.window = window
        self.resample = resample
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1) + 3, num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _scale(self, grid_h: int, grid_w: int) -> float:
        """Base-grid offset per token step on a grid_h x grid_w grid: the ratio of the rectified grid steps
        (`posemb.rectified_step`) (W - 1) / (sqrt(grid_h grid_w) - 1), one scale for both axes; 1 on a grid
        with the base token count or without resampling."""
        g = (grid_h * grid_w) ** 0.5  # exact for square grids
        if not self.resample or g < 2 or g == self.window[0]:
            return 1.0
        return (self.window[0] - 1) / (g - 1)

    def index(self, grid_h: int, grid_w: int, device) -> Tensor:
        """(N, N) long index of every (query, key) pair on a grid_h x grid_w grid into `table(grid_h, grid_w)`."""
        wh, ww = (grid_h, grid_w) if self._scale(grid_h, grid_w) != 1.0 else self.window
        hh, ww_ = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device),
                                 indexing="ij")
        coords = torch.stack([hh.flatten(), ww_.flatten()])  # (2, N)
        rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
        dh = rel[0].clamp(-(wh - 1), wh - 1) + wh - 1
        dw = rel[1].clamp(-(ww - 1), ww - 1) + ww - 1
        return dh * (2 * ww - 1) + dw  # (N, N)

    def table(self, grid_h: int, grid_w: int) -> Tensor:
        """The bias of every offset of a grid_h x grid_w grid: the base table, or its resampling
        ((2 grid_h - 1) (2 grid_w - 1), H) when the grid step differs from the base one."""
        scale = self._scale(grid_h, grid_w)
        if scale == 1.0:
            return self.relative_position_bias_table
        wh, ww = self.window
        heads = self.relative_position_bias_table.shape[1]
        base = self.relative_position_bias_table[:-3].T.reshape(1, heads, 2 * wh - 1, 2 * ww - 1)
        dev, dt = base.device, base.dtype
        # normalised [-1, 1] table coordinate of every offset d on the new grid: d * scale / (W - 1)
        uh = torch.arange(-(grid_h - 1), grid_h, device=dev, dtype=dt) * scale / max(wh - 1, 1)  # (2gh-1,)
        uw = torch.arange(-(grid_w - 1), grid_w, device=dev, dtype=dt) * scale / max(ww - 1, 1)  # (2gw-1,)
        gy, gx = torch.meshgrid(uh.clamp(-1, 1), uw.clamp(-1, 1), indexing="ij")
        where = torch.stack([gx, gy], dim=-1)[None]  # (1, 2gh-1, 2gw-1, 2) as (x, y)
        out = nn.functional.grid_sample(base, where, mode="bilinear", align_corners=True)  # (1, H, 2gh-1, 2gw-1)
        return out[0].flatten(1).T  # ((2gh-1)(2gw-1), H)

    def forward(self, index: Tensor, grid: tuple[int, int]) -> Tensor:
        """index (N, N) or (B, n, n) from `index(*grid)` -> bias (1, H, N, N) or (B, H, n, n)."""
        bias = self.table(*grid)[index]  # (..., n, n, H)
        return bias.permute(2, 0, 1)[None] if index.dim() == 2 else bias.permute(0, 3, 1, 2)


def random_masking(x: Tensor, ratio: float, generator: torch.Generator | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MAE/MDT per-sample random masking. x (B, N, D) -> x_kept (B, n, D), mask (B, N) (1 = dropped),
    ids_restore (B, N), ids_keep (B, n); n = max(1, int(N (1 - ratio)))."""
    B, N, D = x.shape
    n_keep = max(1, int(N * (1 - ratio)))
    noise = torch.rand(B, N, generator=generator, device=generator.device if generator else x.device).to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]  # (B, n)
    x_kept = torch.gather(x, 1, ids_keep[:, :, None].expand(B, n_keep, D))
    mask = torch.ones(B, N, device=x.device, dtype=x.dtype)
    mask[:, :n_keep] = 0
    return x_kept, torch.gather(mask, 1, ids_restore), ids_restore, ids_keep


@dataclass
class MDTConfig(BackboneConfig):
    """mDT-v2: decode_layers (MDTv2's decode_layer, 4 at XL/2), mask_ratio (default ratio of the masked training
    pass, 0.3), mask_ratio_jitter (MDT adds U(0, 0.2)), rel_pos_bias (MDT's learnable relative positions)."""

    decode_layers: int = 4
    mask_ratio: float = 0.3
    mask_ratio_jitter: float = 0.2
    rel_pos_bias: bool = True

    def __post_init__(self):
        super().__post_init__()
        name = self.name or "mdt-v2"
        if self.conditioning != "class":
            raise ValueError(f"{name}: mDT-v2 is class-conditional only (as in the paper); for text use pixart-alpha or mmdit")
        enc = self.depth - self.decode_layers
        if self.decode_layers < 1 or enc < 2 or enc % 2:
            raise ValueError(f"{name}: depth - decode_layers must be even and >= 2 (encoder in/out halves), "
                             f"got depth {self.depth}, decode_layers {self.decode_layers}")
        if not (0 <= self.mask_ratio and self.mask_ratio + self.mask_ratio_jitter < 1):
            raise ValueError(f"{name}: need 0 <= mask_ratio and mask_ratio + mask_ratio_jitter < 1")


class MDTv2(Backbone):
    """mDT-v2. forward(x_t, t, cond, mask_ratio=None, generator=None) -> eps (B, C, H, W)."""

    config_cls = MDTConfig
    class_in_adaln = True

    def __init__(self, cfg: MDTConfig):
        super().__init__(cfg)
        D, half = cfg.hidden_size, (cfg.depth - cfg.decode_layers) // 2
        base = max(1, round(cfg.base_size))  # relative-position window: the base grid (App. C), not input_size
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)

        def block(skip: bool) -> DiTBlock:
            b = DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, skip=skip)
            if cfg.rel_pos_bias:
                b.attn.rel_pos_bias = RelativePositionBias((base, base), cfg.num_heads,
                                                           resample=cfg.pos_grid == "rectified")
            return b

        self.en_inblocks = nn.ModuleList([block(False) for _ in range(half)])
        self.en_outblocks = nn.ModuleList([block(True) for _ in range(half)])
        self.de_blocks = nn.ModuleList([block(True) for _ in range(cfg.decode_layers)])
        self.sideblocks = nn.ModuleList([block(False)])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's scheme (`Backbone.initialize_weights`) + MDT's: mask token N(0, 0.02), relative position
        tables truncated N(0, 0.02)."""
        super().initialize_weights()
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, RelativePositionBias):
                m.reset_parameters()

    @property
    def mask_ratio(self) -> float:
        """Mask ratio of the second (masked) pass of the MDT training loss (module docstring)."""
        return self.cfg.mask_ratio

    def _bias(self, block: DiTBlock, index: Tensor | None, grid: tuple[int, int]) -> Tensor | None:
        return None if index is None else block.attn.rel_pos_bias(index, grid)

    def run_blocks(self, x: Tensor, c: Tensor, cond: Cond, grid: tuple[int, int], *,
                   mask_ratio: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """x (B, N, D), c = t_emb + control + y_emb (B, D) -> (B, N, D); `mask_ratio` runs the masked pass."""
        (gh, gw), run = grid, self.run
        input_skip = x
        index_full = self.en_inblocks[0].attn.rel_pos_bias.index(gh, gw, x.device) if self.cfg.rel_pos_bias else None
        index = index_full
        masked = bool(mask_ratio)
        if masked:
            jitter = self.cfg.mask_ratio_jitter
            if not (0 < mask_ratio and mask_ratio + jitter < 1):
                raise ValueError(f"{self.cfg.name}: need 0 < mask_ratio and mask_ratio + mask_ratio_jitter ({jitter}) "
                                 f"< 1, got mask_ratio {mask_ratio}")
            u = torch.rand(1, generator=generator, device=generator.device if generator else "cpu").item()
            ratio = float(mask_ratio) + jitter * u
            x, mask, ids_restore, ids_keep = random_masking(x, ratio, generator)  # x (B, n, D)
            if index is not None:
                index = index[ids_keep[:, :, None], ids_keep[:, None, :]]  # (B, n, n)
        skips = []
        for blk in self.en_inblocks:
            x, _ = blk(x, c, attn_bias=self._bias(blk, index, (gh, gw)), **run)
            skips.append(x)
        for blk in self.en_outblocks:
            x, _ = blk(x, c, skip=skips.pop(), attn_bias=self._bias(blk, index, (gh, gw)), **run)
        pos = self.pos_embed(gh, gw, x.device, x.dtype)  # (1, N, D) MDT's decoder_pos_embed
        if masked:
            x = self.side_interpolater(x, c, mask, ids_restore, pos, index_full, (gh, gw), run)  # (B, N, D)
        else:
            x = x + pos
        for blk in self.de_blocks:
            x, _ = blk(x, c, skip=input_skip, attn_bias=self._bias(blk, index_full, (gh, gw)), **run)
        return x

    def side_interpolater(self, x: Tensor, c: Tensor, mask: Tensor, ids_restore: Tensor, pos: Tensor,
                          index: Tensor | None, grid: tuple[int, int], run: dict) -> Tensor:
        """Fill dropped tokens with mask tokens, unshuffle, add positions, run the side block; keep its output
        only at dropped positions. x (B, n, D), mask (B, N) (1 = dropped) -> (B, N, D)."""
        B, n, D = x.shape
        N = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(B, N - n, D)], dim=1)  # (B, N, D) shuffled order
        x = torch.gather(x, 1, ids_restore[:, :, None].expand(B, N, D)) + pos  # (B, N, D) image order
        before = x
        for blk in self.sideblocks:
            x, _ = blk(x, c, attn_bias=self._bias(blk, index, grid), **run)
        m = mask[:, :, None].to(x.dtype)
        return x * m + before * (1 - m)
