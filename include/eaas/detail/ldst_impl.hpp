#pragma once

// Bodies of the load/store transports: the peer's region is mapped into this address space, so a
// put is a copy and a signal is an atomic on the mapped word. The host versions serve shm; the
// device versions (nvlink) arrive with the GPU build.

#include <cstring>

#include "eaas/common/status.hpp"
#include "eaas/common/views.hpp"
#include "eaas/detail/atomic.hpp"

namespace eaas::detail::ldst {

inline unsigned char* at(const remote_view& r, std::uint64_t offset) {
  return reinterpret_cast<unsigned char*>(static_cast<std::uintptr_t>(r.addr + offset));
}
inline std::uint64_t* word_at(const remote_view& r, std::uint64_t offset) {
  return reinterpret_cast<std::uint64_t*>(at(r, offset));
}

inline status put(const remote_view& dst, std::uint64_t offset, const void* src, std::size_t bytes) {
  if (bytes != 0) std::memcpy(at(dst, offset), src, bytes);
  return status::ok;
}

inline status get(const remote_view& src, std::uint64_t offset, void* dst, std::size_t bytes) {
  fence_seq_cst();  // earlier puts of this thread (to any peer) are ordered before the read
  if (bytes != 0) std::memcpy(dst, at(src, offset), bytes);
  return status::ok;
}

inline status signal(const remote_view& sig, std::uint64_t offset, std::uint64_t value, signal_op op) {
  std::uint64_t* w = word_at(sig, offset);
  if (op == signal_op::set)
    store_release(w, value);
  else
    (void)fetch_add_acq_rel(w, value);
  return status::ok;
}

inline status fetch_add(const remote_view& t, std::uint64_t offset, std::uint64_t value, std::uint64_t* fetched) {
  *fetched = fetch_add_acq_rel(word_at(t, offset), value);
  return status::ok;
}

inline status compare_swap(const remote_view& t, std::uint64_t offset, std::uint64_t expected, std::uint64_t desired,
                           std::uint64_t* fetched) {
  *fetched = compare_swap_acq_rel(word_at(t, offset), expected, desired);
  return status::ok;
}

}  // namespace eaas::detail::ldst
