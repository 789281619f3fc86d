#pragma once

// Completion side of the ibgda transport: polling a collapsed send CQ.
//
// The CQ is created collapsed (cc = 1) with overrun ignore (oi = 1): the NIC writes every CQE into
// entry 0 and never waits for software to consume it. A CQE therefore says only "the WQE with this
// 16-bit index has completed, and (RC completes in order) so has everything before it". Polling is a
// read of entry 0 and an atomic max on a 64-bit `completed` index; nothing is consumed, so any number
// of threads may poll at once without a lock. Error CQEs are decoded into statuses and latched: the
// first error seen stays in `error`, and every later op on the QP returns it.

#include <cstddef>
#include <cstdint>

#include "eaas/common/macros.hpp"
#include "eaas/common/mlx5.hpp"
#include "eaas/common/status.hpp"
#include "eaas/common/types.hpp"
#include "eaas/detail/atomic.hpp"
#include "eaas/detail/clock.hpp"

namespace eaas::detail::ibgda {

/// Who posts on a QP. `shared`: any number of threads (reservation and publication through atomics).
/// `exclusive`: exactly one thread owns the QP and its counters are plain loads and stores (no
/// read-modify-write); the NIC-facing accesses (WQEs, doorbell record, doorbell, CQE) are the same.
enum class poster : std::uint8_t { shared, exclusive };

/// Consumer state of a collapsed send CQ. Trivially copyable; lives inside `qp_state`.
struct cq_state {
  mlx5::cqe64* cqe;         ///< the CQ buffer; the NIC writes entry 0 only
  std::uint32_t size;       ///< entries in the buffer (1 suffices for a collapsed CQ)
  std::uint32_t error;      ///< latched status of the first error seen (0 = none)
  std::uint64_t completed;  ///< every WQEBB with an index below this has completed successfully
};

static_assert(sizeof(cq_state) == 24 && alignof(cq_state) == 8);
static_assert(offsetof(cq_state, error) == 12 && offsetof(cq_state, completed) == 16);

/// The status an error CQE's syndrome stands for.
EAAS_HOST_DEVICE constexpr status status_from_syndrome(std::uint8_t syndrome) {
  switch (static_cast<mlx5::cqe_syndrome>(syndrome)) {
    case mlx5::cqe_syndrome::transport_retry_exc:
      return status::peer_unreachable;  // no ack after every retry
    case mlx5::cqe_syndrome::wr_flush:
      return status::peer_unreachable;  // flushed behind an earlier failure
    case mlx5::cqe_syndrome::remote_access:
      return status::remote_access_error;
    case mlx5::cqe_syndrome::local_prot:
    case mlx5::cqe_syndrome::local_access:
      return status::invalid_argument;  // our lkey / local bounds
    default:
      return status::internal_error;
  }
}

namespace cq_detail {

template <poster P>
EAAS_HOST_DEVICE std::uint64_t ld(const std::uint64_t* p) {
  if constexpr (P == poster::shared)
    return load_acquire(p);
  else
    return *p;
}
template <poster P>
EAAS_HOST_DEVICE std::uint32_t ld32(const std::uint32_t* p) {
  if constexpr (P == poster::shared)
    return load_acquire(p);
  else
    return *p;
}
template <poster P>
EAAS_HOST_DEVICE void st(std::uint64_t* p, std::uint64_t v) {
  if constexpr (P == poster::shared)
    store_release(p, v);
  else
    *p = v;
}

/// *p = max(*p, v).
template <poster P>
EAAS_HOST_DEVICE void advance_to(std::uint64_t* p, std::uint64_t v) {
  if constexpr (P == poster::shared) {
    std::uint64_t cur = load_relaxed(p);
    while (cur < v) {
      const std::uint64_t seen = compare_swap_acq_rel(p, cur, v);
      if (seen == cur) break;
      cur = seen;
    }
  } else {
    if (*p < v) *p = v;
  }
}

/// Records `s` as the QP's error unless one is already recorded; returns the recorded one.
template <poster P>
EAAS_HOST_DEVICE status latch(std::uint32_t* error, status s) {
  const auto v = static_cast<std::uint32_t>(s);
  if constexpr (P == poster::shared) {
    const std::uint32_t seen = compare_swap_acq_rel(error, 0u, v);
    return static_cast<status>(seen == 0 ? v : seen);
  } else {
    if (*error == 0) *error = v;
    return static_cast<status>(*error);
  }
}

EAAS_HOST_DEVICE const std::uint32_t* cqe_word(const mlx5::cqe64* cqe, std::size_t offset) {
  return reinterpret_cast<const std::uint32_t*>(reinterpret_cast<const std::uint8_t*>(cqe) + offset);
}

}  // namespace cq_detail

/// The QP's latched error (ok when none).
template <poster P>
EAAS_HOST_DEVICE status latched_error(const cq_state* cq) {
  return static_cast<status>(cq_detail::ld32<P>(&cq->error));
}

/// Turns a 16-bit WQE counter into the 64-bit index it stands for, given `newest`, an index at or
/// after it and less than 2^16 past it (the newest reserved WQEBB: nothing later can have completed,
/// and the ring size bounds how far back the CQE can lag).
EAAS_HOST_DEVICE constexpr std::uint64_t widen_wqe_counter(std::uint16_t counter, std::uint64_t newest) {
  return newest - static_cast<std::uint16_t>(static_cast<std::uint16_t>(newest) - counter);
}

/// Reads CQE 0 once and folds it into `cq`: a good CQE advances `completed`; an error CQE latches
/// its status (and, unless it is a flush, marks the WQEs before the failed one complete). `head`
/// is the QP's reservation counter, read after the CQE (it bounds the counter's widening).
/// Returns ok, or the QP's latched error. Never waits.
template <poster P>
EAAS_HOST_DEVICE status poll_cq(cq_state* cq, const std::uint64_t* head) {
  using namespace cq_detail;
  if (status e = latched_error<P>(cq); e != status::ok) return e;
  const std::uint32_t* tail_p = cqe_word(cq->cqe, mlx5::kCqeTailOffset);
  for (int attempt = 0;; ++attempt) {
    const std::uint32_t tail = load_acquire(tail_p);
    const mlx5::cqe_opcode op = mlx5::cqe_op(mlx5::tail_op_own(tail));
    if (op == mlx5::cqe_opcode::invalid) return status::ok;  // nothing has completed yet
    const std::uint64_t h = ld<P>(head);
    if (EAAS_UNLIKELY(h == 0)) return status::ok;  // a CQE from before this QP's first post: not ours
    const std::uint64_t index = widen_wqe_counter(mlx5::tail_wqe_counter(tail), h - 1);
    if (EAAS_LIKELY(op == mlx5::cqe_opcode::req)) {
      advance_to<P>(&cq->completed, index + 1);
      return status::ok;
    }
    if (op == mlx5::cqe_opcode::req_err || op == mlx5::cqe_opcode::resp_err) {
      const std::uint32_t synd_word = load_acquire(cqe_word(cq->cqe, mlx5::kCqeSyndromeWordOffset));
      // The NIC may have written a newer CQE between the two reads: the syndrome must belong to the tail.
      if (load_acquire(tail_p) != tail && attempt < 8) continue;
      const std::uint8_t syndrome = mlx5::word_syndrome(synd_word);
      if (syndrome != static_cast<std::uint8_t>(mlx5::cqe_syndrome::wr_flush)) advance_to<P>(&cq->completed, index);
      return latch<P>(&cq->error, status_from_syndrome(syndrome));
    }
    return latch<P>(&cq->error, status::internal_error);  // not a send-side CQE: the CQ is misconfigured
  }
}

/// Waits until every WQEBB below `target` has completed: ok; the QP's error if one is (or gets)
/// latched first; timeout at the deadline. The clock is read every 16 polls.
template <poster P>
EAAS_HOST_DEVICE status wait_completed(cq_state* cq, const std::uint64_t* head, std::uint64_t target, deadline until) {
  using namespace cq_detail;
  for (std::uint32_t spins = 0;;) {
    if (ld<P>(&cq->completed) >= target) return status::ok;
    const status s = poll_cq<P>(cq, head);
    if (ld<P>(&cq->completed) >= target) return status::ok;
    if (s != status::ok) return s;
    if ((++spins & 15u) == 0 && now_ns() >= until.ns) return status::timeout;
    spin_pause(spins);
  }
}

}  // namespace eaas::detail::ibgda
