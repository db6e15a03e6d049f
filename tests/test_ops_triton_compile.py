"""The Triton kernels compile for a Hopper GPU (sm_90) without one: `triton.compile` with an explicit target
runs Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX, ptxas) on the CPU. This catches what the interpreter
cannot (typing of the compiled kernel, constexpr specialisation, float64 scalar arguments), and lets the
replicate-pad kernels' integer arithmetic be read off their TTIR: every offset product is 64-bit, so that
rows of more than 2^31 elements do not wrap around.
"""

from __future__ import annotations

import os
import re

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are interpreted under TRITON_INTERPRET=1", allow_module_level=True)

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from condiff.ops import _triton as K  # noqa: E402


def _kernels(io: str, acc: str) -> dict:
    """kernel -> (signature, constexprs) for inputs of Triton dtype `io` and accumulation dtype `acc`; the
    signature lists parameter names per kind: io / acc / int64 pointers, i32, fp32 / fp64 scalars."""
    kinds = {"io": f"*{io}", "acc": f"*{acc}", "len": "*i64", "i32": "i32", "f32": "fp32", "f64": "fp64"}

    def sig(**groups: str) -> dict[str, str]:
        return {name: kinds[kind] for kind, names in groups.items() for name in names.split()}

    ACC = tl.float64 if acc == "fp64" else tl.float32
    rows = dict(ACC=ACC, ROWS_=K.ROWS, BLOCK_D=64)
    heads = dict(ACC=ACC, BLOCK_H=16, BLOCK_HD=64)
    pad = dict(ACC=ACC, BLOCK_C=256)
    return {
        K._adaln_fwd_kernel: (sig(io="X SH SC Y", i32="N D", f32="eps"), dict(ACC=ACC, BLOCK_D=64)),
        K._adaln_bwd_kernel: (sig(io="G X SC GX", acc="P", i32="N D NCHUNK", f32="eps"), rows),
        K._gated_fwd_kernel: (sig(io="X GA Yin O", i32="N D"), dict(ACC=ACC, BLOCK_D=64)),
        K._gated_bwd_kernel: (sig(io="G GA Yin GY", acc="P", i32="N D NCHUNK"), rows),
        K._qk_fwd_kernel: (sig(io="SRC Q K V", acc="WQ WK", i32="S L L0 H HD", f32="eps"), heads),
        K._qk_bwd_kernel: (sig(io="GQ GK GV SRC GSRC", acc="WQ WK P", i32="NTOK S L L0 H HD", f32="eps"),
                           dict(heads, ROWS_=K.ROWS)),
        K._pad_fwd_kernel: (sig(io="E Z O", len="LEN", i32="T C NCB", f64="beta"), pad),
        K._pad_bwd_kernel: (sig(io="G E Z GE", len="LEN", i32="T C NCB", f64="beta"), pad),
    }


def _compile(fn, signature: dict, constexprs: dict):
    params = [p.name for p in fn.params]
    ordered = {name: signature.get(name, "constexpr") for name in params}
    assert set(signature) | set(constexprs) == set(params), (fn.__name__, params)
    return triton.compile(ASTSource(fn=fn, signature=ordered, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))


@pytest.mark.parametrize("io,acc", [("bf16", "fp32"), ("fp64", "fp64")])
def test_triton_kernels_compile_for_sm90(io, acc):
    kernels = _kernels(io, acc)
    if io == "fp64":  # (a subset: each compile takes seconds) the reductions and the float64 beta path
        kernels = {k: v for k, v in kernels.items() if k in (K._adaln_bwd_kernel, K._qk_bwd_kernel, K._pad_fwd_kernel)}
    for fn, (signature, constexprs) in kernels.items():
        compiled = _compile(fn, signature, constexprs)
        assert compiled.asm.get("ptx"), fn.__name__


def test_triton_pad_offsets_are_int64():
    for fn, (signature, constexprs) in _kernels("bf16", "fp32").items():
        if fn not in (K._pad_fwd_kernel, K._pad_bwd_kernel):
            continue
        ttir = _compile(fn, signature, constexprs).asm["ttir"]
        muls = [line.strip() for line in ttir.splitlines() if "arith.muli" in line]
        assert muls, ttir
        narrow = [m for m in muls if re.search(r":\s*(tensor<\d+x)?i32>?\s", m + " ")]
        assert not narrow, f"{fn.__name__}: 32-bit products in the offsets: {narrow}"
