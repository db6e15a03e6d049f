import json
import os
from pathlib import Path

import pytest
import torch

# Tests never touch the network and run on 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module that asks for it (`pytestmark = pytest.mark.usefixtures("one_thread")`),
    restored after it: tiny models gain nothing from intra-op threads, and on a busy shared 2-core machine two
    spinning OpenMP threads make each forward ~50x slower (benchmarks/RESULTS.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 samples of the demo shapes preset in 4 shards (+ dataset.json), written once per test module."""
    from condiff.data.make_shards import write_shapes

    out = tmp_path_factory.mktemp("shapes")
    info = write_shapes(str(out), 64, seed=0, preset="demo", shard_size=16)
    (out / "dataset.json").write_text(json.dumps(info))
    return str(out)


@pytest.fixture(scope="session")
def training_recipes() -> list[Path]:
    """Every training recipe under configs/, without the `_`-prefixed partial bases they include
    (configs/repro/ holds `condiff repro` experiment specs, not recipes)."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    return sorted(p for p in configs.rglob("*.yaml")
                  if not p.name.startswith("_") and "repro" not in p.relative_to(configs).parts)
