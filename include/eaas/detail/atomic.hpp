#pragma once

// Memory-ordering primitives for the op bodies: std::atomic_ref on the host, cuda::atomic_ref with
// system scope on the device (so host threads, peer GPUs and NICs are covered).

#include <atomic>
#include <cstdint>

#include "eaas/common/macros.hpp"

#if defined(__CUDACC__)
#include <cuda/atomic>
#endif

namespace eaas::detail {

#if EAAS_DEVICE_CODE
template <class T>
using atomic_ref_t = cuda::atomic_ref<T, cuda::thread_scope_system>;
namespace mo = cuda::std;
#else
template <class T>
using atomic_ref_t = std::atomic_ref<T>;
namespace mo = std;
#endif

template <class T>
EAAS_HOST_DEVICE T load_acquire(const T* p) {
  return atomic_ref_t<T>(*const_cast<T*>(p)).load(mo::memory_order_acquire);
}
template <class T>
EAAS_HOST_DEVICE T load_relaxed(const T* p) {
  return atomic_ref_t<T>(*const_cast<T*>(p)).load(mo::memory_order_relaxed);
}
template <class T>
EAAS_HOST_DEVICE void store_release(T* p, T v) {
  atomic_ref_t<T>(*p).store(v, mo::memory_order_release);
}
template <class T>
EAAS_HOST_DEVICE void store_relaxed(T* p, T v) {
  atomic_ref_t<T>(*p).store(v, mo::memory_order_relaxed);
}
template <class T>
EAAS_HOST_DEVICE T fetch_add_acq_rel(T* p, T v) {
  return atomic_ref_t<T>(*p).fetch_add(v, mo::memory_order_acq_rel);
}
/// Returns the value seen before the exchange (== expected on success).
template <class T>
EAAS_HOST_DEVICE T compare_swap_acq_rel(T* p, T expected, T desired) {
  atomic_ref_t<T>(*p).compare_exchange_strong(expected, desired, mo::memory_order_acq_rel, mo::memory_order_acquire);
  return expected;
}

EAAS_HOST_DEVICE void fence_release() {
#if EAAS_DEVICE_CODE
  cuda::atomic_thread_fence(cuda::std::memory_order_release, cuda::thread_scope_system);
#else
  std::atomic_thread_fence(std::memory_order_release);
#endif
}
EAAS_HOST_DEVICE void fence_seq_cst() {
#if EAAS_DEVICE_CODE
  cuda::atomic_thread_fence(cuda::std::memory_order_seq_cst, cuda::thread_scope_system);
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

}  // namespace eaas::detail
