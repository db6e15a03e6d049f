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
    with pytest.raises(FileExistsError, match="step_00000004: a checkpoint of step 4 already exists"):
        _save(tmp_path, 4, seed=7)  # never replaced silently
    _save(tmp_path, 4, seed=7, overwrite=True)  # asked for: replaced atomically
    torch.testing.assert_close(ck.load_weights(tmp_path / "step_00000004", "model")["layer0.weight"], _state(7)["layer0.weight"])
    assert not list(tmp_path.glob(".tmp-*"))


def test_meta_records_size_and_hash_and_verify_names_the_bad_file(tmp_path):
    d1, d2 = _save(tmp_path, 1), _save(tmp_path, 2)
    files = ck.read_meta(d2).files
    assert set(files) == {"model.safetensors", "ema.safetensors", "optim.pt", "rng.pt"}
    assert files["optim.pt"]["size"] == (d2 / "optim.pt").stat().st_size and len(files["optim.pt"]["sha256"]) == 64
    require = ("ema.safetensors", "optim.pt", "rng.pt")
    assert ck.verify_checkpoint(d2, require) == [] and ck.resumable_checkpoint(tmp_path, require) == (d2, {})
    data = (d2 / "model.safetensors").read_bytes()
    (d2 / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    found, skipped = ck.resumable_checkpoint(tmp_path, require)
    assert found == d1 and skipped == {d2: [f"{d2 / 'model.safetensors'}: corrupt ({len(data) // 2} bytes, "
                                            f"meta.json records {len(data)})"]}
    with pytest.raises(ValueError, match="model.safetensors: cannot read the weights"):
        ck.load_weights(d2, "model")
    (d1 / "optim.pt").write_bytes(bytes(b ^ 1 for b in (d1 / "optim.pt").read_bytes()))  # same size, flipped bits
    assert ck.verify_checkpoint(d1) == [f"{d1 / 'optim.pt'}: corrupt (sha256 differs from the one meta.json records)"]
    with pytest.raises(ValueError, match="optim.pt: cannot read"):
        ck.load_pt(d1, "optim.pt")


def test_missing_file_makes_a_checkpoint_unresumable(tmp_path):
    d1, d2 = _save(tmp_path, 1), _save(tmp_path, 2)
    (d2 / "rng.pt").unlink()
    assert ck.resumable_checkpoint(tmp_path, ("rng.pt",)) == (d1, {d2: [f"{d2 / 'rng.pt'}: missing"]})
    # a checkpoint written without records (older format) is checked for the required files' presence
    d3 = ck.save_checkpoint(tmp_path, 3, model_state=_state(0), ema_state=None, meta={"model": {"name": "x"}})
    assert ck.verify_checkpoint(d3, ("ema.safetensors",)) == [f"{d3 / 'ema.safetensors'}: missing"]


def test_pruning_goes_through_trash_and_stale_leftovers_are_cleaned(tmp_path, monkeypatch):
    for s in (1, 2):
        _save(tmp_path, s)
    import shutil

    def killed(path, *a, **k):  # the process dies while deleting the pruned checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, keep_last=2)
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert not (tmp_path / "step_00000001").exists()
    (tmp_path / ".tmp-step_00000009-999999").mkdir()
    removed = sorted(p.name for p in ck.clean_stale(tmp_path))
    assert removed == [".tmp-step_00000009-999999", f".trash-step_00000001-{os.getpid()}"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_run_lock_names_the_holder_and_takes_over_a_dead_one(tmp_path):
    import json
    import socket

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname()}))
        with pytest.raises(RuntimeError, match=f"in use by pid {proc.pid} on host {socket.gethostname()}"):
            ck.RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    lock = ck.RunLock(tmp_path).acquire()  # the holder is dead: taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


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
    # another save leaves them alone (they could be another writer's); clean_stale (trainer start) removes them
    _save(tmp_path, 7, seed=7)
    assert (stage == "rename") != bool(list(tmp_path.glob(".tmp-*")))
    ck.clean_stale(tmp_path)
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
