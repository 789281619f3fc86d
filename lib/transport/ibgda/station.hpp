#pragma once

// The ibgda transport of one context (private): the NIC, a heap of GPU memory registered once (the
// lkey every QP of the context uses for local buffers), a pool of QPs made in advance and advertised
// in the context's connection handle, and the per-endpoint links. How two contexts connect without a
// collective step (docs/IBGDA.md, "context::connect over ibgda"):
//
//   A publishes its connection handle: its port (layer, MTU, LID / GID) and the QPN / PSN of each QP
//   waiting in its pool (an advertisement, conn_desc with target 0).
//   B dials: makes a fresh QP, picks one of A's advertised QPs at random, connects its QP to it
//   (RTS), and returns a reply (conn_desc addressed to A, naming A's QP as target_qpn).
//   A accepts the reply: takes that QP out of its pool (refused when it is no longer there),
//   connects it to B's QP, and makes a new QP for the pool.
//
// Two messages in all; A needs nothing from B in advance, and B's handle plays no part.
//
// Close notices: every QP (pooled or dialed) comes with the state word of the endpoint it will
// serve, registered for remote write on its own (a 4-byte MR), and its address and rkey travel with
// the QP's QPN / PSN. link::close deregisters its own word (the peer can no longer write it), marks
// it closed, writes peer_dead into the peer's word with one inline RDMA WRITE on the same QP
// (bounded by close_notice_ns) and moves the QP to ERR.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "eaas/common/status.hpp"
#include "eaas/detail/ibgda/ops.hpp"
#include "transport/ibgda/host.hpp"
#include "transport/ibgda/wire.hpp"

namespace eaas {
class context;
struct context_options;
}  // namespace eaas

namespace eaas::detail::ibgda {

/// Where a context's endpoint state words come from (its word pool: mapped into the GPU for a GPU
/// context). An ibgda endpoint's state word is also where its peer's close notice lands.
class word_source {
 public:
  /// A word set to `initial`, or null when no memory could be had.
  virtual std::uint32_t* take(std::uint32_t initial) = 0;
  virtual void give(std::uint32_t* w) = 0;

 protected:
  ~word_source() = default;
};

/// A state word registered for the peer's close notice: its own MR, remote write reaching these 4
/// bytes only. Deregistered before the word goes back to its source.
struct notice_slot {
  notice_slot() = default;
  notice_slot(notice_slot&& o) noexcept { *this = std::move(o); }
  notice_slot& operator=(notice_slot&& o) noexcept {
    if (this != &o) {
      reset();
      src = o.src;
      word = std::exchange(o.word, nullptr);
      mr = std::move(o.mr);
    }
    return *this;
  }
  ~notice_slot() { reset(); }
  void reset() {
    mr.reset();
    if (word != nullptr) src->give(word);
    word = nullptr;
  }
  /// What the peer needs to write the word.
  notice_word wire() const;
  word_source* src = nullptr;
  std::uint32_t* word = nullptr;
  std::unique_ptr<data_region> mr;
};

/// How a context brings up its ibgda transport.
struct station_options {
  nic_choice nic;
  qp_options qp;
  std::size_t heap_bytes = 64u << 20;           ///< GPU memory registered once; memory_kind::network lives here
  std::uint32_t pool = 4;                       ///< QPs kept waiting for peers (advertised in the handle), 1 .. 64
  std::uint32_t max_peers = 256;                ///< accepted peers at once; the pool is not refilled beyond
  std::uint64_t op_timeout_ns = 5'000'000'000;  ///< endpoint_state::op_timeout_ns
  std::uint64_t close_notice_ns = 100'000'000;  ///< link::close: bound on delivering the close notice
};

class station;

/// One endpoint's QP and its device-side state (in GPU memory). Destroying it destroys the QP; an
/// accepted link gives its place back to the pool.
class link {
 public:
  ~link();
  link(const link&) = delete;
  link& operator=(const link&) = delete;
  /// What device_endpoint::transport_state points to (GPU memory).
  endpoint_state* state() const { return state_; }
  /// The endpoint's state word (device_endpoint::state), where the peer's close notice lands.
  std::uint32_t* state_word() const { return notice_.word; }
  std::uint32_t qpn() const { return qp_->qpn(); }
  /// Closes the link, once: deregisters the state word (the peer can no longer write it), stores
  /// `local` in it (release), tells the peer (peer_dead into its state word, one inline WRITE on
  /// this QP, waited for up to close_notice_ns: a dead peer costs at most that), then moves the QP to
  /// ERR. The QP's memory and the device state stay until the link is destroyed. Not concurrent
  /// with posts on this QP (from kernels or host threads): the notice is posted by the host.
  /// Returns how the notice went (ok, timeout, the QP's error); the link is closed either way.
  status close(std::uint32_t local);

 private:
  friend class station;
  link() = default;
  std::shared_ptr<station> owner_;  // keeps the NIC alive
  std::unique_ptr<rc_qp> qp_;
  endpoint_state* state_ = nullptr;
  notice_slot notice_;  // our state word
  notice_word peer_;    // the peer's
  bool accepted_ = false;
  bool closed_ = false;
};

/// A block of the heap with its own MR (its rkey reaches exactly this block).
class heap_block {
 public:
  ~heap_block();
  heap_block(const heap_block&) = delete;
  heap_block& operator=(const heap_block&) = delete;
  void* data() const { return addr_; }
  std::size_t size() const { return size_; }
  std::uint32_t rkey() const { return mr_->rkey(); }

 private:
  friend class station;
  heap_block() = default;
  std::shared_ptr<station> owner_;
  void* addr_ = nullptr;
  std::size_t size_ = 0;
  std::size_t reserved_ = 0;
  std::unique_ptr<data_region> mr_;
};

class station : public std::enable_shared_from_this<station> {
 public:
  /// Opens the NIC, allocates and registers the heap, fills the pool. `verbs` / `gpu` must outlive
  /// the station unless owned (the `own_*` arguments, which may be null). Endpoint state words come
  /// from `words`, which must outlive the station.
  static status open(std::unique_ptr<verbs_api> own_verbs, std::unique_ptr<gpu_api> own_gpu, verbs_api& verbs,
                     gpu_api& gpu, const station_options& o, std::uint64_t self_id, std::uint64_t host_id,
                     word_source& words, std::shared_ptr<station>& out);
  ~station();
  station(const station&) = delete;
  station& operator=(const station&) = delete;

  /// The advertisement for the connection handle: the port and the QPs waiting in the pool (none
  /// when the pool is exhausted).
  status advertise(conn_desc& out);
  /// B's side: connects a fresh QP to one of the QPs `theirs` advertises; `reply` is what the peer
  /// must accept. no_resource when the advertisement lists no QP.
  status dial(const conn_desc& theirs, std::unique_ptr<link>& out, conn_desc& reply);
  /// A's side: connects the pool QP named by `reply` (which must be addressed to this context) to
  /// the peer's QP. not_found when that QP is no longer in the pool.
  status accept(const conn_desc& reply, std::unique_ptr<link>& out);

  /// `bytes` of the heap (256-byte aligned, zero-filled) with its own MR.
  status allocate(std::size_t bytes, std::unique_ptr<heap_block>& out);

  std::uint64_t self_id() const { return self_; }
  std::uint64_t host_id() const { return host_; }
  /// QPs waiting in the pool, and links accepted and alive (for tests and logs).
  std::size_t pool_size();
  std::size_t accepted();

 private:
  friend class link;
  friend class heap_block;
  station() = default;
  struct waiting {
    std::unique_ptr<rc_qp> qp;
    notice_slot notice;
  };
  status make_notice(notice_slot& out);
  status make_link(std::unique_ptr<rc_qp> qp, notice_slot notice, const notice_word& peer, std::unique_ptr<link>& out);
  status refill_locked();
  void release(link& l);
  void release(heap_block& b);
  conn_desc port_desc() const;

  std::unique_ptr<verbs_api> own_verbs_;
  std::unique_ptr<gpu_api> own_gpu_;
  std::unique_ptr<nic> nic_;
  station_options o_;
  std::uint64_t self_ = 0, host_ = 0;
  void* heap_ = nullptr;
  std::unique_ptr<data_region> heap_mr_;
  std::uint64_t scratch_ = 0;  // 64 bytes at the heap's start: discarded atomic results
  std::mutex mu_;
  std::map<std::size_t, std::size_t> free_;  // heap offset → bytes
  word_source* words_ = nullptr;
  std::vector<waiting> pool_;
  std::size_t accepted_ = 0;
};

/// What tests change about a context (contexts in one process posing as contexts on different
/// hosts, over the verbs / CUDA fakes). Null tables: the real ones.
struct context_setup {
  verbs_api* verbs = nullptr;
  gpu_api* gpu = nullptr;
  std::uint64_t host_id = 0;  ///< 0: this host's id
  station_options station;
};

/// context::create with ibgda brought up through `setup` (defined in lib/context.cpp). A failure of
/// the ibgda bring-up is returned here (context::create only logs it and goes on without ibgda).
status create_context(const context_options& options, const context_setup& setup, std::unique_ptr<context>& out);

}  // namespace eaas::detail::ibgda
