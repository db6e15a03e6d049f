// Fused unpack + per-head RMSNorm(q, k) + join of mmDiT joint attention, on the CPU.
//
// Forward:  qkv_x (B, N, 3D), qkv_c (B, M, 3D) packed [q | k | v], D = H * hd head-major
//           -> q, k, v (B, H, L, hd), L = N + M, image tokens first;
//           q = q_s * rsqrt(mean(q_s^2) + eps) * w_q[s] (same for k), s the token's stream.
// weights:  (4, hd) float in the order [q_x, k_x, q_c, k_c].
// Backward: gq, gk, gv (B, H, L, hd) -> g_qkv_x, g_qkv_c, g_weights (4, hd) (accumulation dtype).
//           With xh = x * r:  gx = r * (g*w - xh * mean(g*w*xh)),  gw = sum over tokens/heads of g*xh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../condiff_ops.h"

namespace condiff {

std::tuple<at::Tensor, at::Tensor, at::Tensor> qknorm_join_fwd_cpu(const at::Tensor& qkv_x, const at::Tensor& qkv_c,
                                                                   const at::Tensor& weights, int64_t H, double eps) {
  check_qknorm_join_inputs(qkv_x, qkv_c, weights, H);
  const int64_t B = qkv_x.size(0), N = qkv_x.size(1), M = qkv_c.size(1), L = N + M;
  const int64_t D = qkv_x.size(2) / 3, hd = D / H;
  auto q = at::empty({B, H, L, hd}, qkv_x.options());
  auto k = at::empty_like(q), v = at::empty_like(q);
  // The kernel is a generic lambda outside the dispatch macro: pragmas are ignored inside macro arguments.
  auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* QX = qkv_x.const_data_ptr<scalar_t>();
    const scalar_t* QC = qkv_c.const_data_ptr<scalar_t>();
    const acc_t* W = weights.const_data_ptr<acc_t>();
    scalar_t* outs[3] = {q.mutable_data_ptr<scalar_t>(), k.mutable_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>()};
    const acc_t inv_hd = acc_t(1) / acc_t(hd);
    at::parallel_for(0, B * L, std::max<int64_t>(1, kGrain / (3 * D)), [&](int64_t t0, int64_t t1) {
      for (int64_t tok = t0; tok < t1; ++tok) {
        const int64_t b = tok / L, l = tok % L;
        const bool is_x = l < N;
        const scalar_t* src = is_x ? QX + (b * N + l) * 3 * D : QC + (b * M + (l - N)) * 3 * D;
        for (int64_t part = 0; part < 3; ++part) {
          const acc_t* w = part < 2 ? W + ((is_x ? 0 : 2) + part) * hd : nullptr;
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t* s = src + part * D + h * hd;
            scalar_t* o = outs[part] + ((b * H + h) * L + l) * hd;
            if (w == nullptr) {  // v: plain copy into the joined layout
              for (int64_t j = 0; j < hd; ++j) o[j] = s[j];
              continue;
            }
            acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
            for (int64_t j = 0; j < hd; ++j) ss += static_cast<acc_t>(s[j]) * static_cast<acc_t>(s[j]);
            const acc_t r = acc_t(1) / std::sqrt(ss * inv_hd + acc_t(eps));
#pragma omp simd
            for (int64_t j = 0; j < hd; ++j) o[j] = static_cast<scalar_t>(static_cast<acc_t>(s[j]) * r * w[j]);
          }
        }
      }
    });
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv_x.scalar_type(), "qknorm_join_fwd_cpu", [&] { kernel(scalar_t{}); });
  return {q, k, v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qknorm_join_bwd_cpu(const at::Tensor& gq, const at::Tensor& gk,
                                                                   const at::Tensor& gv, const at::Tensor& qkv_x,
                                                                   const at::Tensor& qkv_c, const at::Tensor& weights,
                                                                   int64_t H, double eps) {
  check_qknorm_join_bwd_inputs(gq, gk, gv, qkv_x, qkv_c, weights, H);
  const int64_t B = qkv_x.size(0), N = qkv_x.size(1), M = qkv_c.size(1), L = N + M;
  const int64_t D = qkv_x.size(2) / 3, hd = D / H;
  const int64_t nchunk = std::max<int64_t>(1, (B * L + kRowsPerChunk - 1) / kRowsPerChunk);
  auto g_x = at::empty_like(qkv_x), g_c = at::empty_like(qkv_c);
  auto part = at::empty({nchunk, 4, hd}, weights.options());
  // The kernel is a generic lambda outside the dispatch macro: pragmas are ignored inside macro arguments.
  auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* QX = qkv_x.const_data_ptr<scalar_t>();
    const scalar_t* QC = qkv_c.const_data_ptr<scalar_t>();
    const acc_t* W = weights.const_data_ptr<acc_t>();
    const scalar_t* gins[3] = {gq.const_data_ptr<scalar_t>(), gk.const_data_ptr<scalar_t>(), gv.const_data_ptr<scalar_t>()};
    scalar_t* GX = g_x.mutable_data_ptr<scalar_t>();
    scalar_t* GC = g_c.mutable_data_ptr<scalar_t>();
    acc_t* P = part.mutable_data_ptr<acc_t>();
    const acc_t inv_hd = acc_t(1) / acc_t(hd);
    at::parallel_for(0, nchunk, std::max<int64_t>(1, kGrain / (kRowsPerChunk * 3 * D)), [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> buf(2 * hd);
      acc_t* xh = buf.data();
      acc_t* gw = buf.data() + hd;
      for (int64_t c = c0; c < c1; ++c) {
        acc_t* pw = P + c * 4 * hd;
        for (int64_t j = 0; j < 4 * hd; ++j) pw[j] = 0;
        const int64_t tok1 = std::min(B * L, (c + 1) * kRowsPerChunk);
        for (int64_t tok = c * kRowsPerChunk; tok < tok1; ++tok) {
          const int64_t b = tok / L, l = tok % L;
          const bool is_x = l < N;
          const int64_t row = is_x ? (b * N + l) : (b * M + (l - N));
          const scalar_t* src = (is_x ? QX : QC) + row * 3 * D;
          scalar_t* dst = (is_x ? GX : GC) + row * 3 * D;
          for (int64_t p = 0; p < 3; ++p) {
            for (int64_t h = 0; h < H; ++h) {
              const scalar_t* g = gins[p] + ((b * H + h) * L + l) * hd;
              scalar_t* o = dst + p * D + h * hd;
              if (p == 2) {  // v: plain copy back into the packed layout
                for (int64_t j = 0; j < hd; ++j) o[j] = g[j];
                continue;
              }
              const int64_t widx = (is_x ? 0 : 2) + p;
              const acc_t* w = W + widx * hd;
              acc_t* pwi = pw + widx * hd;
              const scalar_t* s = src + p * D + h * hd;
              acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
              for (int64_t j = 0; j < hd; ++j) {
                xh[j] = static_cast<acc_t>(s[j]);
                ss += xh[j] * xh[j];
              }
              const acc_t r = acc_t(1) / std::sqrt(ss * inv_hd + acc_t(eps));
              acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
              for (int64_t j = 0; j < hd; ++j) {
                const acc_t gj = static_cast<acc_t>(g[j]);
                xh[j] *= r;
                pwi[j] += gj * xh[j];
                gw[j] = gj * w[j];
                dot += gw[j] * xh[j];
              }
              dot *= inv_hd;
#pragma omp simd
              for (int64_t j = 0; j < hd; ++j) o[j] = static_cast<scalar_t>(r * (gw[j] - xh[j] * dot));
            }
          }
        }
      }
    });
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv_x.scalar_type(), "qknorm_join_bwd_cpu", [&] { kernel(scalar_t{}); });
  return {g_x, g_c, part.sum(0)};
}

}  // namespace condiff
