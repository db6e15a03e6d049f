"""Triton kernels on the CPU: Triton's interpreter (TRITON_INTERPRET=1) runs them on CPU tensors.

Triton decides at `@triton.jit` decoration time whether to interpret (it reads TRITON_INTERPRET then),
so the kernels are imported and checked in a fresh subprocess with the variable set, on small float32
shapes (the interpreter is slow and its half-precision math is not faithful). On a GPU the same parity
checks run directly in tests/test_ops.py::test_gpu_kernels_match_reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import test_ops

SCRIPT = """
import json, torch
import test_ops
torch.manual_seed(0)
assert test_ops.ops.backends()["triton"]["live"], test_ops.ops.backends()["triton"]
print(json.dumps(test_ops.parity_errors("triton", torch.float32)))
"""


def test_triton_kernels_match_reference_in_interpreter():
    package_root = Path(test_ops.ops.__file__).parents[2]  # the condiff under test (source tree or installed)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(package_root), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert {r["op"] for r in rows} == set(test_ops.SHAPES)
    assert len(rows) > 40
    bad = [r for r in rows if not r["err"] <= test_ops.TOL[torch.float32]]
    assert not bad, bad
