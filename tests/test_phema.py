"""Post-hoc EMA (EDM2): sigma_rel <-> gamma, the tracker against its closed form, the least-squares
reconstruction against the exact EMA of a synthetic trajectory, snapshots and `condiff ema`."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from condiff.io import phema
from condiff.train.phema import PowerEMA

T, EVERY, SIGMAS = 400, 20, (0.05, 0.10)


def test_sigma_rel_gamma_roundtrip_and_edm2_values():
    # EDM2 Sec. 3.2 stores the profiles gamma = 16.97 and 6.94, i.e. sigma_rel = 0.05 and 0.10
    assert phema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert phema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.03, 0.08, 0.15, 0.25):
        assert phema.gamma_to_sigma_rel(phema.sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0.2887\)"):
        phema.sigma_rel_to_gamma(0.3)


def test_discrete_weights_are_the_profile_integrated_per_step():
    gamma, t = phema.sigma_rel_to_gamma(0.1), 50
    w = phema.discrete_weights(gamma, t)
    assert w.shape == (t,) and w.sum() == pytest.approx(1.0, abs=1e-12)
    tau = np.linspace(9, 10, 10_001)  # numerical integral of p_t(tau) = (g+1) tau^g / t^(g+1) over step 10
    p = (gamma + 1) * tau ** gamma / t ** (gamma + 1)
    assert w[9] == pytest.approx(np.trapezoid(p, tau), rel=1e-6)
    # the relative std of the weights is sigma_rel (up to discretisation)
    mean = (w * np.arange(1, t + 1)).sum()
    std = math.sqrt((w * (np.arange(1, t + 1) - mean) ** 2).sum())
    assert std / t == pytest.approx(0.1, rel=0.02)


def _trajectory(steps: int, dim: int = 48) -> np.ndarray:
    """(steps, dim) smooth parameter trajectory: drifting sinusoids, one per coordinate."""
    rng = np.random.default_rng(0)
    tau = np.arange(1, steps + 1)[:, None] / steps
    freq, phase, drift = rng.uniform(0.5, 4, dim), rng.uniform(0, 2 * np.pi, dim), rng.normal(size=dim)
    return np.sin(2 * np.pi * freq * tau + phase) + drift * tau


def _exact_ema(theta: np.ndarray, sigma_rel: float, t: int) -> np.ndarray:
    return phema.discrete_weights(phema.sigma_rel_to_gamma(sigma_rel), t) @ theta[:t]


def _track(tmp_path, theta: np.ndarray):
    """Run PowerEMA over the trajectory (a Linear whose weight IS theta_t), snapshotting every EVERY steps."""
    model = torch.nn.Linear(theta.shape[1], 1, bias=False)
    ema = PowerEMA(model, list(SIGMAS))
    for step in range(theta.shape[0]):  # 0-based step just taken; the weights after it are theta[step]
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(theta[step]).float()[None])
        ema.update(model, step)
        if (step + 1) % EVERY == 0:
            ema.snapshot(model, tmp_path, step + 1)
    return ema


def test_tracker_matches_closed_form(tmp_path):
    theta = _trajectory(T)
    ema = _track(tmp_path, theta)
    for profile, sigma in zip(ema.profiles, SIGMAS):
        got = profile.shadow[0][0].double().numpy()
        np.testing.assert_allclose(got, _exact_ema(theta, sigma, T), rtol=0, atol=2e-5)


def test_reconstruction_matches_exact_ema(tmp_path):
    """From 2 profiles x 20 snapshots, any length is recovered: max abs error <= 2e-3 on a trajectory of
    amplitude ~3 (the profile fit's own relative residual stays below 3%)."""
    theta = _trajectory(T)
    _track(tmp_path, theta)
    for sigma in (0.03, 0.08, 0.12, 0.15):
        rec = phema.reconstruct(tmp_path, sigma)
        assert rec.step == T and len(rec.snapshots) == 2 * T // EVERY
        got = rec.state["weight"][0].double().numpy()
        exact = _exact_ema(theta, sigma, T)
        err = np.abs(got - exact).max()
        assert err < 2e-3, (sigma, err)
        assert rec.residual < 0.03
        # and clearly better than the nearest stored profile
        nearest = _exact_ema(theta, min(SIGMAS, key=lambda s: abs(s - sigma)), T)
        assert err < 0.25 * np.abs(nearest - exact).max(), sigma
    mid = phema.reconstruct(tmp_path, 0.08, step=T // 2)  # read earlier in training
    np.testing.assert_allclose(mid.state["weight"][0].double().numpy(), _exact_ema(theta, 0.08, T // 2), atol=2e-3)


def test_reconstructing_a_stored_profile_returns_that_snapshot(tmp_path):
    _track(tmp_path, _trajectory(T))
    for sigma in SIGMAS:
        for step in (T // 2, T):
            rec = phema.reconstruct(tmp_path, sigma, step=step)
            stored = phema.load_snapshot(phema.read_snapshot_meta(phema.snapshot_path(tmp_path, step, sigma)))
            torch.testing.assert_close(rec.state["weight"], stored["weight"], rtol=0, atol=1e-6)
            assert rec.residual < 1e-6


def test_snapshot_files_and_errors(tmp_path):
    _track(tmp_path, _trajectory(2 * EVERY))
    files = sorted((tmp_path / "phema").iterdir())
    assert [f.name for f in files] == [
        "step_00000020-sigma_0.0500.safetensors", "step_00000020-sigma_0.1000.safetensors",
        "step_00000040-sigma_0.0500.safetensors", "step_00000040-sigma_0.1000.safetensors"]
    with safe_open(str(files[1]), framework="pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "condiff-phema" and meta["step"] == "20" and float(meta["sigma_rel"]) == 0.1
    assert float(meta["gamma"]) == pytest.approx(6.9372, abs=1e-4)
    with pytest.raises(ValueError, match="no snapshot at this step"):
        phema.reconstruct(tmp_path, 0.08, step=30)
    with pytest.raises(ValueError, match="no snapshot at or before it"):
        phema.reconstruct(tmp_path, 0.08, step=10)
    with pytest.raises(FileNotFoundError, match="no post-hoc EMA snapshots"):
        phema.reconstruct(tmp_path / "empty", 0.08)
    bad = tmp_path / "phema" / "step_00000099-sigma_0.0500.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not a post-hoc EMA snapshot"):
        phema.list_snapshots(tmp_path)


def test_power_ema_state_roundtrip_and_errors():
    model = torch.nn.Linear(3, 2)
    ema = PowerEMA(model, [0.05, 0.1])
    for step in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model, step)
    state = ema.state_dict(model)
    assert {k.split("/")[0] for k in state} == {"0.0500", "0.1000"}
    fresh = PowerEMA(model, [0.05, 0.1])
    fresh.load_state_dict(state)
    for a, b in zip(ema.profiles, fresh.profiles):
        assert all(torch.equal(x, y) for x, y in zip(a.shadow, b.shadow))
    with pytest.raises(KeyError, match="no profile sigma_rel=0.0800"):
        PowerEMA(model, [0.08]).load_state_dict(state)
    with pytest.raises(ValueError, match="duplicate"):
        PowerEMA(model, [0.05, 0.05])


# ------------------------------------------------------------------------------------------ end to end
TINY = [
    "model.name=mmdit-ours-tiny",
    "model.kwargs={in_channels: 3, input_size: 8, depth: 2, hidden_size: 32, num_heads: 2}",
    "data.resolution=8", "data.workers=0", "data.shuffle_buffer=16",
    "batch_size=8", "log.progress=false", "log.every=1",
]


def test_train_power_kind_then_condiff_ema(tmp_path, shards, capsys):
    """ema.kind=power: ema.safetensors is the first profile; snapshots every 2 steps (+ the final step) survive
    keep_last; `condiff ema` writes a checkpoint that load_for_inference reads."""
    from condiff.cli import main as cli
    from condiff.inference.pipeline import Pipeline
    from condiff.io import checkpoint as ck
    from condiff.train.config import ConfigError, load_config
    from condiff.train.loop import Trainer

    run = tmp_path / "run"
    cfg = load_config(overrides=TINY + [f"data.shards={shards}", f"run_dir={run}", "steps=5", "save_every=2",
                                        "keep_last=1", "ema.kind=power", "ema.snapshot_every=2"])
    Trainer(cfg).run(final_grid=False)
    assert [c.name for c in ck.list_checkpoints(run)] == ["step_00000005"]
    snaps = phema.list_snapshots(run)
    assert sorted({s.step for s in snaps}) == [2, 4, 5] and len(snaps) == 6
    latest = ck.latest_checkpoint(run)
    ema, stored = ck.load_weights(latest, "ema"), phema.load_checkpoint_state(latest)
    final = phema.load_snapshot(next(s for s in snaps if s.step == 5 and s.sigma_rel == 0.05))
    for k, v in ema.items():
        assert torch.equal(v, stored[f"0.0500/{k}"]) and torch.equal(v, final[k]), k

    assert cli(["ema", "--run", str(run), "--sigma-rel", "0.08", "--out", str(tmp_path / "ema_0.08")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 5 and report["snapshots"] == 6
    inf = Pipeline.from_checkpoint(tmp_path / "ema_0.08")
    assert inf.meta.extra["phema"]["sigma_rel"] == 0.08 and inf.meta.step == 5
    rec = phema.reconstruct(run, 0.08)
    for k, v in inf.model.state_dict().items():
        assert torch.equal(v, rec.state[k]), k
    assert cli(["ema", "--run", str(run), "--sigma-rel", "0.08", "--step", "3"]) == 2
    assert "no snapshot at this step" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ema.kind"):
        load_config(overrides=["ema.kind=box"])
    with pytest.raises(ConfigError, match="ema.sigma_rels"):
        load_config(overrides=["ema.sigma_rels=[0.5]"])


def test_eval_ema_sweep_end_to_end(tmp_path, shards, capsys):
    """`condiff eval --ema-sweep`: one reconstructed checkpoint + manifest per length, a table, a plot,
    and the best length by the chosen metric."""
    from condiff.cli import main as cli
    from condiff.eval import manifest
    from condiff.train.config import load_config
    from condiff.train.loop import Trainer

    run = tmp_path / "run"
    Trainer(load_config(overrides=TINY + [f"data.shards={shards}", f"run_dir={run}", "steps=4", "save_every=4",
                                          "ema.kind=both", "ema.snapshot_every=2"])).run(final_grid=False)
    out = tmp_path / "sweep"
    args = ["eval", "--ckpt", str(run), "--ema-sweep", "0.05:0.10:3", "--metrics", "align", "--n", "4", "--steps", "2",
            "--batch-size", "4", "--prompts", "shapes:demo", "--grid", "0", "--out", str(out)]
    assert cli(args + ["--sweep-metric", "align/colour"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["sigma_rel"] for r in summary["rows"]] == [0.05, 0.075, 0.1] and summary["step"] == 4
    values = [r["metrics"]["align/colour"] for r in summary["rows"]]
    assert summary["best_value"] == max(values) and not summary["lower_is_better"]
    assert summary["tied"] == (len(set(values)) == 1)
    assert summary["best_sigma_rel"] == summary["rows"][values.index(max(values))]["sigma_rel"]
    for sigma in ("0.0500", "0.0750", "0.1000"):
        m = manifest.load(out / f"sigma_{sigma}")
        assert "align/overall" in m.metrics and "--ema-sweep" not in m.command
    table = (out / "sweep.md").read_text()
    assert "**(best)**" in table and "align/colour" in table and (out / "sweep.png").stat().st_size > 0
    assert "best sigma_rel" in capsys.readouterr().out
    assert cli(args + ["--sweep-metric", "fid_val"]) == 2
    assert "not among the computed metrics" in capsys.readouterr().err


def test_sweep_helpers():
    from condiff.eval import ema_sweep as S

    assert S.parse_sweep("0.03:0.15:7") == [0.03, 0.05, 0.07, 0.09, 0.11, 0.13, 0.15]
    assert S.parse_sweep("0.05,0.1") == [0.05, 0.1]
    with pytest.raises(ValueError, match="expected LO:HI:N"):
        S.parse_sweep("0.03:0.15")
    assert S.strip_flags(["--ckpt", "r", "--n", "4", "--out=o", "--ema-sw", "0.1,0.2", "--steps", "2"]) == \
        ["--n", "4", "--steps", "2"]
    assert S.lower_is_better("fid_val") and not S.lower_is_better("align/overall")
    assert S.default_metric(["clip", "fid_train"]) == "fid_train"
