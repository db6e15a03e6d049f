"""Scaffolding of every transformer backbone (DiT, Att-DiT, mDT-v2, PixArt-alpha, mmDiT): the config fields they
share, patchify + 2D sin-cos positions in, the timestep / control / pooled (or adaLN class) embedding of the
shared preamble (`condiff.models.base`), DiT's init, unpatchify out. A backbone builds its blocks and
implements `run_blocks(tokens, c, cond, grid) -> tokens`.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from condiff.conditioning.cond import Cond
from condiff.models.base import DiffusionModel, ModelConfig
from condiff.models.layers import PatchEmbed, TimestepEmbedder, VectorEmbedder, xavier_init_linears
from condiff.models.posemb import GRID_KINDS, sincos_pos_embed_2d

_POS_CACHE: dict[tuple, Tensor] = {}  # (dim, grid, base, kind, ..., device, dtype) -> (1, N, D) sin-cos table


@dataclass
class BackboneConfig(ModelConfig):
    """Fields of every transformer backbone on top of `ModelConfig` (saved in `model.config`).

    Shapes: input (B, in_channels, H, W) cut into patch_size^2 patches of width hidden_size; `input_size` anchors
    the positional grid (base_size = input_size / patch_size unless given).
    use_pooled: add a projection of the pooled text vector to the timestep embedding (SD3 / SDXL).
    pos_grid: positional grid kind (models/posemb.py): rectified (App. C) | arange | scaled | sd3,
    with pos_interp_scale / pos_max_size for the last two.
    learn_sigma: predict 2 C channels (DiT's learned variance, to load its checkpoints); forward returns eps.
    t_freq_shift: timestep-frequency shift (`timestep_embedding`); 1 only for converted diffusers DiT models.
    """

    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    use_pooled: bool = False
    base_size: float | None = None
    pos_grid: str = "rectified"
    pos_interp_scale: float = 1.0
    pos_max_size: int | None = None
    learn_sigma: bool = False
    t_freq_shift: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.check_choice("pos_grid", GRID_KINDS)
        self.check_positive("patch_size", "hidden_size", "depth", "num_heads")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"{self.name}: hidden_size {self.hidden_size} must be a multiple of num_heads "
                             f"{self.num_heads} with an even head width")
        if self.hidden_size % 4:
            raise ValueError(f"{self.name}: hidden_size must be divisible by 4 (2D sin-cos), got {self.hidden_size}")
        if self.input_size % self.patch_size:
            raise ValueError(f"{self.name}: input_size {self.input_size} must be a multiple of patch_size {self.patch_size}")
        if self.base_size is None:
            self.base_size = self.input_size // self.patch_size


class Backbone(DiffusionModel):
    """Transformer scaffolding: `denoise` = patchify + positions, `run_blocks`, final layer, unpatchify.

    The class enters adaLN (c = t_emb + control + y_emb) when `class_in_adaln` (DiT, mDT); the pooled text
    projection when `use_pooled`. Subclasses build `blocks`/`final_layer` and call `initialize_weights()`.
    """

    config_cls = BackboneConfig
    class_in_adaln = False

    def __init__(self, cfg: BackboneConfig):
        super().__init__(cfg)
        D = cfg.hidden_size
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, freq_shift=cfg.t_freq_shift)
        self.control_embedder = self.make_control_embedder(D)
        self.pooled_embedder = None
        if cfg.conditioning == "text" and cfg.use_pooled:
            self.pooled_embedder = VectorEmbedder(cfg.pooled_dim, D)

    def init_common(self) -> None:
        """The init every backbone shares (DiT): xavier-uniform linears with zero biases, unit RMSNorm weights,
        then the embedders' own inits: xavier patch projection, N(0, 0.02) timestep / pooled MLPs and class
        table, zero-output control embedders (and their computed buffers)."""
        xavier_init_linears(self)
        for m in self.modules():
            if isinstance(m, nn.RMSNorm):
                m.reset_parameters()
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.cfg.hidden_size, -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.control_embedder is not None:
            self.control_embedder.reset_parameters()
        if self.pooled_embedder is not None:
            nn.init.normal_(self.pooled_embedder.linear_1.weight, std=0.02)
            nn.init.normal_(self.pooled_embedder.linear_2.weight, std=0.02)
        if getattr(self, "y_embedder", None) is not None and hasattr(self.y_embedder, "embedding_table"):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """(Re-)initialise every parameter and computed buffer: DiT's scheme (`init_common`, then zero adaLN
        modulations via the blocks' `zero_init` and a zero final layer, so a fresh model predicts exactly 0).
        Called by the constructors; call it again after `model.to_empty(device=...)` of a meta-device model.
        """
        self.init_common()
        for block in self.modules():
            if hasattr(block, "zero_init"):
                block.zero_init()
        for lin in (self.final_layer.linear, self.final_layer.adaLN_modulation[1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # --- configuration -------------------------------------------------------------------------------------
    @property
    def base_size(self) -> float:
        """Grid size (tokens per side) the positional embedding is anchored to (App. C)."""
        return self.cfg.base_size

    @property
    def param_dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    @property
    def run(self) -> dict:
        """Keyword arguments of every block call: attention implementation and ops backend."""
        return dict(impl=self.attn_impl, backend=self.cfg.ops_backend)

    # --- the preamble's hooks ------------------------------------------------------------------------------
    def embed_timestep(self, t: Tensor) -> Tensor:
        return self.t_embedder(t)  # (B, D)

    def vector_condition(self, cond: Cond, batch_size: int) -> Tensor | None:
        """(B, D): the pooled-text projection (use_pooled), the class embedding (class_in_adaln), or None."""
        if self.pooled_embedder is not None:
            return self.pooled_embedder(self.pooled(cond, batch_size).to(self.param_dtype))
        if self.class_in_adaln:
            return self.y_embedder(self.labels(cond, batch_size))
        return None

    def denoise(self, x: Tensor, c: Tensor, cond: Cond, **kw) -> Tensor:
        """x_t (B, C, H, W), c (B, D) -> eps (B, C, H, W) through `run_blocks`."""
        tokens, grid = self.embed_input(x)  # (B, N, D), (H/p, W/p)
        tokens = self.run_blocks(tokens, c, cond, grid, **kw)  # (B, N, D)
        return self.unpatchify(self.final_layer(tokens, c, self.cfg.ops_backend), *grid)  # (B, C, H, W)

    @abstractmethod
    def run_blocks(self, x: Tensor, c: Tensor, cond: Cond, grid: tuple[int, int], **kw) -> Tensor:
        """tokens (B, N, D) with positions, c (B, D), the token grid (H/p, W/p) -> tokens (B, N, D)."""

    # --- inputs --------------------------------------------------------------------------------------------
    def pos_embed(self, grid_h: int, grid_w: int, device, dtype) -> Tensor:
        """(1, grid_h * grid_w, D) fixed 2D sin-cos embedding of the actual grid (any resolution)."""
        cfg = self.cfg
        key = (cfg.hidden_size, grid_h, grid_w, float(cfg.base_size), cfg.pos_grid, float(cfg.pos_interp_scale),
               cfg.pos_max_size, str(device), dtype)
        if key not in _POS_CACHE:  # tables are small and reused every step: memoise per device and dtype
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if first built in inference
                pe = sincos_pos_embed_2d(cfg.hidden_size, grid_h, grid_w, cfg.base_size, kind=cfg.pos_grid,
                                         interp_scale=cfg.pos_interp_scale, max_size=cfg.pos_max_size)
                _POS_CACHE[key] = pe.to(device=device, dtype=dtype)[None]
        return _POS_CACHE[key]

    def embed_input(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """x (B, C, H, W) -> tokens (B, N, D) with positions added, and the token grid (H/p, W/p)."""
        tokens, (gh, gw) = self.x_embedder(x)  # (B, N, D)
        return tokens + self.pos_embed(gh, gw, tokens.device, tokens.dtype), (gh, gw)

    def context_tokens(self, cond: Cond, batch_size: int) -> Tensor:
        """(B, M, D) attention context of the token-conditioned backbones (Att-DiT, mmDiT): the class
        token through `y_embedder` (M = 1) or the padded text states through `context_embedder` (M = T)."""
        if self.cfg.conditioning == "class":
            return self.y_embedder(self.labels(cond, batch_size))[:, None]  # (B, 1, D)
        return self.context_embedder(self.text_states(cond, batch_size))  # (B, T, D)

    # --- outputs -------------------------------------------------------------------------------------------
    def unpatchify(self, x: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """(B, N, p*p*C_out) -> (B, C, H, W) (eps; the learned-sigma half is dropped)."""
        B, p, C = x.shape[0], self.cfg.patch_size, self.out_channels
        x = x.reshape(B, grid_h, grid_w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, grid_h * p, grid_w * p)  # (B, C_out, H, W), a copy
        # never a view: FSDP2 hooks the root's output, and an in-place op on a view would drop that hook
        return x if C == self.cfg.in_channels else x[:, : self.cfg.in_channels].contiguous()
