#pragma once

// The only place raw PTX lives.
#if defined(__CUDACC__)
#include <cstdint>

namespace eaas::detail::ptx {

__device__ __forceinline__ std::uint64_t globaltimer() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace eaas::detail::ptx
#endif
