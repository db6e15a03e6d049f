import pytest

from condiff.flops import measure
from throughput import train_step_throughput  # tools/throughput.py, beside this test


def test_train_step_throughput_accounts_three_forwards_per_step():
    r = train_step_throughput("dit-tiny", resolution=64, batch=2, device="cpu", precision="fp32", steps=1, warmup=1)
    _, fwd = measure("dit-tiny", "class", resolutions=(64,))
    assert r["model_tflops_per_step"] == pytest.approx(3 * 2 * fwd[64] / 1e12)
    assert r["achieved_tflops"] == pytest.approx(r["model_tflops_per_step"] * 1e3 / r["step_ms"])
    assert r["img_per_s"] == pytest.approx(2 * 1e3 / r["step_ms"])
    assert r["peak_tflops"] is None and r["mfu"] is None  # no known peak for a CPU


def test_bad_precision_is_named():
    with pytest.raises(ValueError, match="precision"):
        train_step_throughput("dit-tiny", device="cpu", precision="fp8")
