#pragma once

// Failure reporting for the runtime's CUDA files: a status plus a sentence for eaas::last_error().

#include <cuda_runtime.h>

#include <string>

#include "eaas/host/error.hpp"

namespace eaas::runtime::gpu {

inline status fail_at(const char* file, int line, status s, const std::string& what) noexcept {
  return ::eaas::detail::record_failure(s, file, line, what);
}

}  // namespace eaas::runtime::gpu

/// Returns internal_error, with `who`, the call and CUDA's message, when a CUDA call fails.
#define EAAS_GPU_CUDA(who, x)                                                                             \
  do {                                                                                                    \
    if (const cudaError_t e_ = (x); e_ != cudaSuccess)                                                    \
      return ::eaas::runtime::gpu::fail_at(__FILE__, __LINE__, ::eaas::status::internal_error,            \
                                           std::string(who) + ": " + #x + ": " + cudaGetErrorString(e_)); \
  } while (0)

/// Returns `s` with a sentence.
#define EAAS_GPU_FAIL(s, what) ::eaas::runtime::gpu::fail_at(__FILE__, __LINE__, (s), (what))
