// Fused unpack + per-head RMSNorm(q, k) + join of mmDiT joint attention, CUDA kernels
// (same math and layouts as csrc/cpu/qknorm_join.cpp).
//   fwd: one block per token (b, l); warp w handles heads w, w + nwarp, ...; lanes stride over hd.
//   bwd: one block per chunk of kTokPerBlock tokens; grad_qkv per token/head, weight-gradient partials
//        per warp in shared memory, reduced in the block and written to P[chunk] (4, hd), summed after.
#include "common.cuh"

namespace condiff {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int64_t kTokPerBlock = 16;

template <typename scalar_t, typename acc_t>
__global__ void qk_fwd_kernel(const scalar_t* __restrict__ QX, const scalar_t* __restrict__ QC,
                              const acc_t* __restrict__ W, scalar_t* __restrict__ Q, scalar_t* __restrict__ K,
                              scalar_t* __restrict__ V, int64_t N, int64_t M, int64_t H, int64_t hd, acc_t eps) {
  const int64_t L = N + M, tok = blockIdx.x, b = tok / L, l = tok % L;
  const bool is_x = l < N;
  const int64_t D = H * hd;
  const scalar_t* src = is_x ? QX + (b * N + l) * 3 * D : QC + (b * M + (l - N)) * 3 * D;
  const acc_t* wq = W + (is_x ? 0 : 2) * hd;
  const acc_t* wk = wq + hd;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarp = blockDim.x / kWarp;
  for (int64_t h = warp; h < H; h += nwarp) {
    const int64_t o = ((b * H + h) * L + l) * hd;
    const scalar_t* q = src + h * hd;
    const scalar_t* k = src + D + h * hd;
    const scalar_t* v = src + 2 * D + h * hd;
    acc_t sq = 0, sk = 0;
    for (int64_t j = lane; j < hd; j += kWarp) {
      const acc_t a = static_cast<acc_t>(q[j]), c = static_cast<acc_t>(k[j]);
      sq += a * a;
      sk += c * c;
    }
    const acc_t rq = rsqrt(warp_sum(sq) / acc_t(hd) + eps), rk = rsqrt(warp_sum(sk) / acc_t(hd) + eps);
    for (int64_t j = lane; j < hd; j += kWarp) {
      Q[o + j] = static_cast<scalar_t>(static_cast<acc_t>(q[j]) * rq * wq[j]);
      K[o + j] = static_cast<scalar_t>(static_cast<acc_t>(k[j]) * rk * wk[j]);
      V[o + j] = v[j];
    }
  }
}

// gx = r * (g*w - xh * mean(g*w*xh)) for one head row; accumulates g*xh into pw (this warp's partials).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void rms_bwd_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                            const acc_t* __restrict__ w, acc_t* __restrict__ pw,
                                            scalar_t* __restrict__ gx, int64_t hd, acc_t eps, int lane) {
  acc_t ss = 0;
  for (int64_t j = lane; j < hd; j += kWarp) {
    const acc_t a = static_cast<acc_t>(x[j]);
    ss += a * a;
  }
  const acc_t r = rsqrt(warp_sum(ss) / acc_t(hd) + eps);
  acc_t dot = 0;
  for (int64_t j = lane; j < hd; j += kWarp) {
    const acc_t xh = static_cast<acc_t>(x[j]) * r, gv = static_cast<acc_t>(g[j]);
    pw[j] += gv * xh;
    dot += gv * w[j] * xh;
  }
  dot = warp_sum(dot) / acc_t(hd);
  for (int64_t j = lane; j < hd; j += kWarp) {
    const acc_t xh = static_cast<acc_t>(x[j]) * r;
    gx[j] = static_cast<scalar_t>(r * (static_cast<acc_t>(g[j]) * w[j] - xh * dot));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void qk_bwd_kernel(const scalar_t* __restrict__ GQ, const scalar_t* __restrict__ GK,
                              const scalar_t* __restrict__ GV, const scalar_t* __restrict__ QX,
                              const scalar_t* __restrict__ QC, const acc_t* __restrict__ W,
                              scalar_t* __restrict__ GX, scalar_t* __restrict__ GC, acc_t* __restrict__ P, int64_t B,
                              int64_t N, int64_t M, int64_t H, int64_t hd, acc_t eps) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* pw_all = reinterpret_cast<acc_t*>(smem_raw);  // (nwarp, 4, hd)
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarp = blockDim.x / kWarp;
  for (int64_t i = threadIdx.x; i < nwarp * 4 * hd; i += blockDim.x) pw_all[i] = 0;
  __syncthreads();
  acc_t* pw = pw_all + warp * 4 * hd;
  const int64_t L = N + M, D = H * hd;
  const int64_t t0 = blockIdx.x * kTokPerBlock;
  const int64_t t1 = t0 + kTokPerBlock < B * L ? t0 + kTokPerBlock : B * L;
  for (int64_t tok = t0; tok < t1; ++tok) {
    const int64_t b = tok / L, l = tok % L;
    const bool is_x = l < N;
    const int64_t row = is_x ? b * N + l : b * M + (l - N);
    const scalar_t* src = (is_x ? QX : QC) + row * 3 * D;
    scalar_t* dst = (is_x ? GX : GC) + row * 3 * D;
    const int64_t widx = is_x ? 0 : 2;
    for (int64_t h = warp; h < H; h += nwarp) {
      const int64_t o = ((b * H + h) * L + l) * hd;
      rms_bwd_row<scalar_t, acc_t>(src + h * hd, GQ + o, W + widx * hd, pw + widx * hd, dst + h * hd, hd, eps, lane);
      rms_bwd_row<scalar_t, acc_t>(src + D + h * hd, GK + o, W + (widx + 1) * hd, pw + (widx + 1) * hd,
                                   dst + D + h * hd, hd, eps, lane);
      for (int64_t j = lane; j < hd; j += kWarp) dst[2 * D + h * hd + j] = GV[o + j];
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < 4 * hd; i += blockDim.x) {
    acc_t s = 0;
    for (int w = 0; w < nwarp; ++w) s += pw_all[w * 4 * hd + i];
    P[blockIdx.x * 4 * hd + i] = s;
  }
}

// The backward kernel keeps (4 warps, 4 weights, hd) partial weight gradients in dynamic shared memory:
// above 48 KB (head dims > 768 in float32, > 384 in float64) the kernel's limit must be raised to the
// device's opt-in maximum; head dims needing more than that are rejected.
template <typename Kernel>
void set_smem_limit(Kernel kernel, size_t smem, int64_t hd) {
  constexpr size_t kDefault = 48 * 1024;
  if (smem <= kDefault) return;
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(smem <= static_cast<size_t>(optin), "joint_attention backward: head_dim ", hd, " needs ", smem,
              " bytes of shared memory per block, more than the ", optin, " bytes this device allows");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> qknorm_join_fwd_cuda(const at::Tensor& qkv_x, const at::Tensor& qkv_c,
                                                                    const at::Tensor& weights, int64_t H, double eps) {
  check_qknorm_join_inputs(qkv_x, qkv_c, weights, H);
  const int64_t B = qkv_x.size(0), N = qkv_x.size(1), M = qkv_c.size(1), L = N + M;
  const int64_t D = qkv_x.size(2) / 3, hd = D / H;
  c10::cuda::CUDAGuard guard(qkv_x.device());
  auto q = at::empty({B, H, L, hd}, qkv_x.options());
  auto k = at::empty_like(q), v = at::empty_like(q);
  if (B * L == 0) return {q, k, v};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv_x.scalar_type(), "qknorm_join_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    qk_fwd_kernel<scalar_t, acc_t><<<grid_x(B * L, "qk_norm_join"), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        qkv_x.const_data_ptr<scalar_t>(), qkv_c.const_data_ptr<scalar_t>(), weights.const_data_ptr<acc_t>(),
        q.mutable_data_ptr<scalar_t>(), k.mutable_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>(), N, M, H, hd,
        acc_t(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, k, v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qknorm_join_bwd_cuda(const at::Tensor& gq, const at::Tensor& gk,
                                                                    const at::Tensor& gv, const at::Tensor& qkv_x,
                                                                    const at::Tensor& qkv_c, const at::Tensor& weights,
                                                                    int64_t H, double eps) {
  check_qknorm_join_bwd_inputs(gq, gk, gv, qkv_x, qkv_c, weights, H);
  const int64_t B = qkv_x.size(0), N = qkv_x.size(1), M = qkv_c.size(1), L = N + M;
  const int64_t D = qkv_x.size(2) / 3, hd = D / H;
  c10::cuda::CUDAGuard guard(qkv_x.device());
  const int64_t nblk = std::max<int64_t>(1, (B * L + kTokPerBlock - 1) / kTokPerBlock);
  auto g_x = at::empty_like(qkv_x), g_c = at::empty_like(qkv_c);
  auto part = at::zeros({nblk, 4, hd}, weights.options());
  if (B * L > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv_x.scalar_type(), "qknorm_join_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const size_t smem = (kThreads / kWarp) * 4 * hd * sizeof(acc_t);
      set_smem_limit(qk_bwd_kernel<scalar_t, acc_t>, smem, hd);
      qk_bwd_kernel<scalar_t, acc_t><<<grid_x(nblk, "qk_norm_join backward"), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
          gq.const_data_ptr<scalar_t>(), gk.const_data_ptr<scalar_t>(), gv.const_data_ptr<scalar_t>(),
          qkv_x.const_data_ptr<scalar_t>(), qkv_c.const_data_ptr<scalar_t>(), weights.const_data_ptr<acc_t>(),
          g_x.mutable_data_ptr<scalar_t>(), g_c.mutable_data_ptr<scalar_t>(), part.mutable_data_ptr<acc_t>(), B, N, M,
          H, hd, acc_t(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {g_x, g_c, part.sum(0)};
}

}  // namespace cuda
}  // namespace condiff

TORCH_LIBRARY_IMPL(condiff_native, CUDA, m) {
  m.impl("qknorm_join_fwd", &condiff::cuda::qknorm_join_fwd_cuda);
  m.impl("qknorm_join_bwd", &condiff::cuda::qknorm_join_bwd_cuda);
}
