"""Fused ops: eager reference vs torch.compile(reference) vs each live kernel backend, forward and forward+backward.

Shapes (DiT-XL/2 at 256 px, the issue's model shapes): B = 8, N = 256 image tokens, D = 1152, 16 heads
(hd = 72), M = 77 context tokens; text states (8, 77, 768) (CLIP ViT-L/14 width) with prompt lengths 5..39.
float32 on the CPU, bfloat16 on CUDA. Each benchmark stores `GB/s`: the minimal memory traffic of a
perfectly fused implementation (forward: inputs read + outputs written; forward+backward: 3x inputs +
2x outputs) divided by the time. For joint_attention the attention core (SDPA) is compute-bound, so its
GB/s only compares implementations with each other.

Run:   pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-json=ops.json
Table: python benchmarks/test_bench_ops.py ops.json     (speed-up of every implementation over eager)
`test_bench_ratio_interleaved` also times eager and the native kernel alternately, call by call, and stores
the ratio of the minima: the figure to trust on a shared machine.
`CONDIFF_BENCH_COMPILE=0` skips the torch.compile rows (inductor compiles C++ on the CPU: minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

import condiff.ops as ops
from condiff.ops import reference

B, N, D, H, M, T, C = 8, 256, 1152, 16, 77, 77, 768
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
IMPLS = ["eager", "compile"] + [b for b in ("cpu", "cuda", "triton") if ops.backends()[b]["live"]]


def _inputs(op: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, DTYPE)

    if op == "adaln_modulate":
        return [r(B, N, D), r(B, D), r(B, D)]
    if op == "gated_residual":
        return [r(B, N, D), r(B, D), r(B, N, D)]
    if op == "joint_attention":
        return [r(B, N, 3 * D), r(B, M, 3 * D)] + [r(D // H) for _ in range(4)]
    return [r(B, T, C)]


LENGTHS = torch.randint(5, 40, (B,), generator=torch.Generator().manual_seed(1))


def _fn(op: str, impl: str):
    """A callable(*inputs) -> tuple of outputs for this implementation."""
    backend = "reference" if impl in ("eager", "compile") else impl
    if op == "adaln_modulate":
        def f(x, s, c):
            return (ops.adaln_modulate(x, s, c, backend=backend),)
    elif op == "gated_residual":
        def f(x, gate, y):
            return (ops.gated_residual(x, gate, y, backend=backend),)
    elif op == "joint_attention":
        def f(qx, qc, *ws):
            return ops.joint_attention(qx, qc, *ws, num_heads=H, backend=backend)
    else:
        lengths = LENGTHS.to(DEVICE)
        if impl == "compile":  # compile the reference math itself (noise drawn outside, as the op does)
            def f(emb):
                return (reference.noisy_replicate_pad(emb, lengths, 0.1, torch.randn_like(emb)),)
        else:
            def f(emb):
                return (ops.noisy_replicate_pad(emb, lengths, 0.1, backend=backend),)
    return torch.compile(f) if impl == "compile" else f


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _runner(op: str, impl: str, mode: str):
    """-> (run, xs, f): one timed call of `op` by `impl` in `mode` ("fwd" or "fwd+bwd"), its inputs and function."""
    xs = _inputs(op)
    f = _fn(op, impl)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                f(*xs)
            _sync()
        return run, xs, f
    for x in xs:
        x.requires_grad_()
    grads = [torch.randn_like(o) for o in f(*xs)]

    def run_bwd():
        torch.autograd.grad(f(*xs), xs, grads)
        _sync()
    return run_bwd, xs, f


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual", "joint_attention", "noisy_replicate_pad"])
def test_bench_op(benchmark, op, impl, mode):
    if impl == "compile" and os.environ.get("CONDIFF_BENCH_COMPILE", "1") == "0":
        pytest.skip("CONDIFF_BENCH_COMPILE=0")
    torch._dynamo.reset()
    run, xs, f = _runner(op, impl, mode)
    run()  # warm-up (compilation for "compile")
    benchmark.pedantic(run, rounds=8 if op == "joint_attention" else 20, iterations=1, warmup_rounds=1)
    bytes_in = sum(x.numel() * x.element_size() for x in xs)
    with torch.no_grad():
        bytes_out = sum(o.numel() * o.element_size() for o in f(*xs))
    moved = bytes_in + bytes_out if mode == "fwd" else 3 * bytes_in + 2 * bytes_out
    benchmark.extra_info.update(op=op, impl=impl, mode=mode, device=DEVICE, dtype=str(DTYPE),
                                threads=torch.get_num_threads(), gbps=moved / benchmark.stats.stats.min / 1e9)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual", "joint_attention", "noisy_replicate_pad"])
def test_bench_ratio_interleaved(benchmark, op, mode):
    """Kernel backend vs eager, timed alternately call by call (robust to a shared, noisy machine):
    extra_info["speedup"] = min eager time / min kernel time over the same rounds."""
    kernel = "cuda" if DEVICE == "cuda" else "cpu"
    if not ops.backends()[kernel]["live"]:
        pytest.skip(ops.backends()[kernel]["reason"])
    eager, fused = _runner(op, "eager", mode)[0], _runner(op, kernel, mode)[0]
    times = {"eager": [], kernel: []}

    def pair():
        for name, fn in (("eager", eager), (kernel, fused)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    pair()
    benchmark.pedantic(pair, rounds=10 if op == "joint_attention" else 30, iterations=1)
    benchmark.extra_info.update(op=op, impl=f"{kernel}/eager interleaved", mode=mode, device=DEVICE,
                                eager_ms=min(times["eager"]) * 1e3, kernel_ms=min(times[kernel]) * 1e3,
                                speedup=min(times["eager"]) / min(times[kernel]))


def summarize(path: str) -> str:
    """Markdown table of min times, GB/s and speed-up over eager from a --benchmark-json file."""
    rows, ratios = {}, []
    for b in json.load(open(path))["benchmarks"]:
        e = b["extra_info"]
        if "speedup" in e:
            ratios.append(f"| {e['op']} | {e['mode']} | {e['eager_ms']:.2f} | {e['kernel_ms']:.2f} | {e['speedup']:.2f}x |")
            continue
        rows[(e["op"], e["mode"], e["impl"])] = (b["stats"]["min"], e["gbps"])
    impls = sorted({k[2] for k in rows}, key=lambda s: (["eager", "compile", "cpu", "cuda", "triton"].index(s)))
    out = ["| op | pass | " + " | ".join(f"{i} ms (GB/s)" for i in impls) + " | " +
           " | ".join(f"{i} / eager" for i in impls if i != "eager") + " |",
           "|---|---|" + "---|" * (2 * len(impls) - 1)]
    for op, mode in sorted({k[:2] for k in rows}):
        base = rows.get((op, mode, "eager"), (float("nan"),))[0]
        cells = [f"{rows[(op, mode, i)][0] * 1e3:.2f} ({rows[(op, mode, i)][1]:.1f})" if (op, mode, i) in rows else "—"
                 for i in impls]
        speed = [f"{base / rows[(op, mode, i)][0]:.2f}x" if (op, mode, i) in rows else "—" for i in impls if i != "eager"]
        out.append(f"| {op} | {mode} | " + " | ".join(cells) + " | " + " | ".join(speed) + " |")
    if ratios:
        out += ["", "Interleaved (eager and kernel timed alternately, min over the rounds):", "",
                "| op | pass | eager ms | kernel ms | speed-up |", "|---|---|---|---|---|"] + sorted(ratios)
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
