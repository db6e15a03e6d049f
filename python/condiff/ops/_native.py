"""Loads the native extension `_condiff_native.so` (csrc/, built by CMake) and records why it is not live.

The library registers its kernels in the `condiff_native` torch library (TORCH_LIBRARY, CPU and CUDA
dispatch keys), so loading it is `torch.ops.load_library(path)`. It uses torch's C++ API, which is stable
only within one torch release, so before loading it the torch it was compiled against (`_condiff_native.info`,
written by CMake beside it) is compared with the running torch. Nothing here raises: a mismatched, missing or
broken library leaves `LOADED = False` and the reason in `REASON` (shown by `condiff ops-info`), and the ops
fall back to the reference implementations; a mismatched or broken one also warns once at import, naming
the rebuild command.
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch

LIB_NAME = "_condiff_native.so"
LIB_PATH = Path(__file__).with_name(LIB_NAME)


class NativeExtensionWarning(RuntimeWarning):
    """The native extension exists but cannot be used with this torch; the reference ops run instead."""


def read_record(lib: Path) -> dict[str, str]:
    """The build record beside `lib` ({"torch", "cxx11_abi", "built_by", "source_dir", ...}); {} if absent."""
    info = lib.with_suffix(".info")
    if not info.exists():
        return {}
    return dict(line.split("=", 1) for line in info.read_text().splitlines() if "=" in line)


def rebuild_command(lib: Path, record: dict[str, str]) -> str:
    """The command that rebuilds `lib` against the running torch (this interpreter's)."""
    py = shlex.quote(sys.executable)
    source = record.get("source_dir")
    if record.get("built_by") == "inplace" or (not record and (lib.parents[3] / "CMakeLists.txt").exists()):
        source = source or str(lib.parents[3])
        build = record.get("build_dir") or str(Path(source) / "build" / "dev")
        return (f"cmake -S {shlex.quote(source)} -B {shlex.quote(build)} -G Ninja -DCONDIFF_INPLACE=ON "
                f"-DPython_EXECUTABLE={py} && cmake --build {shlex.quote(build)}")
    if not source or not (Path(source) / "pyproject.toml").exists():
        source = "<condiff source checkout>"
    return (f"{py} -m pip install scikit-build-core ninja 'cmake>=3.26' && "
            f"{py} -m pip install --no-build-isolation --no-deps --force-reinstall {shlex.quote(source)}")


def _mismatch(built: str | None, built_abi: str | None) -> str:
    """Why a library built against torch `built` (C++11 ABI flag `built_abi`) cannot run here; "" if it can."""
    running, running_abi = str(torch.__version__), str(int(torch._C._GLIBCXX_USE_CXX11_ABI))
    if built is not None and built != running:
        return f"built against torch {built}, but torch {running} is running"
    if built_abi is not None and built_abi != running_abi:
        return f"built with _GLIBCXX_USE_CXX11_ABI={built_abi}, but torch {running} uses {running_abi}"
    return ""


def load(lib: Path) -> tuple[bool, str, dict[str, str]]:
    """Load `lib` if it matches the running torch: (loaded, reason it is not, its build_info()).

    A library that is present but mismatched or unloadable gives one NativeExtensionWarning.
    """
    if os.environ.get("CONDIFF_NATIVE", "1") == "0":
        return False, "disabled by CONDIFF_NATIVE=0", {}
    if not lib.exists():
        return False, (f"{lib.name} not built (`pip install .` builds it; for a source checkout "
                       f"`cmake -S . -B build/dev -G Ninja -DCONDIFF_INPLACE=ON && cmake --build build/dev`)"), {}
    record = read_record(lib)
    problem = _mismatch(record.get("torch"), record.get("cxx11_abi"))
    info: dict[str, str] = {}
    if not problem:  # never dlopen a library compiled for another torch: that is where undefined symbols crash
        try:
            torch.ops.load_library(str(lib))
            text = torch.ops.condiff_native.build_info()
        except Exception as exc:  # a broken library must not break `import condiff`
            problem = f"failed to load {lib}: {type(exc).__name__}: {exc}"
        else:
            info = dict(item.split("=", 1) for item in text.split() if "=" in item)
            problem = _mismatch(info.get("torch"), None)  # a library without a build record says it here
    if not problem:
        return True, "", info
    reason = (f"{lib.name} {problem}; the ops fall back to the reference (or Triton) kernels. Rebuild it against the running torch: "
              f"{rebuild_command(lib, record)}")
    warnings.warn(f"condiff: native kernels off: {reason}", NativeExtensionWarning, stacklevel=2)
    return False, reason, info


LOADED, REASON, BUILD_INFO = load(LIB_PATH)
# BUILD_INFO e.g. {"torch": "2.14.1", "cuda": "1", "nvcc": "13.0.88", "archs": "80,90", "openmp": "1"}


@lru_cache(maxsize=None)
def cuda_compiled() -> bool:
    """True when the loaded library carries CUDA kernels (built with nvcc)."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("condiff_native::adaln_fwd", "CUDA")
