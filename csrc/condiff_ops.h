// condiff native kernels: shared declarations and input checks.
//
// Every op is registered in the `condiff_native` torch library (csrc/bindings.cpp) with a CPU kernel
// (csrc/cpu/*.cpp, OpenMP through at::parallel_for) and, when compiled with nvcc, a CUDA kernel
// (csrc/cuda/*.cu). Autograd, fake tensors and the public API live in python/condiff/ops/.
//
// Conventions (all kernels): inputs contiguous, math in at::opmath_type<scalar_t> (float for
// bfloat16/float16, double for float64), outputs in the input dtype; per-row statistics are recomputed
// in backward instead of being stored. Weight/parameter gradients are reduced in fixed-size chunks of
// rows (kRowsPerChunk) and the chunks summed afterwards, so results do not depend on the thread count.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace condiff {

constexpr int64_t kRowsPerChunk = 64;
// Elements per parallel task (ATen's GRAIN_SIZE): smaller work runs on one thread, without a fork/join.
constexpr int64_t kGrain = 32768;

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ", a.device(),
              " and ", b.device());
}

inline void check_contig(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// ---- CPU ----
at::Tensor adaln_fwd_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_bwd_cpu(const at::Tensor& gy, const at::Tensor& x,
                                                             const at::Tensor& scale, double eps);
at::Tensor gated_fwd_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y);
std::tuple<at::Tensor, at::Tensor> gated_bwd_cpu(const at::Tensor& g, const at::Tensor& gate, const at::Tensor& y);
std::tuple<at::Tensor, at::Tensor, at::Tensor> qknorm_join_fwd_cpu(const at::Tensor& qkv_x, const at::Tensor& qkv_c,
                                                                   const at::Tensor& weights, int64_t num_heads,
                                                                   double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> qknorm_join_bwd_cpu(const at::Tensor& gq, const at::Tensor& gk,
                                                                   const at::Tensor& gv, const at::Tensor& qkv_x,
                                                                   const at::Tensor& qkv_c, const at::Tensor& weights,
                                                                   int64_t num_heads, double eps);
at::Tensor replicate_pad_fwd_cpu(const at::Tensor& emb, const at::Tensor& lengths, double beta,
                                 const at::Tensor& noise);
at::Tensor replicate_pad_bwd_cpu(const at::Tensor& g, const at::Tensor& emb, const at::Tensor& lengths, double beta,
                                 const at::Tensor& noise);

}  // namespace condiff
