#pragma once

// Posting side of the ibgda transport: the device-visible state of one RC send queue and the code
// that puts WQEs on it, rings its doorbell and waits for its completions. Plain host/device code:
// GPU threads run it against a real mlx5 QP; host threads run it in the tests against the software
// NIC model (tests/ibgda/soft_nic.hpp).
//
// Posting, for `n` WQEs:
//   1. reserve n ring slots: a CAS on `head` that succeeds only while the n slots are free (every
//      WQE that used them has completed; otherwise the poster polls the CQ until they are). A
//      reservation therefore never waits after it is made, which is what lets step 3 be ordered.
//   2. write the WQEs into the slots (a CQE is requested on every `signal_period`-th index and
//      wherever the caller asks for one).
//   3. publish in reservation order: wait until `ready` == my first index; then, if a doorbell is
//      due, write the doorbell record (big-endian producer index & 0xffff, release: after every
//      published WQE) and then the first 8 bytes of my last WQE's ctrl segment to the UAR; then
//      `ready` = my end (release). Because only the poster holding `ready` rings, doorbell record
//      values never go backwards and never run ahead of written WQEs.
// Doorbells are batched: rung when at least `db_batch` published WQEs wait for one, or on request
// (quiet rings whatever waits). `poster::exclusive` runs the same steps with plain counters.

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "eaas/common/macros.hpp"
#include "eaas/common/mlx5.hpp"
#include "eaas/common/status.hpp"
#include "eaas/common/types.hpp"
#include "eaas/detail/atomic.hpp"
#include "eaas/detail/clock.hpp"
#include "eaas/detail/ibgda/cq.hpp"
#include "eaas/detail/ibgda/wqe.hpp"

namespace eaas::detail::ibgda {

/// The largest send queue (WQEBBs): the 16-bit WQE counter must identify an index unambiguously
/// among everything that can be outstanding.
inline constexpr std::uint32_t kMaxSqSize = 1u << 15;

/// What the host side fills in once a QP and its CQ exist.
struct qp_config {
  mlx5::send_wqebb* sq = nullptr;     ///< SQ ring, `sq_size` WQEBBs, 64-byte aligned
  std::uint32_t sq_size = 0;          ///< power of two, 2 .. kMaxSqSize
  std::uint32_t* sq_dbrec = nullptr;  ///< the send word of the QP's doorbell record (dbrec + mlx5::kSendDbr)
  std::uint64_t* uar_db = nullptr;    ///< the 8-byte doorbell register in the UAR page, as mapped here
  mlx5::cqe64* cq = nullptr;          ///< the QP's collapsed send CQ
  std::uint32_t cq_size = 1;
  std::uint32_t qpn = 0;            ///< 24 bits
  std::uint32_t lkey = 0;           ///< local key of the registered local region ops read from / land in
  std::uint64_t scratch_laddr = 0;  ///< 8 bytes inside that region where discarded atomic results land
  std::uint32_t db_batch = 1;       ///< ring once this many published WQEs wait (1: every post)
  std::uint32_t signal_period = 1;  ///< request a CQE on every signal_period-th WQE (power of two)
};

/// Device-visible state of one send queue. Trivially copyable: the host builds it with
/// `make_qp_state` and copies it where the posters can reach it (GPU memory); posters share it
/// through a pointer. The three groups sit on separate 64-byte lines.
struct qp_state {
  // Set up once.
  mlx5::send_wqebb* sq;
  std::uint32_t* sq_dbrec;
  std::uint64_t* uar_db;
  std::uint64_t scratch_laddr;
  std::uint32_t sq_size;
  std::uint32_t qpn;
  std::uint32_t lkey;
  std::uint32_t db_batch;
  std::uint32_t signal_period;
  std::uint32_t reserved0;
  // Reservation.
  alignas(64) std::uint64_t head;  ///< next WQEBB index to reserve
  // Publication.
  alignas(64) std::uint64_t ready;  ///< WQEBBs below this are written, in order
  std::uint64_t rung;               ///< the doorbell record covers WQEBBs below this
  // Completion.
  alignas(64) cq_state cq;
};

static_assert(std::is_trivially_copyable_v<qp_state> && std::is_standard_layout_v<qp_state>);
static_assert(sizeof(qp_state) == 256 && alignof(qp_state) == 64);
static_assert(offsetof(qp_state, sq_size) == 32 && offsetof(qp_state, signal_period) == 48);
static_assert(offsetof(qp_state, head) == 64 && offsetof(qp_state, ready) == 128 && offsetof(qp_state, rung) == 136);
static_assert(offsetof(qp_state, cq) == 192);

EAAS_HOST_DEVICE constexpr bool is_pow2(std::uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

/// Checks `c` and fills `out` with fresh counters. invalid_argument when a pointer (or the scratch
/// word) is missing or misaligned, a size is not a power of two, or batching and signalling could
/// fill the ring with WQEs nobody will ever see complete (db_batch - 1 + signal_period must not
/// exceed sq_size).
EAAS_HOST_DEVICE status make_qp_state(const qp_config& c, qp_state* out) {
  if (out == nullptr || c.sq == nullptr || c.sq_dbrec == nullptr || c.uar_db == nullptr || c.cq == nullptr)
    return status::invalid_argument;
  if ((reinterpret_cast<std::uintptr_t>(c.sq) & 63u) != 0 || (reinterpret_cast<std::uintptr_t>(c.cq) & 63u) != 0 ||
      (reinterpret_cast<std::uintptr_t>(c.uar_db) & 7u) != 0 ||
      (reinterpret_cast<std::uintptr_t>(c.sq_dbrec) & 3u) != 0)
    return status::invalid_argument;
  if (!is_pow2(c.sq_size) || c.sq_size < 2 || c.sq_size > kMaxSqSize || c.cq_size == 0) return status::invalid_argument;
  if (c.qpn >= (1u << 24) || c.db_batch == 0 || !is_pow2(c.signal_period)) return status::invalid_argument;
  if (static_cast<std::uint64_t>(c.db_batch) - 1 + c.signal_period > c.sq_size) return status::invalid_argument;
  if (c.scratch_laddr == 0 || (c.scratch_laddr & 7u) != 0) return status::invalid_argument;
  *out = qp_state{};
  out->sq = c.sq;
  out->sq_dbrec = c.sq_dbrec;
  out->uar_db = c.uar_db;
  out->scratch_laddr = c.scratch_laddr;
  out->sq_size = c.sq_size;
  out->qpn = c.qpn;
  out->lkey = c.lkey;
  out->db_batch = c.db_batch;
  out->signal_period = c.signal_period;
  out->cq.cqe = c.cq;
  out->cq.size = c.cq_size;
  return status::ok;
}

/// Marks every CQE of a CQ buffer in ordinary memory as never written (opcode INVALID), as the NIC
/// expects software to before the CQ is created.
EAAS_HOST_DEVICE void reset_cq(mlx5::cqe64* cq, std::uint32_t entries) {
  for (std::uint32_t i = 0; i < entries; ++i) {
    auto* b = reinterpret_cast<std::uint8_t*>(cq + i);
    for (std::uint32_t k = 0; k < sizeof(mlx5::cqe64); ++k) b[k] = 0;
    b[offsetof(mlx5::cqe64, op_own)] = static_cast<std::uint8_t>(mlx5::cqe_opcode::invalid) << 4;
  }
}

/// What one WQE does.
enum class wqe_kind : std::uint8_t { write, write_inline, read, fetch_add, compare_swap, nop };

/// One WQE to post. Local addresses are in the region of `lkey` (for write_inline, `laddr` is a
/// pointer to the payload, which is copied into the WQE).
struct wqe_desc {
  wqe_kind kind = wqe_kind::nop;
  fence_mode fence = fence_mode::none;
  bool completion = false;  ///< request a CQE even if the signal period would not
  std::uint8_t reserved0 = 0;
  std::uint32_t bytes = 0;
  std::uint32_t rkey = 0;
  std::uint32_t lkey = 0;
  std::uint64_t raddr = 0;
  std::uint64_t laddr = 0;
  std::uint64_t operand = 0;  ///< fetch_add: the addend; compare_swap: the new value
  std::uint64_t compare = 0;  ///< compare_swap: the expected value
};

static_assert(std::is_trivially_copyable_v<wqe_desc>);

/// invalid_argument for a WQE the NIC would reject or that cannot fit one WQEBB.
EAAS_HOST_DEVICE status check_wqe(const wqe_desc& d) {
  switch (d.kind) {
    case wqe_kind::write:
    case wqe_kind::read:
      return d.bytes <= mlx5::kMaxSegBytes ? status::ok : status::invalid_argument;
    case wqe_kind::write_inline:
      return d.bytes <= kMaxInlineBytes && (d.bytes == 0 || d.laddr != 0) ? status::ok : status::invalid_argument;
    case wqe_kind::fetch_add:
    case wqe_kind::compare_swap:
      return ((d.raddr | d.laddr) & 7u) == 0 ? status::ok : status::invalid_argument;
    case wqe_kind::nop:
      return status::ok;
  }
  return status::invalid_argument;
}

/// Writes `d` into `slot` as WQE number `index` of QP `qpn` with ctrl flags `fm_ce_se`.
EAAS_HOST_DEVICE void build_wqe(mlx5::send_wqebb* slot, const wqe_desc& d, std::uint16_t index, std::uint32_t qpn,
                                std::uint8_t fm_ce_se) {
  switch (d.kind) {
    case wqe_kind::write:
      build_rdma_write(slot, index, qpn, fm_ce_se, d.raddr, d.rkey, d.laddr, d.lkey, d.bytes);
      break;
    case wqe_kind::write_inline:
      build_rdma_write_inline(slot, index, qpn, fm_ce_se, d.raddr, d.rkey,
                              reinterpret_cast<const void*>(static_cast<std::uintptr_t>(d.laddr)), d.bytes);
      break;
    case wqe_kind::read:
      build_rdma_read(slot, index, qpn, fm_ce_se, d.raddr, d.rkey, d.laddr, d.lkey, d.bytes);
      break;
    case wqe_kind::fetch_add:
      build_atomic_fetch_add(slot, index, qpn, fm_ce_se, d.raddr, d.rkey, d.operand, d.laddr, d.lkey);
      break;
    case wqe_kind::compare_swap:
      build_atomic_compare_swap(slot, index, qpn, fm_ce_se, d.raddr, d.rkey, d.compare, d.operand, d.laddr, d.lkey);
      break;
    case wqe_kind::nop:
      build_nop(slot, index, qpn, fm_ce_se);
      break;
  }
}

/// True when the QP's signal period requests a CQE for WQE `index`.
EAAS_HOST_DEVICE constexpr bool period_signals(std::uint64_t index, std::uint32_t period) {
  return ((index + 1) & (period - 1)) == 0;
}

namespace qp_detail {

template <poster P>
EAAS_HOST_DEVICE std::uint64_t ld(const std::uint64_t* p) {
  return cq_detail::ld<P>(p);
}

/// Step 1: n free slots, reserved; *start = the first.
template <poster P>
EAAS_HOST_DEVICE status reserve(qp_state* q, std::uint32_t n, deadline until, std::uint64_t* start) {
  std::uint64_t h = P == poster::shared ? load_relaxed(&q->head) : q->head;
  for (std::uint32_t spins = 0;;) {
    if (status e = latched_error<P>(&q->cq); e != status::ok) return e;
    const std::uint64_t done = ld<P>(&q->cq.completed);
    if (h + n - done <= q->sq_size) {
      if constexpr (P == poster::shared) {
        const std::uint64_t seen = compare_swap_acq_rel(&q->head, h, h + n);
        if (seen != h) {  // another poster got there first: retry from its value at once
          h = seen;
          continue;
        }
      } else {
        q->head = h + n;
      }
      *start = h;
      return status::ok;
    }
    // The ring is full: the oldest WQEs must complete before their slots are reused.
    if (status s = poll_cq<P>(&q->cq, &q->head); s != status::ok) return s;
    if (ld<P>(&q->cq.completed) != done) continue;
    if ((++spins & 15u) == 0 && now_ns() >= until.ns) return status::timeout;
    spin_pause(spins);
    if constexpr (P == poster::shared) h = load_relaxed(&q->head);
  }
}

/// Doorbell record, then doorbell: the record (release) covers every WQE below `end`, and the
/// 8-byte doorbell write is ordered after it.
EAAS_HOST_DEVICE void ring_doorbell(qp_state* q, std::uint64_t end, std::uint64_t db_word) {
  store_release(q->sq_dbrec, mlx5::to_be32(static_cast<std::uint32_t>(end) & 0xffffu));
  fence_release();
  store_relaxed(q->uar_db, db_word);
}

/// Step 3: in reservation order, ring if due, then publish [start, start + n).
template <poster P>
EAAS_HOST_DEVICE status publish(qp_state* q, std::uint64_t start, std::uint32_t n, bool ring, std::uint64_t db_word,
                                deadline until) {
  if constexpr (P == poster::shared) {
    for (std::uint32_t spins = 0; load_acquire(&q->ready) != start;) {
      if ((++spins & 15u) == 0 && now_ns() >= until.ns) {
        // An earlier poster never published: the QP can no longer make progress in order.
        return cq_detail::latch<P>(&q->cq.error, status::timeout);
      }
      spin_pause(spins);
    }
  }
  const std::uint64_t end = start + n;
  // Only the poster that owns `ready` == start reaches here: `rung` has a single writer at a time.
  const std::uint64_t rung = P == poster::shared ? load_relaxed(&q->rung) : q->rung;
  if (ring || end - rung >= q->db_batch) {
    ring_doorbell(q, end, db_word);
    if constexpr (P == poster::shared)
      store_relaxed(&q->rung, end);
    else
      q->rung = end;
  }
  cq_detail::st<P>(&q->ready, end);
  return status::ok;
}

}  // namespace qp_detail

/// Posts `n` WQEs (1 .. sq_size) as one contiguous, ordered group: they reach the NIC in this order,
/// with no other poster's WQE between them. `ring` forces the doorbell. `*first_index` (optional)
/// receives the ring index of the first. Returns ok (accepted: complete after `quiet`),
/// invalid_argument (nothing posted), timeout (no room in the ring, or an earlier poster never
/// published, before the deadline), or the QP's latched error.
template <poster P>
EAAS_HOST_DEVICE status post(qp_state* q, const wqe_desc* d, std::uint32_t n, bool ring, deadline until,
                             std::uint64_t* first_index = nullptr) {
  if (EAAS_UNLIKELY(n == 0 || n > q->sq_size)) return status::invalid_argument;
  for (std::uint32_t i = 0; i < n; ++i)
    if (status s = check_wqe(d[i]); s != status::ok) return s;
  std::uint64_t start = 0;
  if (status s = qp_detail::reserve<P>(q, n, until, &start); s != status::ok) return s;
  std::uint64_t db_word = 0;
  for (std::uint32_t i = 0; i < n; ++i) {
    const std::uint64_t index = start + i;
    mlx5::send_wqebb* slot = q->sq + (index & (q->sq_size - 1));
    const bool cqe = d[i].completion || period_signals(index, q->signal_period);
    build_wqe(slot, d[i], static_cast<std::uint16_t>(index), q->qpn, ctrl_flags(cqe, d[i].fence));
    if (i + 1 == n) db_word = doorbell_word(slot);
  }
  if (first_index != nullptr) *first_index = start;
  return qp_detail::publish<P>(q, start, n, ring, db_word, until);
}

/// Options of the single-op helpers below.
struct post_opts {
  fence_mode fence = fence_mode::none;  ///< on the op's (first) WQE
  bool ring = false;                    ///< ring the doorbell now, whatever the batch
  bool completion = false;              ///< request a CQE for the op's (last) WQE
};

/// One WRITE or READ of `bytes` between local `laddr` (QP's lkey) and remote [raddr, rkey].
template <poster P>
EAAS_HOST_DEVICE status post_data(qp_state* q, wqe_kind kind, std::uint64_t raddr, std::uint32_t rkey,
                                  std::uint64_t laddr, std::uint64_t bytes, deadline until, post_opts o) {
  if (EAAS_UNLIKELY(bytes > mlx5::kMaxSegBytes)) return status::invalid_argument;
  wqe_desc d;
  d.kind = kind;
  d.fence = o.fence;
  d.completion = o.completion;
  d.bytes = static_cast<std::uint32_t>(bytes);
  d.rkey = rkey;
  d.lkey = q->lkey;
  d.raddr = raddr;
  d.laddr = laddr;
  return post<P>(q, &d, 1, o.ring, until);
}

/// RDMA WRITE of `bytes` from local `laddr` (QP's lkey) to remote [raddr, rkey].
template <poster P>
EAAS_HOST_DEVICE status put(qp_state* q, std::uint64_t raddr, std::uint32_t rkey, std::uint64_t laddr,
                            std::uint64_t bytes, deadline until, post_opts o = {}) {
  return post_data<P>(q, wqe_kind::write, raddr, rkey, laddr, bytes, until, o);
}

/// RDMA WRITE of up to kMaxInlineBytes carried in the WQE: `src` may be reused on return.
template <poster P>
EAAS_HOST_DEVICE status put_inline(qp_state* q, std::uint64_t raddr, std::uint32_t rkey, const void* src,
                                   std::uint32_t bytes, deadline until, post_opts o = {}) {
  wqe_desc d;
  d.kind = wqe_kind::write_inline;
  d.fence = o.fence;
  d.completion = o.completion;
  d.bytes = bytes;
  d.rkey = rkey;
  d.raddr = raddr;
  d.laddr = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(src));
  return post<P>(q, &d, 1, o.ring, until);
}

/// RDMA READ of `bytes` from remote [raddr, rkey] into local `laddr` (QP's lkey); landed after quiet.
template <poster P>
EAAS_HOST_DEVICE status get(qp_state* q, std::uint64_t raddr, std::uint32_t rkey, std::uint64_t laddr,
                            std::uint64_t bytes, deadline until, post_opts o = {}) {
  return post_data<P>(q, wqe_kind::read, raddr, rkey, laddr, bytes, until, o);
}

/// Remote 64-bit fetch-and-add; the previous value lands in `*fetched` (QP's lkey region) after quiet.
template <poster P>
EAAS_HOST_DEVICE status fetch_add(qp_state* q, std::uint64_t raddr, std::uint32_t rkey, std::uint64_t add,
                                  std::uint64_t* fetched, deadline until, post_opts o = {}) {
  wqe_desc d;
  d.kind = wqe_kind::fetch_add;
  d.fence = o.fence;
  d.completion = o.completion;
  d.rkey = rkey;
  d.lkey = q->lkey;
  d.raddr = raddr;
  d.laddr = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(fetched));
  d.operand = add;
  return post<P>(q, &d, 1, o.ring, until);
}

/// Remote 64-bit compare-and-swap; the previous value lands in `*fetched` after quiet.
template <poster P>
EAAS_HOST_DEVICE status compare_swap(qp_state* q, std::uint64_t raddr, std::uint32_t rkey, std::uint64_t expected,
                                     std::uint64_t desired, std::uint64_t* fetched, deadline until, post_opts o = {}) {
  wqe_desc d;
  d.kind = wqe_kind::compare_swap;
  d.fence = o.fence;
  d.completion = o.completion;
  d.rkey = rkey;
  d.lkey = q->lkey;
  d.raddr = raddr;
  d.laddr = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(fetched));
  d.operand = desired;
  d.compare = expected;
  return post<P>(q, &d, 1, o.ring, until);
}

namespace qp_detail {

/// The WQE of a signal: `set` is an 8-byte inline WRITE (one aligned 8-byte DMA write, never torn),
/// `add` a fetch-and-add whose result goes to the QP's scratch word.
EAAS_HOST_DEVICE wqe_desc signal_wqe(const qp_state* q, std::uint64_t raddr, std::uint32_t rkey,
                                     const std::uint64_t* value, signal_op op) {
  wqe_desc d;
  d.rkey = rkey;
  d.raddr = raddr;
  if (op == signal_op::set) {
    d.kind = wqe_kind::write_inline;
    d.bytes = 8;
    d.laddr = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(value));
  } else {
    d.kind = wqe_kind::fetch_add;
    d.lkey = q->lkey;
    d.laddr = q->scratch_laddr;
    d.operand = *value;
  }
  return d;
}

}  // namespace qp_detail

/// Remote 64-bit signal on the 8-byte aligned word [raddr, rkey]: `set` or `add`.
template <poster P>
EAAS_HOST_DEVICE status signal(qp_state* q, std::uint64_t raddr, std::uint32_t rkey, std::uint64_t value, signal_op op,
                               deadline until, post_opts o = {}) {
  if (EAAS_UNLIKELY((raddr & 7u) != 0 || (op != signal_op::set && op != signal_op::add)))
    return status::invalid_argument;
  wqe_desc d = qp_detail::signal_wqe(q, raddr, rkey, &value, op);
  d.fence = o.fence;
  d.completion = o.completion;
  return post<P>(q, &d, 1, o.ring, until);
}

/// WRITE of the payload, then the signal, as two adjacent WQEs of one reservation: an RC QP executes
/// them in order at the responder, so the signal is never visible before the payload. `bytes` may
/// be 0 (the signal alone).
template <poster P>
EAAS_HOST_DEVICE status put_signal(qp_state* q, std::uint64_t raddr, std::uint32_t rkey, std::uint64_t laddr,
                                   std::uint64_t bytes, std::uint64_t sig_raddr, std::uint32_t sig_rkey,
                                   std::uint64_t value, signal_op op, deadline until, post_opts o = {}) {
  if (EAAS_UNLIKELY(bytes > mlx5::kMaxSegBytes || (sig_raddr & 7u) != 0 ||
                    (op != signal_op::set && op != signal_op::add)))
    return status::invalid_argument;
  wqe_desc d[2];
  std::uint32_t n = 0;
  if (bytes != 0) {
    d[0].kind = wqe_kind::write;
    d[0].bytes = static_cast<std::uint32_t>(bytes);
    d[0].rkey = rkey;
    d[0].lkey = q->lkey;
    d[0].raddr = raddr;
    d[0].laddr = laddr;
    n = 1;
  }
  d[n] = qp_detail::signal_wqe(q, sig_raddr, sig_rkey, &value, op);
  d[n].completion = o.completion;
  d[0].fence = o.fence;
  return post<P>(q, d, n + 1, o.ring, until);
}

/// Waits until every WQE published on the QP so far (this caller's included) has completed: remote
/// writes done, reads and fetched values landed. Rings whatever waits for a doorbell; if the last
/// published WQE requests no CQE (or the doorbell is due), posts a NOP that requests one and rings.
/// Returns ok, timeout at the deadline, or the QP's latched error (peer_unreachable,
/// remote_access_error, ...) -- once the QP has failed, also to callers whose own WQEs completed
/// before the failure. After an error the QP needs a reset (host side).
template <poster P>
EAAS_HOST_DEVICE status quiet(qp_state* q, deadline until) {
  if (status e = latched_error<P>(&q->cq); e != status::ok) return e;
  const std::uint64_t published = qp_detail::ld<P>(&q->ready);
  if (qp_detail::ld<P>(&q->cq.completed) >= published) return status::ok;
  const std::uint64_t rung = P == poster::shared ? load_relaxed(&q->rung) : q->rung;
  std::uint64_t target = published;
  if (rung < published || !period_signals(published - 1, q->signal_period)) {
    wqe_desc nop;
    nop.completion = true;
    std::uint64_t at = 0;
    if (status s = post<P>(q, &nop, 1, /*ring=*/true, until, &at); s != status::ok) return s;
    target = at + 1;
  }
  return wait_completed<P>(&q->cq, &q->head, target, until);
}

}  // namespace eaas::detail::ibgda
