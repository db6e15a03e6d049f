"""The native extension is checked against the running torch before it is loaded (python/condiff/ops/_native.py).

A library built for another torch release, or one that fails to load, must leave `import condiff` working on
the reference ops with exactly one warning that names both torch versions and the rebuild command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from condiff.ops import _native

PYTHONPATH = str(Path(_native.__file__).parents[2])

# Fakes a running torch that differs from the one the installed library was built against, then imports condiff.
FAKED_MISMATCH = """
import contextlib, io, json, warnings, torch
torch.__version__ = "0.0.1"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import condiff.ops as ops
    from condiff.ops import _native, info, reference
    x, shift, scale = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8)
    out = ops.adaln_modulate(x, shift, scale)
    torch.testing.assert_close(out, reference.adaln_modulate(x, shift, scale))
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    info.main([])
print(json.dumps({"warnings": [(w.category.__name__, str(w.message)) for w in caught], "loaded": _native.LOADED,
                  "backends": ops.backends(), "choice": ops._select(None, x), "ops_info": buf.getvalue()}))
"""


@pytest.mark.skipif(not _native.LIB_PATH.exists(), reason="native extension not built")
def test_library_built_for_another_torch_falls_back_with_one_warning():
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    env.pop("CONDIFF_NATIVE", None)
    res = subprocess.run([sys.executable, "-c", FAKED_MISMATCH], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    ours = [w for w in out["warnings"] if w[0] == "NativeExtensionWarning"]
    assert len(ours) == 1, out["warnings"]
    message = ours[0][1]
    built = _native.read_record(_native.LIB_PATH).get("torch") or _native.BUILD_INFO["torch"]
    assert f"built against torch {built}, but torch 0.0.1 is running" in message
    assert _native.rebuild_command(_native.LIB_PATH, _native.read_record(_native.LIB_PATH)) in message
    assert not out["loaded"] and out["choice"] == "reference"
    assert not out["backends"]["cpu"]["live"] and not out["backends"]["cuda"]["live"]
    reason = out["backends"]["cpu"]["reason"]
    assert message.endswith(reason) and reason in out["ops_info"]  # `condiff ops-info` shows why


def _fake_library(tmp_path: Path, record: str | None) -> Path:
    lib = tmp_path / "condiff" / "ops" / _native.LIB_NAME
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not an ELF file")
    if record is not None:
        lib.with_suffix(".info").write_text(record)
    return lib


def _load_warning(lib: Path) -> tuple[bool, str, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, reason, _ = _native.load(lib)
    assert [w.category for w in caught] == [_native.NativeExtensionWarning]
    return loaded, reason, str(caught[0].message)


def test_mismatch_is_found_before_the_library_is_opened(tmp_path):
    # the record says another torch: the (unloadable) file must not even be opened
    lib = _fake_library(tmp_path, f"torch=0.0.1\ncxx11_abi=1\nbuilt_by=pip\nsource_dir={tmp_path}\n")
    loaded, reason, message = _load_warning(lib)
    assert not loaded
    assert reason.startswith(f"{lib.name} built against torch 0.0.1, but torch {torch.__version__} is running")
    assert "failed to load" not in reason and message.endswith(reason)
    # no pyproject.toml at the recorded source: the command says where the source goes
    assert reason.endswith("-m pip install --no-build-isolation --no-deps --force-reinstall '<condiff source checkout>'")


def test_abi_flag_mismatch(tmp_path):
    other = 1 - int(torch._C._GLIBCXX_USE_CXX11_ABI)
    lib = _fake_library(tmp_path, f"torch={torch.__version__}\ncxx11_abi={other}\nbuilt_by=pip\n")
    loaded, reason, _ = _load_warning(lib)
    assert not loaded and f"built with _GLIBCXX_USE_CXX11_ABI={other}" in reason


def test_library_that_fails_to_load_falls_back_with_one_warning(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    lib = _fake_library(tmp_path, f"torch={torch.__version__}\ncxx11_abi={int(torch._C._GLIBCXX_USE_CXX11_ABI)}\n"
                                  f"built_by=pip\nsource_dir={tmp_path}\n")
    loaded, reason, _ = _load_warning(lib)
    assert not loaded and reason.startswith(f"{lib.name} failed to load {lib}: OSError")
    assert reason.endswith(f"-m pip install --no-build-isolation --no-deps --force-reinstall {tmp_path}")


def test_inplace_build_names_the_cmake_rebuild(tmp_path):
    lib = _fake_library(tmp_path, "torch=0.0.1\nbuilt_by=inplace\nsource_dir=/src\nbuild_dir=/src/build/dev\n")
    _, reason, _ = _load_warning(lib)
    assert reason.endswith(f"cmake -S /src -B /src/build/dev -G Ninja -DCONDIFF_INPLACE=ON "
                           f"-DPython_EXECUTABLE={sys.executable} && cmake --build /src/build/dev")


def test_missing_or_disabled_library_does_not_warn(tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.load(tmp_path / _native.LIB_NAME)[:2] == (False, f"{_native.LIB_NAME} not built (`pip install .` builds it; for a source checkout `cmake -S . -B build/dev -G Ninja -DCONDIFF_INPLACE=ON && cmake --build build/dev`)")
        monkeypatch.setenv("CONDIFF_NATIVE", "0")
        assert _native.load(_native.LIB_PATH)[:2] == (False, "disabled by CONDIFF_NATIVE=0")
