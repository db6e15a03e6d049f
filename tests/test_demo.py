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


def test_demo_thread_policy(monkeypatch):
    import os

    from condiff import demo
    from condiff.train.threads import free_threads

    assert free_threads(2, 0.1) == 2  # quiet 2-core machine
    assert free_threads(2, 1.0) == 1  # one competing CPU-bound process
    assert free_threads(2, 0.6) == 1 and free_threads(2, 0.4) == 2  # rounded
    assert free_threads(2, 7.5) == 1 and free_threads(16, 3.2) == 13
    assert free_threads(4, -1.0) == 4  # never above the cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.3, 0.5, 0.2), raising=False)
    before = __import__("torch").get_num_threads()
    try:
        info, tuner = demo.choose_threads(0)
        assert info == {"cores": 4, "load_1min": 1.3, "first_guess": 3} and tuner.candidates == [3, 1, 4]
        info, tuner = demo.choose_threads(2)
        assert tuner is None and info == {"threads": 2, "rule": "--threads", "cores": 4}
    finally:
        __import__("torch").set_num_threads(before)


def test_thread_tuner_keeps_the_fastest_and_remeasures():
    from condiff.train.threads import ThreadTuner

    applied = []
    tuner = ThreadTuner([2, 1], probe_steps=3, every=5, warmup=2, set_threads=applied.append)
    cost = {1: 0.1, 2: 0.3}  # a busy machine: 1 thread is faster
    used = []

    def step():
        tuner.before_step()
        used.append(applied[-1])
        tuner.after_step(cost[applied[-1]])

    for _ in range(2 + 3 + 3):  # warm-up on the first candidate, then 3 steps of 2 and 3 of 1
        step()
    assert used == [2, 2, 2, 2, 2, 1, 1, 1]
    assert tuner.threads == 1 and tuner.probes == [{"step": 8, "sec_per_step": {"2": 0.3, "1": 0.1}, "chose": 1}]
    cost = {1: 0.2, 2: 0.05}  # the other work ended: 2 threads now win, found at the next probe
    for _ in range(5 + 6):
        step()
    assert used[8:13] == [1] * 5 and used[13:19] == [2, 2, 2, 1, 1, 1]
    assert tuner.threads == 2 and applied[-1] == 2 and tuner.probes[-1]["chose"] == 2
    assert tuner.record()["candidates"] == [2, 1] and len(tuner.record()["probes"]) == 2
    # the first step after each switch is not timed: a slow switch step does not decide
    tuner = ThreadTuner([1, 2], probe_steps=2, every=5, warmup=0, set_threads=lambda n: None)
    for seconds in (9.0, 0.1, 9.0, 0.2):
        tuner.before_step()
        tuner.after_step(seconds)
    assert tuner.threads == 1 and tuner.probes[0]["sec_per_step"] == {"1": 0.1, "2": 0.2}


def test_thread_tuner_rejects_bad_settings():
    import pytest

    from condiff.train.threads import ThreadTuner

    with pytest.raises(ValueError, match="candidates must be thread counts >= 1"):
        ThreadTuner([0, 2])
    with pytest.raises(ValueError, match="probe_steps >= 2"):
        ThreadTuner([1], probe_steps=1)
