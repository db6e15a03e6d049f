// Noisy replicate padding (paper Eq. 7) on the CPU.
//
// out[b, t, c] = emb[b, t mod len_b, c] + [t >= len_b] * amp_b * sigma[b, c] * noise[b, t, c]
// amp_b = beta * sqrt(m_b - 1), m_b = ceil(T / len_b); sigma = population std over the valid tokens.
// Backward (noise constant):
//   gemb[b, s, c] = sum_{t : t mod len = s} g[b, t, c]
//                 + amp_b * (sum_{t >= len} g * noise)[c] * (emb[b, s, c] - mean[c]) / (len_b * sigma[c])
//   for s < len_b (the second term is 0 where sigma = 0), and 0 for s >= len_b.
// Work is split over (row, block of kChanBlock channels); loops over channels are contiguous.
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

constexpr int64_t kChanBlock = 128;

// mean and population std of channels [c0, c0 + nc) over the first len tokens of one row.
template <typename scalar_t, typename acc_t>
void row_stats(const scalar_t* e, int64_t len, int64_t C, int64_t c0, int64_t nc, acc_t* mean, acc_t* sigma) {
  for (int64_t j = 0; j < nc; ++j) mean[j] = sigma[j] = 0;
  for (int64_t t = 0; t < len; ++t) {
    const scalar_t* er = e + t * C + c0;
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) mean[j] += static_cast<acc_t>(er[j]);
  }
  for (int64_t j = 0; j < nc; ++j) mean[j] /= acc_t(len);
  for (int64_t t = 0; t < len; ++t) {
    const scalar_t* er = e + t * C + c0;
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) {
      const acc_t dv = static_cast<acc_t>(er[j]) - mean[j];
      sigma[j] += dv * dv;
    }
  }
  for (int64_t j = 0; j < nc; ++j) sigma[j] = std::sqrt(sigma[j] / acc_t(len));
}

}  // namespace

at::Tensor replicate_pad_fwd_cpu(const at::Tensor& emb, const at::Tensor& lengths, double beta,
                                 const at::Tensor& noise) {
  check_replicate_pad_inputs(emb, lengths, noise);
  const int64_t B = emb.size(0), T = emb.size(1), C = emb.size(2);
  check_lengths_host(lengths, T);
  const int64_t* LEN = lengths.const_data_ptr<int64_t>();
  auto out = at::empty_like(emb);
  const int64_t ncb = (C + kChanBlock - 1) / kChanBlock;
  // The kernel is a generic lambda outside the dispatch macro: pragmas are ignored inside macro arguments.
  auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* E = emb.const_data_ptr<scalar_t>();
    const scalar_t* Z = noise.const_data_ptr<scalar_t>();
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * ncb, std::max<int64_t>(1, kGrain / (T * kChanBlock)), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> buf(2 * kChanBlock);
      acc_t* mean = buf.data();
      acc_t* sigma = buf.data() + kChanBlock;
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / ncb, c0 = (task % ncb) * kChanBlock, nc = std::min(kChanBlock, C - c0);
        const int64_t len = LEN[b], m = (T + len - 1) / len;
        const acc_t amp = acc_t(beta) * std::sqrt(acc_t(m - 1));
        const scalar_t* e = E + b * T * C;
        if (len < T && amp != acc_t(0)) row_stats<scalar_t, acc_t>(e, len, C, c0, nc, mean, sigma);
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* src = e + (t % len) * C + c0;
          scalar_t* o = O + (b * T + t) * C + c0;
          if (t < len || amp == acc_t(0)) {
            for (int64_t j = 0; j < nc; ++j) o[j] = src[j];
            continue;
          }
          const scalar_t* z = Z + (b * T + t) * C + c0;
#pragma omp simd
          for (int64_t j = 0; j < nc; ++j)
            o[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) + amp * sigma[j] * static_cast<acc_t>(z[j]));
        }
      }
    });
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, emb.scalar_type(), "replicate_pad_fwd_cpu", [&] { kernel(scalar_t{}); });
  return out;
}

at::Tensor replicate_pad_bwd_cpu(const at::Tensor& g, const at::Tensor& emb, const at::Tensor& lengths, double beta,
                                 const at::Tensor& noise) {
  check_replicate_pad_bwd_inputs(g, emb, lengths, noise);
  const int64_t B = emb.size(0), T = emb.size(1), C = emb.size(2);
  check_lengths_host(lengths, T);
  const int64_t* LEN = lengths.const_data_ptr<int64_t>();
  auto gemb = at::empty_like(emb);
  const int64_t ncb = (C + kChanBlock - 1) / kChanBlock;
  // The kernel is a generic lambda outside the dispatch macro: pragmas are ignored inside macro arguments.
  auto kernel = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* E = emb.const_data_ptr<scalar_t>();
    const scalar_t* Z = noise.const_data_ptr<scalar_t>();
    const scalar_t* G = g.const_data_ptr<scalar_t>();
    scalar_t* GE = gemb.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * ncb, std::max<int64_t>(1, kGrain / (T * kChanBlock)), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> stats(3 * kChanBlock);
      std::vector<acc_t> acc;
      acc_t* mean = stats.data();
      acc_t* sigma = stats.data() + kChanBlock;
      acc_t* gz = stats.data() + 2 * kChanBlock;  // sum_{t >= len} g * noise
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / ncb, c0 = (task % ncb) * kChanBlock, nc = std::min(kChanBlock, C - c0);
        const int64_t len = LEN[b], m = (T + len - 1) / len;
        const acc_t amp = acc_t(beta) * std::sqrt(acc_t(m - 1));
        const scalar_t* e = E + b * T * C;
        acc.assign(len * nc, acc_t(0));
        for (int64_t j = 0; j < nc; ++j) gz[j] = 0;
        for (int64_t t = 0; t < T; ++t) {  // gather the gradient of every copy onto its source token
          const scalar_t* gr = G + (b * T + t) * C + c0;
          acc_t* a = acc.data() + (t % len) * nc;
#pragma omp simd
          for (int64_t j = 0; j < nc; ++j) a[j] += static_cast<acc_t>(gr[j]);
          if (t >= len && amp != acc_t(0)) {
            const scalar_t* z = Z + (b * T + t) * C + c0;
#pragma omp simd
            for (int64_t j = 0; j < nc; ++j) gz[j] += static_cast<acc_t>(gr[j]) * static_cast<acc_t>(z[j]);
          }
        }
        if (len < T && amp != acc_t(0)) {  // gradient through sigma_ch
          row_stats<scalar_t, acc_t>(e, len, C, c0, nc, mean, sigma);
          for (int64_t j = 0; j < nc; ++j) gz[j] = sigma[j] > 0 ? amp * gz[j] / (acc_t(len) * sigma[j]) : acc_t(0);
          for (int64_t s = 0; s < len; ++s) {
            const scalar_t* er = e + s * C + c0;
            acc_t* a = acc.data() + s * nc;
#pragma omp simd
            for (int64_t j = 0; j < nc; ++j) a[j] += gz[j] * (static_cast<acc_t>(er[j]) - mean[j]);
          }
        }
        for (int64_t t = 0; t < T; ++t) {
          scalar_t* o = GE + (b * T + t) * C + c0;
          if (t >= len) {  // padding positions are outputs only
            for (int64_t j = 0; j < nc; ++j) o[j] = scalar_t(0);
            continue;
          }
          const acc_t* a = acc.data() + t * nc;
          for (int64_t j = 0; j < nc; ++j) o[j] = static_cast<scalar_t>(a[j]);
        }
      }
    });
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, emb.scalar_type(), "replicate_pad_bwd_cpu", [&] { kernel(scalar_t{}); });
  return gemb;
}

}  // namespace condiff
