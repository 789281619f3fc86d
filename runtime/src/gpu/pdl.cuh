#pragma once

// Programmatic dependent launch (compute capability 9.0+) for the runtime's chains of small kernels: the
// client's forward, the server's round, the monolithic layer.
//
// A kernel launched with `launch(..., pdl = true, ...)` may be scheduled while the kernel before it in the
// stream still runs. Every such kernel calls pdl_wait() before its first access to memory: it returns once the
// kernel before has completed and its writes are visible, exactly what the kernel boundary gave (and the wait
// is transitive: that kernel waited for its own predecessor before it completed). What is gained is the launch:
// the next kernel's blocks are set up while this one runs, instead of after it drained. A kernel that is short
// also calls pdl_release() (pdl_enter() does both), so that its successor's blocks can be made resident at
// once; a kernel that spins on a peer (the server's poll, the client's wait) does not, so that its successor's
// blocks do not sit on the SMs for the whole wait, where another process's kernels may need them. A kernel
// whose few blocks each move much data (the server's answer puts) launches plainly: made resident early, its
// blocks are placed wherever the kernel before left room, several to an SM, and copy at a fraction of the
// bandwidth once it ends (docs/PERF.md, session 10).
//
// Without the attribute (pdl false, or a device before 9.0) both calls are no-ops and the launch is a plain one.

#include <cuda_runtime.h>

#include <utility>

namespace eaas::runtime::gpu {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_enter() {
  pdl_wait();
  pdl_release();
}

namespace {

__global__ void pdl_probe() {}

/// Whether kernels of this file can launch with programmatic stream serialization on `device` (the current
/// device): compute capability 9.0+, and this file's kernels built from PTX for 9.0+ (a build for an older
/// architecture run through the JIT has pdl_wait() compiled out, and must launch plainly). Call once, at set-up.
bool pdl_supported(int device) {
  int major = 0;
  cudaFuncAttributes fa{};
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9 &&
         cudaFuncGetAttributes(&fa, pdl_probe) == cudaSuccess && fa.ptxVersion >= 90;
}

}  // namespace

/// `kernel<<<grid, block, smem, stream>>>(args...)`, with programmatic stream serialization when `pdl`.
template <class... Params, class... Args>
cudaError_t launch(cudaStream_t stream, bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem,
                   Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace eaas::runtime::gpu
