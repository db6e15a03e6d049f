"""condiff.ops: every live backend against the pure-PyTorch reference (forward and gradients), gradcheck of
the reference, the noisy-replicate-padding semantics, torch.compile tracing, dispatch and errors.

Parity is measured against the reference evaluated in float64 on the same (rounded) inputs. Tolerances
(atol = rtol, on values of order 1) per dtype of the backend under test:
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import condiff.ops as ops
from condiff.ops import _native, library, reference

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Shapes per op, odd sizes included (D = 1, N = 0 or 1 rows, heads of width 5, M = 0 context tokens).
SHAPES = {
    "adaln_modulate": [(2, 7, 33), (3, 1, 64), (1, 70, 5), (2, 3, 1), (2, 0, 8)],
    "gated_residual": [(2, 7, 33), (1, 70, 5), (3, 1, 128)],
    "joint_attention": [(2, 9, 5, 4, 8), (1, 7, 0, 3, 5), (3, 1, 2, 2, 16), (1, 70, 3, 1, 7), (2, 0, 3, 2, 4)],  # B, N, M, H, hd
    "noisy_replicate_pad": [(3, 11, 20, (1, 4, 11)), (2, 77, 9, (5, 30)), (1, 2, 300, (1,))],  # B, T, C, lengths
}
BETA = 0.6
SEED = 1234


def make_inputs(op: str, shape) -> list[torch.Tensor]:
    """float32 inputs of order 1 for one case of `op` (cast to the dtype under test by the caller)."""
    if op == "adaln_modulate":
        B, N, D = shape
        return [torch.randn(B, N, D) * 2 + 0.5, 0.5 * torch.randn(B, D), 0.5 * torch.randn(B, D)]
    if op == "gated_residual":
        B, N, D = shape
        return [torch.randn(B, N, D), torch.randn(B, D), torch.randn(B, N, D)]
    if op == "joint_attention":
        B, N, M, H, hd = shape
        D3 = 3 * H * hd
        return [torch.randn(B, N, D3), torch.randn(B, M, D3)] + [1 + 0.3 * torch.randn(hd) for _ in range(4)]
    B, T, C, _ = shape
    return [torch.randn(B, T, C) * 1.5]


def run_op(op: str, shape, inputs: list[torch.Tensor], backend: str | None) -> tuple[torch.Tensor, ...]:
    """Calls the public op; for the reference in float64 the noise is the one the public op draws."""
    if op == "adaln_modulate":
        return (ops.adaln_modulate(*inputs, backend=backend),)
    if op == "gated_residual":
        return (ops.gated_residual(*inputs, backend=backend),)
    if op == "joint_attention":
        return ops.joint_attention(*inputs, num_heads=shape[3], backend=backend)
    lengths = torch.tensor(shape[3])
    return (ops.noisy_replicate_pad(inputs[0], lengths, BETA, torch.Generator().manual_seed(SEED), backend=backend),)


def reference_f64(op: str, shape, inputs: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    if op != "noisy_replicate_pad":
        return run_op(op, shape, inputs, "reference")
    # the same eps the public op draws for `dtype`, upcast
    noise = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(SEED), dtype=dtype).double()
    return (reference.noisy_replicate_pad(inputs[0], torch.tensor(shape[3]), BETA, noise),)


def parity_errors(backend: str, dtype: torch.dtype, device: str = "cpu", shapes: dict | None = None) -> list[dict]:
    """Max |backend - reference_f64| / (1 + |reference|) for every op, case (of `shapes`, default SHAPES),
    output and gradient."""
    rows = []
    for op, cases in (SHAPES if shapes is None else shapes).items():
        for shape in cases:
            base = make_inputs(op, shape)
            xs = [t.to(device=device, dtype=dtype).requires_grad_() for t in base]
            refs = [t.detach().to(dtype).double().requires_grad_() for t in base]
            out = run_op(op, shape, xs, backend)
            ref = reference_f64(op, shape, refs, dtype)
            grads = [torch.randn(r.shape, dtype=torch.float64) for r in ref]
            sum((o.double() * g.to(device)).sum() for o, g in zip(out, grads)).backward()
            sum((r * g).sum() for r, g in zip(ref, grads)).backward()
            pairs = [(f"out{i}", o, r) for i, (o, r) in enumerate(zip(out, ref))]
            pairs += [(f"grad{i}", x.grad, r.grad) for i, (x, r) in enumerate(zip(xs, refs))]
            for name, got, want in pairs:
                assert got is not None and got.dtype == dtype and tuple(got.shape) == tuple(want.shape), (op, name)
                err = ((got.detach().cpu().double() - want.detach()).abs() / (1 + want.detach().abs())).max().item() \
                    if want.numel() else 0.0
                rows.append({"op": op, "shape": str(shape), "what": name, "err": err})
    return rows


def assert_parity(backend: str, dtype: torch.dtype, device: str = "cpu") -> None:
    rows = parity_errors(backend, dtype, device)
    bad = [r for r in rows if not r["err"] <= TOL[dtype]]
    assert not bad, f"{backend} {dtype} exceeds tol {TOL[dtype]}: {bad}"


# ------------------------------------------------------------------ parity of the kernel backends
needs_native = pytest.mark.skipif(not _native.LOADED, reason=f"native extension not loaded: {_native.REASON}")


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernels_match_reference(dtype):
    assert_parity("cpu", dtype)


@needs_native
def test_cpu_kernels_float64_exact():
    assert_parity("cpu", torch.float64)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_kernels_match_reference(backend, dtype):
    if not ops.backends()[backend]["live"]:
        pytest.skip(ops.backends()[backend]["reason"])
    assert_parity(backend, dtype, device="cuda")


def test_reference_in_low_precision_matches_float64():
    """The spec itself in bf16/fp16 stays within the same tolerances (so the tolerances are meaningful)."""
    for dtype in (torch.bfloat16, torch.float16):
        assert_parity("reference", dtype)


# ------------------------------------------------------------------ gradcheck (float64)
def _gradcheck_all(backend: str, fast: bool) -> None:
    kw = dict(dtype=torch.float64, requires_grad=True)
    check = dict(fast_mode=fast)
    x, shift, scale = torch.randn(2, 3, 5, **kw), torch.randn(2, 5, **kw), torch.randn(2, 5, **kw)
    assert torch.autograd.gradcheck(lambda *a: ops.adaln_modulate(*a, backend=backend), (x, shift, scale), **check)
    gate, y = torch.randn(2, 5, **kw), torch.randn(2, 3, 5, **kw)
    assert torch.autograd.gradcheck(lambda *a: ops.gated_residual(*a, backend=backend), (x, gate, y), **check)
    qx, qc = torch.randn(2, 3, 3 * 2 * 3, **kw), torch.randn(2, 2, 18, **kw)
    ws = [torch.randn(3, **kw) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *a: ops.joint_attention(*a, num_heads=2, backend=backend), (qx, qc, *ws),
                                    **check)
    emb = torch.randn(3, 7, 4, **kw)

    def pad(e):
        return ops.noisy_replicate_pad(e, [2, 3, 7], 0.7, torch.Generator().manual_seed(0), backend=backend)

    assert torch.autograd.gradcheck(pad, (emb,), **check)


def test_reference_gradcheck_float64():
    _gradcheck_all("reference", fast=False)


@needs_native
def test_cpu_kernels_gradcheck_float64():
    _gradcheck_all("cpu", fast=True)  # (fast mode: random projections of the Jacobian; full mode is 10x slower)


# ------------------------------------------------------------------ the reference is the paper's math
def test_reference_adaln_and_gated_formulas():
    x, shift, scale = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 8).double(), torch.randn(2, 8).double()
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(reference.adaln_modulate(x, shift, scale), want)
    y = torch.randn_like(x)
    torch.testing.assert_close(reference.gated_residual(x, scale, y), x + scale[:, None] * y)


def test_reference_joint_attention_is_joint_softmax_attention():
    B, N, M, H, hd = 2, 5, 3, 2, 4
    qx, qc = torch.randn(B, N, 3 * H * hd).double(), torch.randn(B, M, 3 * H * hd).double()
    ws = [torch.rand(hd).double() + 0.5 for _ in range(4)]
    out_x, out_c = reference.joint_attention(qx, qc, *ws, num_heads=H)

    def heads(t, part, w=None):  # (B, S, 3D) -> (B, H, S, hd), optionally RMS-normalised
        h = t[..., part * H * hd:(part + 1) * H * hd].reshape(t.shape[0], t.shape[1], H, hd).transpose(1, 2)
        return h if w is None else h / torch.sqrt((h ** 2).mean(-1, keepdim=True) + 1e-6) * w

    q = torch.cat([heads(qx, 0, ws[0]), heads(qc, 0, ws[2])], 2)
    k = torch.cat([heads(qx, 1, ws[1]), heads(qc, 1, ws[3])], 2)
    v = torch.cat([heads(qx, 2), heads(qc, 2)], 2)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v  # (B, H, L, hd)
    o = att.transpose(1, 2).reshape(B, N + M, H * hd)
    torch.testing.assert_close(out_x, o[:, :N])
    torch.testing.assert_close(out_c, o[:, N:])


# ------------------------------------------------------------------ noisy replicate padding semantics
PAD_BACKENDS = ["reference"] + (["cpu"] if _native.LOADED else [])


@pytest.mark.parametrize("backend", PAD_BACKENDS)
def test_noisy_pad_semantics(backend):
    emb = torch.randn(3, 10, 6)
    lengths = torch.tensor([3, 10, 1])
    plain = ops.noisy_replicate_pad(emb, lengths, 0.0, backend=backend)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(plain[b], emb[b, torch.arange(10) % n])  # beta = 0: plain replicate padding
    noisy = ops.noisy_replicate_pad(emb, lengths, 0.5, torch.Generator().manual_seed(0), backend=backend)
    assert torch.equal(noisy[1], emb[1])  # full-length row unchanged
    assert torch.equal(noisy[0, :3], emb[0, :3])  # prompt tokens untouched
    assert not torch.allclose(noisy[0, 3:], plain[0, 3:])  # padding positions perturbed
    assert torch.equal(noisy[2], plain[2])  # 1-token prompt: sigma_ch = 0, so no noise
    again = ops.noisy_replicate_pad(emb, lengths, 0.5, torch.Generator().manual_seed(0), backend=backend)
    assert torch.equal(noisy, again)  # the generator makes it reproducible


@pytest.mark.parametrize("backend", PAD_BACKENDS)
def test_noisy_pad_noise_scale_follows_eq7(backend):
    """(out - copy) / (beta * sqrt(m - 1) * sigma_ch) is standard normal at every padding position."""
    T, C, n, beta = 40, 2048, 4, 0.3  # m = 10
    emb = torch.randn(1, T, C) * torch.linspace(0.5, 3, C)
    out = ops.noisy_replicate_pad(emb, [n], beta, torch.Generator().manual_seed(1), backend=backend)
    sigma = emb[0, :n].std(0, unbiased=False)
    z = (out[0, n:] - emb[0, torch.arange(n, T) % n]) / (beta * math.sqrt(10 - 1) * sigma)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def test_replication_counts():
    assert reference.replication_counts(torch.tensor([1, 10, 76, 77, 39]), 77).tolist() == [77, 8, 2, 1, 2]


@pytest.mark.parametrize("backend", PAD_BACKENDS)
def test_noisy_pad_rejects_bad_lengths(backend):
    emb = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 0"):
        ops.noisy_replicate_pad(emb, [3, 0], 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 6"):
        ops.noisy_replicate_pad(emb, [6, 2], 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"lengths must be \(B,\)"):
        ops.noisy_replicate_pad(emb, [3], 0.1, backend=backend)


@needs_native
def test_noisy_pad_under_compile_leaves_the_length_check_to_the_kernel():
    """Under torch.compile the public op skips its host-side check (a device sync, and no CUDA-graph capture,
    on GPUs); the custom op does not look at lengths on the host either, and the kernel rejects bad ones."""
    torch._dynamo.reset()
    pad = torch.compile(lambda e, n: ops.noisy_replicate_pad(e, n, 0.5, backend="cpu"), fullgraph=True,
                        backend="aot_eager")
    emb = torch.randn(2, 5, 3)
    assert pad(emb, torch.tensor([2, 5])).shape == (2, 5, 3)
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 6 must be in \[1, T=5\]"):
        pad(emb, torch.tensor([2, 6]))


# ------------------------------------------------------------------ torch.library / torch.compile
def _model_step(x, shift, scale, gate, qkv_c, ws, emb, backend):
    h = ops.adaln_modulate(x, shift, scale, backend=backend)  # (B, N, 24)
    qkv_x = torch.cat([h, h, h], -1)  # (B, N, 72) stand-in for the qkv projection
    out_x, out_c = ops.joint_attention(qkv_x, qkv_c, *ws, num_heads=3, backend=backend)
    y = ops.gated_residual(x, gate, out_x, backend=backend)
    pad = ops.noisy_replicate_pad(emb, torch.tensor([2, 5]), 0.5, backend=backend)
    return y.sum() + out_c.square().sum() + pad.sum()


@pytest.mark.parametrize("backend", [None, "reference"])
def test_torch_compile_traces_without_graph_breaks(backend):
    torch._dynamo.reset()
    args = [torch.randn(2, 6, 24), torch.randn(2, 24), torch.randn(2, 24), torch.randn(2, 24), torch.randn(2, 3, 72),
            [torch.randn(8) for _ in range(4)], torch.randn(2, 5, 4)]
    for t in args[:5] + args[6:]:
        t.requires_grad_()
    explain = torch._dynamo.explain(_model_step)(*args, backend)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    compiled = torch.compile(_model_step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    loss = compiled(*args, backend)
    (g_c,) = torch.autograd.grad(loss, [args[0]])
    torch.manual_seed(3)
    loss_e = _model_step(*args, backend)
    (g_e,) = torch.autograd.grad(loss_e, [args[0]])
    torch.testing.assert_close(loss, loss_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-4)


@needs_native
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels and autograd registration of every custom op (torch.library.opcheck)."""
    x, s, c = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True), torch.randn(2, 8)
    torch.library.opcheck(library.adaln_modulate, (x, s, c, 1e-6, "cpu"))
    torch.library.opcheck(library.gated_residual, (x, s, torch.randn(2, 5, 8, requires_grad=True), "cpu"))
    qx, qc = torch.randn(2, 4, 24, requires_grad=True), torch.randn(2, 3, 24, requires_grad=True)
    ws = [torch.randn(4, requires_grad=True) for _ in range(4)]
    torch.library.opcheck(library.qk_norm_join, (qx, qc, *ws, 2, 1e-6, "cpu"))
    emb = torch.randn(2, 6, 5, requires_grad=True)
    torch.library.opcheck(library.noisy_replicate_pad, (emb, torch.tensor([2, 6]), 0.4, torch.randn(2, 6, 5), "cpu"))


# ------------------------------------------------------------------ dispatch, errors, backends()
def test_automatic_backend_choice():
    x = torch.empty(1, 1, 4)
    assert ops._select(None, x) == ("cpu" if _native.LOADED else "reference")
    assert ops._select("reference", x) == "reference"


def test_backend_errors_name_the_problem():
    x, s = torch.randn(2, 3, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.adaln_modulate(x, s, s, backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
            ops.adaln_modulate(x, s, s, backend="cuda")
    with pytest.raises(ValueError, match=r"shift must be \(B, D\) = \(2, 4\)"):
        ops.adaln_modulate(x, s[:1], s)
    with pytest.raises(ValueError, match=r"gate must be \(B, D\)"):
        ops.gated_residual(x, s[:, :3], x)
    with pytest.raises(ValueError, match="3 \\* num_heads\\(5\\)"):
        ops.joint_attention(torch.randn(1, 2, 24), torch.randn(1, 0, 24), *[torch.ones(4)] * 4, num_heads=5)
    with pytest.raises(ValueError, match=r"k_norm_c must be \(head_dim,\) = \(4,\)"):
        ops.joint_attention(torch.randn(1, 2, 24), torch.randn(1, 0, 24), *[torch.ones(4)] * 3, torch.ones(3), num_heads=2)


def test_mixed_dtypes_follow_the_activation():
    x = torch.randn(2, 3, 8)
    shift, scale = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16)
    out = ops.adaln_modulate(x, shift, scale)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.adaln_modulate(x, shift.float(), scale.float()))


def test_backends_report():
    state = ops.backends()
    assert set(state) == {"reference", "cpu", "cuda", "triton"}
    assert state["reference"]["live"] and all(s["reason"] for s in state.values())
    assert state["cpu"]["live"] == _native.LOADED
    if os.environ.get("CONDIFF_EXPECT_CUDA") == "1":  # set by .ci/run where nvcc exists: the .cu files compiled
        assert state["cuda"]["compiled"], state["cuda"]
        assert _native.BUILD_INFO.get("cuda") == "1"


def test_ops_info_cli_without_native_module():
    env = dict(os.environ, CONDIFF_NATIVE="0", PYTHONPATH=str(Path(ops.__file__).parents[2]))
    res = subprocess.run([sys.executable, "-m", "condiff", "ops-info"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "disabled by CONDIFF_NATIVE=0" in res.stdout
    assert "automatic choice for cpu tensors: reference" in res.stdout


# ------------------------------------------------------------------ kernel-level input checks (the registered ops)
def _bad_kernel_calls():
    """(call, expected message) pairs of the backward kernels with inputs the public ops never build."""
    nat = torch.ops.condiff_native
    B, N, D = 2, 3, 4
    x, g, s = torch.randn(B, N, D), torch.randn(B, N, D), torch.randn(B, D)
    H, hd, M = 2, 3, 1
    qx, qc = torch.randn(B, N, 3 * H * hd), torch.randn(B, M, 3 * H * hd)
    w, gq = torch.randn(4, hd), torch.randn(B, H, N + M, hd)
    emb, lengths = torch.randn(B, 5, 3), torch.tensor([2, 5])
    return [
        (lambda: nat.adaln_bwd(g, x, torch.randn(B, D + 1), 1e-6), r"scale must be \(B, D\) = \(2, 4\)"),
        (lambda: nat.adaln_bwd(g, x, s.double(), 1e-6), "x and scale must have the same dtype"),
        (lambda: nat.adaln_bwd(torch.randn(B, N + 1, D), x, s, 1e-6), "grad_out must have x's shape"),
        (lambda: nat.gated_bwd(g, torch.randn(B - 1, D), x), r"gate must be \(B, D\) = \(2, 4\)"),
        (lambda: nat.gated_bwd(g, s.double(), x), "y and gate must have the same dtype"),
        (lambda: nat.gated_bwd(torch.randn(B, N, D + 1), s, x), "grad_out must have y's shape"),
        (lambda: nat.qknorm_join_bwd(gq, gq[:, :, :-1].contiguous(), gq, qx, qc, w, H, 1e-6), "grad_k must be"),
        (lambda: nat.qknorm_join_bwd(gq, gq, gq[..., :-1].contiguous(), qx, qc, w, H, 1e-6), "grad_v must be"),
        (lambda: nat.qknorm_join_bwd(gq, gq.double(), gq, qx, qc, w, H, 1e-6), "qkv_x and grad_k must have the same dtype"),
        (lambda: nat.replicate_pad_bwd(emb[:, :4].contiguous(), emb, lengths, 0.5, emb), "grad_out must have emb's shape"),
        (lambda: nat.replicate_pad_bwd(emb, emb, torch.tensor([0, 5]), 0.5, emb), r"lengths\[0\] = 0 must be in \[1, T=5\]"),
        (lambda: nat.replicate_pad_bwd(emb, emb, torch.tensor([2, 6]), 0.5, emb), r"lengths\[1\] = 6 must be in \[1, T=5\]"),
        (lambda: nat.replicate_pad_fwd(emb, torch.tensor([6, 2]), 0.5, emb), r"lengths\[0\] = 6 must be in \[1, T=5\]"),
    ]


@needs_native
@pytest.mark.parametrize("call,msg", _bad_kernel_calls(), ids=[m for _, m in _bad_kernel_calls()])
def test_native_kernels_reject_bad_inputs(call, msg):
    """The registered CPU kernels check every input themselves (torch.compile and direct callers skip the
    public ops' checks): backward scale / gate / grad shapes and dtypes, and 1 <= length <= T in backward."""
    with pytest.raises(RuntimeError, match=msg):
        call()
