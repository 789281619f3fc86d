#pragma once

// Device bodies of the load/store transport (nvlink): the peer's memory is mapped into this
// process (CUDA IPC, peer access), so a put is a copy by the calling group and a signal is a
// system-scope atomic on the mapped word. Compiled only by nvcc.

#if defined(__CUDACC__)

#include <cstddef>
#include <cstdint>

#include "eaas/common/status.hpp"
#include "eaas/common/types.hpp"
#include "eaas/common/views.hpp"
#include "eaas/detail/atomic.hpp"

namespace eaas::detail::ldst_dev {

/// Rank and size of a cooperating group, and its barrier.
template <class Coop>
struct group;

template <>
struct group<coop_thread> {
  __device__ __forceinline__ static unsigned rank() { return 0; }
  __device__ __forceinline__ static unsigned size() { return 1; }
  __device__ __forceinline__ static void sync() {}
};

template <>
struct group<coop_warp> {
  __device__ __forceinline__ static unsigned rank() {
    unsigned lane;
    asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
    return lane;
  }
  __device__ __forceinline__ static unsigned size() { return 32; }
  __device__ __forceinline__ static void sync() { __syncwarp(); }
};

template <>
struct group<coop_block> {
  __device__ __forceinline__ static unsigned rank() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  }
  __device__ __forceinline__ static unsigned size() { return blockDim.x * blockDim.y * blockDim.z; }
  __device__ __forceinline__ static void sync() { __syncthreads(); }
};

/// Copies `n` bytes with the whole group: 16-byte vectors when source and destination share their
/// alignment modulo 16 (4 loads in flight per thread before the stores), else 8-byte words, else
/// bytes. Head and tail bytes are split across the group as well.
template <class Coop>
__device__ __forceinline__ void copy(unsigned char* dst, const unsigned char* src, std::size_t n) {
  using G = group<Coop>;
  const std::size_t r = G::rank(), sz = G::size();
  const auto d0 = reinterpret_cast<std::uintptr_t>(dst), s0 = reinterpret_cast<std::uintptr_t>(src);
  std::size_t vec = ((d0 ^ s0) & 15u) == 0 ? 16 : ((d0 ^ s0) & 7u) == 0 ? 8 : 1;
  if (n < 64) vec = 1;
  std::size_t head = vec == 1 ? n : ((vec - (d0 & (vec - 1))) & (vec - 1));
  if (head > n) head = n;
  for (std::size_t i = r; i < head; i += sz) dst[i] = src[i];
  if (vec == 1) return;
  const std::size_t body = (n - head) / vec;
  if (vec == 16) {
    const int4* s = reinterpret_cast<const int4*>(src + head);
    int4* d = reinterpret_cast<int4*>(dst + head);
    std::size_t i = r;
    for (; i + 3 * sz < body; i += 4 * sz) {
      const int4 a = s[i], b = s[i + sz], c = s[i + 2 * sz], e = s[i + 3 * sz];
      d[i] = a;
      d[i + sz] = b;
      d[i + 2 * sz] = c;
      d[i + 3 * sz] = e;
    }
    for (; i < body; i += sz) d[i] = s[i];
  } else {
    const std::uint64_t* s = reinterpret_cast<const std::uint64_t*>(src + head);
    std::uint64_t* d = reinterpret_cast<std::uint64_t*>(dst + head);
    for (std::size_t i = r; i < body; i += sz) d[i] = s[i];
  }
  for (std::size_t i = head + body * vec + r; i < n; i += sz) dst[i] = src[i];
}

__device__ __forceinline__ unsigned char* at(const remote_view& v, std::uint64_t offset) {
  return reinterpret_cast<unsigned char*>(static_cast<std::uintptr_t>(v.addr + offset));
}

template <class Coop>
__device__ __forceinline__ status put(const remote_view& dst, std::uint64_t off, const void* src, std::size_t n) {
  copy<Coop>(at(dst, off), static_cast<const unsigned char*>(src), n);
  return status::ok;
}

template <class Coop>
__device__ __forceinline__ status get(const remote_view& src, std::uint64_t off, void* dst, std::size_t n) {
  copy<Coop>(static_cast<unsigned char*>(dst), at(src, off), n);
  return status::ok;
}

/// One thread of the group performs the atomic after the group's earlier stores: barrier, a
/// system-scope fence, then the release operation (payload before signal, across NVLink).
template <class Coop>
__device__ __forceinline__ status signal(const remote_view& sig, std::uint64_t off, std::uint64_t value,
                                         signal_op op) {
  using G = group<Coop>;
  G::sync();
  if (G::rank() == 0) {
    fence_seq_cst();
    auto* w = reinterpret_cast<std::uint64_t*>(at(sig, off));
    if (op == signal_op::set)
      store_release(w, value);
    else
      (void)fetch_add_acq_rel(w, value);
  }
  return status::ok;
}

template <class Coop>
__device__ __forceinline__ status fetch_add(const remote_view& t, std::uint64_t off, std::uint64_t value,
                                            std::uint64_t* fetched) {
  using G = group<Coop>;
  if (G::rank() == 0) *fetched = fetch_add_acq_rel(reinterpret_cast<std::uint64_t*>(at(t, off)), value);
  return status::ok;
}

template <class Coop>
__device__ __forceinline__ status compare_swap(const remote_view& t, std::uint64_t off, std::uint64_t expected,
                                               std::uint64_t desired, std::uint64_t* fetched) {
  using G = group<Coop>;
  if (G::rank() == 0)
    *fetched = compare_swap_acq_rel(reinterpret_cast<std::uint64_t*>(at(t, off)), expected, desired);
  return status::ok;
}

/// Every thread's earlier stores and atomics are performed at system scope, then the group meets.
template <class Coop>
__device__ __forceinline__ void quiet() {
  fence_seq_cst();
  group<Coop>::sync();
}

template <class Coop>
__device__ __forceinline__ void fence() {
  fence_release();
  group<Coop>::sync();
}

}  // namespace eaas::detail::ldst_dev

#endif  // __CUDACC__
