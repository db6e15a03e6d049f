"""`condiff make-shards`: image folders, CSV / JSONL tables, shapes and photos into readable shards."""

import json
import os

import pytest
from PIL import Image

from condiff.cli import main as cli
from condiff.data import shapes
from condiff.data.loader import LoaderConfig, ShardLoader


def _read_all(out, **kw):
    cfg = dict(shards=out, batch_size=2, resolution=16, epochs=1, drop_last=False, shuffle_buffer=0, shuffle_shards=False, flip_prob=0.0)
    cfg.update(kw)
    loader = ShardLoader(LoaderConfig(**cfg))
    batches = list(loader)
    return {k: [x for b in batches for x in (b[k].tolist() if hasattr(b[k], "tolist") else b[k])] for k in batches[0]}, loader


def _img(path, size, colour, mode="RGB", fmt=None):
    Image.new(mode, size, colour).save(path, format=fmt)


def test_image_folder_with_class_subfolders(tmp_path):
    src = tmp_path / "src"
    for cls, colour in [("zebra", (0, 0, 0)), ("ant", (255, 0, 0))]:
        (src / cls).mkdir(parents=True)
        _img(src / cls / "a.jpg", (30, 20), colour)
        _img(src / cls / "b.png", (12, 40), colour)
    _img(src / "ant" / "c.bmp", (8, 8), (255, 0, 0))  # re-encoded as PNG
    (src / "ant" / "broken.jpg").write_bytes(b"not an image")
    (src / "ant" / "b.txt").write_text("a red thing\n")  # sidecar caption for ant/b.png
    out = str(tmp_path / "out")
    assert cli(["make-shards", str(src), "--out", out, "--shard-size", "2"]) == 0
    classes = json.load(open(os.path.join(out, "classes.json")))
    assert classes["classes"] == ["ant", "zebra"] and classes["class_to_id"] == {"ant": 0, "zebra": 1}
    info = json.load(open(os.path.join(out, "dataset.json")))
    assert info["n"] == 5 and len(info["shards"]) == 3 and info["skipped"][0].endswith("broken.jpg")
    data, loader = _read_all(out)
    assert data["label"] == [0, 0, 0, 1, 1]
    assert data["control_l"] == [[20, 30], [40, 12], [8, 8], [20, 30], [40, 12]]  # original [h, w]
    assert loader.stats["samples"] == 5
    text, _ = _read_all(out, conditioning="text")
    assert text["caption"] == ["a red thing"]


def test_csv_and_jsonl_tables(tmp_path):
    (tmp_path / "imgs").mkdir()
    _img(tmp_path / "imgs" / "x.png", (10, 14), (0, 255, 0))
    _img(tmp_path / "imgs" / "y.webp", (9, 9), (0, 0, 255), fmt="WEBP")
    (tmp_path / "t.csv").write_text('path,caption,label\nimgs/x.png,"a green, wide box",3\nimgs/y.webp,blue,\n')
    out = str(tmp_path / "csv")
    assert cli(["make-shards", str(tmp_path / "t.csv"), "--out", out]) == 0
    data, _ = _read_all(out, conditioning="text")
    assert data["caption"] == ["a green, wide box", "blue"] and data["control_l"] == [[14, 10], [9, 9]]
    rows = [{"path": str(tmp_path / "imgs" / "y.webp"), "caption": "abs path", "label": 1}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = str(tmp_path / "jsonl")
    assert cli(["make-shards", str(tmp_path / "t.jsonl"), "--out", out]) == 0
    data, _ = _read_all(out, conditioning="class")
    assert data["label"] == [1] and data["caption"] == ["abs path"]
    (tmp_path / "bad.jsonl").write_text('{"caption": "no path"}\n')
    assert cli(["make-shards", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "bad")]) == 2


def test_shapes_and_photos_sources(tmp_path, capsys):
    out = str(tmp_path / "shapes")
    assert cli(["make-shards", "shapes", "--out", out, "--n", "12", "--seed", "5", "--preset", "demo", "--shard-size", "5"]) == 0
    assert sorted(os.listdir(out)) == ["dataset.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    info = json.load(open(os.path.join(out, "dataset.json")))
    assert info["num_classes"] == 8 and info["preset"] == "demo" and info["seed"] == 5
    data, _ = _read_all(out, crop="center", resolution=8)
    for i, (key, caption, label) in enumerate(zip(data["key"], data["caption"], data["label"])):
        s = shapes.render(int(key), "demo", 5)
        assert (caption, label) == (s.caption, s.label)
    assert len(data["key"]) == 12
    small = str(tmp_path / "small")
    argv = ["make-shards", "shapes", "--out", small, "--n", "4", "--preset", "demo", "--set", "size_range=16,16", "--set", "colours=green,yellow,cyan"]
    assert cli(argv) == 0
    info = json.load(open(os.path.join(small, "dataset.json")))
    assert info["config"]["size_range"] == [16, 16] and info["num_classes"] == 6 * 4
    data, _ = _read_all(small, crop="center", resolution=8)
    assert data["control_l"] == [[16, 16]] * 4
    assert cli(["make-shards", "shapes", "--out", small, "--set", "colors=red"]) == 2
    assert "FIELD=VALUE" in capsys.readouterr().err
    out = str(tmp_path / "photos")
    assert cli(["make-shards", "photos", "--out", out]) == 0
    data, loader = _read_all(out, conditioning="text", resolution=32)
    assert len(data["key"]) == len(shapes.PHOTO_NAMES)
    assert loader.stats.get("converted_L", 0) >= 1  # grayscale photos stored as L, converted on read
    assert cli(["make-shards", str(tmp_path / "missing"), "--out", out]) == 2
    assert "not 'shapes'" in capsys.readouterr().err


def test_no_partial_shard_after_a_crash(tmp_path):
    from condiff.data.writer import ShardSetWriter

    with pytest.raises(RuntimeError):
        with ShardSetWriter(str(tmp_path), shard_size=3) as w:
            for i in range(5):
                w.write({"__key__": f"{i}", "txt": "x"})
            raise RuntimeError("crash")
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar"]
