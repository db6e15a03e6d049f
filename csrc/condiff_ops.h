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

#include <array>
#include <tuple>
#include <utility>

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

// adaln_bwd: grad_out and x (B, N, D), scale (B, D), all of one dtype and device.
inline void check_adaln_bwd_inputs(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& scale) {
  check_contig(gy, "grad_out", 3);
  check_contig(x, "x", 3);
  check_contig(scale, "scale", 2);
  check_same(x, gy, "x", "grad_out");
  check_same(x, scale, "x", "scale");
  TORCH_CHECK(gy.sizes() == x.sizes(), "grad_out must have x's shape ", x.sizes(), ", got ", gy.sizes());
  TORCH_CHECK(scale.size(0) == x.size(0) && scale.size(1) == x.size(2), "scale must be (B, D) = (", x.size(0), ", ",
              x.size(2), "), got ", scale.sizes());
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

// gated_bwd: grad_out and y (B, N, D), gate (B, D), all of one dtype and device.
inline void check_gated_bwd_inputs(const at::Tensor& g, const at::Tensor& gate, const at::Tensor& y) {
  check_contig(g, "grad_out", 3);
  check_contig(y, "y", 3);
  check_contig(gate, "gate", 2);
  check_same(y, g, "y", "grad_out");
  check_same(y, gate, "y", "gate");
  TORCH_CHECK(g.sizes() == y.sizes(), "grad_out must have y's shape ", y.sizes(), ", got ", g.sizes());
  TORCH_CHECK(gate.size(0) == y.size(0) && gate.size(1) == y.size(2), "gate must be (B, D) = (", y.size(0), ", ",
              y.size(2), "), got ", gate.sizes());
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
  const int64_t B = qkv_x.size(0), L = qkv_x.size(1) + qkv_c.size(1), hd = qkv_x.size(2) / (3 * H);
  const std::array<int64_t, 4> want{B, H, L, hd};
  const std::array<std::pair<const at::Tensor*, const char*>, 3> grads{{{&gq, "grad_q"}, {&gk, "grad_k"}, {&gv, "grad_v"}}};
  for (const auto& [g, name] : grads) {
    check_contig(*g, name, 4);
    check_same(qkv_x, *g, "qkv_x", name);
    TORCH_CHECK(g->sizes() == at::IntArrayRef(want), name, " must be (B, H, N + M, head_dim) = ", at::IntArrayRef(want),
                ", got ", g->sizes());
  }
}

// replicate_pad_fwd: emb and noise (B, T, C), lengths int64 (B,). The range 1 <= length <= T is checked on the
// host by the CPU kernels (check_lengths_host) and by the public Python op; the CUDA kernels assert it on the
// device and clamp (a host check there would synchronise the stream and break CUDA-graph capture).
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
  check_same(emb, g, "emb", "grad_out");
  TORCH_CHECK(g.sizes() == emb.sizes(), "grad_out must have emb's shape ", emb.sizes(), ", got ", g.sizes());
}

// 1 <= lengths[b] <= T for every row, for lengths in host memory (the CPU kernels).
inline void check_lengths_host(const at::Tensor& lengths, int64_t T) {
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < lengths.size(0); ++b)
    TORCH_CHECK(len[b] >= 1 && len[b] <= T, "lengths[", b, "] = ", len[b], " must be in [1, T=", T, "]");
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
