// Shared helpers of the condiff CUDA kernels: warp / block sums in the accumulation type.
#pragma once

// Light headers only (no <ATen/ATen.h>): nvcc compile time matters on small build machines.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../condiff_ops.h"

#include <cstdint>
#include <limits>

namespace condiff {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the block, returned to every thread. `shm` holds >= 32 values; blockDim.x % 32 == 0.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shm) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarp = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // shm may still be read by a previous call
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  v = lane < nwarp ? shm[lane] : T(0);
  return warp_sum(v);
}

// Threads per block for a row of D elements: a multiple of 32 in [64, 512].
inline int row_threads(int64_t D) {
  int t = 64;
  while (t < 512 && t < D) t *= 2;
  return t;
}

// `blocks` as a grid x size, checked against its limit 2^31 - 1 (y and z stop at 65535: large dimensions such
// as the batch are folded into x by the kernels).
inline unsigned int grid_x(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": ", blocks, " thread blocks exceed the CUDA grid");
  return static_cast<unsigned int>(blocks);
}

}  // namespace cuda
}  // namespace condiff
