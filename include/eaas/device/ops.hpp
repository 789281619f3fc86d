#pragma once

/// The one-sided op vocabulary. The same calls, with the same meaning, on every transport; the
/// transport is picked at run time from the endpoint (`device_endpoint::transport`).
///
/// Who calls: every op takes a cooperation tag first. All threads of the group (one thread, one warp,
/// one block) call with the same arguments. On the host (shm transport) only `coop_thread` exists;
/// `coop_warp` / `coop_block` there return `unsupported`.
///
/// Completion: `put`, `get`, `put_signal`, `signal` and the fetching atomics are non-blocking: `ok`
/// means *accepted*. The source buffer of a put may be reused once the call returns. The effect is
/// guaranteed complete (remote writes visible to the peer, gets and fetched values landed locally)
/// only after `quiet` on the same endpoint returns `ok`. (The shm transport completes in the call.)
///
/// Ordering: `put_signal` makes its signal visible only after its payload. `fence` orders every
/// earlier op of this caller on `ep` before every later one. Nothing else is ordered.
///
/// Checks made by every op before it touches memory (all cheap, all on the calling side):
/// the endpoint view is genuine (magic); the remote view is genuine, of the same transport and
/// registered by this endpoint's peer; `offset + bytes` lies inside the region; signal and atomic
/// words are 8-byte aligned. A failed check returns `invalid_argument` and does nothing.
/// The endpoint's state (`not_connected` after close, `peer_unreachable` once the peer is known
/// dead) is checked by every op on the host; on the device it lives in host memory a PCIe round
/// trip away, so device ops leave it to `quiet` and `wait_signal` (which read it every 20 µs).
///
/// Waiting: `wait_signal` is the only op that blocks on the peer, and it always ends: with `ok`
/// when the comparison holds, `timeout` at the deadline, `aborted` when the context's abort flag is
/// raised, or (endpoint overload) `peer_unreachable` once the peer is known dead.

#include <cstddef>
#include <cstdint>

#include "eaas/common/status.hpp"
#include "eaas/common/types.hpp"
#include "eaas/common/views.hpp"

namespace eaas {

/// Current time on this execution space's clock (host: steady clock, device: %globaltimer), in ns.
EAAS_HOST_DEVICE std::uint64_t now_ns();

/// A deadline `ns` nanoseconds from now on this execution space's clock.
EAAS_HOST_DEVICE deadline deadline_after(std::uint64_t ns);

/// Write `bytes` from local `src` into the peer's region `dst` at `dst_offset`.
template <class Coop>
EAAS_HOST_DEVICE status put(Coop, const device_endpoint& ep, const remote_view& dst, std::uint64_t dst_offset,
                            const void* src, std::size_t bytes);

/// `put`, then a 64-bit signal on `sig` at `sig_offset` (`set` or `add` with `value`) that becomes
/// visible only after the whole payload is. `bytes` may be 0 (a pure ordered signal).
template <class Coop>
EAAS_HOST_DEVICE status put_signal(Coop, const device_endpoint& ep, const remote_view& dst, std::uint64_t dst_offset,
                                   const void* src, std::size_t bytes, const remote_view& sig, std::uint64_t sig_offset,
                                   std::uint64_t value, signal_op op);

/// Remote atomic `set` / `add` on a 64-bit word (8-byte aligned) of the peer's region.
template <class Coop>
EAAS_HOST_DEVICE status signal(Coop, const device_endpoint& ep, const remote_view& sig, std::uint64_t sig_offset,
                               std::uint64_t value, signal_op op);

/// Read `bytes` at `src_offset` of the peer's region into local `dst`.
template <class Coop>
EAAS_HOST_DEVICE status get(Coop, const device_endpoint& ep, const remote_view& src, std::uint64_t src_offset,
                            void* dst, std::size_t bytes);

/// Remote atomic fetch-and-add on a 64-bit word; the previous value lands in `*fetched` (local
/// memory, 8-byte aligned) by the time `quiet` returns ok.
template <class Coop>
EAAS_HOST_DEVICE status fetch_add(Coop, const device_endpoint& ep, const remote_view& target, std::uint64_t offset,
                                  std::uint64_t value, std::uint64_t* fetched);

/// Remote atomic compare-and-swap on a 64-bit word: if it equals `expected` it becomes `desired`.
/// The previous value lands in `*fetched` by the time `quiet` returns ok (== expected on success).
template <class Coop>
EAAS_HOST_DEVICE status compare_swap(Coop, const device_endpoint& ep, const remote_view& target, std::uint64_t offset,
                                     std::uint64_t expected, std::uint64_t desired, std::uint64_t* fetched);

/// Later ops of this caller on `ep` are ordered after earlier ones.
template <class Coop>
EAAS_HOST_DEVICE status fence(Coop, const device_endpoint& ep);

/// Every op this caller issued on `ep` is complete: remote writes visible, gets and fetched values
/// landed. Returns `peer_unreachable` if the peer is known dead (the writes may be lost).
template <class Coop>
EAAS_HOST_DEVICE status quiet(Coop, const device_endpoint& ep);

/// A pointer through which the caller's own loads and stores reach bytes [offset, offset + bytes) of the
/// peer's region `v`, for transports where the peer's memory is mapped into the caller's address space:
/// nvlink in device code (the region is CUDA-IPC mapped into this GPU), shm on the host. nullptr where there is
/// none (ibgda, nvlink from the host, shm from device code) or where a check fails (the same view and range
/// checks as a put of `bytes` at `offset`). What it is for: producing data straight into the peer (a combine
/// whose sums go out over NVLink as they are computed) instead of into a local buffer that a put then copies.
/// Stores through it are the caller's plain stores, not ops: `fence` / `quiet` do not cover another thread's
/// stores, so make them visible as grid_put.cuh does (block barrier, then a system-scope release by the thread
/// that signals, after every storing block has arrived).
EAAS_HOST_DEVICE void* peer_pointer(const device_endpoint& ep, const remote_view& v, std::uint64_t offset,
                                    std::size_t bytes);

/// Bounded wait until `compare(*sig, cmp, value)` holds for a local signal word (8-byte aligned).
/// Ends with ok / timeout / aborted. The value last seen goes to `*observed` when it is non-null.
/// Acquire semantics: payload that a put_signal ordered before the signal is visible after `ok`.
EAAS_HOST_DEVICE status wait_signal(const device_context& ctx, const std::uint64_t* sig, cmp_op cmp,
                                    std::uint64_t value, deadline until, std::uint64_t* observed = nullptr);

/// As above, bounded by a relative timeout that starts when the first poll misses.
EAAS_HOST_DEVICE status wait_signal(const device_context& ctx, const std::uint64_t* sig, cmp_op cmp,
                                    std::uint64_t value, timeout limit, std::uint64_t* observed = nullptr);

/// As above, and also ends with `peer_unreachable` / `not_connected` once `ep`'s peer is known dead
/// or `ep` is closed: wait for a peer's answer through its endpoint.
EAAS_HOST_DEVICE status wait_signal(const device_endpoint& ep, const std::uint64_t* sig, cmp_op cmp,
                                    std::uint64_t value, deadline until, std::uint64_t* observed = nullptr);

/// Endpoint wait bounded by a relative timeout that starts when the first poll misses.
EAAS_HOST_DEVICE status wait_signal(const device_endpoint& ep, const std::uint64_t* sig, cmp_op cmp,
                                    std::uint64_t value, timeout limit, std::uint64_t* observed = nullptr);

}  // namespace eaas

#include "eaas/detail/ops_impl.hpp"
