"""The evaluation manifest round-trips and carries the protocol."""

from __future__ import annotations

import json

import pytest

from condiff.eval import manifest as M


def _manifest() -> M.Manifest:
    return M.Manifest(checkpoint="runs/x/step_00000010", checkpoint_hash="0123456789abcdef", sampler="ddim",
                      steps=250, guidance=1.5, control_guidance=1.375, size_cond="fixed:256", n=50000, seed=3,
                      resolution=256, metrics={"fid_train": 2.5, "clip": 26.17, "align/overall": 0.75},
                      reference={"train": "a" * 32}, settings={"lpips_sizes": [256, 512], "eta": 0.0},
                      world_size=8)


def test_roundtrip(tmp_path):
    m = _manifest()
    path = M.save(m, tmp_path / "out")
    assert path.name == "manifest.json"
    assert M.load(path) == m
    assert M.load(tmp_path / "out") == m
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| fid_train | 2.5000 |" in md and "| sampler | ddim |" in md and "| control_guidance | 1.3750 |" in md


def test_manifest_records_protocol_and_versions():
    d = _manifest().to_dict()
    for key in ("checkpoint_hash", "sampler", "steps", "guidance", "control_guidance", "size_cond", "n", "seed",
                "reference", "libraries"):
        assert key in d
    from importlib.metadata import version

    assert d["libraries"]["torch"] == version("torch") and d["libraries"]["clean-fid"] == version("clean-fid")
    assert d["libraries"]["condiff"] != "absent"  # installed, or the source tree's __version__


def test_load_rejects_bad_fields(tmp_path):
    d = _manifest().to_dict()
    d["stepz"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="stepz"):
        M.load(tmp_path)
    del d["stepz"], d["sampler"]
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="sampler"):
        M.load(tmp_path)


def test_checkpoint_hash_changes_with_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "meta.json").write_text("{}")
    h1 = M.checkpoint_hash(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert M.checkpoint_hash(tmp_path) != h1
    with pytest.raises(FileNotFoundError):
        M.checkpoint_hash(tmp_path / "empty_dir_missing")
