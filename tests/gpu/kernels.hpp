#pragma once

// Host launchers of the GPU test kernels (kernels.cu). Each returns a status; CUDA failures come
// back as internal_error with the CUDA error printed.

#include <cstdint>

#include "eaas/common/status.hpp"

namespace eaas::gputest {

/// Number of CUDA devices (0 when there is no driver or no device).
int device_count();

struct wait_result {
  status result;             ///< what wait_signal returned on the device
  std::uint64_t elapsed_ns;  ///< measured with %globaltimer inside the kernel
  std::uint64_t observed;    ///< the value it saw last
};

/// A kernel waits on a device word holding `initial` for `>= target`, bounded by `timeout_ns`.
/// If `abort_after_ms` >= 0, the host raises a mapped abort flag that many ms after launch.
status run_wait(std::uint64_t initial, std::uint64_t target, std::uint64_t timeout_ns, int abort_after_ms,
                wait_result& out);

/// Calls put / signal / quiet from a kernel through a connected endpoint view whose transport has no
/// device body in this build (shm); every op must return `unsupported`, bounds errors first
/// `invalid_argument`. Writes the statuses to `out[0..5]`.
status run_dispatch(std::uint32_t out[6]);

}  // namespace eaas::gputest
