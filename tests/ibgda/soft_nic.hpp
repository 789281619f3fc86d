#pragma once

// A software model of an mlx5 NIC's requester side, for tests only (never a transport): one host
// thread plays the hardware for QPs whose SQ ring, doorbell record, UAR word and collapsed CQ live in
// ordinary host memory, so that the production posting and polling code (eaas/detail/ibgda) runs
// unchanged against it.
//
// What it does, as the hardware would:
// - Learns of new WQEs from the doorbell (the 8-byte UAR write, which names the newest WQE) and never
//   executes past the doorbell record; `require_doorbell = false` follows the record alone.
// - Decodes every WQE and checks it: the ctrl segment's index must be the ring position it sits at
//   (a stale slot means the doorbell record ran ahead of the WQEs), the QP number, ds against the
//   opcode, no reserved bits. A malformed WQE is a protocol violation (counted, reported) and fails
//   the QP with LOCAL_QP_OP.
// - Executes RDMA WRITE (pointer or inline), READ, 64-bit fetch-add and compare-swap between
//   registered buffers: lkey/rkey checked against a table of [addr, len) regions (LOCAL_PROT for a bad
//   lkey or local bounds, REMOTE_ACCESS for rkey / remote bounds). Atomics work on host-endian memory
//   (mlx5_core puts the HCA in host-endianness atomic mode where it can) and use std::atomic_ref.
// - Completes in order: a WQE that asks for a CQE (CQ_UPDATE) gets one in CQE 0 (collapsed CQ) with
//   its wqe_counter, written body first and the last 4 bytes (counter, op_own) last with release.
// - Read and atomic responses can land late (`response_lag`: after that many later WQEs) unless a
//   later WQE carries a fence, which makes it wait for them: the case the fence bit exists for.
//
// Faults it injects: a delay before every WQE; an error CQE with a chosen syndrome at a chosen WQE
// index, after which every later WQE is flushed (WR_FLUSH error CQEs); a dead peer (every WQE retries
// for `retry_timeout_ns`, then TRANSPORT_RETRY_EXC, then flushes); a pause (nothing progresses).

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "eaas/common/mlx5.hpp"
#include "eaas/detail/ibgda/qp.hpp"

namespace eaas::test {

struct soft_nic_options {
  std::uint64_t wqe_delay_ns = 0;              ///< wait this long before executing each WQE
  std::uint32_t response_lag = 0;              ///< READ / atomic results land this many WQEs later
  std::uint64_t retry_timeout_ns = 2'000'000;  ///< dead peer: time until TRANSPORT_RETRY_EXC
  bool require_doorbell = true;                ///< execute only WQEs a doorbell announced
};

class soft_nic {
 public:
  struct keys {
    std::uint32_t lkey;
    std::uint32_t rkey;
  };

  explicit soft_nic(soft_nic_options o = {});
  ~soft_nic();
  soft_nic(const soft_nic&) = delete;
  soft_nic& operator=(const soft_nic&) = delete;

  /// Registers [addr, addr + len) for local and remote access; distinct lkey and rkey. Any time.
  keys register_memory(const void* addr, std::size_t len);
  /// Removes the region of `rkey` (false when there is none): once this returns, no WQE reads or
  /// writes through either key, and later ones fail with a protection / access error. Any time.
  bool unregister_memory(std::uint32_t rkey);
  /// Serves the QP described by `q` (its ring, doorbell record, UAR word, CQ). Before start().
  int attach(const detail::ibgda::qp_state& q);
  /// Stops serving QP `qp` (its memory may then be freed). Before start(), or after stop().
  void detach(int qp);

  void start();
  void stop();

  /// The WQE with ring index `wqe_index` fails with `syndrome`; every later one is flushed.
  void inject_error(int qp, std::uint64_t wqe_index, std::uint8_t syndrome);
  /// From now on the peer does not answer: the next WQE fails with TRANSPORT_RETRY_EXC after
  /// retry_timeout_ns, and the rest are flushed.
  void kill_peer(int qp);
  /// While paused the NIC does nothing (a stalled NIC).
  void pause(bool on) { paused_.store(on, std::memory_order_release); }

  std::uint64_t executed(int qp) const { return qps_[qp]->executed.load(std::memory_order_acquire); }
  std::uint64_t cqes(int qp) const { return qps_[qp]->cqes.load(std::memory_order_acquire); }
  std::uint64_t error_cqes(int qp) const { return qps_[qp]->error_cqes.load(std::memory_order_acquire); }
  std::uint64_t doorbells(int qp) const { return qps_[qp]->doorbells.load(std::memory_order_acquire); }
  std::uint64_t fenced_waits(int qp) const { return qps_[qp]->fenced_waits.load(std::memory_order_acquire); }
  /// Protocol violations seen (malformed or stale WQEs, doorbell ahead of the doorbell record, ...).
  std::uint64_t violations() const { return violations_.load(std::memory_order_acquire); }
  std::string first_violation() const;

 private:
  struct region {
    std::uint64_t addr;
    std::uint64_t len;
    std::uint32_t lkey;
    std::uint32_t rkey;
  };
  struct inflight {
    std::uint64_t index;
    bool cqe;
    std::uint32_t byte_cnt;
    bool pending;  // a response that has not landed yet
    std::uint32_t lag_left;
    std::uint64_t dst;
    std::vector<std::uint8_t> data;  // what lands at dst
  };
  struct qp_model {
    mlx5::send_wqebb* sq;
    std::uint32_t sq_size;
    std::uint32_t qpn;
    std::uint32_t* dbrec;
    std::uint64_t* uar;
    mlx5::cqe64* cq;
    std::uint32_t cq_size;
    // Hardware state (model thread only).
    std::uint64_t pos = 0;        // next WQE to execute
    std::uint64_t dbr = 0;        // widened doorbell record
    std::uint64_t announced = 0;  // WQEs below this were announced by a doorbell
    std::uint64_t last_uar = 0;
    bool in_error = false;
    bool detached = false;
    std::uint64_t cqe_count = 0;
    std::deque<inflight> flight;
    // Injection and statistics (any thread).
    std::atomic<std::uint64_t> inject_at{~std::uint64_t{0}};
    std::atomic<std::uint8_t> inject_syndrome{0};
    std::atomic<bool> dead{false};
    std::atomic<std::uint64_t> executed{0}, cqes{0}, error_cqes{0}, doorbells{0}, fenced_waits{0};
  };

  void run();
  bool step(qp_model& m);
  void execute(qp_model& m);
  void fail(qp_model& m, std::uint64_t index, std::uint8_t opcode, std::uint8_t syndrome);
  void land(inflight& f);
  void land_all(qp_model& m);
  void retire(qp_model& m);
  void write_cqe(qp_model& m, std::uint64_t index, std::uint32_t byte_cnt);
  void write_err_cqe(qp_model& m, std::uint64_t index, std::uint8_t opcode, std::uint8_t syndrome);
  void store_cqe(qp_model& m, const void* bytes64);
  const region* find(std::uint32_t key, bool remote, std::uint64_t addr, std::uint64_t len) const;
  void violation(const std::string& what);
  void wait_ns(std::uint64_t ns) const;

  soft_nic_options opt_;
  std::mutex keys_mu_;  // regions_, and a WQE's key checks together with its memory effects
  std::vector<region> regions_;
  std::vector<std::unique_ptr<qp_model>> qps_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> paused_{false};
  std::atomic<std::uint64_t> violations_{0};
  mutable std::mutex mu_;
  std::string first_violation_;
};

}  // namespace eaas::test
