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
#include <ATen/OpMathType.h>
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

// ---- Per-op input checks, shared by the CPU and CUDA host functions ----

// adaln_fwd: x (B, N, D), shift and scale (B, D), all of one dtype and device.
inline void check_adaln_inputs(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  check_contig(x, "x", 3);
  check_contig(shift, "shift", 2);
  check_contig(scale, "scale", 2);
  check_same(x, shift, "x", "shift");
  check_same(x, scale, "x", "scale");
  const int64_t B = x.size(0), D = x.size(2);
  TORCH_CHECK(shift.size(0) == B && shift.size(1) == D && scale.sizes() == shift.sizes(),
              "shift and scale must be (B, D) = (", B, ", ", D, "), got ", shift.sizes(), " and ", scale.sizes());
}

// adaln_bwd: grad_out and x (B, N, D), scale (B, D).
inline void check_adaln_bwd_inputs(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& scale) {
  check_contig(gy, "grad_out", 3);
  check_contig(x, "x", 3);
  check_contig(scale, "scale", 2);
  check_same(x, gy, "x", "grad_out");
}

// gated_fwd: x and y (B, N, D), gate (B, D).
inline void check_gated_inputs(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  check_contig(x, "x", 3);
  check_contig(y, "y", 3);
  check_contig(gate, "gate", 2);
  check_same(x, y, "x", "y");
  check_same(x, gate, "x", "gate");
  TORCH_CHECK(x.sizes() == y.sizes(), "x and y must have the same shape, got ", x.sizes(), " and ", y.sizes());
  const int64_t B = x.size(0), D = x.size(2);
  TORCH_CHECK(gate.size(0) == B && gate.size(1) == D, "gate must be (B, D) = (", B, ", ", D, "), got ", gate.sizes());
}

// gated_bwd: grad_out and y (B, N, D), gate (B, D).
inline void check_gated_bwd_inputs(const at::Tensor& g, const at::Tensor& gate, const at::Tensor& y) {
  check_contig(g, "grad_out", 3);
  check_contig(y, "y", 3);
  check_contig(gate, "gate", 2);
  check_same(g, y, "grad_out", "y");
}

// qknorm_join_fwd: qkv_x (B, N, 3D), qkv_c (B, M, 3D), weights (4, head_dim) in the accumulation dtype.
inline void check_qknorm_join_inputs(const at::Tensor& qkv_x, const at::Tensor& qkv_c, const at::Tensor& weights,
                                     int64_t H) {
  check_contig(qkv_x, "qkv_x", 3);
  check_contig(qkv_c, "qkv_c", 3);
  check_same(qkv_x, qkv_c, "qkv_x", "qkv_c");
  TORCH_CHECK(qkv_x.size(0) == qkv_c.size(0) && qkv_x.size(2) == qkv_c.size(2),
              "qkv_x and qkv_c must be (B, N, 3D) and (B, M, 3D), got ", qkv_x.sizes(), " and ", qkv_c.sizes());
  TORCH_CHECK(H > 0 && qkv_x.size(2) % (3 * H) == 0, "qkv last dim ", qkv_x.size(2), " must be 3 * num_heads * head_dim");
  const int64_t hd = qkv_x.size(2) / (3 * H);
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == 4 && weights.size(1) == hd && weights.is_contiguous() &&
                  weights.scalar_type() == at::toOpMathType(qkv_x.scalar_type()) && weights.device() == qkv_x.device(),
              "weights must be a contiguous (4, head_dim) tensor of the accumulation dtype on qkv's device");
}

// qknorm_join_bwd: the forward inputs plus grad_q, grad_k, grad_v (B, H, N + M, head_dim).
inline void check_qknorm_join_bwd_inputs(const at::Tensor& gq, const at::Tensor& gk, const at::Tensor& gv,
                                         const at::Tensor& qkv_x, const at::Tensor& qkv_c, const at::Tensor& weights,
                                         int64_t H) {
  check_qknorm_join_inputs(qkv_x, qkv_c, weights, H);
  check_contig(gq, "grad_q", 4);
  check_contig(gk, "grad_k", 4);
  check_contig(gv, "grad_v", 4);
  const int64_t B = qkv_x.size(0), L = qkv_x.size(1) + qkv_c.size(1), hd = qkv_x.size(2) / (3 * H);
  TORCH_CHECK(gq.size(0) == B && gq.size(1) == H && gq.size(2) == L && gq.size(3) == hd,
              "grad_q must be (B, H, L, hd), got ", gq.sizes());
}

// replicate_pad_fwd: emb and noise (B, T, C), lengths int64 (B,). The range 1 <= length <= T is checked by the
// CPU kernel and by the Python op (a device sync in the CUDA host function would serialise the stream).
inline void check_replicate_pad_inputs(const at::Tensor& emb, const at::Tensor& lengths, const at::Tensor& noise) {
  check_contig(emb, "emb", 3);
  check_contig(noise, "noise", 3);
  check_same(emb, noise, "emb", "noise");
  TORCH_CHECK(noise.sizes() == emb.sizes(), "noise must have emb's shape ", emb.sizes(), ", got ", noise.sizes());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == emb.size(0) && lengths.scalar_type() == at::kLong &&
                  lengths.device() == emb.device() && lengths.is_contiguous(),
              "lengths must be an int64 (B,) tensor on emb's device");
}

// replicate_pad_bwd: the forward inputs plus grad_out (B, T, C).
inline void check_replicate_pad_bwd_inputs(const at::Tensor& g, const at::Tensor& emb, const at::Tensor& lengths,
                                           const at::Tensor& noise) {
  check_replicate_pad_inputs(emb, lengths, noise);
  check_contig(g, "grad_out", 3);
  check_same(g, emb, "grad_out", "emb");
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
