"""Loads the native extension `_condiff_native.so` (csrc/, built by CMake) and records why it is not live.

The library registers its kernels in the `condiff_native` torch library (TORCH_LIBRARY, CPU and CUDA
dispatch keys), so loading it is `torch.ops.load_library(path)`; nothing here raises: a missing or
broken library leaves `LOADED = False` and the reason in `REASON` (shown by `condiff ops-info`).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

LIB_NAME = "_condiff_native.so"
LIB_PATH = Path(__file__).with_name(LIB_NAME)

LOADED = False
REASON = ""
BUILD_INFO: dict[str, str] = {}  # e.g. {"torch": "2.14.1+cu130", "cuda": "1", "nvcc": "13.0.88", "archs": "80;90", "openmp": "1"}


def _load() -> None:
    global LOADED, REASON, BUILD_INFO
    if os.environ.get("CONDIFF_NATIVE", "1") == "0":
        REASON = "disabled by CONDIFF_NATIVE=0"
        return
    if not LIB_PATH.exists():
        REASON = (f"{LIB_NAME} not built (install with `pip install --no-build-isolation .`, or for a source "
                  f"checkout `cmake -S . -B build/dev -G Ninja -DCONDIFF_INPLACE=ON && cmake --build build/dev`)")
        return
    try:
        torch.ops.load_library(str(LIB_PATH))
        info = torch.ops.condiff_native.build_info()
    except Exception as exc:  # an ABI mismatch or missing symbol must not break `import condiff`
        REASON = f"failed to load {LIB_PATH}: {type(exc).__name__}: {exc}"
        return
    BUILD_INFO = dict(item.split("=", 1) for item in info.split() if "=" in item)
    LOADED = True


@lru_cache(maxsize=None)
def cuda_compiled() -> bool:
    """True when the loaded library carries CUDA kernels (built with nvcc)."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("condiff_native::adaln_fwd", "CUDA")


_load()
