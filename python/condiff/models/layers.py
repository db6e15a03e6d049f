"""Building blocks shared by the transformer backbones (DiT, Att-DiT, mDT-v2, PixArt-alpha, mmDiT).

Parameter names follow facebookresearch/DiT (x_embedder.proj, t_embedder.mlp.{0,2}, y_embedder.embedding_table,
attn.qkv, attn.proj, mlp.fc1/fc2, adaLN_modulation.1, final_layer.*) so checkpoint conversion is a rename.

Attention implementation switch. Every attention of these models goes through `attention()` /
`joint_attention()` below, which use `F.scaled_dot_product_attention` (impl "sdpa", default) or an explicit
softmax(q k^T / sqrt(d)) v written with matmuls (impl "math"), which `torch.utils.flop_counter` counts on
any device (Table A1 counts the attention matmuls). Select it per model (`attn_impl` config field) or for
every model that leaves it at None with the context manager `attention_impl("math")`.

Fused ops. adaLN modulation, gated residuals and the mmDiT joint attention call `condiff.ops` with the
model's `ops_backend` (None = automatic, "reference" = the pure-PyTorch spec, for debugging). Meta tensors
(shape-only passes) always use the reference backend. Under impl "math" the joint attention is computed
here with explicit matmuls (same math as `condiff.ops.reference.joint_attention`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condiff import ops
from condiff.conditioning.cond import CONTROL_GROUPS, Cond
from condiff.conditioning.control import CONTROL_MODES, GAMMA_KINDS, ControlEmbedder, check_control_fields
from condiff.conditioning.labels import check_labels
from condiff.conditioning.padding import NOISE_READINGS, PADDING_MODES, noise_amplitude, pad_text
from condiff.models.posemb import GRID_KINDS, sincos_pos_embed_2d
from condiff.ops.reference import qk_norm_join

ATTN_IMPLS = ("sdpa", "math")
_attn_impl_default = "sdpa"
_POS_CACHE: dict[tuple, Tensor] = {}  # (dim, grid, base, kind, ..., device, dtype) -> (1, N, D) sin-cos table


@contextlib.contextmanager
def attention_impl(impl: str):
    """Set the attention implementation of every model whose `attn_impl` is None, e.g. for FLOP counting."""
    global _attn_impl_default
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention_impl: impl must be one of {ATTN_IMPLS}, got {impl!r}")
    previous, _attn_impl_default = _attn_impl_default, impl
    try:
        yield
    finally:
        _attn_impl_default = previous


def resolve_attn_impl(impl: str | None) -> str:
    return _attn_impl_default if impl is None else impl


def _backend(x: Tensor, backend: str | None) -> str | None:
    return "reference" if x.is_meta else backend


def attention(q: Tensor, k: Tensor, v: Tensor, impl: str = "sdpa", bias: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(hd) + bias) v. q (B, H, Lq, hd), k, v (B, H, Lk, hd); bias broadcastable to
    (B, H, Lq, Lk) or None -> (B, H, Lq, hd)."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, Lq, Lk)
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1) @ v  # (B, H, Lq, hd)


def joint_attention(qkv_x: Tensor, qkv_c: Tensor | None, num_heads: int, norms: tuple[Tensor, ...] | None = None, *,
                    impl: str = "sdpa", backend: str | None = None, bias: Tensor | None = None
                    ) -> tuple[Tensor, Tensor | None]:
    """Attention over the joined sequence [image tokens, context tokens], each stream with its own q, k, v.

    qkv_x (B, N, 3D), qkv_c (B, M, 3D) or None, packed [q | k | v], head-major. norms: None (no qk-norm)
    or the RMSNorm weights (q_x, k_x, q_c, k_c), each (hd,), eps 1e-6 (SD3 / the paper's mmDiT).
    bias: additive attention bias over the joined sequence (mDT's relative positions), or None.
    Returns out_x (B, N, D) and out_c (B, M, D) (None when qkv_c is None), before the output projection.
    """
    B, N, D3 = qkv_x.shape
    if qkv_c is None:
        qkv_c = qkv_x.new_zeros(B, 0, D3)
    if norms is not None and impl == "sdpa" and bias is None:
        out_x, out_c = ops.joint_attention(qkv_x, qkv_c, *norms, num_heads, 1e-6, backend=_backend(qkv_x, backend))
    else:
        if norms is not None:
            q, k, v = qk_norm_join(qkv_x, qkv_c, *norms, num_heads, 1e-6)  # each (B, H, N + M, hd)
        else:
            qkv = torch.cat([qkv_x, qkv_c], dim=1) if qkv_c.shape[1] else qkv_x  # (B, L, 3D)
            q, k, v = qkv.reshape(B, qkv.shape[1], 3, num_heads, -1).permute(2, 0, 3, 1, 4)  # each (B, H, L, hd)
        o = attention(q, k, v, impl, bias).transpose(1, 2).reshape(B, q.shape[2], D3 // 3)  # (B, L, D)
        out_x, out_c = o[:, :N], o[:, N:]
    return out_x, (out_c if out_c.shape[1] else None)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, backend: str | None = None) -> Tensor:
    """LayerNorm(x) * (1 + scale) + shift (no affine, eps 1e-6). x (B, N, D); shift, scale (B, D)."""
    return ops.adaln_modulate(x, shift, scale, 1e-6, backend=_backend(x, backend))


def gated(x: Tensor, gate: Tensor, y: Tensor, backend: str | None = None) -> Tensor:
    """x + gate[:, None] * y. x, y (B, N, D); gate (B, D)."""
    return ops.gated_residual(x, gate, y, backend=_backend(x, backend))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, shift: float = 0.0) -> Tensor:
    """DiT / diffusers (flip_sin_to_cos) sinusoidal features: t (B,) -> (B, dim) = [cos, sin].
    shift: diffusers' `downscale_freq_shift` (frequencies max_period^(-i / (dim/2 - shift)); 0 = DiT, SD3, PixArt;
    1 = diffusers' DiTTransformer2DModel, needed to convert it exactly)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """t (B,) float DDPM timesteps -> (B, dim): 256 sinusoidal features -> Linear -> SiLU -> Linear (DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.freq_dim, self.freq_shift = freq_dim, freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim, shift=self.freq_shift).to(self.mlp[0].weight.dtype))  # (B, dim)


class VectorEmbedder(nn.Module):
    """A vector (B, in_dim) -> Linear -> SiLU -> Linear -> (B, dim): SD3's pooled-text projection (linear_1/2)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, v: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(v)))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) tokens, N = (H/p)(W/p), row-major; a p x p stride-p convolution (timm / DiT)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))  # DiT: init like nn.Linear
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p or C != self.proj.in_channels:
            raise ValueError(f"PatchEmbed: input must be (B, {self.proj.in_channels}, H, W) with H, W multiples of "
                             f"the patch size {p}, got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2).contiguous(), (H // p, W // p)  # (B, N, D), grid


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm Mlp as used by DiT / PixArt / SD3's FeedForward)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim or in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Self-attention over the image tokens, optionally joined by a context stream (tokens with own q, k, v).

    context: None (plain self-attention, DiT); "light" (context tokens get their own q,k,v `context_qkv`
    and share the output projection `proj`); "full" (SD3 dual stream: own q,k,v and own `context_proj`).
    qk_norm: per-head RMSNorm of q and k (eps 1e-6, learnable weight (hd,)) for each stream (SD3 / mmDiT).
    context_pre_only: the context stream's outputs are not needed after this block (SD3's last block): its
    output projection is skipped (and `context_proj` not created).
    """

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool = False, context: str | None = None,
                 context_pre_only: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.context, self.context_pre_only = num_heads, context, context_pre_only
        hd = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm else None
        if context is not None:
            self.context_qkv = nn.Linear(dim, 3 * dim)
            # a pre-only context's queries are discarded: no q norm (SD3's last-block norm_added_q has no effect)
            self.context_q_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm and not context_pre_only else None
            self.context_k_norm = nn.RMSNorm(hd, eps=1e-6) if qk_norm else None
            if context == "full" and not context_pre_only:
                self.context_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, c: Tensor | None = None, *, impl: str = "sdpa", backend: str | None = None,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D), c (B, M, D) (only with a context stream), bias (B|1, H, L, L) | None
        -> projected (out_x (B, N, D), out_c (B, M, D) | None)."""
        qkv_c = self.context_qkv(c) if (c is not None and self.context is not None) else None  # (B, M, 3D)
        norms = None
        if self.q_norm is not None:
            ck = self.context_k_norm if qkv_c is not None else self.k_norm
            cq = (self.context_q_norm or ck) if qkv_c is not None else self.q_norm  # (ck: placeholder, see init)
            norms = (self.q_norm.weight, self.k_norm.weight, cq.weight, ck.weight)
        out_x, out_c = joint_attention(self.qkv(x), qkv_c, self.num_heads, norms, impl=impl, backend=backend,
                                       bias=bias)
        if out_c is None or self.context_pre_only:
            return self.proj(out_x), None
        return self.proj(out_x), (self.context_proj if self.context == "full" else self.proj)(out_c)


class CrossAttention(nn.Module):
    """Image tokens attend to context tokens (PixArt's MultiHeadCrossAttention: q_linear, kv_linear, proj)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, *, impl: str = "sdpa") -> Tensor:
        """x (B, N, D), y (B, M, Dc) -> (B, N, D)."""
        B, N, D = x.shape
        q = self.q_linear(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, H, N, hd)
        k, v = self.kv_linear(y).view(B, y.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, M, hd)
        return self.proj(attention(q, k, v, impl).transpose(1, 2).reshape(B, N, D))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) -> Linear to p*p*C_out per token; both zero-initialised (DiT)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        for lin in (self.linear, self.adaLN_modulation[1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, c: Tensor, backend: str | None = None) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(x, shift, scale, backend))  # (B, N, p*p*C_out)


def xavier_init_linears(module: nn.Module) -> None:
    """DiT's basic init: xavier-uniform weights, zero biases for every nn.Linear (specific inits follow)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass
class BackboneConfig:
    """Fields shared by every transformer backbone (saved in `model.config`; `create(**model.config)` rebuilds).

    Shapes: input (B, in_channels, H, W); `input_size` is the training resolution in latent cells (32 = 256 px
    SD-VAE latents) and anchors the positional grid (base_size = input_size / patch_size unless given).
    conditioning: "class" (labels, num_classes + null) or "text" (states (B, T, text_dim), lengths, pooled).
    control: "none" | "additive" (SDXL joint embedding) | "disentangled" (Eq. 1 with gamma_c `gamma`).
    control_fields: the conditioned control groups (crop, aspect, flip, size; `cond.CONTROL_GROUPS`), default all.
    text_padding: zero | replicate | noisy-replicate (noise `text_noise_beta` = beta_txt, training mode only;
    0.1 is our choice: the paper only says "a small variance"). text_noise_reading: "variance" (default, the
    paper's word: std factor sqrt(beta_txt)) | "std" (beta_txt multiplies the std; the former reading);
    text_noise_at_inference: keep the noise in eval mode too (`conditioning.padding`).
    text_len: the encoder's token count T (77 for CLIP); only `example_inputs` uses it, any T runs.
    use_pooled: add a projection of the pooled text vector to the timestep embedding (SD3 / SDXL).
    pos_grid: positional grid kind (models/posemb.py): rectified (App. C) | arange | scaled | sd3,
    with pos_interp_scale / pos_max_size for the last two.
    learn_sigma: predict 2 C channels (DiT's learned variance, to load its checkpoints); forward returns eps.
    attn_impl: None (module default, see `attention_impl`) | sdpa | math. ops_backend: condiff.ops backend.
    t_freq_shift: timestep-frequency shift (`timestep_embedding`); 1 only for converted diffusers DiT models.
    """

    name: str = ""
    conditioning: str = "class"
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    text_dim: int = 768
    pooled_dim: int = 768
    text_len: int = 77
    text_padding: str = "zero"
    text_noise_beta: float = 0.1
    text_noise_reading: str = "variance"
    text_noise_at_inference: bool = False
    use_pooled: bool = False
    control: str = "additive"
    gamma: str = "power-cosine"
    gamma_alpha: float = 8.0
    gamma_k: float = 1.0
    control_fields: list = field(default_factory=lambda: list(CONTROL_GROUPS))
    control_freq_dim: int = 256
    num_timesteps: int = 1000
    base_size: float | None = None
    pos_grid: str = "rectified"
    pos_interp_scale: float = 1.0
    pos_max_size: int | None = None
    learn_sigma: bool = False
    attn_impl: str | None = None
    ops_backend: str | None = None
    t_freq_shift: float = 0.0

    def __post_init__(self):
        def check(field, value, allowed):
            if value not in allowed:
                raise ValueError(f"{self.name or type(self).__name__}: {field} must be one of {allowed}, got {value!r}")

        check("conditioning", self.conditioning, ("class", "text"))
        check("control", self.control, CONTROL_MODES)
        check("gamma", self.gamma, GAMMA_KINDS)
        check("text_padding", self.text_padding, PADDING_MODES)
        check("text_noise_reading", self.text_noise_reading, NOISE_READINGS)
        self.control_fields = list(check_control_fields(self.control_fields, f"{self.name}: control_fields"))
        check("pos_grid", self.pos_grid, GRID_KINDS)
        check("attn_impl", self.attn_impl, (None, *ATTN_IMPLS))
        check("ops_backend", self.ops_backend, (None, *ops.BACKENDS))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"{self.name}: hidden_size {self.hidden_size} must be a multiple of num_heads "
                             f"{self.num_heads} with an even head width")
        if self.hidden_size % 4:
            raise ValueError(f"{self.name}: hidden_size must be divisible by 4 (2D sin-cos), got {self.hidden_size}")
        for f in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
                  "text_dim", "pooled_dim", "text_len", "num_timesteps"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{self.name}: {f} must be >= 1, got {getattr(self, f)}")
        if self.input_size % self.patch_size:
            raise ValueError(f"{self.name}: input_size {self.input_size} must be a multiple of patch_size {self.patch_size}")
        if self.base_size is None:
            self.base_size = self.input_size // self.patch_size


class Backbone(nn.Module):
    """Scaffolding of every transformer backbone: tokens + positions in, timestep / control / pooled embedding,
    condition checks, unpatchify out. Subclasses build their blocks and implement `forward(x_t, t, cond)`.
    """

    config_cls = BackboneConfig

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, freq_shift=cfg.t_freq_shift)
        self.control_embedder = None
        if cfg.control != "none":
            self.control_embedder = ControlEmbedder(D, cfg.control, cfg.gamma, cfg.gamma_alpha, cfg.gamma_k,
                                                    cfg.control_freq_dim, cfg.num_timesteps, cfg.control_fields)
        self.pooled_embedder = None
        if cfg.conditioning == "text" and cfg.use_pooled:
            self.pooled_embedder = VectorEmbedder(cfg.pooled_dim, D)

    def init_common(self) -> None:
        """The init every backbone shares (DiT): xavier-uniform linears with zero biases, unit RMSNorm weights,
        then the embedders' own inits: xavier patch projection, N(0, 0.02) timestep / pooled MLPs, zero-output
        control embedders (and their computed buffers)."""
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
    def config(self) -> dict:
        """JSON-able dict; `condiff.models.create(**model.config)` rebuilds the same architecture."""
        return asdict(self.cfg)

    @property
    def base_size(self) -> float:
        """Grid size (tokens per side) the positional embedding is anchored to (App. C)."""
        return self.cfg.base_size

    @property
    def attn_impl(self) -> str:
        return resolve_attn_impl(self.cfg.attn_impl)

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

    def check_inputs(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Validate (x_t, t, cond); returns t as (B,) float (a scalar t is broadcast)."""
        if x.dim() != 4:
            raise ValueError(f"{self.cfg.name}: x_t must be (B, C, H, W), got {tuple(x.shape)}")
        if not isinstance(cond, Cond):
            raise TypeError(f"{self.cfg.name}: cond must be a condiff.conditioning.cond.Cond, got {type(cond).__name__}")
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"{self.cfg.name}: t must be ({B},) timesteps, got {tuple(t.shape)}")
        return t.float()

    def embed_time(self, t: Tensor, cond: Cond, batch_size: int) -> Tensor:
        """(B, D) = t_emb + control embedding (Eq. 1 or SDXL-additive) [+ pooled-text projection]."""
        c = self.t_embedder(t)  # (B, D)
        if self.control_embedder is not None:
            c = c + self.control_embedder(t, cond, batch_size).to(c.dtype)
        if self.pooled_embedder is not None:
            if cond.pooled is None or cond.pooled.shape != (batch_size, self.cfg.pooled_dim):
                got = None if cond.pooled is None else tuple(cond.pooled.shape)
                raise ValueError(f"{self.cfg.name}: cond.pooled must be ({batch_size}, {self.cfg.pooled_dim}), got {got}")
            c = c + self.pooled_embedder(cond.pooled.to(c.dtype))
        return c

    def labels(self, cond: Cond, batch_size: int) -> Tensor:
        """Validated class ids (B,) (num_classes = null class)."""
        return check_labels(cond.labels, self.cfg.num_classes, batch_size)

    def context_tokens(self, cond: Cond, batch_size: int) -> Tensor:
        """(B, M, D) attention context of the token-conditioned backbones (Att-DiT, mmDiT): the class
        token through `y_embedder` (M = 1) or the padded text states through `context_embedder` (M = T)."""
        if self.cfg.conditioning == "class":
            return self.y_embedder(self.labels(cond, batch_size))[:, None]  # (B, 1, D)
        return self.context_embedder(self.text_states(cond, batch_size))  # (B, T, D)

    def text_states(self, cond: Cond, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Text states (B, T, text_dim) after the padding mode; noise (noisy-replicate) only in training mode.

        `cond.text_lengths` None means every one of the T tokens is valid (no padding positions).
        """
        text = cond.text
        if text is None or text.dim() != 3 or text.shape[0] != batch_size or text.shape[2] != self.cfg.text_dim:
            got = None if text is None else tuple(text.shape)
            raise ValueError(f"{self.cfg.name}: cond.text must be ({batch_size}, T, {self.cfg.text_dim}), got {got}")
        lengths = cond.text_lengths
        if lengths is None:
            lengths = torch.full((batch_size,), text.shape[1], dtype=torch.long, device=text.device)
        beta = noise_amplitude(self.cfg.text_noise_beta, self.cfg.text_noise_reading, training=self.training,
                               at_inference=self.cfg.text_noise_at_inference)
        states = pad_text(text, lengths, self.cfg.text_padding, beta, generator, backend=self.cfg.ops_backend)
        return states.to(self.x_embedder.proj.weight.dtype)  # (B, T, text_dim) in the model's dtype

    # --- outputs -------------------------------------------------------------------------------------------
    def unpatchify(self, x: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """(B, N, p*p*C_out) -> (B, C, H, W) (eps; the learned-sigma half is dropped)."""
        B, p, C = x.shape[0], self.cfg.patch_size, self.out_channels
        x = x.reshape(B, grid_h, grid_w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, grid_h * p, grid_w * p)  # (B, C_out, H, W)
        return x[:, : self.cfg.in_channels]

    def example_inputs(self, batch_size: int = 1, input_size: int | None = None, device=None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Cond]:
        """Random (x_t, t, cond) of the right shapes for this model (tests, FLOP counting, smoke runs)."""
        cfg, B = self.cfg, batch_size
        device = device or next(self.parameters()).device
        S = input_size or cfg.input_size
        x = torch.randn(B, cfg.in_channels, S, S, generator=generator).to(device)
        t = (torch.rand(B, generator=generator) * (cfg.num_timesteps - 1)).to(device)
        size = float(S * 8)
        control = dict(control_h=torch.tensor([[0.0, 0.0, size, size, 1.0, 0.0]]).repeat(B, 1).to(device),
                       control_l=torch.tensor([[size, size]]).repeat(B, 1).to(device))
        if cfg.conditioning == "class":
            cond = Cond(labels=torch.randint(0, cfg.num_classes, (B,), generator=generator).to(device), **control)
        else:
            T = cfg.text_len
            cond = Cond(text=torch.randn(B, T, cfg.text_dim, generator=generator).to(device),
                        text_lengths=torch.randint(1, T + 1, (B,), generator=generator).to(device),
                        pooled=torch.randn(B, cfg.pooled_dim, generator=generator).to(device), **control)
        return x, t, cond


