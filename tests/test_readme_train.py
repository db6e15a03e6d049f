"""The README's Train section, run as written on a fresh directory (a clone's configs/, no data/, no runs/)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path


from condiff import cli
from condiff.train import data as train_data

ROOT = Path(__file__).resolve().parents[1]
# Appended to every README training command: same recipes, a few steps of small batches.
FAST = ["steps=2", "batch_size=4", "save_every=2", "log.sample_every=0", "log.every=1", "data.workers=0"]


def readme_train_commands() -> list[str]:
    """The `condiff train` commands of the README's first bash block under "## Train"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Train\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    cmds = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [c for c in cmds if c]


def test_builtin_shards_named_and_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(train_data.BUILTIN_SHARDS, "data/shapes-demo", {"preset": "demo", "n": 12, "seed": 0})
    assert train_data.builtin_command("./data/shapes-demo") == \
        "condiff make-shards shapes --preset demo --n 12 --seed 0 --out ./data/shapes-demo"
    assert train_data.builtin_command("data/other") is None
    cfg = train_data.DataConfig(shards="data/shapes-demo")
    train_data.ensure_builtin_shards(cfg)
    err = capsys.readouterr().err
    assert "data/shapes-demo is missing" in err and "condiff make-shards shapes --preset demo" in err
    info = json.loads((tmp_path / "data/shapes-demo/dataset.json").read_text())
    assert info["n"] == 12 and info["preset"] == "demo"
    assert not list((tmp_path / "data").glob("*.tmp-*"))
    train_data.ensure_builtin_shards(cfg)  # present: nothing written, nothing said
    assert capsys.readouterr().err == ""


def test_readme_train_commands_on_fresh_clone(tmp_path, monkeypatch, capsys):
    cmds = readme_train_commands()
    assert len(cmds) >= 3 and all(c.startswith("condiff train ") for c in cmds), cmds
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(train_data.BUILTIN_SHARDS, "data/shapes-demo", {"preset": "demo", "n": 16, "seed": 0})
    for cmd in cmds:
        argv = shlex.split(cmd)[1:]
        if "--print-config" not in argv:
            argv += FAST
        assert cli.main(argv) == 0, cmd
        out = capsys.readouterr().out
        if "--print-config" in argv:
            assert "model:" in out
        else:
            assert json.loads(out.strip().splitlines()[-1])["steps"] == 2, cmd
    assert (tmp_path / "data/shapes-demo/dataset.json").is_file()
