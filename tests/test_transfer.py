"""init_from transfer: matching weights, base size kept (App. C), Eq. 3 schedule rescaling, recorded in meta."""

import json

import pytest
import torch

from condiff.diffusion import Schedule
from condiff.models import create
from condiff.io import checkpoint as ck
from condiff.train.config import load_config
from condiff.train.transfer import match_state

ARCH = {"in_channels": 3, "depth": 2, "hidden_size": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from condiff.data.make_shards import write_shapes

    out = tmp_path_factory.mktemp("shapes")
    (out / "dataset.json").write_text(json.dumps(write_shapes(str(out), 32, seed=0, preset="demo", shard_size=32)))
    return str(out)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A class-conditional 8 px source checkpoint (as a 256 px pre-training run would leave)."""
    run = tmp_path_factory.mktemp("src")
    model = create("mmdit-ours-tiny", conditioning="class", num_classes=8, input_size=8, **ARCH)
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}  # distinguishable from the raw weights
    meta = {"model": model.config, "schedule": Schedule().to_dict(), "base_size": model.base_size,
            "config": {"data": {"resolution": 8, "crop": "local"}}, "text_encoder": None,
            "autoencoder": {"kind": "pixels"}}
    ck.save_checkpoint(run, 100, model_state=model.state_dict(), ema_state=ema, meta=meta)
    return run, ema


def _target(tmp_path, shards, source_dir, *extra):
    return load_config(overrides=[
        f"init_from={source_dir}", f"data.shards={shards}", f"run_dir={tmp_path}/dst", "data.workers=0",
        "batch_size=4", "steps=1", "log.progress=false", "data.shuffle_buffer=8", "data.crop=global",
        f"model.kwargs={json.dumps(ARCH)}", "model.name=mmdit-ours-tiny", *extra])


def test_match_state_lists_everything():
    src = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    dst = {"a": torch.zeros(2), "b": torch.zeros(4), "d": torch.zeros(1)}
    r = match_state(src, dst)
    assert r == {"loaded": ["a"], "new": ["d"], "dropped": ["c"], "mismatched": {"b": [[3], [4]]}}


def test_resolution_and_dataset_transfer_class_to_text(tmp_path, shards, source):
    from condiff.train.loop import Trainer

    src_dir, src_ema = source
    cfg = _target(tmp_path, shards, src_dir, "data.resolution=16", "model.conditioning=text",
                  "model.kwargs.input_size=16", "model.kwargs.text_dim=64", "model.kwargs.pooled_dim=64",
                  "model.kwargs.text_len=16",
                  'text.encoder={"kind": "tiny-clip", "dim": 64, "layers": 1, "heads": 2, "max_length": 16}')
    trainer = Trainer(cfg)
    info = trainer.transfer_info
    # App. C: the 16 px model keeps the 8 px model's grid range (base size 4 = 8 px / patch 2), so its
    # 8 x 8 grid samples linspace(0, 4, 8) instead of extrapolating to 0..7
    assert trainer.model.base_size == 4 == info["base_size"] == info["source_base_size"]
    # every loaded tensor is the source's EMA tensor
    state = trainer.model.state_dict()
    assert len(info["loaded"]) > 10
    for k in info["loaded"]:
        torch.testing.assert_close(state[k], src_ema[k], rtol=0, atol=0)
    # class tokens dropped, text embedders new
    assert info["dropped"] == ["y_embedder.embedding_table.weight"]  # the class table
    assert any("context" in k or "text" in k for k in info["new"]), info["new"]
    assert set(info["loaded"]) | set(info["new"]) | set(info["mismatched"]) == set(state)
    # Eq. 3 with s = 8, s' = 16, computed here from the formula
    abar = Schedule().alphas_cumprod
    s, s2 = 8.0, 16.0
    expected = (s**2 * abar / (s2**2 + abar * (s**2 - s2**2))).clamp(min=2.0**-24)
    torch.testing.assert_close(trainer.schedule.alphas_cumprod, expected)
    assert info["schedule_rescaled"] and info["resolution"] == [8, 16] and info["crop"] == ["local", "global"]
    # recorded in the new run's checkpoint
    trainer.run(final_grid=False)
    meta = ck.read_meta(ck.latest_checkpoint(tmp_path / "dst"))
    assert meta.transfer["source_step"] == 100 and meta.base_size == 4
    assert Schedule.from_dict(meta.schedule) == trainer.schedule
    assert meta.schedule["base_resolution"] == 8.0 and meta.schedule["resolution"] == 16.0
    # a resumed run keeps the transferred architecture and schedule
    again = Trainer(_target(tmp_path, shards, src_dir, "data.resolution=16", "model.conditioning=text", "steps=2",
                            "model.kwargs.input_size=16", "model.kwargs.text_dim=64", "model.kwargs.pooled_dim=64",
                            "model.kwargs.text_len=16",
                            'text.encoder={"kind": "tiny-clip", "dim": 64, "layers": 1, "heads": 2, "max_length": 16}'))
    assert again.step == 1 and again.schedule == trainer.schedule and again.model.base_size == 4


def test_more_classes_is_a_listed_mismatch_and_strict_refuses(tmp_path, shards, source):
    from condiff.train.loop import Trainer

    src_dir, _ = source
    cfg = _target(tmp_path, shards, src_dir, "data.resolution=8", "data.num_classes=20", "model.kwargs.input_size=8",
                  "transfer.use_ema=false")
    trainer = Trainer(cfg)
    info = trainer.transfer_info
    assert info["mismatched"] and all(v[0][0] == 9 and v[1][0] == 21 for v in info["mismatched"].values())  # 8+1 -> 20+1 rows
    assert not info["schedule_rescaled"] and info["weights"] == "model"
    with pytest.raises(ValueError, match="strict_shapes"):
        Trainer(_target(tmp_path / "b", shards, src_dir, "data.resolution=8", "data.num_classes=20",
                        "model.kwargs.input_size=8", "transfer.strict_shapes=true"))


def test_mdt_256_to_512_loads_every_weight_and_keeps_base_outputs(tmp_path, shards):
    """mDT-v2's relative-position tables are sized from the base grid and resampled (App. C): a transfer to
    twice the resolution re-initialises nothing, and at the base size the transferred model is the source."""
    from condiff.models.mdt import RelativePositionBias
    from condiff.train.transfer import transfer_init

    arch = {"in_channels": 3, "depth": 4, "decode_layers": 2, "hidden_size": 32, "num_heads": 2, "num_classes": 8}
    src = create("mdt-v2", conditioning="class", input_size=8, **arch)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-init layers would hide a wrong bias
    run = tmp_path / "src"
    meta = {"model": src.config, "schedule": Schedule().to_dict(), "base_size": src.base_size,
            "config": {"data": {"resolution": 8}}, "text_encoder": None, "autoencoder": {"kind": "pixels"}}
    ck.save_checkpoint(run, 10, model_state=src.state_dict(), ema_state=src.state_dict(), meta=meta)
    cfg = load_config(overrides=[f"init_from={run}", f"data.shards={shards}", "data.resolution=16",
                                 "model.name=mdt-v2", f"model.kwargs={json.dumps(dict(arch, input_size=16))}"])
    model, _, info = transfer_init(cfg, dict(cfg.model.kwargs), log=lambda _: None)
    assert info["new"] == [] and info["dropped"] == [] and info["mismatched"] == {}
    assert len(info["loaded"]) == len(src.state_dict())

    src.eval(), model.eval()
    x, t, cond = src.example_inputs(2)  # (2, 3, 8, 8): the base size
    torch.testing.assert_close(model(x, t, cond), src(x, t, cond), rtol=0, atol=0)
    assert model(torch.randn(2, 3, 16, 16), t, cond).shape == (2, 3, 16, 16)

    # on the 2x grid, offset 2k reads the base table at offset k; odd offsets interpolate their neighbours
    bias = RelativePositionBias((4, 4), num_heads=2)
    base = bias.relative_position_bias_table[:-3].detach().view(7, 7, 2)
    table = bias.table(7, 7).detach().view(13, 13, 2)
    torch.testing.assert_close(table[::2, ::2], base, rtol=0, atol=1e-6)
    torch.testing.assert_close(table[1::2, ::2], (base[:-1] + base[1:]) / 2, rtol=0, atol=1e-6)
    assert bias.table(4, 4) is bias.relative_position_bias_table
