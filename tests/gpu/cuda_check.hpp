#pragma once

// CU(call): in a launcher returning eaas::status, a failed CUDA call prints itself and returns
// internal_error.

#include <cuda_runtime.h>

#include <cstdio>

#include "eaas/common/status.hpp"

namespace eaas::gputest {
inline status cuda_fail(cudaError_t e, const char* what) {
  std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(e));
  return status::internal_error;
}
}  // namespace eaas::gputest

#define CU(x)                                                                               \
  do {                                                                                      \
    if (cudaError_t e_ = (x); e_ != cudaSuccess) return ::eaas::gputest::cuda_fail(e_, #x); \
  } while (0)
