#pragma once

#include <cstdint>

#include "eaas/common/macros.hpp"
#include "eaas/common/types.hpp"

#if EAAS_DEVICE_CODE || defined(__CUDACC__)
#include "eaas/detail/ptx.cuh"
#endif
#include <chrono>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace eaas::detail {

/// Nanoseconds on the clock of the current execution space (host steady clock, device %globaltimer).
EAAS_HOST_DEVICE std::uint64_t now_ns() {
#if EAAS_DEVICE_CODE
  return ptx::globaltimer();
#else
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
#endif
}

/// One step of a polite spin: a pause instruction, then (after `spins` grows) a yield so that more
/// waiters than cores still make progress.
EAAS_HOST_DEVICE void spin_pause(std::uint32_t spins) {
#if EAAS_DEVICE_CODE
  if (spins > 4096) __nanosleep(32);  // long waits leave issue slots to the SM's other warps
#else
  if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#elif defined(__aarch64__)
    asm volatile("yield" ::: "memory");
#endif
  } else {
    std::this_thread::yield();
  }
#endif
}

}  // namespace eaas::detail
