#pragma once

// What the GPU perf tools share: failing loudly on a CUDA error, and the data pattern of pattern.hpp
// written and checked by kernels (byte j of transfer `seed` is byte j % 8 of splitmix64(seed + j / 8)).

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "pattern.hpp"

#define EAAS_CU(x)                                                                                           \
  do {                                                                                                       \
    if (cudaError_t e_ = (x); e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "CUDA error: %s at %s:%d: %s\n", #x, __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(2);                                                                                          \
    }                                                                                                        \
  } while (0)

namespace eaas::perf {

/// Writes the pattern of `seed` over `bytes` bytes at `p` (any length, `p` 8-byte aligned).
__global__ inline void fill_pattern_kernel(unsigned char* p, std::uint64_t bytes, std::uint64_t seed) {
  const std::uint64_t words = (bytes + 7) / 8;
  for (std::uint64_t i = blockIdx.x * std::uint64_t{blockDim.x} + threadIdx.x; i < words;
       i += std::uint64_t{gridDim.x} * blockDim.x) {
    const std::uint64_t w = splitmix64(seed + i);
    if (8 * i + 8 <= bytes) {
      reinterpret_cast<std::uint64_t*>(p)[i] = w;
    } else {
      for (std::uint64_t b = 0; 8 * i + b < bytes; ++b) p[8 * i + b] = static_cast<unsigned char>(w >> (8 * b));
    }
  }
}

/// Adds to `*wrong` the number of bytes at `p` that differ from the pattern of `seed`.
__global__ inline void count_wrong_kernel(const unsigned char* p, std::uint64_t bytes, std::uint64_t seed,
                                          unsigned long long* wrong) {
  unsigned long long bad = 0;
  const std::uint64_t words = (bytes + 7) / 8;
  for (std::uint64_t i = blockIdx.x * std::uint64_t{blockDim.x} + threadIdx.x; i < words;
       i += std::uint64_t{gridDim.x} * blockDim.x) {
    const std::uint64_t w = splitmix64(seed + i);
    for (std::uint64_t b = 0; b < 8 && 8 * i + b < bytes; ++b)
      bad += p[8 * i + b] != static_cast<unsigned char>(w >> (8 * b));
  }
  if (bad != 0) atomicAdd(wrong, bad);
}

/// Fills (stream-ordered) and checks (synchronous) on the current device.
inline void fill_pattern_async(void* p, std::uint64_t bytes, std::uint64_t seed, cudaStream_t s) {
  fill_pattern_kernel<<<264, 512, 0, s>>>(static_cast<unsigned char*>(p), bytes, seed);
  EAAS_CU(cudaGetLastError());
}
inline unsigned long long count_wrong(const void* p, std::uint64_t bytes, std::uint64_t seed, cudaStream_t s) {
  unsigned long long* d = nullptr;
  EAAS_CU(cudaMallocAsync(&d, sizeof(*d), s));
  EAAS_CU(cudaMemsetAsync(d, 0, sizeof(*d), s));
  count_wrong_kernel<<<264, 512, 0, s>>>(static_cast<const unsigned char*>(p), bytes, seed, d);
  EAAS_CU(cudaGetLastError());
  unsigned long long h = 0;
  EAAS_CU(cudaMemcpyAsync(&h, d, sizeof(h), cudaMemcpyDeviceToHost, s));
  EAAS_CU(cudaFreeAsync(d, s));
  EAAS_CU(cudaStreamSynchronize(s));
  return h;
}

}  // namespace eaas::perf
