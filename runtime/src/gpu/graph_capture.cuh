#pragma once

// Stream capture of a CUDA graph, in one place: the GPU steps capture their round or forward with it, so
// that every capture begun is ended (the stream never stays in capture mode) and no half-built graph leaks.

#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "cuda_fail.cuh"

namespace eaas::runtime::gpu {

/// Captures the work `enqueue()` (a callable returning status) queues on `stream` and instantiates it into
/// `exec`. The capture is thread-local (cudaStreamCaptureModeThreadLocal: only this thread's unsafe calls
/// invalidate it) and always ended, even when enqueue fails; the graph is destroyed once instantiated or on
/// failure (the executable graph does not need it). On failure `exec` is untouched and the status is
/// enqueue's, or internal_error with `who` (the caller, for last_error()), the CUDA call and its message.
template <class Enqueue>
status capture_graph(const char* who, cudaStream_t stream, Enqueue&& enqueue, cudaGraphExec_t& exec) {
  auto cuda_failed = [who](int line, const char* call, cudaError_t e) {
    return fail_at(__FILE__, line, status::internal_error,
                   std::string(who) + ": graph capture: " + call + ": " + cudaGetErrorString(e));
  };
  if (const cudaError_t e = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal); e != cudaSuccess)
    return cuda_failed(__LINE__, "cudaStreamBeginCapture", e);
  const status st = std::forward<Enqueue>(enqueue)();
  cudaGraph_t g = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream, &g);  // always: the stream leaves capture mode
  if (st != status::ok || ended != cudaSuccess) {
    if (g != nullptr) cudaGraphDestroy(g);
    return st != status::ok ? st : cuda_failed(__LINE__, "cudaStreamEndCapture", ended);
  }
  cudaGraphExec_t made = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&made, g, 0);
  cudaGraphDestroy(g);
  if (inst != cudaSuccess) return cuda_failed(__LINE__, "cudaGraphInstantiate", inst);
  exec = made;
  return status::ok;
}

}  // namespace eaas::runtime::gpu
