// Schemas of the `condiff_native` torch library and its CPU kernels; CUDA kernels register themselves
// in csrc/cuda/*.cu. Loaded from Python with torch.ops.load_library (no pybind): see
// python/condiff/ops/_native.py. `build_info()` tells Python how this library was compiled.
#include <torch/library.h>

#include <string>

#include "condiff_ops.h"

#ifndef CONDIFF_BUILD_INFO
#define CONDIFF_BUILD_INFO "unknown"
#endif

namespace condiff {
namespace {
std::string build_info() {
#ifdef _OPENMP
  const std::string omp = "openmp=1";
#else
  const std::string omp = "openmp=0";
#endif
  return std::string(CONDIFF_BUILD_INFO) + " " + omp;
}
}  // namespace
}  // namespace condiff

TORCH_LIBRARY(condiff_native, m) {
  m.def("build_info() -> str", &condiff::build_info);
  m.def("adaln_fwd(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor");
  m.def("adaln_bwd(Tensor grad_out, Tensor x, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("gated_fwd(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def("gated_bwd(Tensor grad_out, Tensor gate, Tensor y) -> (Tensor, Tensor)");
  m.def("qknorm_join_fwd(Tensor qkv_x, Tensor qkv_c, Tensor weights, int num_heads, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "qknorm_join_bwd(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor qkv_x, Tensor qkv_c, Tensor weights, "
      "int num_heads, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("replicate_pad_fwd(Tensor emb, Tensor lengths, float beta, Tensor noise) -> Tensor");
  m.def("replicate_pad_bwd(Tensor grad_out, Tensor emb, Tensor lengths, float beta, Tensor noise) -> Tensor");
}

TORCH_LIBRARY_IMPL(condiff_native, CPU, m) {
  m.impl("adaln_fwd", &condiff::adaln_fwd_cpu);
  m.impl("adaln_bwd", &condiff::adaln_bwd_cpu);
  m.impl("gated_fwd", &condiff::gated_fwd_cpu);
  m.impl("gated_bwd", &condiff::gated_bwd_cpu);
  m.impl("qknorm_join_fwd", &condiff::qknorm_join_fwd_cpu);
  m.impl("qknorm_join_bwd", &condiff::qknorm_join_bwd_cpu);
  m.impl("replicate_pad_fwd", &condiff::replicate_pad_fwd_cpu);
  m.impl("replicate_pad_bwd", &condiff::replicate_pad_bwd_cpu);
}
