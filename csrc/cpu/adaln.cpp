// adaLN modulation and gated residual on the CPU (OpenMP through at::parallel_for).
//
//   adaln:  y = (x - mean) * rstd * (1 + scale[b]) + shift[b]     x (B, N, D); shift, scale (B, D)
//   gated:  out = x + gate[b] * y                                  x, y (B, N, D); gate (B, D)
//
// One pass per row: the row is converted once to the accumulation type in a thread-local buffer (it
// stays in L1), statistics and outputs are vectorisable `omp simd` loops over D.
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
namespace {

// Rows per parallel task so that a task holds about kGrain elements (as ATen does): small
// tensors run on one thread instead of paying a fork/join.
inline int64_t grain_for(int64_t D) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(D, 1)); }

// Sum chunk partials (B, nchunk, D) -> (B, D), parallel over B * D.
template <typename acc_t>
void reduce_chunks(const acc_t* part, acc_t* out, int64_t B, int64_t nchunk, int64_t D) {
  at::parallel_for(0, B, grain_for(nchunk * D), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* o = out + b * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0;
      for (int64_t c = 0; c < nchunk; ++c) {
        const acc_t* p = part + (b * nchunk + c) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += p[d];
      }
    }
  });
}

}  // namespace

at::Tensor adaln_fwd_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_adaln_inputs(x, shift, scale);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  auto y = at::empty_like(x);
  // The kernel is a generic lambda outside the dispatch macro: pragmas are ignored inside macro arguments.
  auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* X = x.const_data_ptr<scalar_t>();
    const scalar_t* SH = shift.const_data_ptr<scalar_t>();
    const scalar_t* SC = scale.const_data_ptr<scalar_t>();
    scalar_t* Y = y.mutable_data_ptr<scalar_t>();
    const acc_t inv_d = acc_t(1) / acc_t(D);
    at::parallel_for(0, B * N, grain_for(D), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(D);
      acc_t* v = buf.data();
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = X + r * D;
        const scalar_t* sh = SH + (r / N) * D;
        const scalar_t* sc = SC + (r / N) * D;
        scalar_t* yr = Y + r * D;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < D; ++d) {
          v[d] = static_cast<acc_t>(xr[d]);
          sum += v[d];
        }
        const acc_t mean = sum * inv_d;
        acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
        for (int64_t d = 0; d < D; ++d) sq += (v[d] - mean) * (v[d] - mean);
        const acc_t rstd = acc_t(1) / std::sqrt(sq * inv_d + acc_t(eps));
#pragma omp simd
        for (int64_t d = 0; d < D; ++d)
          yr[d] = static_cast<scalar_t>((v[d] - mean) * rstd * (acc_t(1) + static_cast<acc_t>(sc[d])) +
                                        static_cast<acc_t>(sh[d]));
      }
    });
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adaln_fwd_cpu", [&] { kernel(scalar_t{}); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_bwd_cpu(const at::Tensor& gy, const at::Tensor& x,
                                                             const at::Tensor& scale, double eps) {
  check_adaln_bwd_inputs(gy, x, scale);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t nchunk = std::max<int64_t>(1, (N + kRowsPerChunk - 1) / kRowsPerChunk);
  auto gx = at::empty_like(x);
  auto opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  auto part = at::empty({2, B, nchunk, D}, opts);  // [g_shift, g_scale] partial sums per chunk of rows
  auto gshift = at::empty({B, D}, opts), gscale = at::empty({B, D}, opts);
  // The kernel is a generic lambda outside the dispatch macro: pragmas are ignored inside macro arguments.
  auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* X = x.const_data_ptr<scalar_t>();
    const scalar_t* G = gy.const_data_ptr<scalar_t>();
    const scalar_t* SC = scale.const_data_ptr<scalar_t>();
    scalar_t* GX = gx.mutable_data_ptr<scalar_t>();
    acc_t* P = part.mutable_data_ptr<acc_t>();
    const acc_t inv_d = acc_t(1) / acc_t(D);
    at::parallel_for(0, B * nchunk, grain_for(kRowsPerChunk * D), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> buf(2 * D);
      acc_t* xh = buf.data();
      acc_t* gh = buf.data() + D;
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / nchunk, c = task % nchunk;
        acc_t* psh = P + (b * nchunk + c) * D;
        acc_t* psc = P + ((B + b) * nchunk + c) * D;
        for (int64_t d = 0; d < D; ++d) psh[d] = psc[d] = 0;
        const scalar_t* sc = SC + b * D;
        const int64_t n1 = std::min(N, (c + 1) * kRowsPerChunk);
        for (int64_t n = c * kRowsPerChunk; n < n1; ++n) {
          const int64_t r = b * N + n;
          const scalar_t* xr = X + r * D;
          const scalar_t* gr = G + r * D;
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t d = 0; d < D; ++d) {
            xh[d] = static_cast<acc_t>(xr[d]);
            sum += xh[d];
          }
          const acc_t mean = sum * inv_d;
          acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
          for (int64_t d = 0; d < D; ++d) sq += (xh[d] - mean) * (xh[d] - mean);
          const acc_t rstd = acc_t(1) / std::sqrt(sq * inv_d + acc_t(eps));
          acc_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t d = 0; d < D; ++d) {
            const acc_t g = static_cast<acc_t>(gr[d]);
            xh[d] = (xh[d] - mean) * rstd;
            psh[d] += g;
            psc[d] += g * xh[d];
            gh[d] = g * (acc_t(1) + static_cast<acc_t>(sc[d]));
            s1 += gh[d];
            s2 += gh[d] * xh[d];
          }
          s1 *= inv_d;
          s2 *= inv_d;
          scalar_t* gxr = GX + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) gxr[d] = static_cast<scalar_t>(rstd * (gh[d] - s1 - xh[d] * s2));
        }
      }
    });
    reduce_chunks<acc_t>(P, gshift.mutable_data_ptr<acc_t>(), B, nchunk, D);
    reduce_chunks<acc_t>(P + B * nchunk * D, gscale.mutable_data_ptr<acc_t>(), B, nchunk, D);
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adaln_bwd_cpu", [&] { kernel(scalar_t{}); });
  return {gx, gshift.to(x.scalar_type()), gscale.to(x.scalar_type())};
}

at::Tensor gated_fwd_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  check_gated_inputs(x, gate, y);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  auto out = at::empty_like(x);
  // The kernel is a generic lambda outside the dispatch macro: pragmas are ignored inside macro arguments.
  auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* X = x.const_data_ptr<scalar_t>();
    const scalar_t* Yp = y.const_data_ptr<scalar_t>();
    const scalar_t* GA = gate.const_data_ptr<scalar_t>();
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * N, grain_for(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* ga = GA + (r / N) * D;
        const scalar_t* xr = X + r * D;
        const scalar_t* yr = Yp + r * D;
        scalar_t* o = O + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d)
          o[d] = static_cast<scalar_t>(static_cast<acc_t>(xr[d]) +
                                       static_cast<acc_t>(ga[d]) * static_cast<acc_t>(yr[d]));
      }
    });
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_fwd_cpu", [&] { kernel(scalar_t{}); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_bwd_cpu(const at::Tensor& g, const at::Tensor& gate, const at::Tensor& y) {
  check_gated_bwd_inputs(g, gate, y);
  const int64_t B = y.size(0), N = y.size(1), D = y.size(2);
  const int64_t nchunk = std::max<int64_t>(1, (N + kRowsPerChunk - 1) / kRowsPerChunk);
  auto gy = at::empty_like(y);
  auto opts = y.options().dtype(at::toOpMathType(y.scalar_type()));
  auto part = at::empty({B, nchunk, D}, opts);
  auto ggate = at::empty({B, D}, opts);
  // The kernel is a generic lambda outside the dispatch macro: pragmas are ignored inside macro arguments.
  auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* G = g.const_data_ptr<scalar_t>();
    const scalar_t* Yp = y.const_data_ptr<scalar_t>();
    const scalar_t* GA = gate.const_data_ptr<scalar_t>();
    scalar_t* GY = gy.mutable_data_ptr<scalar_t>();
    acc_t* P = part.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * nchunk, grain_for(kRowsPerChunk * D), [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / nchunk, c = task % nchunk;
        acc_t* p = P + task * D;
        for (int64_t d = 0; d < D; ++d) p[d] = 0;
        const scalar_t* ga = GA + b * D;
        const int64_t n1 = std::min(N, (c + 1) * kRowsPerChunk);
        for (int64_t n = c * kRowsPerChunk; n < n1; ++n) {
          const int64_t r = b * N + n;
          const scalar_t* gr = G + r * D;
          const scalar_t* yr = Yp + r * D;
          scalar_t* o = GY + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            const acc_t gv = static_cast<acc_t>(gr[d]);
            o[d] = static_cast<scalar_t>(gv * static_cast<acc_t>(ga[d]));
            p[d] += gv * static_cast<acc_t>(yr[d]);
          }
        }
      }
    });
    reduce_chunks<acc_t>(P, ggate.mutable_data_ptr<acc_t>(), B, nchunk, D);
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "gated_bwd_cpu", [&] { kernel(scalar_t{}); });
  return {gy, ggate.to(y.scalar_type())};
}

}  // namespace condiff
