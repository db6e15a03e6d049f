"""`condiff demo` end to end at a toy size: shards, training, captioned grid, loss curve, report."""

import json

from PIL import Image


def test_demo_writes_grid_curve_and_report(tmp_path):
    from condiff.io import checkpoint as ck
    from condiff.demo import main

    out = tmp_path / "demo"
    args = ["--out", str(out), "--steps", "2", "--n", "64", "--per-prompt", "2", "--sample-steps", "2", "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["steps_this_run"] == 2 and report["batch_size"] == 32
    assert report["sec_per_step"] > 0 and report["img_per_s"] > 0 and report["wall_s"]["total"] > 0
    assert report["threads_choice"]["threads"] == report["threads"] >= 1 and report["threads_choice"]["cores"] >= 1
    assert len(report["prompts"]) == 8 and all(" to the left of " in p for p in report["prompts"])
    for key in ("colour", "shape", "relation", "overall"):
        assert 0.0 <= report["alignment"][key] <= 1.0
    assert report["alignment_of_real_images"]["colour"] == 1.0  # the detector reads real 16 px images
    grid = Image.open(out / "samples.png")
    assert grid.size[1] == 2 + 8 * (96 + 2)  # one row per prompt, 16 px samples shown in 96 px cells
    assert grid.size[0] > 2 + 2 * (96 + 2) + 150  # 2 per prompt, right of the caption column
    assert (out / "loss.png").stat().st_size > 1000
    meta = ck.read_meta(ck.latest_checkpoint(out))
    assert meta.model["name"] == "mmdit-ours-tiny" and meta.text_encoder["kind"] == "minilm"
    assert json.loads((out / "data" / "dataset.json").read_text())["preset"] == "demo"


def test_demo_threads_follow_the_free_cores(monkeypatch):
    import os

    from condiff import demo

    assert demo.free_threads(2, 0.1) == 2  # quiet 2-core machine
    assert demo.free_threads(2, 1.0) == 1  # one competing CPU-bound process
    assert demo.free_threads(2, 0.6) == 1 and demo.free_threads(2, 0.4) == 2  # rounded
    assert demo.free_threads(2, 7.5) == 1 and demo.free_threads(16, 3.2) == 13
    assert demo.free_threads(4, -1.0) == 4  # never above the cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.3, 0.5, 0.2), raising=False)
    assert demo.choose_threads(0) == {"threads": 1, "rule": "cores - load average (1 min), rounded, >= 1",
                                      "cores": 2, "load_1min": 1.3}
    assert demo.choose_threads(3)["threads"] == 3 and demo.choose_threads(3)["rule"] == "--threads"
