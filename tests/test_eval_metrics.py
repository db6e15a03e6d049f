"""The metric protocol of `condiff eval` (`condiff.eval.metrics`): for every metric, merging the states of
two ranks (each fed its share r, r + 2, ... in batches, states sent through pickle as `gather_object`
does) equals one pass over all samples; results do not depend on update or merge order; a sample index
recorded twice is an error naming it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from condiff.data import shapes
from condiff.eval import align, features, lpips_size, reference, statistics
from condiff.eval.metrics import Stream
from condiff.eval.metrics.align import Align
from condiff.eval.metrics.clip import ClipScore
from condiff.eval.metrics.fid import Fid
from condiff.eval.metrics.grid import Grid
from condiff.eval.metrics.lpips import LpipsSize

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

N = 9
SIZES = (16, 24, 32)


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (x + 0.2 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


def _shapes_batch(n: int) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, 32, 32) uint8 images of the shapes dataset and their captions (the detector gets them right)."""
    samples = [shapes.render(i, "demo", seed=0) for i in range(n)]
    u8 = np.stack([reference.center_crop_arr(s.image, 32) for s in samples])
    return torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous(), [s.caption for s in samples]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from condiff.eval.clip_score import ClipScorer

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(path)
    return ClipScorer(path, batch_size=4)


@pytest.fixture(scope="module")
def cases(tiny_clip):
    """name -> (factory of a fresh metric, the N samples, reference values computed without the protocol)."""
    ext = features.random_extractor(dim=4, size=32)
    ref_feats = ext.features((_images(20, 5) + 0.4).clamp(-1, 1))  # (20, 4), a brighter set
    ref = statistics.FidStats.from_features(ref_feats)
    plain = _images(N, 1)
    shapes_u8, captions = _shapes_batch(N)
    net = lpips_size.lpips_model("alex", random_backbone=True)
    sweeps = torch.stack([torch.stack([_images(1, 100 * i + k)[0] * (0.5 + 0.1 * k) for k in range(len(SIZES))])
                          for i in range(N)])  # (N, K, 3, 32, 32)
    text = ["a photo of a dog", "a red circle", "two cats on a mat"]
    caption_of = lambda i: text[i % 3]  # noqa: E731
    return {
        "fid": (lambda: Fid(Stream(N), ext, {"train": ref}),
                plain, {"fid_train": statistics.fid_from_features(ext.features(plain), ref_feats)}),
        "clip": (lambda: ClipScore(Stream(N), tiny_clip, caption_of),
                 plain, {"clip": float(tiny_clip(plain, [caption_of(i) for i in range(N)]).mean())}),
        "align": (lambda: Align(Stream(N), lambda i: captions[i]),
                  shapes_u8, {f"align/{k}": v for k, v in align.score_images(shapes_u8, captions).items()}),
        "lpips": (lambda: LpipsSize(Stream(N, SIZES), net),
                  sweeps, {"lpips_size": float(np.mean([lpips_size.mean_pairwise_lpips(s, net) for s in sweeps]))}),
    }


def _feed(metric, samples: torch.Tensor, indices: list[int], batch: int):
    for start in range(0, len(indices), batch):
        idx = indices[start:start + batch]
        metric.update(samples[idx], idx)
    return metric


def _assert_same(a: dict, b: dict, rel: float):
    assert list(a) == list(b)
    for k in a:
        if np.isnan(a[k]):
            assert np.isnan(b[k]), k
        else:
            assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-9), k


@pytest.mark.parametrize("name", ["fid", "clip", "align", "lpips"])
def test_merged_ranks_equal_one_pass(cases, name):
    make, samples, expected = cases[name]
    one = _feed(make(), samples, list(range(N)), batch=N).compute()
    _assert_same(expected, one, rel=1e-5)  # the protocol computes the metric's own definition
    states = [pickle.loads(pickle.dumps(_feed(make(), samples, list(range(r, N, 2)), batch=2).state()))
              for r in range(2)]
    merged = make()
    merged.merge(states)
    _assert_same(one, merged.compute(), rel=1e-5)
    assert merged.ordered()[0] == list(range(N))
    if name == "fid":  # the generated statistics are those of one pass
        np.testing.assert_allclose(np.stack(merged.ordered()[1]), features.random_extractor(4, 32).features(samples),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fid", "clip", "align", "lpips"])
def test_order_of_updates_and_merges_does_not_matter(cases, name):
    make, samples, _ = cases[name]
    perm = [int(i) for i in torch.randperm(N, generator=torch.Generator().manual_seed(3))]
    shuffled = _feed(make(), samples, perm, batch=4)
    assert shuffled.ordered()[0] == list(range(N))
    parts = [_feed(make(), samples, perm[:4], batch=4).state(), _feed(make(), samples, perm[4:], batch=4).state()]
    forward, backward = make(), make()
    forward.merge(parts)
    backward.merge(parts[::-1])
    assert forward.compute() == pytest.approx(backward.compute(), nan_ok=True)  # the same values in the same order
    _assert_same(shuffled.compute(), forward.compute(), rel=0)


@pytest.mark.parametrize("name", ["fid", "clip", "align", "lpips"])
def test_duplicate_sample_index_is_an_error(cases, name):
    make, samples, _ = cases[name]
    metric = _feed(make(), samples, [0, 1, 2], batch=3)
    with pytest.raises(ValueError, match=f"{name}: sample index 2 recorded twice"):
        metric.update(samples[[2]], [2])
    with pytest.raises(ValueError, match=f"{name}: sample index 1 recorded twice"):
        make().merge([metric.state(), _feed(make(), samples, [1, 5], batch=2).state()])
    with pytest.raises(ValueError, match=f"{name}: 2 samples but 3 sample indices"):
        make().update(samples[:2], [0, 1, 2])


def test_grid_keeps_the_first_samples_by_index():
    images = _images(N, 2, size=8)
    ranks = [Grid(Stream(N), 4) for _ in range(2)]
    for r, grid in enumerate(ranks):
        _feed(grid, images, list(range(r, N, 2)), batch=3)
    merged = Grid(Stream(N), 4)
    merged.merge([g.state() for g in ranks[::-1]])
    assert merged.nrow is None and torch.equal(merged.images(), images[:4])
    sweeps = torch.stack([images[i:i + 3] for i in range(3)])  # (3, K=3, 3, 8, 8)
    sweep_grid = _feed(Grid(Stream(3, SIZES), 2), sweeps, [2, 0, 1], batch=3)
    assert sweep_grid.nrow == 3 and torch.equal(sweep_grid.images(), sweeps[:2].reshape(6, 3, 8, 8))


def test_lpips_needs_sweeps_of_its_sizes():
    net = lpips_size.lpips_model("alex", random_backbone=True)
    with pytest.raises(ValueError, match="size-sweep stream"):
        LpipsSize(Stream(4), net)
    with pytest.raises(ValueError, match=r"expected size sweeps \(B, 3, 3, H, W\)"):
        LpipsSize(Stream(4, SIZES), net).update(_images(2, 0), [0, 1])


def test_cases_are_not_degenerate(cases):
    """The parity above would hold trivially for constant metrics: these values are informative."""
    values = {name: case[2] for name, case in cases.items()}
    assert values["fid"]["fid_train"] > 0.01 and values["lpips"]["lpips_size"] > 0.01
    assert values["clip"]["clip"] > 0.0 and values["align"]["align/overall"] > 0.5
