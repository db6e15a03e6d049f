"""The native extension builds from this source tree with CMake, CUDA kernels included where nvcc exists.

Slow (a full nvcc compile, minutes on 2 cores): `pytest -m slow tests/test_ops_build.py`. CI covers the same
ground on every run: `.ci/run` builds with nvcc and sets CONDIFF_EXPECT_CUDA=1, so
tests/test_ops.py::test_backends_report fails if the installed library lacks the CUDA kernels.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return str(Path(home) / "bin" / "nvcc") if (Path(home) / "bin" / "nvcc").exists() else shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
@pytest.mark.parametrize("cuda", ["1", "0"])
def test_cmake_build_loads_and_reports_cuda(tmp_path, cuda):
    if cuda == "1" and _nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    env = dict(os.environ, CONDIFF_CUDA=cuda, CONDIFF_CUDA_ARCHS="90")
    if cuda == "1":
        env["CUDA_HOME"] = str(Path(_nvcc()).parents[1])
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}", *gen],
                   env=env, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], env=env, check=True, capture_output=True)
    lib = build / "_condiff_native.so"
    code = ("import torch, sys; torch.ops.load_library(sys.argv[1]); print(torch.ops.condiff_native.build_info()); "
            "print(torch._C._dispatch_has_kernel_for_dispatch_key('condiff_native::adaln_fwd', 'CUDA'))")
    out = subprocess.run([sys.executable, "-c", code, str(lib)], check=True, capture_output=True, text=True).stdout
    info, has_cuda = out.split("\n")[:2]
    assert f"cuda={cuda}" in info and "openmp=1" in info
    assert has_cuda == ("True" if cuda == "1" else "False")
