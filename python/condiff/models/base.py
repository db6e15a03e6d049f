"""The model-spec contract every backbone follows: one typed config base, one forward preamble.

`ModelConfig` holds the fields whose meaning is the same in every family (transformers and the UNet), under
one name each: the conditioning, class count, text-state and pooled widths, text padding, the control
embedder and its gamma_c (Eq. 1), attention implementation and ops backend. A family's config subclasses
it and adds its architecture fields; `model.config` is `asdict(model.cfg)` and `create(**model.config)`
rebuilds the model.

`DiffusionModel.forward(x_t, t, cond)` is the shared preamble: validate the inputs, embed the timestep,
add the control embedding (Eq. 1 or SDXL-additive) and the family's vector condition (pooled text / class
vector), then hand the (B, E) embedding to the family's `denoise(x_t, emb, cond)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from condiff import ops
from condiff.conditioning.cond import CONTROL_GROUPS, Cond
from condiff.conditioning.control import CONTROL_MODES, GAMMA_KINDS, ControlEmbedder, check_control_fields
from condiff.conditioning.labels import check_labels
from condiff.conditioning.padding import NOISE_READINGS, PADDING_MODES, noise_amplitude, pad_text
from condiff.models.layers import ATTN_IMPLS, resolve_attn_impl


@dataclass
class ModelConfig:
    """Fields shared by every backbone family (same name, same meaning).

    conditioning: "class" (labels, num_classes + null row) or "text" (states (B, T, text_dim), lengths, pooled
    (B, pooled_dim)). input_size: training resolution in latent cells (32 = 256 px SD-VAE latents).
    text_len: the encoder's token count T (77 for CLIP); only `example_inputs` uses it, any T runs.
    text_padding: zero | replicate | noisy-replicate (noise `text_noise_beta` = beta_txt, training mode only;
    0.1 is our choice: the paper only says "a small variance"). text_noise_reading: "variance" (default, the
    paper's word: std factor sqrt(beta_txt)) | "std" (beta_txt multiplies the std; the former reading);
    text_noise_at_inference: keep the noise in eval mode too (`conditioning.padding`).
    control: "none" | "additive" (SDXL joint embedding) | "disentangled" (Eq. 1 with gamma_c `gamma`,
    `gamma_alpha`, `gamma_k`); control_freq_dim: sinusoidal features per control field.
    control_fields: the conditioned control groups (crop, aspect, flip, size; `cond.CONTROL_GROUPS`), default all.
    attn_impl: None (module default, see `attention_impl`) | sdpa | math. ops_backend: condiff.ops backend.
    """

    name: str = ""
    conditioning: str = "class"
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    text_dim: int = 768
    pooled_dim: int = 768
    text_len: int = 77
    text_padding: str = "zero"
    text_noise_beta: float = 0.1
    text_noise_reading: str = "variance"
    text_noise_at_inference: bool = False
    control: str = "additive"
    gamma: str = "power-cosine"
    gamma_alpha: float = 8.0
    gamma_k: float = 1.0
    control_fields: list = field(default_factory=lambda: list(CONTROL_GROUPS))
    control_freq_dim: int = 256
    num_timesteps: int = 1000
    attn_impl: str | None = None
    ops_backend: str | None = None

    def __post_init__(self):
        self.check_choice("conditioning", ("class", "text"))
        self.check_choice("control", CONTROL_MODES)
        self.check_choice("gamma", GAMMA_KINDS)
        self.check_choice("text_padding", PADDING_MODES)
        self.check_choice("text_noise_reading", NOISE_READINGS)
        self.control_fields = list(check_control_fields(self.control_fields, f"{self.name}: control_fields"))
        self.check_choice("attn_impl", (None, *ATTN_IMPLS))
        self.check_choice("ops_backend", (None, *ops.BACKENDS))
        self.check_positive("input_size", "in_channels", "num_classes", "text_dim", "pooled_dim", "text_len",
                            "num_timesteps", "control_freq_dim")

    def check_choice(self, field: str, allowed: tuple) -> None:
        value = getattr(self, field)
        if value not in allowed:
            raise ValueError(f"{self.name or type(self).__name__}: {field} must be one of {allowed}, got {value!r}")

    def check_positive(self, *names: str) -> None:
        for f in names:
            value = getattr(self, f)
            if not isinstance(value, (int, float)) or int(value) < 1:
                raise ValueError(f"{self.name or type(self).__name__}: {f} must be >= 1, got {value!r}")


class DiffusionModel(nn.Module, ABC):
    """Base of every backbone: `forward(x_t, t, cond, **kw) -> eps (B, C, H, W)` runs the shared preamble
    (`check_inputs`, `embed_time`) and then the family's `denoise(x_t, emb, cond, **kw)`.

    Subclasses set `control_embedder` (`make_control_embedder(E)`) and implement `embed_timestep(t) -> (B, E)`,
    `vector_condition(cond, B) -> (B, E) | None`, `denoise`, `initialize_weights` and `param_dtype`.
    """

    config_cls = ModelConfig

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def make_control_embedder(self, dim: int) -> ControlEmbedder | None:
        """The control embedder (Eq. 1 / SDXL-additive) of width `dim`, or None for control "none"."""
        cfg = self.cfg
        if cfg.control == "none":
            return None
        return ControlEmbedder(dim, cfg.control, cfg.gamma, cfg.gamma_alpha, cfg.gamma_k, cfg.control_freq_dim,
                               cfg.num_timesteps, cfg.control_fields)

    # --- configuration -------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """JSON-able dict; `condiff.models.create(**model.config)` rebuilds the same architecture."""
        return asdict(self.cfg)

    @property
    def attn_impl(self) -> str:
        return resolve_attn_impl(self.cfg.attn_impl)

    @property
    @abstractmethod
    def param_dtype(self) -> torch.dtype:
        """dtype of the model's weights (conditions are cast to it)."""

    # --- the preamble --------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, cond: Cond, **kw) -> Tensor:
        """x_t (B, C, H, W), t (B,) (or a scalar) float DDPM timesteps in [0, T), cond a `Cond` -> eps (B, C, H, W)."""
        t = self.check_inputs(x, t, cond)
        return self.denoise(x, self.embed_time(t, cond, x.shape[0]), cond, **kw)

    def check_inputs(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Validate (x_t, t, cond); returns t as (B,) float (a scalar t is broadcast)."""
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"{self.cfg.name}: x_t must be (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
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
        """(B, E) = t_emb + control embedding (Eq. 1 or SDXL-additive) [+ the family's vector condition]."""
        c = self.embed_timestep(t)  # (B, E)
        if self.control_embedder is not None:
            c = c + self.control_embedder(t, cond, batch_size).to(c.dtype)
        v = self.vector_condition(cond, batch_size)
        return c if v is None else c + v.to(c.dtype)

    @abstractmethod
    def embed_timestep(self, t: Tensor) -> Tensor:
        """t (B,) float -> (B, E)."""

    def vector_condition(self, cond: Cond, batch_size: int) -> Tensor | None:
        """(B, E) added to the timestep embedding (pooled text, class vector), or None."""
        return None

    @abstractmethod
    def denoise(self, x: Tensor, emb: Tensor, cond: Cond, **kw) -> Tensor:
        """x_t (B, C, H, W), emb (B, E) from the preamble -> eps (B, C, H, W)."""

    @abstractmethod
    def initialize_weights(self) -> None:
        """(Re-)initialise every parameter and computed buffer (called by the constructor; call it again after
        `model.to_empty(device=...)` of a meta-device model)."""

    # --- conditions ----------------------------------------------------------------------------------------
    def labels(self, cond: Cond, batch_size: int) -> Tensor:
        """Validated class ids (B,) (num_classes = null class)."""
        return check_labels(cond.labels, self.cfg.num_classes, batch_size)

    def pooled(self, cond: Cond, batch_size: int) -> Tensor:
        """Validated pooled text vector (B, pooled_dim)."""
        if cond.pooled is None or cond.pooled.shape != (batch_size, self.cfg.pooled_dim):
            got = None if cond.pooled is None else tuple(cond.pooled.shape)
            raise ValueError(f"{self.cfg.name}: cond.pooled must be ({batch_size}, {self.cfg.pooled_dim}), got {got}")
        return cond.pooled

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
        return states.to(self.param_dtype)  # (B, T, text_dim) in the model's dtype

    def example_inputs(self, batch_size: int = 1, input_size: int | tuple[int, int] | None = None, device=None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Cond]:
        """Random (x_t, t, cond) of the right shapes for this model (tests, FLOP counting, smoke runs).
        input_size: S (square) or (H, W) latent cells; the control is a full H x W crop of an 8x larger image."""
        cfg, B = self.cfg, batch_size
        device = device or next(self.parameters()).device
        H, W = (input_size, input_size) if isinstance(input_size, int) else (input_size or (cfg.input_size,) * 2)
        x = torch.randn(B, cfg.in_channels, H, W, generator=generator).to(device)
        t = (torch.rand(B, generator=generator) * (cfg.num_timesteps - 1)).to(device)
        h, w = float(H * 8), float(W * 8)
        control = dict(control_h=torch.tensor([[0.0, 0.0, h, w, w / h, 0.0]]).repeat(B, 1).to(device),
                       control_l=torch.tensor([[h, w]]).repeat(B, 1).to(device))
        if cfg.conditioning == "class":
            cond = Cond(labels=torch.randint(0, cfg.num_classes, (B,), generator=generator).to(device), **control)
        else:
            T = cfg.text_len
            cond = Cond(text=torch.randn(B, T, cfg.text_dim, generator=generator).to(device),
                        text_lengths=torch.randint(1, T + 1, (B,), generator=generator).to(device),
                        pooled=torch.randn(B, cfg.pooled_dim, generator=generator).to(device), **control)
        return x, t, cond
