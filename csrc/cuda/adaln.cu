// adaLN modulation and gated residual, CUDA kernels (same math as csrc/cpu/adaln.cpp).
//   adaln fwd: one block per row; mean and centred variance by block reductions, then one write.
//   adaln bwd: one block per (batch, chunk of kRowsPerChunk rows); grad_x per row, and grad_shift /
//              grad_scale partial sums per chunk (each thread owns its columns: no atomics), summed after.
//   gated fwd: one block per row.  gated bwd: thread per column over a chunk of rows.
// (batch, chunk) pairs are folded into grid x, so the batch is not bound by gridDim.y's 65535.
#include "common.cuh"

namespace condiff {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void adaln_fwd_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ SH,
                                 const scalar_t* __restrict__ SC, scalar_t* __restrict__ Y, int64_t N, int64_t D,
                                 acc_t eps) {
  __shared__ acc_t shm[kWarp];
  const int64_t row = blockIdx.x, b = row / N;
  const scalar_t* x = X + row * D;
  acc_t s = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s += static_cast<acc_t>(x[d]);
  const acc_t mean = block_sum(s, shm) / acc_t(D);
  acc_t sq = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const acc_t c = static_cast<acc_t>(x[d]) - mean;
    sq += c * c;
  }
  const acc_t rstd = rsqrt(block_sum(sq, shm) / acc_t(D) + eps);
  const scalar_t* sh = SH + b * D;
  const scalar_t* sc = SC + b * D;
  scalar_t* y = Y + row * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    y[d] = static_cast<scalar_t>((static_cast<acc_t>(x[d]) - mean) * rstd * (acc_t(1) + static_cast<acc_t>(sc[d])) +
                                 static_cast<acc_t>(sh[d]));
}

template <typename scalar_t, typename acc_t>
__global__ void adaln_bwd_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ X,
                                 const scalar_t* __restrict__ SC, scalar_t* __restrict__ GX, acc_t* __restrict__ P,
                                 int64_t B, int64_t N, int64_t D, int64_t nchunk, acc_t eps) {
  __shared__ acc_t shm[kWarp];
  const int64_t b = blockIdx.x / nchunk, c = blockIdx.x % nchunk;
  acc_t* psh = P + (b * nchunk + c) * D;            // partial grad_shift of this chunk
  acc_t* psc = P + ((B + b) * nchunk + c) * D;      // partial grad_scale
  const scalar_t* sc = SC + b * D;  // P is zero-initialised by the host
  const int64_t n1 = (c + 1) * kRowsPerChunk < N ? (c + 1) * kRowsPerChunk : N;
  for (int64_t n = c * kRowsPerChunk; n < n1; ++n) {
    const scalar_t* x = X + (b * N + n) * D;
    const scalar_t* g = G + (b * N + n) * D;
    acc_t s = 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s += static_cast<acc_t>(x[d]);
    const acc_t mean = block_sum(s, shm) / acc_t(D);
    acc_t sq = 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t cx = static_cast<acc_t>(x[d]) - mean;
      sq += cx * cx;
    }
    const acc_t rstd = rsqrt(block_sum(sq, shm) / acc_t(D) + eps);
    acc_t s1 = 0, s2 = 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t xh = (static_cast<acc_t>(x[d]) - mean) * rstd, gv = static_cast<acc_t>(g[d]);
      const acc_t gh = gv * (acc_t(1) + static_cast<acc_t>(sc[d]));
      psh[d] += gv;
      psc[d] += gv * xh;
      s1 += gh;
      s2 += gh * xh;
    }
    s1 = block_sum(s1, shm) / acc_t(D);
    s2 = block_sum(s2, shm) / acc_t(D);
    scalar_t* gx = GX + (b * N + n) * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t xh = (static_cast<acc_t>(x[d]) - mean) * rstd;
      const acc_t gh = static_cast<acc_t>(g[d]) * (acc_t(1) + static_cast<acc_t>(sc[d]));
      gx[d] = static_cast<scalar_t>(rstd * (gh - s1 - xh * s2));
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gated_fwd_kernel(const scalar_t* __restrict__ X, const scalar_t* __restrict__ GA,
                                 const scalar_t* __restrict__ Yp, scalar_t* __restrict__ O, int64_t N, int64_t D) {
  const int64_t row = blockIdx.x;  // one block per row: no per-element index division
  const scalar_t* ga = GA + (row / N) * D;
  const int64_t off = row * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    O[off + d] = static_cast<scalar_t>(static_cast<acc_t>(X[off + d]) +
                                       static_cast<acc_t>(ga[d]) * static_cast<acc_t>(Yp[off + d]));
}

template <typename scalar_t, typename acc_t>
__global__ void gated_bwd_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ GA,
                                 const scalar_t* __restrict__ Yp, scalar_t* __restrict__ GY, acc_t* __restrict__ P,
                                 int64_t N, int64_t D, int64_t nchunk) {
  const int64_t b = blockIdx.x / nchunk, c = blockIdx.x % nchunk;
  const int64_t d = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (d >= D) return;
  const acc_t ga = static_cast<acc_t>(GA[b * D + d]);
  acc_t acc = 0;
  const int64_t n1 = (c + 1) * kRowsPerChunk < N ? (c + 1) * kRowsPerChunk : N;
  for (int64_t n = c * kRowsPerChunk; n < n1; ++n) {
    const int64_t i = (b * N + n) * D + d;
    const acc_t g = static_cast<acc_t>(G[i]);
    GY[i] = static_cast<scalar_t>(g * ga);
    acc += g * static_cast<acc_t>(Yp[i]);
  }
  P[(b * nchunk + c) * D + d] = acc;
}

}  // namespace

at::Tensor adaln_fwd_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_adaln_inputs(x, shift, scale);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  if (B * N == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adaln_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    adaln_fwd_kernel<scalar_t, acc_t><<<grid_x(B * N, "adaln_modulate"), row_threads(D), 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), shift.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
        y.mutable_data_ptr<scalar_t>(), N, D, acc_t(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_bwd_cuda(const at::Tensor& gy, const at::Tensor& x,
                                                              const at::Tensor& scale, double eps) {
  check_adaln_bwd_inputs(gy, x, scale);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const int64_t nchunk = std::max<int64_t>(1, (N + kRowsPerChunk - 1) / kRowsPerChunk);
  c10::cuda::CUDAGuard guard(x.device());
  auto gx = at::empty_like(x);
  auto part = at::zeros({2, B, nchunk, D}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (B * D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adaln_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      adaln_bwd_kernel<scalar_t, acc_t><<<grid_x(B * nchunk, "adaln_modulate backward"), row_threads(D), 0, c10::cuda::getCurrentCUDAStream()>>>(
          gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
          gx.mutable_data_ptr<scalar_t>(), part.mutable_data_ptr<acc_t>(), B, N, D, nchunk, acc_t(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto sums = part.sum(2);  // (2, B, D)
  return {gx, sums[0].to(x.scalar_type()).clone(), sums[1].to(x.scalar_type()).clone()};
}

at::Tensor gated_fwd_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y) {
  check_gated_inputs(x, gate, y);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  if (B * N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gated_fwd_kernel<scalar_t, acc_t><<<grid_x(B * N, "gated_residual"), row_threads(D), 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), N, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_bwd_cuda(const at::Tensor& g, const at::Tensor& gate, const at::Tensor& y) {
  check_gated_bwd_inputs(g, gate, y);
  const int64_t B = y.size(0), N = y.size(1), D = y.size(2);
  const int64_t nchunk = std::max<int64_t>(1, (N + kRowsPerChunk - 1) / kRowsPerChunk);
  c10::cuda::CUDAGuard guard(y.device());
  auto gy = at::empty_like(y);
  auto part = at::zeros({B, nchunk, D}, y.options().dtype(at::toOpMathType(y.scalar_type())));
  if (B * D > 0) {
    const int threads = 128;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "gated_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gated_bwd_kernel<scalar_t, acc_t>
          <<<dim3(grid_x(B * nchunk, "gated_residual backward"), (D + threads - 1) / threads), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              g.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
              gy.mutable_data_ptr<scalar_t>(), part.mutable_data_ptr<acc_t>(), N, D, nchunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {gy, part.sum(1).to(y.scalar_type()).clone()};
}

}  // namespace cuda
}  // namespace condiff

TORCH_LIBRARY_IMPL(condiff_native, CUDA, m) {
  m.impl("adaln_fwd", &condiff::cuda::adaln_fwd_cuda);
  m.impl("adaln_bwd", &condiff::cuda::adaln_bwd_cuda);
  m.impl("gated_fwd", &condiff::cuda::gated_fwd_cuda);
  m.impl("gated_bwd", &condiff::cuda::gated_bwd_cuda);
}
