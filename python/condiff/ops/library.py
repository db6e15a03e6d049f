"""torch.library registration of the fused ops: custom ops, fake (meta) kernels and autograd.

Each op is a `torch.library.custom_op` in the `condiff` namespace whose last argument names the kernel
backend ("cpu" | "cuda" | "triton"); forward and backward are both custom ops, so `torch.compile` treats
them as opaque graph nodes (no graph breaks) and autograd works in eager and compiled code alike.
Backends implement the same kernel interface (`torch.ops.condiff_native.*` for cpu/cuda, `_triton` for
triton): see csrc/bindings.cpp for the schemas. The pure-PyTorch reference never goes through here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from condiff.ops.reference import acc_dtype


def _kernels(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.condiff_native
    if backend == "triton":
        from condiff.ops import _triton

        return _triton
    raise ValueError(f"unknown kernel backend {backend!r}")


def _grad(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.contiguous()


# ---------------------------------------------------------------- adaLN modulation
@torch.library.custom_op("condiff::adaln_modulate", mutates_args=())
def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, backend: str) -> Tensor:
    return _kernels(backend).adaln_fwd(x, shift, scale, eps)


@adaln_modulate.register_fake
def _(x, shift, scale, eps, backend):
    return torch.empty_like(x)


@torch.library.custom_op("condiff::adaln_modulate_backward", mutates_args=())
def adaln_modulate_backward(grad: Tensor, x: Tensor, scale: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    gx, gshift, gscale = _kernels(backend).adaln_bwd(grad, x, scale, eps)
    return gx, gshift, gscale


@adaln_modulate_backward.register_fake
def _(grad, x, scale, eps, backend):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


def _adaln_setup(ctx, inputs, output):
    x, _, scale, eps, backend = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps, ctx.backend = eps, backend


def _adaln_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    gx, gshift, gscale = adaln_modulate_backward(_grad(grad, x), x, scale, ctx.eps, ctx.backend)
    return gx, gshift, gscale, None, None


adaln_modulate.register_autograd(_adaln_backward, setup_context=_adaln_setup)


# ---------------------------------------------------------------- gated residual
@torch.library.custom_op("condiff::gated_residual", mutates_args=())
def gated_residual(x: Tensor, gate: Tensor, y: Tensor, backend: str) -> Tensor:
    return _kernels(backend).gated_fwd(x, gate, y)


@gated_residual.register_fake
def _(x, gate, y, backend):
    return torch.empty_like(x)


@torch.library.custom_op("condiff::gated_residual_backward", mutates_args=())
def gated_residual_backward(grad: Tensor, gate: Tensor, y: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    gy, ggate = _kernels(backend).gated_bwd(grad, gate, y)
    return gy, ggate


@gated_residual_backward.register_fake
def _(grad, gate, y, backend):
    return torch.empty_like(y), torch.empty_like(gate)


def _gated_setup(ctx, inputs, output):
    _, gate, y, backend = inputs
    ctx.save_for_backward(gate, y)
    ctx.backend = backend


def _gated_backward(ctx, grad):
    gate, y = ctx.saved_tensors
    grad = _grad(grad, y)
    gy, ggate = gated_residual_backward(grad, gate, y, ctx.backend)
    return grad, ggate, gy, None  # d/dx (x + gate * y) = identity


gated_residual.register_autograd(_gated_backward, setup_context=_gated_setup)


# ---------------------------------------------------------------- RMSNorm-QK join (joint attention)
def _stack_weights(ws: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack([w.to(acc_dtype(dtype)) for w in ws]).contiguous()  # (4, hd): q_x, k_x, q_c, k_c


@torch.library.custom_op("condiff::qk_norm_join", mutates_args=())
def qk_norm_join(qkv_x: Tensor, qkv_c: Tensor, q_norm_x: Tensor, k_norm_x: Tensor, q_norm_c: Tensor, k_norm_c: Tensor,
                 num_heads: int, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    w = _stack_weights([q_norm_x, k_norm_x, q_norm_c, k_norm_c], qkv_x.dtype)
    q, k, v = _kernels(backend).qknorm_join_fwd(qkv_x, qkv_c, w, num_heads, eps)
    return q, k, v


@qk_norm_join.register_fake
def _(qkv_x, qkv_c, q_norm_x, k_norm_x, q_norm_c, k_norm_c, num_heads, eps, backend):
    B, N, D3 = qkv_x.shape
    L, hd = N + qkv_c.shape[1], D3 // 3 // num_heads
    return tuple(qkv_x.new_empty(B, num_heads, L, hd) for _ in range(3))


@torch.library.custom_op("condiff::qk_norm_join_backward", mutates_args=())
def qk_norm_join_backward(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, qkv_x: Tensor, qkv_c: Tensor,
                          q_norm_x: Tensor, k_norm_x: Tensor, q_norm_c: Tensor, k_norm_c: Tensor, num_heads: int,
                          eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    w = _stack_weights([q_norm_x, k_norm_x, q_norm_c, k_norm_c], qkv_x.dtype)
    g_x, g_c, g_w = _kernels(backend).qknorm_join_bwd(grad_q, grad_k, grad_v, qkv_x, qkv_c, w, num_heads, eps)
    return g_x, g_c, g_w


@qk_norm_join_backward.register_fake
def _(grad_q, grad_k, grad_v, qkv_x, qkv_c, q_norm_x, k_norm_x, q_norm_c, k_norm_c, num_heads, eps, backend):
    return torch.empty_like(qkv_x), torch.empty_like(qkv_c), qkv_x.new_empty(4, q_norm_x.shape[0], dtype=acc_dtype(qkv_x.dtype))


def _qk_setup(ctx, inputs, output):
    qkv_x, qkv_c, *ws, num_heads, eps, backend = inputs
    ctx.save_for_backward(qkv_x, qkv_c, *ws)
    ctx.num_heads, ctx.eps, ctx.backend = num_heads, eps, backend


def _qk_backward(ctx, gq, gk, gv):
    qkv_x, qkv_c, *ws = ctx.saved_tensors
    B, N, D3 = qkv_x.shape
    shape = (B, ctx.num_heads, N + qkv_c.shape[1], D3 // 3 // ctx.num_heads)  # (B, H, L, hd)
    gq, gk, gv = (qkv_x.new_zeros(shape) if g is None else g.contiguous() for g in (gq, gk, gv))
    g_x, g_c, g_w = qk_norm_join_backward(gq, gk, gv, qkv_x, qkv_c, *ws, ctx.num_heads, ctx.eps, ctx.backend)
    g_ws = [g_w[i].to(w.dtype) for i, w in enumerate(ws)]
    return g_x, g_c, *g_ws, None, None, None


qk_norm_join.register_autograd(_qk_backward, setup_context=_qk_setup)


# ---------------------------------------------------------------- noisy replicate padding (Eq. 7)
@torch.library.custom_op("condiff::noisy_replicate_pad", mutates_args=())
def noisy_replicate_pad(emb: Tensor, lengths: Tensor, beta: float, noise: Tensor, backend: str) -> Tensor:
    # No host-side look at `lengths` here: it would synchronise the stream on every call and fail under
    # CUDA-graph capture. The public op checks 1 <= length <= T outside torch.compile; the kernels check
    # on their side (CPU: on the host; CUDA, Triton: device-side assert, and clamp).
    return _kernels(backend).replicate_pad_fwd(emb, lengths, beta, noise)


@noisy_replicate_pad.register_fake
def _(emb, lengths, beta, noise, backend):
    return torch.empty_like(emb)


@torch.library.custom_op("condiff::noisy_replicate_pad_backward", mutates_args=())
def noisy_replicate_pad_backward(grad: Tensor, emb: Tensor, lengths: Tensor, beta: float, noise: Tensor,
                                 backend: str) -> Tensor:
    return _kernels(backend).replicate_pad_bwd(grad, emb, lengths, beta, noise)


@noisy_replicate_pad_backward.register_fake
def _(grad, emb, lengths, beta, noise, backend):
    return torch.empty_like(emb)


def _pad_setup(ctx, inputs, output):
    emb, lengths, beta, noise, backend = inputs
    ctx.save_for_backward(emb, lengths, noise)
    ctx.beta, ctx.backend = beta, backend


def _pad_backward(ctx, grad):
    emb, lengths, noise = ctx.saved_tensors
    return noisy_replicate_pad_backward(_grad(grad, emb), emb, lengths, ctx.beta, noise, ctx.backend), None, None, None, None


noisy_replicate_pad.register_autograd(_pad_backward, setup_context=_pad_setup)
