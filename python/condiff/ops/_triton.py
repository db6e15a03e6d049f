"""Triton kernels of the fused ops, with the kernel interface of `torch.ops.condiff_native` (csrc/bindings.cpp).

Imported lazily (only when the "triton" backend is used). On a GPU they compile for the device; with
TRITON_INTERPRET=1 set before this module is first imported they run in Triton's CPU interpreter on CPU
tensors (slow, and its half-precision math is not faithful: the tests use float32 and float64 there).

Layout and math follow the C++ kernels: one program per row (adaLN, gated residual) or per token (RMSNorm-QK
join), statistics in the accumulation dtype ACC (float64 for float64 inputs, else float32) and recomputed in
backward, parameter gradients reduced per chunk of ROWS rows into a partial buffer summed afterwards
(deterministic; no atomics). Large dimensions (batch x chunks) are folded into grid axis 0, whose limit is
2^31 - 1 (axes 1 and 2 stop at 65535). Every launch runs under a device guard for its tensors' device:
Triton launches on the current CUDA device, not on the tensors'.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ROWS = 64  # rows (tokens) per program in the backward reductions


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the kernels for t: float64 for float64, else float32."""
    return torch.promote_types(t.dtype, torch.float32)


def _tl_acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _block(n: int) -> int:
    """Power-of-two block covering n >= 0 elements (at least 1: tl.arange needs a positive size)."""
    return triton.next_power_of_2(max(1, n))


def _on_input_device(fn):
    """Runs a kernel-interface function with its first tensor's CUDA device current (no-op for CPU tensors)."""
    @functools.wraps(fn)
    def wrapper(first, *args):
        if not first.is_cuda:
            return fn(first, *args)
        with torch.cuda.device(first.device):
            return fn(first, *args)
    return wrapper


# ------------------------------------------------------------------ adaLN modulation
@triton.jit
def _adaln_fwd_kernel(X, SH, SC, Y, N, D, eps, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    sh = tl.load(SH + b * D + cols, mask=mask, other=0.0).to(ACC)
    sc = tl.load(SC + b * D + cols, mask=mask, other=0.0).to(ACC)
    y = xc * rstd * (1.0 + sc) + sh
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(G, X, SC, GX, P, N, D, NCHUNK, eps, ACC: tl.constexpr, ROWS_: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """One program per (batch b, chunk c of ROWS_ rows), folded into grid axis 0 as b * NCHUNK + c."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NCHUNK
    c = pid % NCHUNK
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    sc1 = 1.0 + tl.load(SC + b * D + cols, mask=mask, other=0.0).to(ACC)
    psh = tl.zeros([BLOCK_D], dtype=ACC)
    psc = tl.zeros([BLOCK_D], dtype=ACC)
    for n in range(c * ROWS_, tl.minimum(N, (c + 1) * ROWS_)):
        off = (b * N + n) * D + cols
        x = tl.load(X + off, mask=mask, other=0.0).to(ACC)
        g = tl.load(G + off, mask=mask, other=0.0).to(ACC)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        xh = xc * rstd
        psh += g
        psc += g * xh
        gh = g * sc1
        s1 = tl.sum(gh, axis=0) / D
        s2 = tl.sum(gh * xh, axis=0) / D
        gx = rstd * (gh - s1 - xh * s2)
        tl.store(GX + off, gx.to(GX.dtype.element_ty), mask=mask)
    tl.store(P + pid * D + cols, psh, mask=mask)  # P (2, B * NCHUNK, D): grad_shift, grad_scale partials
    tl.store(P + (tl.num_programs(0) + pid) * D + cols, psc, mask=mask)


@_on_input_device
def adaln_fwd(x, shift, scale, eps):
    B, N, D = x.shape
    y = torch.empty_like(x)
    if x.numel():
        _adaln_fwd_kernel[(B * N,)](x, shift, scale, y, N, D, eps, ACC=_tl_acc(x), BLOCK_D=_block(D))
    return y


@_on_input_device
def adaln_bwd(grad, x, scale, eps):
    B, N, D = x.shape
    nchunk = max(1, triton.cdiv(N, ROWS))
    gx = torch.empty_like(x)
    part = torch.zeros(2, B, nchunk, D, device=x.device, dtype=_acc(x))
    if x.numel():
        _adaln_bwd_kernel[(B * nchunk,)](grad, x, scale, gx, part, N, D, nchunk, eps, ACC=_tl_acc(x), ROWS_=ROWS,
                                         BLOCK_D=_block(D))
    return gx, part[0].sum(1).to(x.dtype), part[1].sum(1).to(x.dtype)  # separate tensors (no aliasing)


# ------------------------------------------------------------------ gated residual
@triton.jit
def _gated_fwd_kernel(X, GA, Yin, O, N, D, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(ACC)
    y = tl.load(Yin + row * D + cols, mask=mask, other=0.0).to(ACC)
    ga = tl.load(GA + (row // N) * D + cols, mask=mask, other=0.0).to(ACC)
    tl.store(O + row * D + cols, (x + ga * y).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(G, GA, Yin, GY, P, N, D, NCHUNK, ACC: tl.constexpr, ROWS_: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """One program per (batch b, chunk c of ROWS_ rows), folded into grid axis 0 as b * NCHUNK + c."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NCHUNK
    c = pid % NCHUNK
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    ga = tl.load(GA + b * D + cols, mask=mask, other=0.0).to(ACC)
    pg = tl.zeros([BLOCK_D], dtype=ACC)
    for n in range(c * ROWS_, tl.minimum(N, (c + 1) * ROWS_)):
        off = (b * N + n) * D + cols
        g = tl.load(G + off, mask=mask, other=0.0).to(ACC)
        y = tl.load(Yin + off, mask=mask, other=0.0).to(ACC)
        pg += g * y
        tl.store(GY + off, (g * ga).to(GY.dtype.element_ty), mask=mask)
    tl.store(P + pid * D + cols, pg, mask=mask)


@_on_input_device
def gated_fwd(x, gate, y):
    B, N, D = x.shape
    out = torch.empty_like(x)
    if x.numel():
        _gated_fwd_kernel[(B * N,)](x, gate, y, out, N, D, ACC=_tl_acc(x), BLOCK_D=_block(D))
    return out


@_on_input_device
def gated_bwd(grad, gate, y):
    B, N, D = y.shape
    nchunk = max(1, triton.cdiv(N, ROWS))
    gy = torch.empty_like(y)
    part = torch.zeros(B, nchunk, D, device=y.device, dtype=_acc(y))
    if y.numel():
        _gated_bwd_kernel[(B * nchunk,)](grad, gate, y, gy, part, N, D, nchunk, ACC=_tl_acc(y), ROWS_=ROWS,
                                         BLOCK_D=_block(D))
    return gy, part.sum(1).to(y.dtype)


# ------------------------------------------------------------------ RMSNorm-QK join
@triton.jit
def _qk_fwd_kernel(SRC, WQ, WK, Q, K, V, S, L, L0, H, HD, eps, ACC: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_HD: tl.constexpr):
    """One token of one stream: SRC (B, S, 3D) -> rows of q, k, v (B, H, L, hd) at sequence index L0 + s."""
    tok = tl.program_id(0).to(tl.int64)
    b = tok // S
    s = tok % S
    D = H * HD
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HD)[None, :]
    mask = (h < H) & (j < HD)
    src = SRC + tok * 3 * D + h * HD + j
    dst = ((b * H + h) * L + L0 + s) * HD + j
    wq = tl.load(WQ + j, mask=j < HD, other=0.0)
    wk = tl.load(WK + j, mask=j < HD, other=0.0)
    q = tl.load(src, mask=mask, other=0.0).to(ACC)
    rq = 1.0 / tl.sqrt(tl.sum(q * q, axis=1) / HD + eps)
    tl.store(Q + dst, (q * rq[:, None] * wq).to(Q.dtype.element_ty), mask=mask)
    k = tl.load(src + D, mask=mask, other=0.0).to(ACC)
    rk = 1.0 / tl.sqrt(tl.sum(k * k, axis=1) / HD + eps)
    tl.store(K + dst, (k * rk[:, None] * wk).to(K.dtype.element_ty), mask=mask)
    v = tl.load(src + 2 * D, mask=mask, other=0.0)
    tl.store(V + dst, v, mask=mask)


@triton.jit
def _rms_heads_bwd(src, grad, gdst, w, mask, HD, eps, ACC: tl.constexpr):
    """Backward of per-head RMSNorm for one token: x = src (BLOCK_H, BLOCK_HD) rows, w (1, BLOCK_HD).
    With xh = x * r: gx = r * (g*w - xh * mean(g*w*xh)) stored at gdst; returns the weight grad sum_h g*xh.
    xh is zeroed outside `mask`: padding heads have r = 1/sqrt(eps), infinite for eps = 0, and 0 * inf would
    turn the weight-gradient sum into NaN."""
    x = tl.load(src, mask=mask, other=0.0).to(ACC)
    g = tl.load(grad, mask=mask, other=0.0).to(ACC)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HD + eps)
    xh = tl.where(mask, x * r[:, None], 0.0)
    gw = g * w
    dot = tl.sum(gw * xh, axis=1) / HD
    tl.store(gdst, (r[:, None] * (gw - xh * dot[:, None])).to(gdst.dtype.element_ty), mask=mask)
    return tl.sum(g * xh, axis=0)


@triton.jit
def _qk_bwd_kernel(GQ, GK, GV, SRC, WQ, WK, GSRC, P, NTOK, S, L, L0, H, HD, eps, ACC: tl.constexpr,
                   ROWS_: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HD: tl.constexpr):
    """ROWS_ tokens of one stream: gradients into GSRC (B, S, 3D), partial weight grads into P[chunk] (2, hd)."""
    c = tl.program_id(0).to(tl.int64)
    D = H * HD
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HD)[None, :]
    mask = (h < H) & (j < HD)
    wq = tl.load(WQ + j, mask=j < HD, other=0.0)
    wk = tl.load(WK + j, mask=j < HD, other=0.0)
    pq = tl.zeros([BLOCK_HD], dtype=ACC)
    pk = tl.zeros([BLOCK_HD], dtype=ACC)
    for tok in range(c * ROWS_, tl.minimum(NTOK, (c + 1) * ROWS_)):
        b = tok // S
        s = tok % S
        src = SRC + tok * 3 * D + h * HD + j
        gdst = GSRC + tok * 3 * D + h * HD + j
        goff = ((b * H + h) * L + L0 + s) * HD + j
        pq += _rms_heads_bwd(src, GQ + goff, gdst, wq, mask, HD, eps, ACC)
        pk += _rms_heads_bwd(src + D, GK + goff, gdst + D, wk, mask, HD, eps, ACC)
        tl.store(gdst + 2 * D, tl.load(GV + goff, mask=mask, other=0.0), mask=mask)
    jj = tl.arange(0, BLOCK_HD)
    tl.store(P + c * 2 * HD + jj, pq, mask=jj < HD)
    tl.store(P + c * 2 * HD + HD + jj, pk, mask=jj < HD)


def _qk_blocks(x, num_heads, hd):
    return dict(ACC=_tl_acc(x), BLOCK_H=_block(num_heads), BLOCK_HD=_block(hd))


@_on_input_device
def qknorm_join_fwd(qkv_x, qkv_c, weights, num_heads, eps):
    """weights (4, hd) in the accumulation dtype: q_x, k_x, q_c, k_c."""
    B, N, D3 = qkv_x.shape
    M = qkv_c.shape[1]
    L, hd = N + M, D3 // 3 // num_heads
    q = qkv_x.new_empty(B, num_heads, L, hd)
    k, v = torch.empty_like(q), torch.empty_like(q)
    for src, S, L0, wq, wk in ((qkv_x, N, 0, weights[0], weights[1]), (qkv_c, M, N, weights[2], weights[3])):
        if src.numel():
            _qk_fwd_kernel[(B * S,)](src, wq, wk, q, k, v, S, L, L0, num_heads, hd, eps,
                                     **_qk_blocks(qkv_x, num_heads, hd))
    return q, k, v


@_on_input_device
def qknorm_join_bwd(gq, gk, gv, qkv_x, qkv_c, weights, num_heads, eps):
    B, N, D3 = qkv_x.shape
    M = qkv_c.shape[1]
    L, hd = N + M, D3 // 3 // num_heads
    g_x, g_c = torch.empty_like(qkv_x), torch.empty_like(qkv_c)
    g_w = []
    for src, gsrc, S, L0, wq, wk in ((qkv_x, g_x, N, 0, weights[0], weights[1]),
                                     (qkv_c, g_c, M, N, weights[2], weights[3])):
        nchunk = max(1, triton.cdiv(B * S, ROWS))
        part = torch.zeros(nchunk, 2, hd, device=qkv_x.device, dtype=_acc(qkv_x))
        if src.numel():
            _qk_bwd_kernel[(nchunk,)](gq, gk, gv, src, wq, wk, gsrc, part, B * S, S, L, L0, num_heads, hd, eps,
                                      ROWS_=ROWS, **_qk_blocks(qkv_x, num_heads, hd))
        g_w.append(part.sum(0))  # (2, hd): q, k
    return g_x, g_c, torch.cat(g_w).to(weights.dtype)


# ------------------------------------------------------------------ noisy replicate padding (Eq. 7)
# Offsets are int64 throughout (t * C exceeds int32 for rows of over 2^31 elements). Lengths are asserted
# on the device (in kernels compiled with TRITON_DEBUG=1) and clamped to [1, T], so a bad length never reads
# outside its row: the public op checks them on the host outside torch.compile, and a host check here would
# synchronise the stream and break CUDA-graph capture.
@triton.jit
def _pad_row(E, LEN, T, C, NCB, beta, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's row b and channel block (program b * NCB + block on grid axis 0): (base offset,
    channels, mask, length n, amp = beta * sqrt(m - 1), mean, sigma). C is int64 here (the caller casts it)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NCB
    cols = (pid % NCB) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    n = tl.load(LEN + b)  # int64 prompt length
    tl.device_assert((n >= 1) & (n <= T), "noisy_replicate_pad: every length must lie in [1, T]")
    n = tl.minimum(tl.maximum(n, 1), T)
    m = (T + n - 1) // n
    amp = tl.full((), beta, ACC) * tl.sqrt((m - 1).to(ACC))  # beta exactly in ACC (float64 for float64)
    base = b * T * C
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(0, n):
        mean += tl.load(E + base + t * C + cols, mask=mask, other=0.0).to(ACC)
    mean = mean / n.to(ACC)
    var = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(0, n):
        d = tl.load(E + base + t * C + cols, mask=mask, other=0.0).to(ACC) - mean
        var += d * d
    return base, cols, mask, n, amp, mean, tl.sqrt(var / n.to(ACC))


@triton.jit
def _pad_fwd_kernel(E, LEN, Z, O, T, C, NCB, beta: tl.float64, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    C = tl.cast(C, tl.int64)
    base, cols, mask, n, amp, mean, sigma = _pad_row(E, LEN, T, C, NCB, beta, ACC, BLOCK_C)
    for t in range(0, T):
        e = tl.load(E + base + (t % n) * C + cols, mask=mask, other=0.0)
        z = tl.load(Z + base + t * C + cols, mask=mask, other=0.0).to(ACC)
        noisy = (e.to(ACC) + amp * sigma * z).to(O.dtype.element_ty)
        tl.store(O + base + t * C + cols, tl.where(t >= n, noisy, e), mask=mask)  # prompt tokens: exact copies


@triton.jit
def _pad_bwd_kernel(G, E, LEN, Z, GE, T, C, NCB, beta: tl.float64, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    C = tl.cast(C, tl.int64)
    base, cols, mask, n, amp, mean, sigma = _pad_row(E, LEN, T, C, NCB, beta, ACC, BLOCK_C)
    gz = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(n, T):
        g = tl.load(G + base + t * C + cols, mask=mask, other=0.0).to(ACC)
        gz += g * tl.load(Z + base + t * C + cols, mask=mask, other=0.0).to(ACC)
    safe = tl.where(sigma > 0, sigma, 1.0)
    coef = tl.where(sigma > 0, amp * gz / (n.to(ACC) * safe), 0.0)  # through sigma_ch
    for s in range(0, n):
        acc = tl.zeros([BLOCK_C], dtype=ACC)
        for t in range(s, T, n):  # every copy of token s
            acc += tl.load(G + base + t * C + cols, mask=mask, other=0.0).to(ACC)
        e = tl.load(E + base + s * C + cols, mask=mask, other=0.0).to(ACC)
        acc += coef * (e - mean)
        tl.store(GE + base + s * C + cols, acc.to(GE.dtype.element_ty), mask=mask)
    for t in range(n, T):
        tl.store(GE + base + t * C + cols, tl.zeros([BLOCK_C], dtype=GE.dtype.element_ty), mask=mask)


def _pad_launch(emb):
    """Grid (B * channel blocks,) and the arguments after the tensors: T, C, channel blocks."""
    B, T, C = emb.shape
    block = min(256, _block(C))
    ncb = triton.cdiv(C, block)
    return (B * ncb,), (T, C, ncb), dict(ACC=_tl_acc(emb), BLOCK_C=block)


@_on_input_device
def replicate_pad_fwd(emb, lengths, beta, noise):
    out = torch.empty_like(emb)
    grid, sizes, consts = _pad_launch(emb)
    if emb.numel():
        _pad_fwd_kernel[grid](emb, lengths, noise, out, *sizes, beta, **consts)
    return out


@_on_input_device
def replicate_pad_bwd(grad, emb, lengths, beta, noise):
    gemb = torch.empty_like(emb)
    grid, sizes, consts = _pad_launch(emb)
    if emb.numel():
        _pad_bwd_kernel[grid](grad, emb, lengths, noise, gemb, *sizes, beta, **consts)
    return gemb
