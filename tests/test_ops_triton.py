"""Triton kernels on the CPU: Triton's interpreter (TRITON_INTERPRET=1) runs them on CPU tensors.

Triton decides at `@triton.jit` decoration time whether to interpret (it reads TRITON_INTERPRET then),
so the kernels are imported and checked in one fresh subprocess with the variable set (`interpreter_checks`,
whose results the tests below assert), on small float32 / float64 shapes (the interpreter is slow and its
half-precision math is not faithful). On a GPU the same parity checks run directly in
tests/test_ops.py::test_gpu_kernels_match_reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_ops

# float64 parity on the first case of each op (the interpreter runs ~0.5 ms per program)
SHAPES_F64 = {op: cases[:1] for op, cases in test_ops.SHAPES.items()}


def _errors(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs() / (1 + want.double().abs())).max().item()


def _eps0_odd_heads() -> dict:
    """RMSNorm-QK backward with eps = 0 and H = 24 heads (not a power of two: the kernel pads to 32)."""
    torch.manual_seed(1)
    B, N, M, H, hd = 1, 3, 2, 24, 4
    out = {}
    for dtype in (torch.float32, torch.float64):
        base = [torch.randn(B, N, 3 * H * hd), torch.randn(B, M, 3 * H * hd)] + [1 + 0.3 * torch.randn(hd) for _ in range(4)]
        grads = {}
        for backend in ("triton", "reference"):
            xs = [t.to(dtype).requires_grad_() for t in base]
            q, k, v = test_ops.library.qk_norm_join(*xs, H, 0.0, backend) if backend == "triton" else \
                test_ops.reference.qk_norm_join(*xs, H, 0.0)
            (q.sum() + (2 * k).sum() + v.sum()).backward()
            grads[backend] = [x.grad for x in xs]
        out[str(dtype)] = {
            "finite": all(bool(g.isfinite().all()) for g in grads["triton"]),
            "err": max(_errors(a, b) for a, b in zip(grads["triton"], grads["reference"])),
        }
    return out


def _zero_width() -> dict:
    """D = 0 (adaLN, gated residual) and head_dim = 0 (RMSNorm-QK join), forward and backward."""
    from condiff.ops import library

    out = {}
    cases = {
        "adaln_modulate": lambda x, s: library.adaln_modulate(x, s, s, 1e-6, "triton"),
        "gated_residual": lambda x, s: library.gated_residual(x, s, x, "triton"),
    }
    for name, fn in cases.items():
        x, s = torch.randn(2, 3, 0, requires_grad=True), torch.randn(2, 0, requires_grad=True)
        try:
            y = fn(x, s)
            y.sum().backward()
            out[name] = [list(y.shape), list(x.grad.shape), list(s.grad.shape)]
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"[:300]
    qx, qc = torch.randn(2, 3, 0, requires_grad=True), torch.randn(2, 1, 0, requires_grad=True)
    ws = [torch.randn(0, requires_grad=True) for _ in range(4)]
    try:
        q, k, v = library.qk_norm_join(qx, qc, *ws, 2, 1e-6, "triton")
        (q.sum() + k.sum() + v.sum()).backward()
        out["qk_norm_join"] = [list(q.shape), list(qx.grad.shape), list(ws[0].grad.shape)]
    except Exception as exc:
        out["qk_norm_join"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def _bad_lengths_stay_in_row() -> dict:
    """The custom op called directly (as under torch.compile, where the host check is skipped) with lengths
    outside [1, T]: the kernels clamp on the device instead of reading outside the row."""
    from condiff.ops import library

    emb, noise = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    got = library.noisy_replicate_pad(emb, torch.tensor([0, 9, 2]), 0.5, noise, "triton")
    want = library.noisy_replicate_pad(emb, torch.tensor([1, 5, 2]), 0.5, noise, "triton")
    return {"equal_to_clamped": bool(torch.equal(got, want))}


def interpreter_checks() -> dict:
    """Runs inside the TRITON_INTERPRET=1 subprocess; returns JSON-able results."""
    assert test_ops.ops.backends()["triton"]["live"], test_ops.ops.backends()["triton"]
    torch.manual_seed(0)
    checks = {
        "float32": lambda: test_ops.parity_errors("triton", torch.float32),
        "float64": lambda: test_ops.parity_errors("triton", torch.float64, shapes=SHAPES_F64),
        "eps0_odd_heads": _eps0_odd_heads,
        "zero_width": _zero_width,
        "bad_lengths": _bad_lengths_stay_in_row,
    }
    out = {}
    for name, check in checks.items():  # one failing check must not hide the others' results
        try:
            out[name] = check()
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return out


@pytest.fixture(scope="module")
def interp() -> dict:
    package_root = Path(test_ops.ops.__file__).parents[2]  # the condiff under test (source tree or installed)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(package_root), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    script = "import json, test_ops_triton as t; print(json.dumps(t.interpreter_checks()))"
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_triton_kernels_match_reference_in_interpreter(interp):
    rows = interp["float32"]
    assert isinstance(rows, list), rows
    assert {r["op"] for r in rows} == set(test_ops.SHAPES)
    assert len(rows) > 40
    bad = [r for r in rows if not r["err"] <= test_ops.TOL[torch.float32]]
    assert not bad, bad


def test_triton_float64_accumulates_in_float64(interp):
    """float64 inputs: forward and gradients within 1e-10 of the float64 reference (float32 accumulation
    would be off by ~1e-7), the replicate-pad noise amplitude beta included."""
    rows = interp["float64"]
    assert isinstance(rows, list), rows
    assert {r["op"] for r in rows} == set(test_ops.SHAPES) and len(rows) >= 15
    bad = [r for r in rows if not r["err"] <= test_ops.TOL[torch.float64]]
    assert not bad, bad


def test_triton_rmsnorm_backward_eps0_non_power_of_two_heads(interp):
    assert "error" not in interp["eps0_odd_heads"], interp["eps0_odd_heads"]
    for dtype, r in interp["eps0_odd_heads"].items():
        assert r["finite"], (dtype, r)
        assert r["err"] <= (1e-10 if dtype == str(torch.float64) else 1e-5), (dtype, r)


def test_triton_zero_width_rows(interp):
    z = interp["zero_width"]
    assert z["adaln_modulate"] == [[2, 3, 0], [2, 3, 0], [2, 0]], z
    assert z["gated_residual"] == [[2, 3, 0], [2, 3, 0], [2, 0]], z
    assert z["qk_norm_join"] == [[2, 2, 4, 0], [2, 3, 0], [0]], z


def test_triton_pad_clamps_bad_lengths_on_device(interp):
    assert interp["bad_lengths"]["equal_to_clamped"], interp["bad_lengths"]
