"""Triton kernels of the fused ops, with the kernel interface of `torch.ops.condiff_native` (csrc/bindings.cpp).

Imported lazily (only when the "triton" backend is used). On a GPU they compile for the device; with
TRITON_INTERPRET=1 set before this module is first imported they run in Triton's CPU interpreter on CPU
tensors (slow, float32 only: that is how the tests check them on machines without a GPU).

Layout and math follow the C++ kernels: one program per row (adaLN, gated residual) or per token (RMSNorm-QK
join), statistics in float32 and recomputed in backward, parameter gradients reduced per chunk of
ROWS rows into a partial buffer summed afterwards (deterministic; no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 64  # rows (tokens) per program in the backward reductions


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# ------------------------------------------------------------------ adaLN modulation
@triton.jit
def _adaln_fwd_kernel(X, SH, SC, Y, N, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    sh = tl.load(SH + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SC + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + sc) + sh
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(G, X, SC, GX, P, N, D, NCHUNK, eps, ROWS_: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    sc1 = 1.0 + tl.load(SC + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    psh = tl.zeros([BLOCK_D], dtype=tl.float32)
    psc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n in range(c * ROWS_, tl.minimum(N, (c + 1) * ROWS_)):
        off = (b * N + n) * D + cols
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + off, mask=mask, other=0.0).to(tl.float32)
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
    pbase = (b * NCHUNK + c) * D + cols
    tl.store(P + pbase, psh, mask=mask)
    tl.store(P + tl.num_programs(0) * NCHUNK * D + pbase, psc, mask=mask)


def adaln_fwd(x, shift, scale, eps):
    B, N, D = x.shape
    y = torch.empty_like(x)
    if B * N:
        _adaln_fwd_kernel[(B * N,)](x, shift, scale, y, N, D, eps, BLOCK_D=triton.next_power_of_2(D))
    return y


def adaln_bwd(grad, x, scale, eps):
    B, N, D = x.shape
    nchunk = max(1, triton.cdiv(N, ROWS))
    gx = torch.empty_like(x)
    part = torch.zeros(2, B, nchunk, D, device=x.device, dtype=torch.float32)
    if B:
        _adaln_bwd_kernel[(B, nchunk)](grad, x, scale, gx, part, N, D, nchunk, eps, ROWS_=ROWS,
                                       BLOCK_D=triton.next_power_of_2(D))
    return gx, part[0].sum(1).to(x.dtype), part[1].sum(1).to(x.dtype)  # separate tensors (no aliasing)


# ------------------------------------------------------------------ gated residual
@triton.jit
def _gated_fwd_kernel(X, GA, Yin, O, N, D, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Yin + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    ga = tl.load(GA + (row // N) * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + row * D + cols, (x + ga * y).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(G, GA, Yin, GY, P, N, D, NCHUNK, ROWS_: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    ga = tl.load(GA + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    pg = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n in range(c * ROWS_, tl.minimum(N, (c + 1) * ROWS_)):
        off = (b * N + n) * D + cols
        g = tl.load(G + off, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Yin + off, mask=mask, other=0.0).to(tl.float32)
        pg += g * y
        tl.store(GY + off, (g * ga).to(GY.dtype.element_ty), mask=mask)
    tl.store(P + (b * NCHUNK + c) * D + cols, pg, mask=mask)


def gated_fwd(x, gate, y):
    B, N, D = x.shape
    out = torch.empty_like(x)
    if B * N:
        _gated_fwd_kernel[(B * N,)](x, gate, y, out, N, D, BLOCK_D=triton.next_power_of_2(D))
    return out


def gated_bwd(grad, gate, y):
    B, N, D = y.shape
    nchunk = max(1, triton.cdiv(N, ROWS))
    gy = torch.empty_like(y)
    part = torch.zeros(B, nchunk, D, device=y.device, dtype=torch.float32)
    if B:
        _gated_bwd_kernel[(B, nchunk)](grad, gate, y, gy, part, N, D, nchunk, ROWS_=ROWS,
                                       BLOCK_D=triton.next_power_of_2(D))
    return gy, part.sum(1).to(y.dtype)


# ------------------------------------------------------------------ RMSNorm-QK join
@triton.jit
def _qk_fwd_kernel(SRC, WQ, WK, Q, K, V, S, L, L0, H, HD, eps, BLOCK_H: tl.constexpr, BLOCK_HD: tl.constexpr):
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
    q = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    rq = 1.0 / tl.sqrt(tl.sum(q * q, axis=1) / HD + eps)
    tl.store(Q + dst, (q * rq[:, None] * wq).to(Q.dtype.element_ty), mask=mask)
    k = tl.load(src + D, mask=mask, other=0.0).to(tl.float32)
    rk = 1.0 / tl.sqrt(tl.sum(k * k, axis=1) / HD + eps)
    tl.store(K + dst, (k * rk[:, None] * wk).to(K.dtype.element_ty), mask=mask)
    v = tl.load(src + 2 * D, mask=mask, other=0.0)
    tl.store(V + dst, v, mask=mask)


@triton.jit
def _rms_heads_bwd(src, grad, gdst, w, mask, HD, eps):
    """Backward of per-head RMSNorm for one token: x = src (BLOCK_H, BLOCK_HD) rows, w (1, BLOCK_HD).
    With xh = x * r: gx = r * (g*w - xh * mean(g*w*xh)) stored at gdst; returns the weight grad sum_h g*xh."""
    x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HD + eps)
    xh = x * r[:, None]
    gw = g * w
    dot = tl.sum(gw * xh, axis=1) / HD
    tl.store(gdst, (r[:, None] * (gw - xh * dot[:, None])).to(gdst.dtype.element_ty), mask=mask)
    return tl.sum(g * xh, axis=0)


@triton.jit
def _qk_bwd_kernel(GQ, GK, GV, SRC, WQ, WK, GSRC, P, NTOK, S, L, L0, H, HD, eps, ROWS_: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HD: tl.constexpr):
    """ROWS_ tokens of one stream: gradients into GSRC (B, S, 3D), partial weight grads into P[chunk] (2, hd)."""
    c = tl.program_id(0)
    zero64 = c.to(tl.int64) * 0
    D = H * HD
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HD)[None, :]
    mask = (h < H) & (j < HD)
    wq = tl.load(WQ + j, mask=j < HD, other=0.0)
    wk = tl.load(WK + j, mask=j < HD, other=0.0)
    pq = tl.zeros([BLOCK_HD], dtype=tl.float32)
    pk = tl.zeros([BLOCK_HD], dtype=tl.float32)
    for t in range(c * ROWS_, tl.minimum(NTOK, (c + 1) * ROWS_)):
        tok = t + zero64
        b = tok // S
        s = tok % S
        src = SRC + tok * 3 * D + h * HD + j
        gdst = GSRC + tok * 3 * D + h * HD + j
        goff = ((b * H + h) * L + L0 + s) * HD + j
        pq += _rms_heads_bwd(src, GQ + goff, gdst, wq, mask, HD, eps)
        pk += _rms_heads_bwd(src + D, GK + goff, gdst + D, wk, mask, HD, eps)
        tl.store(gdst + 2 * D, tl.load(GV + goff, mask=mask, other=0.0), mask=mask)
    jj = tl.arange(0, BLOCK_HD)
    tl.store(P + c * 2 * HD + jj, pq, mask=jj < HD)
    tl.store(P + c * 2 * HD + HD + jj, pk, mask=jj < HD)


def _qk_blocks(num_heads, hd):
    return dict(BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_HD=triton.next_power_of_2(hd))


def qknorm_join_fwd(qkv_x, qkv_c, weights, num_heads, eps):
    B, N, D3 = qkv_x.shape
    M = qkv_c.shape[1]
    L, hd = N + M, D3 // 3 // num_heads
    q = qkv_x.new_empty(B, num_heads, L, hd)
    k, v = torch.empty_like(q), torch.empty_like(q)
    w = weights.float()
    for src, S, L0, wq, wk in ((qkv_x, N, 0, w[0], w[1]), (qkv_c, M, N, w[2], w[3])):
        if B * S:
            _qk_fwd_kernel[(B * S,)](src, wq, wk, q, k, v, S, L, L0, num_heads, hd, eps, **_qk_blocks(num_heads, hd))
    return q, k, v


def qknorm_join_bwd(gq, gk, gv, qkv_x, qkv_c, weights, num_heads, eps):
    B, N, D3 = qkv_x.shape
    M = qkv_c.shape[1]
    L, hd = N + M, D3 // 3 // num_heads
    g_x, g_c = torch.empty_like(qkv_x), torch.empty_like(qkv_c)
    w = weights.float()
    g_w = []
    for src, gsrc, S, L0, wq, wk in ((qkv_x, g_x, N, 0, w[0], w[1]), (qkv_c, g_c, M, N, w[2], w[3])):
        nchunk = max(1, triton.cdiv(B * S, ROWS))
        part = torch.zeros(nchunk, 2, hd, device=qkv_x.device, dtype=torch.float32)
        if B * S:
            _qk_bwd_kernel[(nchunk,)](gq, gk, gv, src, wq, wk, gsrc, part, B * S, S, L, L0, num_heads, hd, eps,
                                      ROWS_=ROWS, **_qk_blocks(num_heads, hd))
        g_w.append(part.sum(0))  # (2, hd): q, k
    return g_x, g_c, torch.cat(g_w).to(weights.dtype)


# ------------------------------------------------------------------ noisy replicate padding (Eq. 7)
@triton.jit
def _pad_stats(E, base, n, C, cols, mask, BLOCK_C: tl.constexpr):
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, n):
        mean += tl.load(E + base + t * C + cols, mask=mask, other=0.0).to(tl.float32)
    mean = mean / n.to(tl.float32)
    var = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, n):
        d = tl.load(E + base + t * C + cols, mask=mask, other=0.0).to(tl.float32) - mean
        var += d * d
    return mean, tl.sqrt(var / n.to(tl.float32))


@triton.jit
def _pad_fwd_kernel(E, LEN, Z, O, T, C, beta, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    n = tl.load(LEN + b).to(tl.int32)  # prompt length (< 2^31)
    amp = beta * tl.sqrt(((T + n - 1) // n - 1).to(tl.float32))  # beta * sqrt(m - 1)
    base = b * T * C
    mean, sigma = _pad_stats(E, base, n, C, cols, mask, BLOCK_C)
    for t in range(0, T):
        e = tl.load(E + base + (t % n) * C + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(Z + base + t * C + cols, mask=mask, other=0.0).to(tl.float32)
        pad = (t >= n).to(tl.float32)
        tl.store(O + base + t * C + cols, (e + pad * amp * sigma * z).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _pad_bwd_kernel(G, E, LEN, Z, GE, T, C, beta, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    n = tl.load(LEN + b).to(tl.int32)  # prompt length (< 2^31)
    amp = beta * tl.sqrt(((T + n - 1) // n - 1).to(tl.float32))
    base = b * T * C
    mean, sigma = _pad_stats(E, base, n, C, cols, mask, BLOCK_C)
    gz = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(n, T):
        g = tl.load(G + base + t * C + cols, mask=mask, other=0.0).to(tl.float32)
        gz += g * tl.load(Z + base + t * C + cols, mask=mask, other=0.0).to(tl.float32)
    safe = tl.where(sigma > 0, sigma, 1.0)
    coef = tl.where(sigma > 0, amp * gz / (n.to(tl.float32) * safe), 0.0)  # through sigma_ch
    for s in range(0, n):
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t in range(s, T, n):  # every copy of token s
            acc += tl.load(G + base + t * C + cols, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(E + base + s * C + cols, mask=mask, other=0.0).to(tl.float32)
        acc += coef * (e - mean)
        tl.store(GE + base + s * C + cols, acc.to(GE.dtype.element_ty), mask=mask)
    for t in range(n, T):
        tl.store(GE + base + t * C + cols, tl.zeros([BLOCK_C], dtype=tl.float32).to(GE.dtype.element_ty), mask=mask)


def _pad_grid(emb):
    B, T, C = emb.shape
    block = min(256, triton.next_power_of_2(max(C, 1)))
    return (B, triton.cdiv(C, block)), block


def replicate_pad_fwd(emb, lengths, beta, noise):
    out = torch.empty_like(emb)
    grid, block = _pad_grid(emb)
    if emb.numel():
        _pad_fwd_kernel[grid](emb, lengths, noise, out, emb.shape[1], emb.shape[2], beta, BLOCK_C=block)
    return out


def replicate_pad_bwd(grad, emb, lengths, beta, noise):
    gemb = torch.empty_like(emb)
    grid, block = _pad_grid(emb)
    if emb.numel():
        _pad_bwd_kernel[grid](grad, emb, lengths, noise, gemb, emb.shape[1], emb.shape[2], beta, BLOCK_C=block)
    return gemb
