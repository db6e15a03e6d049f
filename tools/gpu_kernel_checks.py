#!/usr/bin/env python
"""GPU-only checks of the fused-op kernels that the CPU (Triton interpreter, C++ twins) cannot make.

    python tools/gpu_kernel_checks.py GROUP      GROUP: devices | capture | grid | smem | int64

Each group runs in its own process (tools/gpu_check.py starts one per group), so that a kernel fault, which
poisons the CUDA context, costs only its own group; the last line printed is a JSON list of
{"check", "backend", "status": PASS | FAIL | SKIP, "detail"} rows.

    devices  ops on the last visible device while device 0 is current (Triton launches on the current device
             unless guarded); needs 2 GPUs, else SKIP.
    capture  noisy_replicate_pad: no host sync inside the custom op (torch.cuda.set_sync_debug_mode("error")),
             and forward + backward under torch.compile(mode="reduce-overhead") (CUDA-graph capture).
    grid     batch B = 70000 > 65535 (adaLN / gated backward, replicate pad) and N = 4.2M tokens > 65535 chunks
             of 64 rows (adaLN / gated backward), against the float64 reference.
    smem     q/k-norm backward at head_dim 1024 (float32) and 512 (float64), above 48 KB of shared memory per
             block, and the clean rejection of a head_dim beyond the device's opt-in limit.
    int64    replicate pad of one row of 3 x (2^30 + 256) elements: offsets past 2^31 (bf16, ~20 GB).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from condiff import ops  # noqa: E402
from condiff.ops import library, reference  # noqa: E402

SMALL = {  # op -> a small case: (B, N, D) | (B, N, M, H, hd) | (B, T, C)
    "adaln_modulate": (3, 5, 33),
    "gated_residual": (3, 5, 33),
    "qk_norm_join": (2, 5, 3, 3, 8),
    "noisy_replicate_pad": (3, 9, 20),
}
BETA = 0.6


def _kernel_backends() -> list[str]:
    return [b for b in ("cuda", "triton") if ops.backends()[b]["live"]]


def _case(op: str, shape, backend: str, device, dtype):
    """(kernel fn, float64 reference fn, float inputs) of one op case; extra arguments bound in the fns."""
    g = torch.Generator().manual_seed(0)

    def rnd(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(device, dtype)

    if op == "adaln_modulate":
        B, N, D = shape
        return (lambda *a: ops.adaln_modulate(*a, backend=backend), lambda *a: reference.adaln_modulate(*a),
                [rnd(B, N, D, scale=2.0), rnd(B, D, scale=0.5), rnd(B, D, scale=0.5)])
    if op == "gated_residual":
        B, N, D = shape
        return (lambda *a: ops.gated_residual(*a, backend=backend), lambda *a: reference.gated_residual(*a),
                [rnd(B, N, D), rnd(B, D), rnd(B, N, D)])
    if op == "qk_norm_join":
        B, N, M, H, hd = shape
        xs = [rnd(B, N, 3 * H * hd), rnd(B, M, 3 * H * hd)] + [1 + rnd(hd, scale=0.3) for _ in range(4)]
        return (lambda *a: library.qk_norm_join(*a, H, 1e-6, backend), lambda *a: reference.qk_norm_join(*a, H, 1e-6),
                xs)
    B, T, C = shape
    lengths = torch.randint(1, T + 1, (B,), generator=g).to(device)
    noise = rnd(B, T, C)
    return (lambda e: library.noisy_replicate_pad(e, lengths, BETA, noise, backend),
            lambda e: reference.noisy_replicate_pad(e, lengths, BETA, noise.double()), [rnd(B, T, C, scale=1.5)])


def _outs_and_grads(fn, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of fn and the gradients of a fixed random projection of them w.r.t. every input."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device=outs[0].device).manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float64)).sum()
               for o in outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, xs))


def _compare(op: str, shape, backend: str, device, dtype, tol: float) -> str:
    kernel, ref, xs = _case(op, shape, backend, device, dtype)
    got = _outs_and_grads(kernel, xs)
    want = _outs_and_grads(ref, [x.double() for x in xs])
    err = max(((a.double() - b).abs() / (1 + b.abs())).max().item() for a, b in zip(got, want) if b.numel())
    if not err <= tol:
        raise AssertionError(f"max error {err:.2e} > tol {tol:.0e}")
    return f"max error {err:.1e}"


def _run(rows: list[dict], check: str, backend: str, fn) -> None:
    try:
        rows.append({"check": check, "backend": backend, "status": "PASS", "detail": fn()})
    except Exception as exc:  # report and go on with the group's other checks
        rows.append({"check": check, "backend": backend, "status": "FAIL", "detail": f"{type(exc).__name__}: {exc}"[:300]})
    print(rows[-1], flush=True)


# ------------------------------------------------------------------ groups
def devices() -> list[dict]:
    n = torch.cuda.device_count()
    if n < 2:
        return [{"check": "ops on the last device, device 0 current", "backend": "-", "status": "SKIP",
                 "detail": f"{n} visible device(s); needs 2"}]
    rows: list[dict] = []
    last = torch.device("cuda", n - 1)
    for b in _kernel_backends():
        for op, shape in SMALL.items():
            def check(op=op, shape=shape, b=b):
                torch.cuda.set_device(0)
                detail = _compare(op, shape, b, last, torch.float32, 1e-5)
                torch.cuda.synchronize(last)
                assert torch.cuda.current_device() == 0, "the op changed the current device"
                return detail
            _run(rows, f"{op} on {last}, cuda:0 current", b, check)
    return rows


def capture() -> list[dict]:
    from torch._dynamo.utils import counters

    rows: list[dict] = []
    B, T, C = 4, 77, 64
    emb = torch.randn(B, T, C, device="cuda")
    lengths = torch.tensor([1, 5, 40, 77], device="cuda")
    noise = torch.randn_like(emb)
    for b in _kernel_backends():
        def no_sync(b=b):
            library.noisy_replicate_pad(emb, lengths, BETA, noise, b)  # warm-up (Triton compiles here)
            library.noisy_replicate_pad_backward(emb, emb, lengths, BETA, noise, b)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                library.noisy_replicate_pad(emb, lengths, BETA, noise, b)
                library.noisy_replicate_pad_backward(emb, emb, lengths, BETA, noise, b)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            return "no host sync in forward or backward"

        def graphs(b=b):
            torch._dynamo.reset()
            counters.clear()
            w = torch.randn_like(emb)

            def step(e, n):
                out = ops.noisy_replicate_pad(e, n, BETA, backend=b)
                return out, (out * w).sum()

            compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
            for _ in range(3):
                e = emb.clone().requires_grad_()
                out, loss = compiled(e, lengths)
                loss.backward()
                out = out.detach().clone()
            torch.cuda.synchronize()
            skips = counters["inductor"]["cudagraph_skips"]
            assert skips == 0, f"{skips} cudagraph skip(s): {dict(counters['inductor'])}"
            for i, n in enumerate(lengths.tolist()):
                assert torch.equal(out[i, :n], emb[i, :n]), f"row {i}: prompt tokens changed"
                assert torch.equal(e.grad[i, n:], torch.zeros_like(e.grad[i, n:])), f"row {i}: padding got gradient"
            assert out.isfinite().all() and e.grad.isfinite().all()
            return "3 steps fwd+bwd, 0 cudagraph skips"

        _run(rows, "noisy_replicate_pad custom op without host sync", b, no_sync)
        _run(rows, "noisy_replicate_pad under torch.compile(mode='reduce-overhead')", b, graphs)
    return rows


def grid() -> list[dict]:
    rows: list[dict] = []
    for b in _kernel_backends():
        for op, shape in (("adaln_modulate", (70000, 2, 8)), ("gated_residual", (70000, 2, 8)),
                          ("noisy_replicate_pad", (70000, 4, 8)), ("adaln_modulate", (1, 4_200_000, 8)),
                          ("gated_residual", (1, 4_200_000, 8))):
            # (loose tolerance: this checks launch and indexing, which fail by O(1); among 70000 rows some
            # replicate-pad rows have a tiny sigma_ch whose float32 gradient is ill-conditioned)
            _run(rows, f"{op} {shape}", b, lambda op=op, shape=shape, b=b: _compare(op, shape, b, "cuda", torch.float32, 1e-2))
    return rows


def smem() -> list[dict]:
    rows: list[dict] = []
    for b in _kernel_backends():
        for hd, dtype, tol in ((1024, torch.float32, 1e-5), (512, torch.float64, 1e-10)):
            _run(rows, f"qk_norm_join backward head_dim {hd} {dtype}", b,
                 lambda hd=hd, dtype=dtype, tol=tol, b=b: _compare("qk_norm_join", (1, 5, 3, 2, hd), b, "cuda", dtype, tol))
    if "cuda" in _kernel_backends():
        def rejects():
            _, _, xs = _case("qk_norm_join", (1, 2, 1, 1, 16384), "cuda", "cuda", torch.float32)  # 1 MiB of partials
            try:
                _outs_and_grads(lambda *a: library.qk_norm_join(*a, 1, 1e-6, "cuda"), xs)
            except RuntimeError as exc:
                assert "shared memory" in str(exc), exc
                return str(exc).splitlines()[0][:160]
            raise AssertionError("head_dim 16384 was not rejected")
        _run(rows, "qk_norm_join backward head_dim 16384 rejected", "cuda", rejects)
    return rows


def int64() -> list[dict]:
    rows: list[dict] = []
    T, C = 3, 2 ** 30 + 256  # offsets t * C reach 2^31 + 512 at t = 2
    emb = torch.randn(1, T, C, device="cuda", dtype=torch.bfloat16)
    noise = torch.randn_like(emb)
    lengths = torch.tensor([2], device="cuda")
    tail = slice(C - 4096, C)
    e = emb[0, :, tail].double()  # (T, 4096)
    sigma = e[:2].std(0, unbiased=False)
    want = (e[0] + BETA * sigma * noise[0, 2, tail].double()).to(torch.bfloat16)  # m = 2: amp = beta
    for b in _kernel_backends():
        def check(b=b):
            out = library.noisy_replicate_pad(emb, lengths, BETA, noise, b)
            torch.cuda.synchronize()
            assert torch.equal(out[0, :2, tail], emb[0, :2, tail]), "prompt tokens changed"
            got, ref = out[0, 2, tail].double(), want.double()
            err = ((got - ref).abs() / (1 + ref.abs())).max().item()
            assert err <= 1.6e-2, f"last token's padding off by {err:.2e}"  # 2 bf16 ulps
            del out
            return f"row of {T * C} elements; max error {err:.1e} (bf16)"
        _run(rows, f"noisy_replicate_pad (1, {T}, {C}) bf16", b, check)
    return rows


GROUPS = {"devices": devices, "capture": capture, "grid": grid, "smem": smem, "int64": int64}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in GROUPS:
        raise SystemExit(f"usage: gpu_kernel_checks.py {{{' | '.join(GROUPS)}}}")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernel_checks: no CUDA device visible")
    print(json.dumps(GROUPS[sys.argv[1]]()))
