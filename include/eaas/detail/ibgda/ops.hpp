#pragma once

// The op vocabulary (eaas/device/ops.hpp) on an ibgda endpoint: the bodies ops_impl.hpp dispatches
// to when `ep.transport == transport_kind::ibgda`. `ep.transport_state` points to an
// `endpoint_state` (below) in memory the caller can reach (GPU memory for kernels; the tests use
// host memory and the software NIC model). One thread of the cooperating group posts; the group
// gets its status. Local buffers (put's source, get's destination, fetched values) must lie in the
// region registered under the QP's lkey; the NIC refuses anything else (invalid_argument after
// quiet). Remote views carry the peer's address and rkey.

#include <cstdint>
#include <type_traits>

#include "eaas/common/status.hpp"
#include "eaas/common/types.hpp"
#include "eaas/common/views.hpp"
#include "eaas/detail/checks.hpp"
#include "eaas/detail/clock.hpp"
#include "eaas/detail/ibgda/qp.hpp"
#include "eaas/detail/ldst_device.cuh"

namespace eaas::detail::ibgda {

/// What an ibgda device_endpoint's transport_state points to. Trivially copyable; the host side
/// builds it (make_qp_state + the bound below) and copies it into place.
struct endpoint_state {
  qp_state qp;                  ///< the RC QP to the peer; posters share it through this pointer
  std::uint64_t op_timeout_ns;  ///< bound on a post waiting for ring space, and on quiet
  std::uint64_t reserved[7];
};
static_assert(std::is_trivially_copyable_v<endpoint_state> && sizeof(endpoint_state) == 320);

namespace ops_detail {

EAAS_HOST_DEVICE endpoint_state* state_of(const device_endpoint& ep) {
  return static_cast<endpoint_state*>(ep.transport_state);
}

EAAS_HOST_DEVICE deadline bound(const endpoint_state* s) {
  const std::uint64_t t = now_ns();
  return deadline{t + s->op_timeout_ns < t ? ~std::uint64_t{0} : t + s->op_timeout_ns};
}

/// Runs `f` on one thread of the group and gives every thread its status. On the host only
/// coop_thread exists.
template <class Coop, class F>
EAAS_HOST_DEVICE status one_posts(F&& f) {
  if constexpr (std::is_same_v<Coop, coop_thread>) {
    return f();
  } else {
#if EAAS_DEVICE_CODE
    if constexpr (std::is_same_v<Coop, coop_warp>) {
      __syncwarp();
      unsigned s = 0;
      if (ldst_dev::group<Coop>::rank() == 0) s = static_cast<unsigned>(f());
      return static_cast<status>(__shfl_sync(0xffffffffu, s, 0));
    } else {
      __shared__ unsigned shared_status;
      __syncthreads();
      if (ldst_dev::group<Coop>::rank() == 0) shared_status = static_cast<unsigned>(f());
      __syncthreads();
      const auto s = static_cast<status>(shared_status);
      __syncthreads();
      return s;
    }
#else
    return status::unsupported;
#endif
  }
}

/// How long quiet waits between two reads of the endpoint state word (a PCIe round trip on the
/// device, a cached load on the host).
inline constexpr std::uint64_t kQuietSliceNs = EAAS_DEVICE_CODE ? 20'000 : 100'000;

EAAS_HOST_DEVICE std::uint64_t addr(const void* p) {
  return static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(p));
}

}  // namespace ops_detail

template <class Coop>
EAAS_HOST_DEVICE status op_put(const device_endpoint& ep, const remote_view& dst, std::uint64_t off, const void* src,
                               std::size_t bytes) {
  if (EAAS_UNLIKELY(ep.transport_state == nullptr)) return status::invalid_argument;
  return ops_detail::one_posts<Coop>([&] {
    endpoint_state* s = ops_detail::state_of(ep);
    return put<poster::shared>(&s->qp, dst.addr + off, dst.rkey, ops_detail::addr(src), bytes, ops_detail::bound(s));
  });
}

template <class Coop>
EAAS_HOST_DEVICE status op_get(const device_endpoint& ep, const remote_view& src, std::uint64_t off, void* dst,
                               std::size_t bytes) {
  if (EAAS_UNLIKELY(ep.transport_state == nullptr)) return status::invalid_argument;
  return ops_detail::one_posts<Coop>([&] {
    endpoint_state* s = ops_detail::state_of(ep);
    return get<poster::shared>(&s->qp, src.addr + off, src.rkey, ops_detail::addr(dst), bytes, ops_detail::bound(s));
  });
}

template <class Coop>
EAAS_HOST_DEVICE status op_signal(const device_endpoint& ep, const remote_view& sig, std::uint64_t off,
                                  std::uint64_t value, signal_op op) {
  if (EAAS_UNLIKELY(ep.transport_state == nullptr)) return status::invalid_argument;
  return ops_detail::one_posts<Coop>([&] {
    endpoint_state* s = ops_detail::state_of(ep);
    return signal<poster::shared>(&s->qp, sig.addr + off, sig.rkey, value, op, ops_detail::bound(s));
  });
}

template <class Coop>
EAAS_HOST_DEVICE status op_put_signal(const device_endpoint& ep, const remote_view& dst, std::uint64_t off,
                                      const void* src, std::size_t bytes, const remote_view& sig, std::uint64_t sig_off,
                                      std::uint64_t value, signal_op op) {
  if (EAAS_UNLIKELY(ep.transport_state == nullptr)) return status::invalid_argument;
  return ops_detail::one_posts<Coop>([&] {
    endpoint_state* s = ops_detail::state_of(ep);
    return put_signal<poster::shared>(&s->qp, dst.addr + off, dst.rkey, ops_detail::addr(src), bytes,
                                      sig.addr + sig_off, sig.rkey, value, op, ops_detail::bound(s));
  });
}

template <class Coop>
EAAS_HOST_DEVICE status op_fetch_add(const device_endpoint& ep, const remote_view& t, std::uint64_t off,
                                     std::uint64_t value, std::uint64_t* fetched) {
  if (EAAS_UNLIKELY(ep.transport_state == nullptr)) return status::invalid_argument;
  return ops_detail::one_posts<Coop>([&] {
    endpoint_state* s = ops_detail::state_of(ep);
    return fetch_add<poster::shared>(&s->qp, t.addr + off, t.rkey, value, fetched, ops_detail::bound(s));
  });
}

template <class Coop>
EAAS_HOST_DEVICE status op_compare_swap(const device_endpoint& ep, const remote_view& t, std::uint64_t off,
                                        std::uint64_t expected, std::uint64_t desired, std::uint64_t* fetched) {
  if (EAAS_UNLIKELY(ep.transport_state == nullptr)) return status::invalid_argument;
  return ops_detail::one_posts<Coop>([&] {
    endpoint_state* s = ops_detail::state_of(ep);
    return compare_swap<poster::shared>(&s->qp, t.addr + off, t.rkey, expected, desired, fetched, ops_detail::bound(s));
  });
}

/// A NOP with the fence bit: the NIC starts it (and so every later WQE) only after every earlier
/// READ / atomic has completed; WRITEs are already in order on an RC QP.
template <class Coop>
EAAS_HOST_DEVICE status op_fence(const device_endpoint& ep) {
  if (EAAS_UNLIKELY(ep.transport_state == nullptr)) return status::invalid_argument;
  return ops_detail::one_posts<Coop>([&] {
    endpoint_state* s = ops_detail::state_of(ep);
    wqe_desc nop;
    nop.fence = fence_mode::full;
    return post<poster::shared>(&s->qp, &nop, 1, false, ops_detail::bound(s));
  });
}

/// Every WQE published on the QP has completed (reads and fetched values landed), then the
/// endpoint's state is checked. The state is also read before and while waiting (every
/// kQuietSliceNs): a closed endpoint (not_connected), a peer that closed (its close notice set
/// the word to peer_dead) or that the control plane declared dead (peer_unreachable) ends the
/// wait at once, not after the NIC's retries; the state also wins over the QP's own error.
template <class Coop>
EAAS_HOST_DEVICE status op_quiet(const device_endpoint& ep) {
  if (EAAS_UNLIKELY(ep.transport_state == nullptr)) return status::invalid_argument;
  return ops_detail::one_posts<Coop>([&] {
    endpoint_state* s = ops_detail::state_of(ep);
    if (status c = check_endpoint(ep); c != status::ok) return c;
    const deadline until = ops_detail::bound(s);
    for (;;) {
      const std::uint64_t t = now_ns();
      const bool last = t >= until.ns || until.ns - t <= ops_detail::kQuietSliceNs;
      const deadline slice{last ? until.ns : t + ops_detail::kQuietSliceNs};
      const status q = quiet<poster::shared>(&s->qp, slice);
      const status c = check_endpoint(ep);
      if (c != status::ok) return c;
      if (q != status::timeout || last) return q;
    }
  });
}

}  // namespace eaas::detail::ibgda
