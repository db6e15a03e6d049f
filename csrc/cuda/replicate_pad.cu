// Noisy replicate padding (paper Eq. 7), CUDA kernels (same math as csrc/cpu/replicate_pad.cpp).
// One thread per (row, channel): channel loops are coalesced across the warp; the row's statistics over
// its valid tokens are computed by the same thread, then every position is written. Blocks are laid out
// on grid x only, (row, channel block) folded, so the batch is not bound by gridDim.y's 65535.
// Lengths are not checked on the host (that would synchronise the stream and break CUDA-graph capture):
// the kernels assert 1 <= length <= T on the device and clamp, so that a bad length never reads out of
// the row nor divides by zero.
#include "common.cuh"

namespace condiff {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// lengths[b], asserted to lie in [1, T] and clamped there.
__device__ __forceinline__ int64_t row_length(const int64_t* __restrict__ LEN, int64_t b, int64_t T) {
  const int64_t len = LEN[b];
  CUDA_KERNEL_ASSERT_MSG(len >= 1 && len <= T, "noisy_replicate_pad: every length must lie in [1, T]");
  return len < 1 ? 1 : (len > T ? T : len);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void col_stats(const scalar_t* e, int64_t len, int64_t C, acc_t& mean, acc_t& sigma) {
  acc_t s = 0;
  for (int64_t t = 0; t < len; ++t) s += static_cast<acc_t>(e[t * C]);
  mean = s / acc_t(len);
  acc_t v = 0;
  for (int64_t t = 0; t < len; ++t) {
    const acc_t d = static_cast<acc_t>(e[t * C]) - mean;
    v += d * d;
  }
  sigma = sqrt(v / acc_t(len));
}

template <typename scalar_t, typename acc_t>
__global__ void pad_fwd_kernel(const scalar_t* __restrict__ E, const int64_t* __restrict__ LEN,
                               const scalar_t* __restrict__ Z, scalar_t* __restrict__ O, int64_t T, int64_t C,
                               int64_t ncb, acc_t beta) {
  const int64_t b = blockIdx.x / ncb, c = (blockIdx.x % ncb) * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const int64_t len = row_length(LEN, b, T), m = (T + len - 1) / len;
  const acc_t amp = beta * sqrt(acc_t(m - 1));
  const scalar_t* e = E + b * T * C + c;
  acc_t mean = 0, sigma = 0;
  if (len < T && amp != acc_t(0)) col_stats<scalar_t, acc_t>(e, len, C, mean, sigma);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t i = (b * T + t) * C + c;
    const scalar_t src = e[(t % len) * C];
    O[i] = t < len || amp == acc_t(0) ? src
                                      : static_cast<scalar_t>(static_cast<acc_t>(src) + amp * sigma * static_cast<acc_t>(Z[i]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void pad_bwd_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ E,
                               const int64_t* __restrict__ LEN, const scalar_t* __restrict__ Z,
                               scalar_t* __restrict__ GE, int64_t T, int64_t C, int64_t ncb, acc_t beta) {
  const int64_t b = blockIdx.x / ncb, c = (blockIdx.x % ncb) * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const int64_t len = row_length(LEN, b, T), m = (T + len - 1) / len;
  const acc_t amp = beta * sqrt(acc_t(m - 1));
  const scalar_t* e = E + b * T * C + c;
  const scalar_t* g = G + b * T * C + c;
  acc_t coef = 0, mean = 0;
  if (len < T && amp != acc_t(0)) {  // gradient through sigma_ch
    acc_t sigma = 0, gz = 0;
    col_stats<scalar_t, acc_t>(e, len, C, mean, sigma);
    for (int64_t t = len; t < T; ++t) gz += static_cast<acc_t>(g[t * C]) * static_cast<acc_t>(Z[(b * T + t) * C + c]);
    coef = sigma > acc_t(0) ? amp * gz / (acc_t(len) * sigma) : acc_t(0);
  }
  scalar_t* ge = GE + b * T * C + c;
  for (int64_t s = 0; s < len; ++s) {
    acc_t a = 0;
    for (int64_t t = s; t < T; t += len) a += static_cast<acc_t>(g[t * C]);  // every copy of token s
    a += coef * (static_cast<acc_t>(e[s * C]) - mean);
    ge[s * C] = static_cast<scalar_t>(a);
  }
  for (int64_t t = len; t < T; ++t) ge[t * C] = scalar_t(0);
}

}  // namespace

at::Tensor replicate_pad_fwd_cuda(const at::Tensor& emb, const at::Tensor& lengths, double beta,
                                  const at::Tensor& noise) {
  check_replicate_pad_inputs(emb, lengths, noise);
  const int64_t B = emb.size(0), T = emb.size(1), C = emb.size(2);
  c10::cuda::CUDAGuard guard(emb.device());
  auto out = at::empty_like(emb);
  if (emb.numel() == 0) return out;
  const int64_t ncb = (C + kThreads - 1) / kThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, emb.scalar_type(), "replicate_pad_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pad_fwd_kernel<scalar_t, acc_t><<<grid_x(B * ncb, "noisy_replicate_pad"), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        emb.const_data_ptr<scalar_t>(), lengths.const_data_ptr<int64_t>(), noise.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), T, C, ncb, acc_t(beta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor replicate_pad_bwd_cuda(const at::Tensor& g, const at::Tensor& emb, const at::Tensor& lengths, double beta,
                                  const at::Tensor& noise) {
  check_replicate_pad_bwd_inputs(g, emb, lengths, noise);
  const int64_t B = emb.size(0), T = emb.size(1), C = emb.size(2);
  c10::cuda::CUDAGuard guard(emb.device());
  auto gemb = at::empty_like(emb);
  if (emb.numel() == 0) return gemb;
  const int64_t ncb = (C + kThreads - 1) / kThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, emb.scalar_type(), "replicate_pad_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pad_bwd_kernel<scalar_t, acc_t><<<grid_x(B * ncb, "noisy_replicate_pad"), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), emb.const_data_ptr<scalar_t>(), lengths.const_data_ptr<int64_t>(),
        noise.const_data_ptr<scalar_t>(), gemb.mutable_data_ptr<scalar_t>(), T, C, ncb, acc_t(beta));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gemb;
}

}  // namespace cuda
}  // namespace condiff

TORCH_LIBRARY_IMPL(condiff_native, CUDA, m) {
  m.impl("replicate_pad_fwd", &condiff::cuda::replicate_pad_fwd_cuda);
  m.impl("replicate_pad_bwd", &condiff::cuda::replicate_pad_bwd_cuda);
}
