#pragma once

// Stream capture of a CUDA graph, in one place: the GPU steps capture their round or forward with it, so
// that every capture begun is ended (the stream never stays in capture mode), no half-built graph leaks, and
// captures take turns with the process's GPU allocations (capture_lock.hpp).

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>

#include "capture_lock.hpp"
#include "cuda_fail.cuh"

namespace eaas::runtime::gpu {

// After a failed capture: true once `stream` is out of capture mode (ending a capture still open) and the
// thread's last error is cleared. An invalidated capture is no sticky error: the context stays usable.
inline bool leave_failed_capture(cudaStream_t stream) {
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &cs) == cudaSuccess && cs != cudaStreamCaptureStatusNone) {
    cudaGraph_t g = nullptr;
    (void)cudaStreamEndCapture(stream, &g);
    if (g != nullptr) cudaGraphDestroy(g);
  }
  (void)cudaGetLastError();
  return cudaStreamIsCapturing(stream, &cs) == cudaSuccess && cs == cudaStreamCaptureStatusNone;
}

/// Captures the work `enqueue()` (a callable returning status) queues on `stream` and instantiates it into
/// `exec`. The capture is thread-local (cudaStreamCaptureModeThreadLocal: only this thread's unsafe calls
/// invalidate it), holds capture_mutex() throughout (the caller must not hold it), and is always ended, even
/// when enqueue fails; the graph is destroyed once instantiated or on failure (the executable graph does not
/// need it). A capture invalidated all the same (cudaErrorStreamCaptureInvalidated: some other CUDA call of
/// this process that does not take the lock) is begun again once, so `enqueue` must only queue work; each
/// such retry adds one to `*retries` (when given). A launch of enqueue's own that fails inside the capture
/// invalidates it as well: that also spends the retry (and counts), and its failure, repeated, is returned. On failure
/// `exec` is untouched and the status is enqueue's, or internal_error with `who` (the caller, for last_error()), the
/// CUDA call and its message.
template <class Enqueue>
status capture_graph(const char* who, cudaStream_t stream, Enqueue&& enqueue, cudaGraphExec_t& exec,
                     std::uint32_t* retries = nullptr) {
  std::lock_guard lock(capture_mutex());
  for (int attempt = 0;; ++attempt) {
    auto cuda_failed = [who, attempt](int line, const char* call, cudaError_t e) {
      return fail_at(__FILE__, line, status::internal_error,
                     std::string(who) + ": graph capture: " + call + ": " + cudaGetErrorString(e) +
                         (attempt > 0 ? " (capture begun again once after it was invalidated)" : ""));
    };
    if (const cudaError_t e = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal); e != cudaSuccess)
      return cuda_failed(__LINE__, "cudaStreamBeginCapture", e);
    const status st = enqueue();
    // Asked before the end: a failed enqueue may be the invalidation's doing (a launch into a spoilt capture).
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusActive;
    const bool spoilt = cudaStreamIsCapturing(stream, &cs) == cudaSuccess && cs == cudaStreamCaptureStatusInvalidated;
    cudaGraph_t g = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream, &g);  // always: the stream leaves capture mode
    cudaError_t inst = cudaSuccess;
    cudaGraphExec_t made = nullptr;
    if (st == status::ok && ended == cudaSuccess) inst = cudaGraphInstantiate(&made, g, 0);
    if (g != nullptr) cudaGraphDestroy(g);
    if (st == status::ok && ended == cudaSuccess && inst == cudaSuccess) {
      exec = made;
      return status::ok;
    }
    const bool invalidated =
        spoilt || ended == cudaErrorStreamCaptureInvalidated || inst == cudaErrorStreamCaptureInvalidated;
    // Also before a failure is returned: a stale last error would fail the caller's next launch check.
    if (leave_failed_capture(stream) && invalidated && attempt == 0) {
      if (retries != nullptr) ++*retries;
      continue;
    }
    if (st != status::ok) return st;
    return ended != cudaSuccess ? cuda_failed(__LINE__, "cudaStreamEndCapture", ended)
                                : cuda_failed(__LINE__, "cudaGraphInstantiate", inst);
  }
}

}  // namespace eaas::runtime::gpu
