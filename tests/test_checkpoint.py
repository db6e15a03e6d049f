"""Checkpoint format, atomicity (interrupted and killed saves) and safe loading."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from condiff.io import checkpoint as ck

REPO = Path(__file__).resolve().parents[1]


def _state(seed: int, n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(8, 8, generator=g) for i in range(n)}


def _save(run, step, seed=0, **kw):
    return ck.save_checkpoint(
        run, step, model_state=_state(seed), ema_state=_state(seed + 100),
        meta={"model": {"name": "x"}, "schedule": {}, "data_position": [step * 4]},
        optim_state={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]},
        rng_state=[{"torch": torch.get_rng_state(), "python": [1, 2, 3]}], **kw)


def test_roundtrip_and_latest(tmp_path):
    d1 = _save(tmp_path, 10, seed=1)
    d2 = _save(tmp_path, 20, seed=2)
    assert d2.name == "step_00000020"
    assert (tmp_path / "latest").read_text().strip() == "step_00000020"
    assert ck.latest_checkpoint(tmp_path) == d2
    assert ck.list_checkpoints(tmp_path) == [d1, d2]
    meta = ck.read_meta(d2)
    assert meta.step == 20 and meta.data_position == [80] and meta.format == ck.FORMAT_VERSION
    for name, t in ck.load_weights(d2, "model").items():
        torch.testing.assert_close(t, _state(2)[name], rtol=0, atol=0)
    for name, t in ck.load_weights(d2, "ema").items():
        torch.testing.assert_close(t, _state(102)[name], rtol=0, atol=0)
    optim = ck.load_pt(d2, "optim.pt")
    assert optim["param_groups"][0]["betas"] == (0.9, 0.95)
    rng = ck.load_pt(d2, "rng.pt")
    torch.testing.assert_close(rng[0]["torch"], torch.get_rng_state())
    assert ck.resolve_checkpoint(tmp_path) == d2 and ck.resolve_checkpoint(d1) == d1


def test_keep_last_and_resave_same_step(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    _save(tmp_path, 4, seed=7)  # same step again: replaced atomically
    torch.testing.assert_close(ck.load_weights(tmp_path / "step_00000004", "model")["layer0.weight"], _state(7)["layer0.weight"])
    assert not list(tmp_path.glob(".tmp-*"))


def test_shared_storage_tensors_are_saved(tmp_path):
    w = torch.randn(4, 4)
    d = ck.save_checkpoint(tmp_path, 1, model_state={"a": w, "b": w}, ema_state=None, meta={})
    out = ck.load_weights(d, "model")
    torch.testing.assert_close(out["a"], out["b"])


@pytest.mark.parametrize("stage", ["model.safetensors", "ema.safetensors", "optim.pt", "rng.pt", "meta.json", "rename"])
def test_interrupted_save_keeps_latest_readable(tmp_path, stage):
    good = _save(tmp_path, 5, seed=5)
    with pytest.raises(RuntimeError, match="simulated failure"):
        _save(tmp_path, 6, seed=6, _fail_after=stage)
    latest = ck.latest_checkpoint(tmp_path)
    if stage == "rename":  # the new directory is complete, but `latest` still names the previous one
        assert (tmp_path / "latest").read_text().strip() == good.name
        assert latest == good
    else:  # only a hidden temp directory exists; readers ignore it
        assert latest == good
        assert not (tmp_path / "step_00000006").exists()
    torch.testing.assert_close(ck.load_weights(latest, "model")["layer0.weight"], _state(5)["layer0.weight"])
    # the next save cleans the leftovers up
    _save(tmp_path, 7, seed=7)
    assert not list(tmp_path.glob(".tmp-*"))
    assert ck.latest_checkpoint(tmp_path).name == "step_00000007"


def test_latest_pointer_missing_or_stale_falls_back(tmp_path):
    _save(tmp_path, 1)
    d2 = _save(tmp_path, 2)
    (tmp_path / "latest").write_text("step_00000099\n")
    assert ck.latest_checkpoint(tmp_path) == d2
    (tmp_path / "latest").unlink()
    assert ck.latest_checkpoint(tmp_path) == d2
    assert ck.latest_checkpoint(tmp_path / "nothing") is None


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ck.resolve_checkpoint(tmp_path)
    d = _save(tmp_path, 3)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json: not valid JSON"):
        ck.read_meta(d)
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        (d / "ema.safetensors").unlink()
        ck.load_weights(d, "ema")


def test_pt_files_refuse_arbitrary_objects(tmp_path):
    d = _save(tmp_path, 1)

    import argparse  # any importable class stands in for a malicious payload

    torch.save({"x": argparse.Namespace(a=1)}, d / "optim.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ck.load_pt(d, "optim.pt")


_KILL_SCRIPT = r"""
import sys, torch
from condiff.io import checkpoint as ck
run = sys.argv[1]
big = {f"w{i}": torch.full((256, 1024), float(i)) for i in range(8)}  # 8 MiB per file
step = 0
while True:
    step += 1
    state = {k: v + step for k, v in big.items()}
    ck.save_checkpoint(run, step, model_state=state, ema_state=state, meta={"model": {}, "schedule": {}},
                       optim_state={"step": step}, keep_last=2)
    print(step, flush=True)
"""


def test_process_killed_during_saves_never_breaks_latest(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    for delay in (0.05, 0.35):
        run = tmp_path / f"run{delay}"
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(run)], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"  # at least one checkpoint is complete
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = ck.latest_checkpoint(run)
        assert latest is not None
        step = ck.read_meta(latest).step
        w = ck.load_weights(latest, "model")
        torch.testing.assert_close(w["w3"], torch.full((256, 1024), 3.0 + step))
        assert (run / "latest").read_text().strip() == latest.name
