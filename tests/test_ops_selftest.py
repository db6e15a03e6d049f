"""Kernel self-test: a kernel that disagrees with the reference is routed to the reference (warned once)."""

import warnings

import pytest
import torch

from condiff import ops
from condiff.ops import _native, library, reference, selftest

pytestmark = pytest.mark.skipif(not _native.LOADED, reason="native CPU extension not built")


@pytest.fixture(autouse=True)
def fresh_results():
    selftest.reset()
    yield
    selftest.reset()


class _Wrong:
    """The native kernels, except one entry that is off (forward or backward)."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __getattr__(self, attr):
        real = getattr(torch.ops.condiff_native, attr)
        return (lambda *a: self.fn(real(*a))) if attr == self.name else real


def _patch(monkeypatch, name, fn):
    real = library._kernels
    monkeypatch.setattr(library, "_kernels", lambda b: _Wrong(name, fn) if b == "cpu" else real(b))


def _adaln_inputs():
    return torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8)


def test_wrong_forward_kernel_is_routed_to_the_reference_with_one_warning(monkeypatch):
    _patch(monkeypatch, "adaln_fwd", lambda out: out + 1e-2)
    x, s, c = _adaln_inputs()
    with pytest.warns(RuntimeWarning, match=r"the 'cpu' kernel of adaln_modulate failed its self-test on cpu "
                                            r"\(off by 0\.01.*\); adaln_modulate uses the reference"):
        out = ops.adaln_modulate(x, s, c)
    assert torch.equal(out, reference.adaln_modulate(x, s, c, 1e-6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second call is silent
        assert torch.equal(ops.adaln_modulate(x, s, c), reference.adaln_modulate(x, s, c, 1e-6))
        # other ops keep their (correct) kernel; an explicit backend is never rerouted
        g, y = torch.randn(2, 8), torch.randn(2, 5, 8)
        torch.testing.assert_close(ops.gated_residual(x, g, y), reference.gated_residual(x, g, y))
        assert selftest._results[("gated_residual", "cpu", "cpu")] is True
        wrong = ops.adaln_modulate(x, s, c, backend="cpu")
    torch.testing.assert_close(wrong, reference.adaln_modulate(x, s, c, 1e-6) + 1e-2)


def test_wrong_backward_kernel_is_caught(monkeypatch):
    _patch(monkeypatch, "adaln_bwd", lambda grads: (grads[0], grads[1] * 1.5, grads[2]))
    x, s, c = _adaln_inputs()
    with pytest.warns(RuntimeWarning, match="kernel of adaln_modulate failed its self-test"):
        ops.adaln_modulate(x, s, c)
    assert selftest._results == {("adaln_modulate", "cpu", "cpu"): False}


def test_a_kernel_that_raises_is_routed_too(monkeypatch):
    def boom(_):
        raise RuntimeError("no kernel image is available for execution on the device")

    _patch(monkeypatch, "gated_fwd", boom)
    ok, detail = selftest.check("gated_residual", "cpu", "cpu")
    assert not ok and detail == "raised RuntimeError: no kernel image is available for execution on the device"


def test_ops_info_selftest(monkeypatch, capsys):
    from condiff.ops.info import main

    assert main(["--selftest"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok ") == 4 and "joint_attention" in out
    _patch(monkeypatch, "adaln_fwd", lambda out: out * 2)
    assert main(["--selftest"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines if "FAIL" in ln] == ["adaln_modulate"]


def test_ops_info_names_cuda_build_once(monkeypatch, capsys):
    """CUDA kernels compiled in but no device: `condiff ops-info` says so on one line, once."""
    from condiff.ops import _native
    from condiff.ops.info import main

    if not _native.LOADED:
        pytest.skip("native extension not built")
    monkeypatch.setattr(_native, "cuda_compiled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.count("compiled in") == 1 and "CUDA kernels compiled in (nvcc" in out


def test_first_use_inside_activation_checkpointing():
    """The self-test runs on its own thread: when an op's first use is inside torch.utils.checkpoint, the
    checkpoint's saved-tensor hooks do not capture the test's tensors (the recomputation used to fail with
    "a different number of tensors was saved", and the kernel was wrongly routed to the reference)."""
    x, s, c = (t.requires_grad_(True) for t in _adaln_inputs())
    g, y = torch.randn(2, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)

    def block(x, s, c, g, y):
        return ops.gated_residual(ops.adaln_modulate(x, s, c), g, y)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no kernel is reported failed
        out = torch.utils.checkpoint.checkpoint(block, x, s, c, g, y, use_reentrant=False)
        grads = torch.autograd.grad(out.square().sum(), (x, s, c, g, y))
    assert selftest._results == {("adaln_modulate", "cpu", "cpu"): True, ("gated_residual", "cpu", "cpu"): True}
    ref_out = reference.gated_residual(reference.adaln_modulate(x, s, c, 1e-6), g, y)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), (x, s, c, g, y))
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_check_of_an_unknown_op_raises_in_the_caller():
    with pytest.raises(KeyError, match="no_such_op"):
        selftest.check("no_such_op", "cpu", "cpu")
