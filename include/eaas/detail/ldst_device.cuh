#pragma once

// Device bodies of the load/store transport (nvlink): the peer's memory is mapped into this
// process (CUDA IPC, peer access), so a put is a copy by the calling group and a signal is a
// system-scope atomic on the mapped word. Compiled only by nvcc.

#if defined(__CUDACC__)

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "eaas/common/status.hpp"
#include "eaas/common/types.hpp"
#include "eaas/common/views.hpp"
#include "eaas/detail/atomic.hpp"
#include "eaas/detail/checks.hpp"

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

/// Copies `n` bytes with the whole group: the widest words (16, 8, 4 bytes) that source and
/// destination alignment allow, 4 vector loads in flight per thread before the stores; the bytes
/// before the first aligned word and the few after the last are copied by the group as well.
template <class Coop>
__device__ __forceinline__ void copy(unsigned char* dst, const unsigned char* src, std::size_t n) {
  using G = group<Coop>;
  const std::size_t r = G::rank(), sz = G::size();
  const auto d0 = reinterpret_cast<std::uintptr_t>(dst), s0 = reinterpret_cast<std::uintptr_t>(src);
  const std::uintptr_t common = (d0 ^ s0) | 16u;  // lowest set bit = widest shared alignment
  const std::size_t w = common & 1u ? 1 : common & 2u ? 2 : common & 4u ? 4 : common & 8u ? 8 : 16;
  std::size_t head = (w - (d0 & (w - 1))) & (w - 1);
  if (head > n) head = n;
  for (std::size_t i = r; i < head; i += sz) dst[i] = src[i];
  const std::size_t body = (n - head) / w;
  unsigned char* d = dst + head;
  const unsigned char* s = src + head;
  if (w == 16) {
    const int4* sv = reinterpret_cast<const int4*>(s);
    int4* dv = reinterpret_cast<int4*>(d);
    std::size_t i = r;
    for (; i + 3 * sz < body; i += 4 * sz) {
      const int4 a = sv[i], b = sv[i + sz], c = sv[i + 2 * sz], e = sv[i + 3 * sz];
      dv[i] = a;
      dv[i + sz] = b;
      dv[i + 2 * sz] = c;
      dv[i + 3 * sz] = e;
    }
    for (; i < body; i += sz) dv[i] = sv[i];
  } else if (w == 8) {
    for (std::size_t i = r; i < body; i += sz)
      reinterpret_cast<std::uint64_t*>(d)[i] = reinterpret_cast<const std::uint64_t*>(s)[i];
  } else if (w == 4) {
    for (std::size_t i = r; i < body; i += sz)
      reinterpret_cast<std::uint32_t*>(d)[i] = reinterpret_cast<const std::uint32_t*>(s)[i];
  } else if (w == 2) {
    for (std::size_t i = r; i < body; i += sz)
      reinterpret_cast<std::uint16_t*>(d)[i] = reinterpret_cast<const std::uint16_t*>(s)[i];
  } else {
    for (std::size_t i = r; i < body; i += sz) d[i] = s[i];
  }
  // Fewer than w bytes remain, aligned to w: one thread copies them in halving words.
  if (r == 0) {
    std::size_t at = head + body * w;
    for (std::size_t k = w / 2; k >= 1 && at < n; k /= 2) {
      if (n - at < k) continue;
      if (k == 8) *reinterpret_cast<std::uint64_t*>(dst + at) = *reinterpret_cast<const std::uint64_t*>(src + at);
      if (k == 4) *reinterpret_cast<std::uint32_t*>(dst + at) = *reinterpret_cast<const std::uint32_t*>(src + at);
      if (k == 2) *reinterpret_cast<std::uint16_t*>(dst + at) = *reinterpret_cast<const std::uint16_t*>(src + at);
      if (k == 1) dst[at] = src[at];
      at += k;
    }
  }
}

__device__ __forceinline__ unsigned char* at(const remote_view& v, std::uint64_t offset) {
  return reinterpret_cast<unsigned char*>(static_cast<std::uintptr_t>(v.addr + offset));
}

template <class Coop>
__device__ __forceinline__ status put(const remote_view& dst, std::uint64_t off, const void* src, std::size_t n) {
  unsigned char* d = at(dst, off);
  const auto* s = static_cast<const unsigned char*>(src);
  // Small aligned payloads (flags, counters, headers, one row): one word per thread at most, without
  // copy()'s width selection, which for a small message costs about as much as NVLink does.
  const std::uintptr_t bits = reinterpret_cast<std::uintptr_t>(d) | reinterpret_cast<std::uintptr_t>(s) | n;
  if constexpr (std::is_same_v<Coop, coop_thread>) {
    if (n <= 32 && (bits & 7u) == 0) {
      for (std::size_t i = 0; i < n; i += 8)
        *reinterpret_cast<std::uint64_t*>(d + i) = *reinterpret_cast<const std::uint64_t*>(s + i);
      return status::ok;
    }
  } else {
    const std::size_t r = group<Coop>::rank(), sz = group<Coop>::size();
    if ((bits & 15u) == 0 && n <= 16 * sz) {
      if (r < n / 16) reinterpret_cast<int4*>(d)[r] = reinterpret_cast<const int4*>(s)[r];
      return status::ok;
    }
    if ((bits & 7u) == 0 && n <= 8 * sz) {
      if (r < n / 8) reinterpret_cast<std::uint64_t*>(d)[r] = reinterpret_cast<const std::uint64_t*>(s)[r];
      return status::ok;
    }
  }
  copy<Coop>(d, s, n);
  return status::ok;
}

template <class Coop>
__device__ __forceinline__ status get(const remote_view& src, std::uint64_t off, void* dst, std::size_t n) {
  copy<Coop>(static_cast<unsigned char*>(dst), at(src, off), n);
  return status::ok;
}

/// One thread of the group performs the atomic after the group's earlier stores. A single thread's
/// release (st.release.sys, atom.acq_rel.sys) orders its own payload. A warp or block meets at its
/// barrier first: in the PTX memory model a barrier synchronizes its participants, so every member's
/// stores precede the releasing thread's atomic in causality order, and a release is cumulative over
/// causality order. No separate fence.sys is needed (one cost ~1 µs per signal on H200 NVLink: warp
/// and block ping-pong at 1.5x the floor with it); the ordering stress tests run every scope.
template <class Coop>
__device__ __forceinline__ status signal(const remote_view& sig, std::uint64_t off, std::uint64_t value, signal_op op) {
  using G = group<Coop>;
  if constexpr (!std::is_same_v<Coop, coop_thread>) G::sync();
  if (G::rank() == 0) {
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
  if (G::rank() == 0) *fetched = compare_swap_acq_rel(reinterpret_cast<std::uint64_t*>(at(t, off)), expected, desired);
  return status::ok;
}

/// Every thread's earlier stores and atomics are ordered at system scope, then the group meets and
/// one thread reads the endpoint state (a PCIe round trip: once per group, not once per thread).
template <class Coop>
__device__ __forceinline__ status quiet(const device_endpoint& ep) {
  fence_release();
  if constexpr (std::is_same_v<Coop, coop_thread>) {
    return check_endpoint(ep);
  } else if constexpr (std::is_same_v<Coop, coop_warp>) {
    __syncwarp();
    unsigned s = 0;
    if (group<Coop>::rank() == 0) s = static_cast<unsigned>(check_endpoint(ep));
    return static_cast<status>(__shfl_sync(0xffffffffu, s, 0));
  } else {
    __shared__ unsigned shared_status;
    __syncthreads();
    if (group<Coop>::rank() == 0) shared_status = static_cast<unsigned>(check_endpoint(ep));
    __syncthreads();
    const auto s = static_cast<status>(shared_status);
    __syncthreads();  // the word may be reused by the group's next quiet
    return s;
  }
}

template <class Coop>
__device__ __forceinline__ void fence() {
  fence_release();
  group<Coop>::sync();
}

}  // namespace eaas::detail::ldst_dev

#endif  // __CUDACC__
