#pragma once

// Pieces shared by dense_gpu.cu and moe_local.cu: an owning device allocation and a block-wide sum.

#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "cuda_fail.cuh"

namespace eaas::runtime::gpu {

/// One cudaMalloc'd allocation, freed on destruction (errors there are ignored: nothing can be done).
struct device_buffer {
  void* p = nullptr;
  std::size_t bytes = 0;

  device_buffer() = default;
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() {
    if (p != nullptr) cudaFree(p);
  }

  /// Allocates `n` bytes (at least 1) on the current device, zeroed.
  status alloc(std::size_t n) {
    n = n == 0 ? 1 : n;
    EAAS_GPU_CUDA("device buffer", cudaMalloc(&p, n));
    bytes = n;
    EAAS_GPU_CUDA("device buffer", cudaMemset(p, 0, n));
    return status::ok;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

/// The sum of `v` over the block (kThreads threads, a multiple of 32, at most 1024), returned to every
/// thread. Contains __syncthreads: call from all threads of the block.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024);
  __shared__ float s_part[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) s_part[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += s_part[w];  // the same order in every thread
  return total;
}

}  // namespace eaas::runtime::gpu
