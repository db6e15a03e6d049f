"""Self-test of the fused-op kernels against the reference, on the device they are about to run on.

CI has no GPU, so the CUDA and GPU-Triton kernels are first executed on a user's machine. Before an
automatically chosen kernel backend (`backend=None`: "cpu", "cuda" or "triton") runs an op for the first
time on a device in this process, `passed(op, backend, device)` runs that op once on tiny float32
inputs with the kernel and with the reference (`reference.py`), forward and backward (gradients of
every floating input), and compares them (`RTOL`, `ATOL`). On a mismatch or an exception it warns once,
naming the op, the backend and the largest error, and the op is routed to the reference from then on
in this process. The CPU backend is checked the same way (a few milliseconds per op, once per process)
so that one rule covers every kernel. An explicitly requested backend (`backend="cuda"`) is never
rerouted. Under `torch.compile` tracing no test can run: an op not yet checked in eager mode uses its
kernel unchecked.

The test runs on a thread of its own. Autograd's saved-tensor hooks, grad mode and dispatch modes are
thread-local, so the test neither sees nor disturbs the caller's: the first use of an op often happens
inside `torch.utils.checkpoint` (activation checkpointing), whose hooks would otherwise capture the
test's saved tensors and fail the recomputation ("a different number of tensors was saved").

`condiff ops-info --selftest` runs every op on every live kernel backend on demand (`run_all`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

RTOL = ATOL = 1e-4  # float32 kernels accumulate in float32 like the reference: ~1e-6 apart on these sizes

_results: dict[tuple[str, str, str], bool] = {}


def _cases(device: torch.device) -> dict[str, tuple[Callable[..., tuple[Tensor, ...]], list[Tensor]]]:
    """op -> (fn(backend, *inputs) -> outputs, inputs): tiny float32 inputs from a fixed seed."""
    from condiff import ops

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    B, N, M, H, hd = 2, 3, 2, 2, 4
    D = H * hd
    lengths = torch.tensor([2, 5], device=device)
    return {
        "adaln_modulate": (lambda b, x, s, c: (ops.adaln_modulate(x, s, c, backend=b),),
                           [rand(B, N, D), rand(B, D), rand(B, D)]),
        "gated_residual": (lambda b, x, g, y: (ops.gated_residual(x, g, y, backend=b),),
                           [rand(B, N, D), rand(B, D), rand(B, N, D)]),
        "joint_attention": (lambda b, qx, qc, a, k, e, f: ops.joint_attention(qx, qc, a, k, e, f, H, backend=b),
                            [rand(B, N, 3 * D), rand(B, M, 3 * D)] + [1 + 0.1 * rand(hd) for _ in range(4)]),
        "noisy_replicate_pad": (lambda b, emb: (ops.noisy_replicate_pad(
                                    emb, lengths, 0.5, torch.Generator(device=device).manual_seed(1), backend=b),),
                                [rand(B, 5, 4)]),
    }


def _run(fn, inputs: list[Tensor], backend: str, grads_out: list[Tensor] | None) -> tuple[list[Tensor], list[Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.inference_mode(False), torch.enable_grad():
        outs = list(fn(backend, *leaves))
        if grads_out is None:
            gen = torch.Generator().manual_seed(2)
            grads_out = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
        loss = sum((o.float() * g).sum() for o, g in zip(outs, grads_out))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return [o.detach() for o in outs] + [g.detach() for g in grads], grads_out


def _compare(op: str, backend: str, device: torch.device) -> tuple[bool, str]:
    fn, inputs = _cases(device)[op]
    try:
        want, grads_out = _run(fn, inputs, "reference", None)
        got, _ = _run(fn, inputs, backend, grads_out)
    except Exception as exc:  # a kernel that cannot run is as unusable as a wrong one
        return False, f"raised {type(exc).__name__}: {exc}"
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return False, f"shape {tuple(a.shape)} instead of {tuple(b.shape)}"
        err = (a.float() - b.float()).abs()
        if not torch.isfinite(err).all():
            return False, "non-finite output or gradient"
        worst = max(worst, float((err - RTOL * b.float().abs()).max()))
    ok = worst <= ATOL
    return ok, f"forward+backward within {ATOL:g} + {RTOL:g}*|ref|" if ok else f"off by {worst + ATOL:.3g} (tolerance {ATOL:g} + {RTOL:g}*|ref|)"


def check(op: str, backend: str, device: torch.device | str) -> tuple[bool, str]:
    """Run `op` with `backend` and with the reference on `device`; (ok, one-line detail). Runs on a fresh
    thread (clean autograd state, see the module docstring) and waits for it."""
    device = torch.device(device)
    result: list = []

    def target() -> None:
        try:
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # the current device is per thread too
            result.append(_compare(op, backend, device))
        except BaseException as exc:  # not a kernel failure (e.g. an unknown op): raised in the caller
            result.append(exc)

    thread = threading.Thread(target=target, name=f"condiff-selftest-{op}")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def passed(op: str, backend: str, device: torch.device) -> bool:
    """Whether `op` may use `backend` on `device` (tested once per process; warns once on failure)."""
    key = (op, backend, str(device))
    if key not in _results:
        if torch.compiler.is_compiling():
            return True
        ok, detail = check(op, backend, device)
        _results[key] = ok
        if not ok:
            warnings.warn(f"condiff.ops: the {backend!r} kernel of {op} failed its self-test on {device} ({detail}); "
                          f"{op} uses the reference implementation in this process instead", RuntimeWarning,
                          stacklevel=3)
    return _results[key]


def reset() -> None:
    """Forget every self-test result (the next automatic use of each op tests again)."""
    _results.clear()


def run_all() -> list[tuple[str, str, str, bool, str]]:
    """Every op on every live kernel backend and its device: (op, backend, device, ok, detail) rows."""
    from condiff import ops

    state = ops.backends()
    targets = []
    if state["cpu"]["live"]:
        targets.append(("cpu", torch.device("cpu")))
    if state["cuda"]["live"]:
        targets.append(("cuda", torch.device("cuda")))
    if state["triton"]["live"]:
        targets.append(("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    rows = []
    for backend, device in targets:
        for op in _cases(device):
            ok, detail = check(op, backend, device)
            rows.append((op, backend, str(device), ok, detail))
    return rows
