"""Evaluation overheads (EVAL, issue 7): the in-memory FID feature path against writing PNGs and reading
them back with clean-fid (the same features), and the analytic align detector's throughput.

    PYTHONPATH=python python -m pytest benchmarks/test_bench_eval.py --benchmark-only -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from condiff.eval import align, features, reference
from condiff.io.images import to_uint8

N, RES = 128, 64


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(N, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=RES, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def extractor():
    # clean-fid's real resize to 299 px; a small random network stands in for Inception (offline)
    return features.random_extractor(dim=64, size=299, batch_size=64)


def test_bench_fid_features_in_memory(benchmark, images, extractor):
    feats = benchmark.pedantic(extractor.features, args=(images,), rounds=3, iterations=1)
    assert feats.shape == (N, 64)


def test_bench_fid_features_via_png_folder(benchmark, images, extractor, tmp_path):
    from cleanfid.fid import get_folder_features

    def via_pngs():
        for i, u8 in enumerate(to_uint8(images)):
            Image.fromarray(u8).save(tmp_path / f"{i:06d}.png")
        return get_folder_features(str(tmp_path), extractor.fn, num_workers=0, batch_size=64,
                                   device=torch.device("cpu"), mode="clean", verbose=False)

    feats = benchmark.pedantic(via_pngs, rounds=3, iterations=1)
    np.testing.assert_allclose(feats, extractor.features(images), rtol=1e-5, atol=1e-5)


def test_bench_align_detector(benchmark):
    from condiff.data import shapes

    samples = [shapes.render(i, "demo", seed=0) for i in range(N)]
    imgs = torch.from_numpy(np.stack([reference.center_crop_arr(s.image, 32) for s in samples])).permute(0, 3, 1, 2)
    caps = [s.caption for s in samples]
    r = benchmark.pedantic(align.score_images, args=(imgs, caps), rounds=3, iterations=1)
    assert r["overall"] > 0.95
