"""condiff.io: the one shard-spec grammar, to_uint8, atomic writes, the typed checkpoint meta."""

import numpy as np
import pytest
import torch

from condiff.io.atomic import atomic_path, atomic_write_text
from condiff.io.checkpoint import CheckpointMeta, read_meta, save_checkpoint
from condiff.io.images import to_uint8
from condiff.io.shards import expand_shards, split_spec


@pytest.fixture
def shards(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        for i in range(3):
            (tmp_path / split / f"s-{i:03d}.tar").write_bytes(b"x")
    return tmp_path


def test_grammar(shards):
    t = [str(shards / "train" / f"s-{i:03d}.tar") for i in range(3)]
    v = [str(shards / "val" / f"s-{i:03d}.tar") for i in range(3)]
    assert expand_shards(str(shards / "train")) == t  # directory
    assert expand_shards(str(shards / "train" / "s-{000..001}.tar")) == t[:2]  # brace range
    assert expand_shards(str(shards / "{train,val}" / "s-000.tar")) == [t[0], v[0]]  # brace list (commas inside)
    assert expand_shards(str(shards / "*" / "s-00[2].tar")) == [t[2], v[2]]  # glob
    assert expand_shards(f"{v[1]},{t[0]}") == [v[1], t[0]]  # comma list keeps order
    assert expand_shards(f"{v[1]}::{t[0]}") == [v[1], t[0]]  # '::' list
    assert expand_shards([v[1], str(shards / "val")]) == [v[1], v[0], v[2]]  # list; duplicates dropped
    with pytest.raises(FileNotFoundError, match=r"no shard file matches .*nope-1\.tar"):
        expand_shards(str(shards / "nope-{0..1}.tar"))
    assert split_spec("a{1,2}.tar, b.tar::c") == ["a{1,2}.tar", "b.tar", "c"]


def test_to_uint8_batch_and_single():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 2.0]).reshape(1, 3, 1, 2)
    assert to_uint8(x).shape == (1, 1, 2, 3) and to_uint8(x[0]).shape == (1, 2, 3)
    np.testing.assert_array_equal(to_uint8(x)[0], to_uint8(x[0]))
    assert to_uint8(x).ravel().tolist() == [0, 128, 255, 0, 255, 255]  # round((x + 1) * 127.5), clamped
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        to_uint8(torch.zeros(2, 4, 3, 3))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("two")
            raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_checkpoint_meta_round_trip_keeps_unknown_keys(tmp_path):
    meta = CheckpointMeta(model={"name": "x"}, schedule={}, train_sizes=[[3, 4]], extra={"future_key": 1})
    d = save_checkpoint(tmp_path, 7, model_state={"w": torch.zeros(1)}, ema_state=None, meta=meta)
    back = read_meta(d)
    assert back.step == 7 and back.model == {"name": "x"} and back.train_sizes == [[3, 4]]
    assert back.extra == {"future_key": 1} and back.to_dict()["future_key"] == 1
    with pytest.raises(ValueError, match="'model' must be an object"):
        CheckpointMeta.from_dict({"model": "dit"})
