#pragma once

#include <cstring>
#include <type_traits>

#include "eaas/common/status.hpp"
#include "eaas/common/views.hpp"
#include "eaas/detail/atomic.hpp"
#include "eaas/detail/checks.hpp"
#include "eaas/detail/clock.hpp"
#include "eaas/detail/ibgda/ops.hpp"
#include "eaas/detail/ldst_device.cuh"
#include "eaas/detail/ldst_impl.hpp"

namespace eaas {

namespace detail {

// Every condition evaluated, one branch (bitwise |, not ||): on a GPU thread each early exit is a
// dependent compare-and-branch, and at 8 bytes those are most of an op's cost.
EAAS_HOST_DEVICE bool remote_bad(const device_endpoint& ep, const remote_view& r, std::uint64_t offset,
                                 std::uint64_t bytes, std::uint64_t align) {
  return (r.magic != kRemoteViewMagic) | (r.transport != ep.transport) | (r.owner_id != ep.peer_id) |
         (offset > r.size) | (bytes > r.size - offset) | (((r.addr + offset) & (align - 1)) != 0);
}

EAAS_HOST_DEVICE status check_remote(const device_endpoint& ep, const remote_view& r, std::uint64_t offset,
                                     std::uint64_t bytes, std::uint64_t align) {
  return EAAS_UNLIKELY(remote_bad(ep, r, offset, bytes, align)) ? status::invalid_argument : status::ok;
}

EAAS_HOST_DEVICE bool aligned8(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 7u) == 0; }

// Host code runs the shm bodies (one thread); device code runs the nvlink bodies (any scope).
template <class Coop>
EAAS_HOST_DEVICE constexpr bool shm_callable() {
  return !EAAS_DEVICE_CODE && std::is_same_v<Coop, coop_thread>;
}

}  // namespace detail

EAAS_HOST_DEVICE std::uint64_t now_ns() { return detail::now_ns(); }

EAAS_HOST_DEVICE deadline deadline_after(std::uint64_t ns) {
  const std::uint64_t t = detail::now_ns();
  return deadline{t + ns < t ? ~std::uint64_t{0} : t + ns};
}

template <class Coop>
EAAS_HOST_DEVICE status put(Coop, const device_endpoint& ep, const remote_view& dst, std::uint64_t dst_offset,
                            const void* src, std::size_t bytes) {
  static_assert(is_coop_v<Coop>, "the first argument is a cooperation tag: coop_thread, coop_warp or coop_block");
  if (status s = detail::check_endpoint_fast(ep); s != status::ok) return s;
  if (status s = detail::check_remote(ep, dst, dst_offset, bytes, 1); s != status::ok) return s;
  if (EAAS_UNLIKELY(src == nullptr && bytes != 0)) return status::invalid_argument;
  if (ep.transport == transport_kind::shm) {
    if constexpr (detail::shm_callable<Coop>()) return detail::ldst::put(dst, dst_offset, src, bytes);
  }
  if (ep.transport == transport_kind::ibgda) return detail::ibgda::op_put<Coop>(ep, dst, dst_offset, src, bytes);
#if EAAS_DEVICE_CODE
  if (ep.transport == transport_kind::nvlink) return detail::ldst_dev::put<Coop>(dst, dst_offset, src, bytes);
#endif
  return status::unsupported;
}

template <class Coop>
EAAS_HOST_DEVICE status signal(Coop, const device_endpoint& ep, const remote_view& sig, std::uint64_t sig_offset,
                               std::uint64_t value, signal_op op) {
  static_assert(is_coop_v<Coop>, "the first argument is a cooperation tag: coop_thread, coop_warp or coop_block");
  if (status s = detail::check_endpoint_fast(ep); s != status::ok) return s;
  if (status s = detail::check_remote(ep, sig, sig_offset, 8, kSignalAlign); s != status::ok) return s;
  if (EAAS_UNLIKELY(op != signal_op::set && op != signal_op::add)) return status::invalid_argument;
  if (ep.transport == transport_kind::shm) {
    if constexpr (detail::shm_callable<Coop>()) return detail::ldst::signal(sig, sig_offset, value, op);
  }
  if (ep.transport == transport_kind::ibgda) return detail::ibgda::op_signal<Coop>(ep, sig, sig_offset, value, op);
#if EAAS_DEVICE_CODE
  if (ep.transport == transport_kind::nvlink) return detail::ldst_dev::signal<Coop>(sig, sig_offset, value, op);
#endif
  return status::unsupported;
}

template <class Coop>
EAAS_HOST_DEVICE status put_signal(Coop, const device_endpoint& ep, const remote_view& dst, std::uint64_t dst_offset,
                                   const void* src, std::size_t bytes, const remote_view& sig, std::uint64_t sig_offset,
                                   std::uint64_t value, signal_op op) {
  static_assert(is_coop_v<Coop>, "the first argument is a cooperation tag: coop_thread, coop_warp or coop_block");
#if EAAS_DEVICE_CODE
  // The nvlink fast path: the same checks as below (on the device check_endpoint_fast looks at the view
  // only), as one branch.
  if (ep.transport == transport_kind::nvlink) {
    const bool bad = (ep.magic != kEndpointViewMagic) | (ep.state == nullptr) |
                     detail::remote_bad(ep, dst, dst_offset, bytes, 1) |
                     detail::remote_bad(ep, sig, sig_offset, 8, kSignalAlign) | ((src == nullptr) & (bytes != 0)) |
                     ((op != signal_op::set) & (op != signal_op::add));
    if (EAAS_UNLIKELY(bad)) return status::invalid_argument;
    (void)detail::ldst_dev::put<Coop>(dst, dst_offset, src, bytes);
    return detail::ldst_dev::signal<Coop>(sig, sig_offset, value, op);
  }
#endif
  if (status s = detail::check_endpoint_fast(ep); s != status::ok) return s;
  if (status s = detail::check_remote(ep, dst, dst_offset, bytes, 1); s != status::ok) return s;
  if (status s = detail::check_remote(ep, sig, sig_offset, 8, kSignalAlign); s != status::ok) return s;
  if (EAAS_UNLIKELY((src == nullptr && bytes != 0) || (op != signal_op::set && op != signal_op::add)))
    return status::invalid_argument;
  if (ep.transport == transport_kind::shm) {
    if constexpr (detail::shm_callable<Coop>()) {
      (void)detail::ldst::put(dst, dst_offset, src, bytes);
      // The release in the signal store orders the payload before it.
      return detail::ldst::signal(sig, sig_offset, value, op);
    }
  }
  // One RC QP executes the payload WRITE before the signal: no fence needed.
  if (ep.transport == transport_kind::ibgda)
    return detail::ibgda::op_put_signal<Coop>(ep, dst, dst_offset, src, bytes, sig, sig_offset, value, op);
#if EAAS_DEVICE_CODE
  if (ep.transport == transport_kind::nvlink) {
    (void)detail::ldst_dev::put<Coop>(dst, dst_offset, src, bytes);
    return detail::ldst_dev::signal<Coop>(sig, sig_offset, value, op);
  }
#endif
  return status::unsupported;
}

template <class Coop>
EAAS_HOST_DEVICE status get(Coop, const device_endpoint& ep, const remote_view& src, std::uint64_t src_offset,
                            void* dst, std::size_t bytes) {
  static_assert(is_coop_v<Coop>, "the first argument is a cooperation tag: coop_thread, coop_warp or coop_block");
  if (status s = detail::check_endpoint_fast(ep); s != status::ok) return s;
  if (status s = detail::check_remote(ep, src, src_offset, bytes, 1); s != status::ok) return s;
  if (EAAS_UNLIKELY(dst == nullptr && bytes != 0)) return status::invalid_argument;
  if (ep.transport == transport_kind::shm) {
    if constexpr (detail::shm_callable<Coop>()) return detail::ldst::get(src, src_offset, dst, bytes);
  }
  if (ep.transport == transport_kind::ibgda) return detail::ibgda::op_get<Coop>(ep, src, src_offset, dst, bytes);
#if EAAS_DEVICE_CODE
  if (ep.transport == transport_kind::nvlink) return detail::ldst_dev::get<Coop>(src, src_offset, dst, bytes);
#endif
  return status::unsupported;
}

template <class Coop>
EAAS_HOST_DEVICE status fetch_add(Coop, const device_endpoint& ep, const remote_view& target, std::uint64_t offset,
                                  std::uint64_t value, std::uint64_t* fetched) {
  static_assert(is_coop_v<Coop>, "the first argument is a cooperation tag: coop_thread, coop_warp or coop_block");
  if (status s = detail::check_endpoint_fast(ep); s != status::ok) return s;
  if (status s = detail::check_remote(ep, target, offset, 8, kSignalAlign); s != status::ok) return s;
  if (EAAS_UNLIKELY(fetched == nullptr || !detail::aligned8(fetched))) return status::invalid_argument;
  if (ep.transport == transport_kind::shm) {
    if constexpr (detail::shm_callable<Coop>()) return detail::ldst::fetch_add(target, offset, value, fetched);
  }
  if (ep.transport == transport_kind::ibgda)
    return detail::ibgda::op_fetch_add<Coop>(ep, target, offset, value, fetched);
#if EAAS_DEVICE_CODE
  if (ep.transport == transport_kind::nvlink) return detail::ldst_dev::fetch_add<Coop>(target, offset, value, fetched);
#endif
  return status::unsupported;
}

template <class Coop>
EAAS_HOST_DEVICE status compare_swap(Coop, const device_endpoint& ep, const remote_view& target, std::uint64_t offset,
                                     std::uint64_t expected, std::uint64_t desired, std::uint64_t* fetched) {
  static_assert(is_coop_v<Coop>, "the first argument is a cooperation tag: coop_thread, coop_warp or coop_block");
  if (status s = detail::check_endpoint_fast(ep); s != status::ok) return s;
  if (status s = detail::check_remote(ep, target, offset, 8, kSignalAlign); s != status::ok) return s;
  if (EAAS_UNLIKELY(fetched == nullptr || !detail::aligned8(fetched))) return status::invalid_argument;
  if (ep.transport == transport_kind::shm) {
    if constexpr (detail::shm_callable<Coop>())
      return detail::ldst::compare_swap(target, offset, expected, desired, fetched);
  }
  if (ep.transport == transport_kind::ibgda)
    return detail::ibgda::op_compare_swap<Coop>(ep, target, offset, expected, desired, fetched);
#if EAAS_DEVICE_CODE
  if (ep.transport == transport_kind::nvlink)
    return detail::ldst_dev::compare_swap<Coop>(target, offset, expected, desired, fetched);
#endif
  return status::unsupported;
}

template <class Coop>
EAAS_HOST_DEVICE status fence(Coop, const device_endpoint& ep) {
  static_assert(is_coop_v<Coop>, "the first argument is a cooperation tag: coop_thread, coop_warp or coop_block");
  if (status s = detail::check_endpoint_fast(ep); s != status::ok) return s;
  if (ep.transport == transport_kind::shm) {
    if constexpr (detail::shm_callable<Coop>()) {
      detail::fence_release();
      return status::ok;
    }
  }
  if (ep.transport == transport_kind::ibgda) return detail::ibgda::op_fence<Coop>(ep);
#if EAAS_DEVICE_CODE
  if (ep.transport == transport_kind::nvlink) {
    detail::ldst_dev::fence<Coop>();
    return status::ok;
  }
#endif
  return status::unsupported;
}

template <class Coop>
EAAS_HOST_DEVICE status quiet(Coop, const device_endpoint& ep) {
  static_assert(is_coop_v<Coop>, "the first argument is a cooperation tag: coop_thread, coop_warp or coop_block");
  if (ep.transport == transport_kind::shm) {
    if constexpr (detail::shm_callable<Coop>()) {
      detail::fence_seq_cst();
      // Checked after the fence: a peer that died before this point may not have seen the writes.
      return detail::check_endpoint(ep);
    }
  }
  if (ep.transport == transport_kind::ibgda) {
    if (status s = detail::check_endpoint_fast(ep); s != status::ok) return s;
    return detail::ibgda::op_quiet<Coop>(ep);
  }
#if EAAS_DEVICE_CODE
  if (ep.transport == transport_kind::nvlink) return detail::ldst_dev::quiet<Coop>(ep);
#endif
  if (status s = detail::check_endpoint(ep); s != status::ok) return s;
  return status::unsupported;
}

EAAS_HOST_DEVICE void* peer_pointer(const device_endpoint& ep, const remote_view& v, std::uint64_t offset,
                                    std::size_t bytes) {
  if (detail::check_endpoint_fast(ep) != status::ok) return nullptr;
  if (detail::check_remote(ep, v, offset, bytes, 1) != status::ok) return nullptr;
#if EAAS_DEVICE_CODE
  const bool mapped = ep.transport == transport_kind::nvlink;
#else
  const bool mapped = ep.transport == transport_kind::shm;
#endif
  return mapped ? reinterpret_cast<void*>(static_cast<std::uintptr_t>(v.addr + offset)) : nullptr;
}

namespace detail {

// `ep` may be null: a plain context wait. `until_ns` == 0 means "now + relative_ns", with "now"
// read at the first periodic check: a wait that ends within a few polls never reads the clock.
EAAS_HOST_DEVICE status wait_signal_impl(const device_endpoint* ep, const std::uint32_t* abort,
                                         const std::uint64_t* sig, cmp_op cmp, std::uint64_t value,
                                         std::uint64_t until_ns, std::uint64_t relative_ns, std::uint64_t* observed) {
  if (EAAS_UNLIKELY(sig == nullptr || !aligned8(sig))) return status::invalid_argument;
  std::uint64_t word = load_acquire(sig);
  std::uint32_t spins = 0;
  std::uint64_t next_flags = 0;
  status result = status::ok;
  while (!compare(word, cmp, value)) {
    // The clock is read every few polls, the flags every kFlagPeriodNs: the poll is the fast path.
    if ((++spins & 15u) == 0) {
      const std::uint64_t now = now_ns();
      if (until_ns == 0) until_ns = now + relative_ns < now ? ~std::uint64_t{0} : now + relative_ns;
      if (next_flags == 0) next_flags = now + kFlagPeriodNs;  // a short wait never pays for the flags
      if (now >= next_flags) {
        next_flags = now + kFlagPeriodNs;
        if (abort != nullptr && load_relaxed(abort) != 0) {
          result = status::aborted;
          break;
        }
        if (ep != nullptr) {
          if (status s = check_endpoint(*ep); s != status::ok) {
            result = s;
            break;
          }
        }
      }
      if (now >= until_ns) {
        result = status::timeout;
        break;
      }
    }
    spin_pause(spins);
    word = load_acquire(sig);
  }
  if (observed != nullptr) *observed = word;
  return result;
}

}  // namespace detail

// A deadline of 0 ns is in the past: keep it there rather than mistake it for "relative".
EAAS_HOST_DEVICE status wait_signal(const device_context& ctx, const std::uint64_t* sig, cmp_op cmp,
                                    std::uint64_t value, deadline until, std::uint64_t* observed) {
  return detail::wait_signal_impl(nullptr, ctx.abort, sig, cmp, value, until.ns | 1u, 0, observed);
}

EAAS_HOST_DEVICE status wait_signal(const device_context& ctx, const std::uint64_t* sig, cmp_op cmp,
                                    std::uint64_t value, timeout limit, std::uint64_t* observed) {
  return detail::wait_signal_impl(nullptr, ctx.abort, sig, cmp, value, 0, limit.ns, observed);
}

EAAS_HOST_DEVICE status wait_signal(const device_endpoint& ep, const std::uint64_t* sig, cmp_op cmp,
                                    std::uint64_t value, deadline until, std::uint64_t* observed) {
  if (EAAS_UNLIKELY(ep.magic != kEndpointViewMagic)) return status::invalid_argument;
  return detail::wait_signal_impl(&ep, ep.abort, sig, cmp, value, until.ns | 1u, 0, observed);
}

EAAS_HOST_DEVICE status wait_signal(const device_endpoint& ep, const std::uint64_t* sig, cmp_op cmp,
                                    std::uint64_t value, timeout limit, std::uint64_t* observed) {
  if (EAAS_UNLIKELY(ep.magic != kEndpointViewMagic)) return status::invalid_argument;
  return detail::wait_signal_impl(&ep, ep.abort, sig, cmp, value, 0, limit.ns, observed);
}

}  // namespace eaas
