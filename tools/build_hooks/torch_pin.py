"""scikit-build-core dynamic-metadata provider: build condiff against torch, and pin the runtime torch to it.

The native extension links against torch's C++ API, which is only stable within one torch release, so the
wheel must run with the torch it was compiled against. This provider (configured in pyproject.toml under
`[[tool.dynamic-metadata]]`) does both halves:

- `get_requires_for_dynamic_metadata` puts `torch` (the range in its `build-torch` setting) into the
  isolated build environment, so that plain `pip install .` can compile the extension;
- `dynamic_metadata` adds `torch==<the build torch's release>` to the wheel's dependencies, read from the
  torch that CMake compiles against (the build environment's, or the installed one under
  `pip install --no-build-isolation .`). The runtime torch is therefore the build torch.

`CONDIFF_NATIVE=0` builds no extension: no torch in the build environment, and the runtime torch range is
the `runtime-torch` setting instead of a pin.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.version import Version

__all__ = ["dynamic_metadata", "dynamic_wheel", "get_requires_for_dynamic_metadata"]

KEYS = {"field", "build-torch", "runtime-torch"}


def _settings(settings: Mapping[str, Any]) -> tuple[str, str]:
    unknown = set(settings) - KEYS
    if unknown or settings.get("field") != "dependencies":
        raise ValueError(f"tools/build_hooks/torch_pin.py: expected settings field='dependencies', build-torch, "
                         f"runtime-torch; got {dict(settings)}")
    return str(settings["build-torch"]), str(settings["runtime-torch"])


def _native() -> bool:
    return os.environ.get("CONDIFF_NATIVE", "1") != "0"


def get_requires_for_dynamic_metadata(settings: Mapping[str, Any]) -> list[str]:
    build_torch, _ = _settings(settings)
    return [f"torch{build_torch}"] if _native() else []


def dynamic_metadata(settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, list[str]]:
    build_torch, runtime_torch = _settings(settings)
    if not _native():
        return {"dependencies": [f"torch{runtime_torch}"]}
    try:
        built = Version(version("torch"))
    except PackageNotFoundError:
        raise RuntimeError(f"condiff: no torch in the build environment; it should have been installed from "
                           f"build-torch = 'torch{build_torch}' (for `pip install --no-build-isolation .`, "
                           f"install torch first)") from None
    # The release without the local label (+cu130, +cpu): `torch==2.14.1` matches 2.14.1+cu130 as well.
    return {"dependencies": [f"torch=={built.public}"]}


def dynamic_wheel(settings: Mapping[str, Any]) -> dict[str, bool]:
    """The pin depends on the torch each wheel is built against, not on the source: mark it Dynamic."""
    return {"dependencies": True}
