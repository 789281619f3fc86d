#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "cuda_check.hpp"
#include "eaas/device/ops.hpp"
#include "kernels.hpp"

namespace eaas::gputest {

namespace {

__global__ void wait_kernel(device_context ctx, const std::uint64_t* sig, std::uint64_t target,
                            std::uint64_t timeout_ns, wait_result* out) {
  const std::uint64_t t0 = now_ns();
  std::uint64_t seen = 0;
  const status s = wait_signal(ctx, sig, cmp_op::ge, target, timeout{timeout_ns}, &seen);
  out->elapsed_ns = now_ns() - t0;
  out->result = s;
  out->observed = seen;
}

__global__ void dispatch_kernel(device_endpoint ep, remote_view rv, std::uint64_t* src, std::uint32_t* out) {
  out[0] = static_cast<std::uint32_t>(put(coop_thread{}, ep, rv, 0, src, 8));
  out[1] = static_cast<std::uint32_t>(signal(coop_warp{}, ep, rv, 8, 1, signal_op::add));
  out[2] = static_cast<std::uint32_t>(quiet(coop_block{}, ep));
  out[3] = static_cast<std::uint32_t>(put(coop_thread{}, ep, rv, rv.size, src, 8));          // out of bounds
  out[4] = static_cast<std::uint32_t>(signal(coop_thread{}, ep, rv, 3, 1, signal_op::set));  // misaligned
  out[5] = static_cast<std::uint32_t>(get(coop_thread{}, ep, rv, 0, src, 8));
}

}  // namespace

int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

status run_wait(std::uint64_t initial, std::uint64_t target, std::uint64_t timeout_ns, int abort_after_ms,
                wait_result& out) {
  std::uint64_t* sig = nullptr;
  wait_result* res = nullptr;
  std::uint32_t* abort_flag = nullptr;
  CU(cudaMalloc(&sig, sizeof(*sig)));
  CU(cudaMemcpy(sig, &initial, sizeof(initial), cudaMemcpyHostToDevice));
  CU(cudaMalloc(&res, sizeof(*res)));
  CU(cudaHostAlloc(&abort_flag, sizeof(*abort_flag), cudaHostAllocMapped));
  *abort_flag = 0;
  std::uint32_t* abort_dev = nullptr;
  CU(cudaHostGetDevicePointer(&abort_dev, abort_flag, 0));
  const wait_result poison{status::internal_error, ~0ull, ~0ull};
  CU(cudaMemcpy(res, &poison, sizeof(poison), cudaMemcpyHostToDevice));
  wait_kernel<<<1, 1>>>(device_context{abort_dev}, sig, target, timeout_ns, res);
  CU(cudaGetLastError());
  if (abort_after_ms >= 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(abort_after_ms));
    __atomic_store_n(abort_flag, 1u, __ATOMIC_RELEASE);
  }
  CU(cudaDeviceSynchronize());
  CU(cudaMemcpy(&out, res, sizeof(out), cudaMemcpyDeviceToHost));
  CU(cudaFree(sig));
  CU(cudaFree(res));
  CU(cudaFreeHost(abort_flag));
  return status::ok;
}

status run_dispatch(std::uint32_t out[6]) {
  std::uint32_t* state = nullptr;
  std::uint64_t* mem = nullptr;
  std::uint32_t* res = nullptr;
  CU(cudaMalloc(&state, sizeof(*state)));
  CU(cudaMemset(state, 0, sizeof(*state)));  // endpoint_state::connected
  CU(cudaMalloc(&mem, 4096));
  CU(cudaMalloc(&res, 6 * sizeof(*res)));
  CU(cudaMemset(res, 0xff, 6 * sizeof(*res)));
  device_endpoint ep{};
  ep.magic = kEndpointViewMagic;
  ep.transport = transport_kind::shm;
  ep.state = state;
  ep.peer_id = 42;
  remote_view rv{};
  rv.magic = kRemoteViewMagic;
  rv.transport = transport_kind::shm;
  rv.addr = reinterpret_cast<std::uintptr_t>(mem);
  rv.size = 4096;
  rv.owner_id = 42;
  dispatch_kernel<<<1, 32>>>(ep, rv, mem, res);
  CU(cudaGetLastError());
  CU(cudaDeviceSynchronize());
  CU(cudaMemcpy(out, res, 6 * sizeof(*res), cudaMemcpyDeviceToHost));
  CU(cudaFree(state));
  CU(cudaFree(mem));
  CU(cudaFree(res));
  return status::ok;
}

}  // namespace eaas::gputest
