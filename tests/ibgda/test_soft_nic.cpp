// The production posting and polling code (eaas/detail/ibgda/{qp,cq}.hpp), run from host threads
// against the software NIC model: data moved byte for byte, ring wrap-around, many posters on one
// QP, doorbell batching, put_signal ordering, fences, injected errors turned into statuses within
// their deadlines. The model's own checks (no WQE past the doorbell record, no stale WQE) are tested
// first, so that "zero violations" below means something.

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "eaas/common/mlx5.hpp"
#include "eaas/detail/clock.hpp"
#include "eaas/detail/ibgda/cq.hpp"
#include "eaas/detail/ibgda/qp.hpp"
#include "soft_nic.hpp"

namespace m5 = eaas::mlx5;
namespace ib = eaas::detail::ibgda;
using eaas::status;
using eaas::test::soft_nic;
using eaas::test::soft_nic_options;
using ib::poster;

namespace {

constexpr std::uint64_t kMs = 1'000'000;

eaas::deadline in_ms(std::uint64_t ms) { return eaas::deadline{eaas::detail::now_ns() + ms * kMs}; }

std::uint64_t addr(const void* p) { return reinterpret_cast<std::uint64_t>(p); }

// Polls `pred` for up to `ms` milliseconds.
template <class F>
bool eventually(F pred, std::uint64_t ms = 2000) {
  const std::uint64_t until = eaas::detail::now_ns() + ms * kMs;
  while (!pred()) {
    if (eaas::detail::now_ns() > until) return false;
    std::this_thread::yield();
  }
  return true;
}

struct rig_config {
  std::uint32_t sq_size = 16;
  std::uint32_t db_batch = 1;
  std::uint32_t signal_period = 1;
  std::size_t local_bytes = 1 << 18;
  std::size_t remote_bytes = 1 << 16;
  soft_nic_options nic;
  bool start = true;
};

// One QP in host memory, a local and a remote registered region, and the model serving the QP.
struct rig {
  explicit rig(rig_config c = {})
      : nic(c.nic),
        sq(c.sq_size),
        local(new std::uint64_t[c.local_bytes / 8]),
        remote(new std::uint64_t[c.remote_bytes / 8]),
        local_bytes(c.local_bytes),
        remote_bytes(c.remote_bytes) {
    std::memset(local.get(), 0, local_bytes);
    std::memset(remote.get(), 0, remote_bytes);
    for (auto& s : sq) std::memset(s.bytes, 0xFF, sizeof s.bytes);  // never a valid WQE index of lap 0
    ib::reset_cq(&cq->e, 1);
    lk = nic.register_memory(local.get(), local_bytes);
    rk = nic.register_memory(remote.get(), remote_bytes);
    ib::qp_config qc;
    qc.sq = sq.data();
    qc.sq_size = c.sq_size;
    qc.sq_dbrec = &dbrec[m5::kSendDbr];
    qc.uar_db = &uar;
    qc.cq = &cq->e;
    qc.qpn = 0x1234a;
    qc.lkey = lk.lkey;
    qc.scratch_laddr = addr(local.get());  // word 0 of the local region: discarded atomic results
    qc.db_batch = c.db_batch;
    qc.signal_period = c.signal_period;
    REQUIRE(ib::make_qp_state(qc, &q) == status::ok);
    qp = nic.attach(q);
    if (c.start) nic.start();
  }
  ~rig() { nic.stop(); }

  std::uint8_t* lbytes() { return reinterpret_cast<std::uint8_t*>(local.get()); }
  std::uint8_t* rbytes() { return reinterpret_cast<std::uint8_t*>(remote.get()); }
  std::uint64_t L(std::size_t off) { return addr(lbytes() + off); }
  std::uint64_t R(std::size_t off) { return addr(rbytes() + off); }
  std::uint64_t* rword(std::size_t off) { return reinterpret_cast<std::uint64_t*>(rbytes() + off); }
  std::uint64_t uar_now() { return std::atomic_ref<std::uint64_t>(uar).load(); }
  std::uint32_t dbrec_now() { return m5::from_be32(std::atomic_ref<std::uint32_t>(dbrec[m5::kSendDbr]).load()); }

  soft_nic nic;
  std::vector<m5::send_wqebb> sq;
  struct alignas(64) cq_buf {
    m5::cqe64 e;
  };
  std::unique_ptr<cq_buf> cq = std::make_unique<cq_buf>();
  alignas(8) std::uint32_t dbrec[2] = {0, 0};
  alignas(8) std::uint64_t uar = 0;
  std::unique_ptr<std::uint64_t[]> local, remote;
  std::size_t local_bytes, remote_bytes;
  soft_nic::keys lk{}, rk{};
  ib::qp_state q{};
  int qp = 0;
};

// Random one-sided ops from one poster, checked against a shadow of the remote region kept in
// program order (the QP executes in order). Each round ends with quiet, then everything is compared.
template <poster P>
void random_ops(rig& r, std::uint64_t seed, int rounds, int ops_per_round) {
  std::mt19937_64 rng(seed);
  const std::size_t src_base = 4096, src_len = 64 * 1024;  // constant source bytes (never rewritten)
  const std::size_t dst_base = src_base + src_len, dst_len = 96 * 1024;
  const std::size_t fetch_base = dst_base + dst_len;
  REQUIRE(fetch_base + 8 * 64 <= r.local_bytes);
  for (std::size_t i = 0; i < src_len; ++i) r.lbytes()[src_base + i] = static_cast<std::uint8_t>(rng());
  std::vector<std::uint8_t> shadow(r.rbytes(), r.rbytes() + r.remote_bytes);

  struct read_check {
    std::size_t dst;
    std::vector<std::uint8_t> want;
  };
  struct fetch_check {
    std::size_t at;
    std::uint64_t want;
  };
  int mismatches = 0, kinds[6] = {};
  for (int round = 0; round < rounds; ++round) {
    std::memset(r.lbytes() + dst_base, 0xEE, dst_len + 8 * 64);  // poison what reads and atomics fill
    std::vector<read_check> reads;
    std::vector<fetch_check> fetches;
    std::size_t dst_used = 0;
    for (int k = 0; k < ops_per_round; ++k) {
      const int kind = static_cast<int>(rng() % 6);
      ++kinds[kind];
      const eaas::deadline dl = in_ms(5000);
      switch (kind) {
        case 0: {  // pointer WRITE
          const std::size_t n = 1 + rng() % 2048, s = rng() % (src_len - n), d = rng() % (r.remote_bytes - n);
          REQUIRE(ib::put<P>(&r.q, r.R(d), r.rk.rkey, r.L(src_base + s), n, dl) == status::ok);
          std::memcpy(shadow.data() + d, r.lbytes() + src_base + s, n);
          break;
        }
        case 1: {  // inline WRITE; the source is overwritten right after the post
          std::uint8_t tmp[ib::kMaxInlineBytes];
          for (auto& b : tmp) b = static_cast<std::uint8_t>(rng());
          const auto n = static_cast<std::uint32_t>(rng() % (ib::kMaxInlineBytes + 1));
          const std::size_t d = rng() % (r.remote_bytes - n);
          REQUIRE(ib::put_inline<P>(&r.q, r.R(d), r.rk.rkey, tmp, n, dl) == status::ok);
          std::memcpy(shadow.data() + d, tmp, n);
          std::memset(tmp, 0, sizeof tmp);
          break;
        }
        case 2: {  // READ into a fresh window of the local destination area
          const std::size_t n = 1 + rng() % 2048, s = rng() % (r.remote_bytes - n);
          if (dst_used + n > dst_len) break;
          REQUIRE(ib::get<P>(&r.q, r.R(s), r.rk.rkey, r.L(dst_base + dst_used), n, dl) == status::ok);
          reads.push_back({dst_base + dst_used, std::vector<std::uint8_t>(shadow.begin() + s, shadow.begin() + s + n)});
          dst_used += n;
          break;
        }
        case 3:
        case 4: {  // fetch-add / compare-swap on a random aligned word
          if (fetches.size() == 64) break;
          const std::size_t w = 8 * (rng() % (r.remote_bytes / 8));
          std::uint64_t cur;
          std::memcpy(&cur, shadow.data() + w, 8);
          const std::size_t at = fetch_base + 8 * fetches.size();
          auto* fetched = reinterpret_cast<std::uint64_t*>(r.lbytes() + at);
          std::uint64_t next = cur;
          if (kind == 3) {
            const std::uint64_t add = rng();
            REQUIRE(ib::fetch_add<P>(&r.q, r.R(w), r.rk.rkey, add, fetched, dl) == status::ok);
            next = cur + add;
          } else {
            const std::uint64_t expected = (rng() & 1) ? cur : rng(), desired = rng();
            REQUIRE(ib::compare_swap<P>(&r.q, r.R(w), r.rk.rkey, expected, desired, fetched, dl) == status::ok);
            if (expected == cur) next = desired;
          }
          fetches.push_back({at, cur});
          std::memcpy(shadow.data() + w, &next, 8);
          break;
        }
        case 5: {  // put_signal with a set or add signal
          const std::size_t n = 1 + rng() % 1024, s = rng() % (src_len - n), d = rng() % (r.remote_bytes / 2 - n);
          const std::size_t sig = r.remote_bytes / 2 + 8 * (rng() % (r.remote_bytes / 16));
          const auto op = (rng() & 1) ? eaas::signal_op::add : eaas::signal_op::set;
          const std::uint64_t v = rng();
          REQUIRE(ib::put_signal<P>(&r.q, r.R(d), r.rk.rkey, r.L(src_base + s), n, r.R(sig), r.rk.rkey, v, op, dl) ==
                  status::ok);
          std::memcpy(shadow.data() + d, r.lbytes() + src_base + s, n);
          std::uint64_t cur;
          std::memcpy(&cur, shadow.data() + sig, 8);
          cur = op == eaas::signal_op::add ? cur + v : v;
          std::memcpy(shadow.data() + sig, &cur, 8);
          break;
        }
      }
    }
    REQUIRE(ib::quiet<P>(&r.q, in_ms(5000)) == status::ok);
    mismatches += std::memcmp(shadow.data(), r.rbytes(), r.remote_bytes) != 0;
    for (const auto& c : reads) mismatches += std::memcmp(r.lbytes() + c.dst, c.want.data(), c.want.size()) != 0;
    for (const auto& f : fetches) {
      std::uint64_t got;
      std::memcpy(&got, r.lbytes() + f.at, 8);
      mismatches += got != f.want;
    }
  }
  CHECK(mismatches == 0);
  for (int kind = 0; kind < 6; ++kind) CHECK(kinds[kind] > 0);
  CHECK(r.nic.violations() == 0);
  CHECK(r.nic.first_violation() == "");
  // Every reserved slot (ops and quiet's NOPs) was executed, exactly once.
  CHECK(r.nic.executed(r.qp) == r.q.head);
  CHECK(r.nic.error_cqes(r.qp) == 0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// The model checks what the production code must get right.
// ---------------------------------------------------------------------------------------------------

TEST_CASE("soft NIC: never executes past the doorbell record, and reports a doorbell that runs ahead of it") {
  rig_config c;
  c.start = false;
  rig r(c);
  std::uint64_t payload = 0x1122334455667788ull;
  for (std::uint16_t i = 0; i < 4; ++i)
    ib::build_rdma_write_inline(&r.sq[i], i, r.q.qpn, ib::ctrl_flags(true), r.R(8 * i), r.rk.rkey, &payload, 8);
  r.dbrec[m5::kSendDbr] = m5::to_be32(2);
  r.uar = ib::doorbell_word(&r.sq[3]);  // names WQE 3: beyond the record
  r.nic.start();
  REQUIRE(eventually([&] { return r.nic.executed(r.qp) == 2; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(r.nic.executed(r.qp) == 2);
  CHECK(*r.rword(8) == payload);
  CHECK(*r.rword(16) == 0);  // WQE 2 is in the ring but not covered by the record
  CHECK(r.nic.violations() >= 1);
  CHECK(r.nic.first_violation().find("beyond the doorbell record") != std::string::npos);
}

TEST_CASE("soft NIC: a slot that still holds the previous lap's WQE is a violation and fails the QP") {
  rig_config c;
  c.start = false;
  rig r(c);
  std::uint64_t payload = 7;
  ib::build_rdma_write_inline(&r.sq[0], 0, r.q.qpn, ib::ctrl_flags(true), r.R(0), r.rk.rkey, &payload, 8);
  // Slot 1 carries index 1 - 16: what a doorbell record that ran ahead of the writer would expose.
  ib::build_rdma_write_inline(&r.sq[1], static_cast<std::uint16_t>(1 - 16), r.q.qpn, ib::ctrl_flags(true), r.R(8),
                              r.rk.rkey, &payload, 8);
  m5::send_wqebb fresh;  // the WQE the poster meant to write: the doorbell names it
  ib::build_rdma_write_inline(&fresh, 1, r.q.qpn, ib::ctrl_flags(true), r.R(8), r.rk.rkey, &payload, 8);
  r.dbrec[m5::kSendDbr] = m5::to_be32(2);
  r.uar = ib::doorbell_word(&fresh);
  r.q.head = r.q.ready = r.q.rung = 2;  // as if posted
  r.nic.start();
  CHECK(ib::quiet<poster::exclusive>(&r.q, in_ms(2000)) == status::internal_error);  // LOCAL_QP_OP
  CHECK(*r.rword(0) == 7);
  CHECK(*r.rword(8) == 0);
  CHECK(r.nic.violations() == 1);
  CHECK(r.nic.first_violation().find("stale slot") != std::string::npos);
}

TEST_CASE("soft NIC: CQEs only for WQEs that ask, with the right wqe_counter") {
  rig_config c;
  c.start = false;
  rig r(c);
  std::uint64_t v = 1;
  for (std::uint16_t i = 0; i < 5; ++i)
    ib::build_rdma_write_inline(&r.sq[i], i, r.q.qpn, ib::ctrl_flags(i == 2), r.R(8 * i), r.rk.rkey, &v, 8);
  r.dbrec[m5::kSendDbr] = m5::to_be32(5);
  r.uar = ib::doorbell_word(&r.sq[4]);
  r.nic.start();
  REQUIRE(eventually([&] { return r.nic.executed(r.qp) == 5; }));
  REQUIRE(eventually([&] { return r.nic.cqes(r.qp) == 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(r.nic.cqes(r.qp) == 1);
  std::uint32_t tail;
  std::memcpy(&tail, reinterpret_cast<const std::uint8_t*>(&r.cq->e) + m5::kCqeTailOffset, 4);
  CHECK(m5::tail_wqe_counter(tail) == 2);
  CHECK(m5::cqe_op(m5::tail_op_own(tail)) == m5::cqe_opcode::req);
  CHECK(m5::from_be32(r.cq->e.sop_drop_qpn_be) == r.q.qpn);
}

// ---------------------------------------------------------------------------------------------------
// Polling logic on hand-written CQEs.
// ---------------------------------------------------------------------------------------------------

TEST_CASE("wqe_counter widening is exact across 16-bit wrap-around") {
  std::mt19937_64 rng(11);
  int wrong = 0;
  for (int i = 0; i < 100000; ++i) {
    const std::uint64_t newest = rng() >> (rng() % 64);
    const std::uint64_t lag = rng() % 65536;
    if (lag > newest) continue;
    const std::uint64_t index = newest - lag;
    wrong += ib::widen_wqe_counter(static_cast<std::uint16_t>(index), newest) != index;
  }
  CHECK(wrong == 0);
  CHECK(ib::widen_wqe_counter(0xffff, 0x10002) == 0xffff);
  CHECK(ib::widen_wqe_counter(0x0001, 0x10002) == 0x10001);
}

TEST_CASE("poll_cq: good CQEs advance `completed`, error CQEs become the documented statuses") {
  struct alignas(64) buf {
    m5::cqe64 e;
  } cq;
  auto write_tail = [&](std::uint16_t counter, m5::cqe_opcode op, std::uint8_t syndrome) {
    auto* b = reinterpret_cast<std::uint8_t*>(&cq.e);
    b[55] = syndrome;
    const std::uint16_t be = m5::to_be16(counter);
    std::memcpy(b + 60, &be, 2);
    b[63] = static_cast<std::uint8_t>(static_cast<std::uint8_t>(op) << 4 | 1);
  };
  ib::cq_state s{};
  s.cqe = &cq.e;
  s.size = 1;
  ib::reset_cq(&cq.e, 1);
  std::uint64_t head = 70000;
  CHECK(ib::poll_cq<poster::shared>(&s, &head) == status::ok);
  CHECK(s.completed == 0);  // INVALID: nothing completed
  write_tail(static_cast<std::uint16_t>(69990), m5::cqe_opcode::req, 0);
  CHECK(ib::poll_cq<poster::shared>(&s, &head) == status::ok);
  CHECK(s.completed == 69991);
  write_tail(static_cast<std::uint16_t>(69000), m5::cqe_opcode::req, 0);  // older: never moves back
  CHECK(ib::poll_cq<poster::exclusive>(&s, &head) == status::ok);
  CHECK(s.completed == 69991);

  struct row {
    std::uint8_t syndrome;
    status want;
  };
  const row rows[] = {
      {0x15, status::peer_unreachable}, {0x13, status::remote_access_error}, {0x05, status::peer_unreachable},
      {0x04, status::invalid_argument}, {0x11, status::invalid_argument},    {0x10, status::internal_error},
      {0x22, status::internal_error},   {0x01, status::internal_error},      {0x16, status::internal_error}};
  for (const row& w : rows) {
    CAPTURE(int(w.syndrome));
    CHECK(ib::status_from_syndrome(w.syndrome) == w.want);
    ib::cq_state e{};
    e.cqe = &cq.e;
    e.size = 1;
    write_tail(static_cast<std::uint16_t>(69995), m5::cqe_opcode::req_err, w.syndrome);
    CHECK(ib::poll_cq<poster::shared>(&e, &head) == w.want);
    CHECK(e.error == static_cast<std::uint32_t>(w.want));
    // The failed WQE's predecessors completed; a flush says nothing about them.
    CHECK(e.completed == (w.syndrome == 0x05 ? 0u : 69995u));
    // Latched: a later good CQE does not clear it.
    write_tail(static_cast<std::uint16_t>(69999), m5::cqe_opcode::req, 0);
    CHECK(ib::poll_cq<poster::shared>(&e, &head) == w.want);
  }
  ib::cq_state odd{};
  odd.cqe = &cq.e;
  odd.size = 1;
  write_tail(1, m5::cqe_opcode::resp_send, 0);  // a receive CQE on a send CQ
  CHECK(ib::poll_cq<poster::exclusive>(&odd, &head) == status::internal_error);
}

TEST_CASE("make_qp_state rejects configurations that could not work") {
  alignas(64) m5::send_wqebb ring[16];
  alignas(64) m5::cqe64 cqe[1];
  alignas(8) std::uint32_t db[2] = {};
  alignas(8) std::uint64_t uar = 0;
  ib::qp_config c;
  c.sq = ring;
  c.sq_size = 16;
  c.sq_dbrec = &db[1];
  c.uar_db = &uar;
  c.cq = cqe;
  c.scratch_laddr = reinterpret_cast<std::uint64_t>(&uar);
  ib::qp_state q;
  CHECK(ib::make_qp_state(c, &q) == status::ok);
  CHECK(q.head == 0);
  CHECK(q.cq.cqe == cqe);
  auto bad = [&](auto tweak) {
    ib::qp_config b = c;
    tweak(b);
    return ib::make_qp_state(b, &q);
  };
  CHECK(bad([](ib::qp_config& b) { b.sq_size = 12; }) == status::invalid_argument);
  CHECK(bad([](ib::qp_config& b) { b.sq_size = 1u << 16; }) == status::invalid_argument);
  CHECK(bad([](ib::qp_config& b) { b.db_batch = 0; }) == status::invalid_argument);
  CHECK(bad([](ib::qp_config& b) { b.signal_period = 3; }) == status::invalid_argument);
  CHECK(bad([](ib::qp_config& b) { b.db_batch = 9, b.signal_period = 8; }) == status::ok);  // 8 + 8 = 16 slots
  CHECK(bad([](ib::qp_config& b) { b.db_batch = 10, b.signal_period = 8; }) == status::invalid_argument);
  CHECK(bad([](ib::qp_config& b) { b.db_batch = 10, b.signal_period = 8, b.sq_size = 32; }) == status::ok);
  CHECK(bad([&](ib::qp_config& b) { b.sq = reinterpret_cast<m5::send_wqebb*>(ring[0].bytes + 8); }) ==
        status::invalid_argument);
  CHECK(bad([](ib::qp_config& b) { b.uar_db = nullptr; }) == status::invalid_argument);
  CHECK(bad([](ib::qp_config& b) { b.qpn = 1u << 24; }) == status::invalid_argument);
  CHECK(bad([](ib::qp_config& b) { b.scratch_laddr = 0; }) == status::invalid_argument);
  CHECK(bad([](ib::qp_config& b) { b.scratch_laddr += 4; }) == status::invalid_argument);
}

// ---------------------------------------------------------------------------------------------------
// Posting and polling against the model.
// ---------------------------------------------------------------------------------------------------

TEST_CASE("random ops verified byte for byte; the ring wraps more than 10x its depth (shared and exclusive)") {
  struct shape {
    std::uint32_t sq_size, db_batch, signal_period, response_lag;
  };
  // A 2-slot ring (every post waits for the previous completion), plain, and batched with late
  // read / atomic responses and a CQE only every 4th WQE.
  const shape shapes[] = {{2, 1, 1, 0}, {16, 1, 1, 0}, {16, 4, 4, 3}, {64, 8, 8, 5}};
  for (const bool exclusive : {false, true}) {
    for (const shape& sh : shapes) {
      CAPTURE(exclusive);
      CAPTURE(sh.sq_size);
      CAPTURE(sh.db_batch);
      rig_config c;
      c.sq_size = sh.sq_size;
      c.db_batch = sh.db_batch;
      c.signal_period = sh.signal_period;
      c.nic.response_lag = sh.response_lag;
      rig r(c);
      const std::uint64_t seed = sh.sq_size * 131 + sh.db_batch;
      if (exclusive)
        random_ops<poster::exclusive>(r, seed, 40, 60);
      else
        random_ops<poster::shared>(r, seed + 1, 40, 60);
      CHECK(r.q.head > 10 * c.sq_size);
      CHECK(r.q.ready == r.q.head);
    }
  }
}

TEST_CASE("many threads share one QP: every op lands, fetch-add results are a permutation, no violations") {
  struct shape {
    std::uint32_t sq_size, db_batch, signal_period;
  };
  for (const shape& sh : {shape{32, 4, 1}, shape{32, 4, 4}, shape{8, 1, 1}, shape{128, 16, 16}}) {
    CAPTURE(sh.sq_size);
    CAPTURE(sh.db_batch);
    CAPTURE(sh.signal_period);
    constexpr int kThreads = 6, kOps = 1500, kSlice = 8192;
    rig_config c;
    c.sq_size = sh.sq_size;
    c.db_batch = sh.db_batch;
    c.signal_period = sh.signal_period;
    c.local_bytes = 1 << 20;
    c.remote_bytes = 8 + kThreads * kSlice;
    rig r(c);
    std::atomic<int> bad_status{0}, mismatches{0}, adds{0};
    std::vector<std::vector<std::uint64_t>> fetched(kThreads);
    auto worker = [&](int t) {
      std::mt19937_64 rng(1000 + t);
      const std::size_t src =
          8 + static_cast<std::size_t>(t) * (kOps * 8 + 4096);  // per-thread local: fetch words, then source bytes
      auto* fw = reinterpret_cast<std::uint64_t*>(r.lbytes() + src);
      std::uint8_t* sbytes = r.lbytes() + src + kOps * 8;
      for (int i = 0; i < 4096; ++i) sbytes[i] = static_cast<std::uint8_t>(rng());
      std::vector<std::uint8_t> shadow(kSlice, 0);
      const std::size_t slice = 8 + static_cast<std::size_t>(t) * kSlice;
      int my_adds = 0;
      for (int i = 0; i < kOps; ++i) {
        status s;
        if (rng() % 3 == 0) {
          s = ib::fetch_add<poster::shared>(&r.q, r.R(0), r.rk.rkey, 1, &fw[my_adds], in_ms(5000));
          ++my_adds;
        } else {
          const std::size_t n = 1 + rng() % 512, so = rng() % (4096 - n), d = rng() % (kSlice - n);
          if (n <= ib::kMaxInlineBytes && (rng() & 1))
            s = ib::put_inline<poster::shared>(&r.q, r.R(slice + d), r.rk.rkey, sbytes + so,
                                               static_cast<std::uint32_t>(n), in_ms(5000));
          else
            s = ib::put<poster::shared>(&r.q, r.R(slice + d), r.rk.rkey, addr(sbytes + so), n, in_ms(5000));
          std::memcpy(shadow.data() + d, sbytes + so, n);
        }
        if (s != status::ok) ++bad_status;
        if (i % 100 == 99 || i == kOps - 1) {
          if (ib::quiet<poster::shared>(&r.q, in_ms(5000)) != status::ok) ++bad_status;
          if (std::memcmp(r.rbytes() + slice, shadow.data(), kSlice) != 0) ++mismatches;
        }
      }
      fetched[t].assign(fw, fw + my_adds);
      adds += my_adds;
    };
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
    for (auto& th : threads) th.join();
    CHECK(bad_status == 0);
    CHECK(mismatches == 0);
    CHECK(*r.rword(0) == static_cast<std::uint64_t>(adds.load()));
    std::vector<std::uint64_t> all;
    for (auto& f : fetched) all.insert(all.end(), f.begin(), f.end());
    std::sort(all.begin(), all.end());
    bool permutation = all.size() == static_cast<std::size_t>(adds.load());
    for (std::size_t i = 0; permutation && i < all.size(); ++i) permutation = all[i] == i;
    CHECK(permutation);
    CHECK(r.nic.violations() == 0);
    CHECK(r.nic.first_violation() == "");
    CHECK(r.nic.executed(r.qp) == r.q.head);
    CHECK(r.q.head > 10 * c.sq_size);
  }
}

TEST_CASE("doorbell batching: the doorbell and its record move only every db_batch posts, and quiet rings the rest") {
  rig_config c;
  c.sq_size = 16;
  c.db_batch = 4;
  rig r(c);
  std::uint64_t v = 0xABCDEF;
  std::uint64_t last_uar = r.uar_now();
  int rings = 0;
  for (int i = 0; i < 12; ++i) {
    REQUIRE(ib::put_inline<poster::exclusive>(&r.q, r.R(8 * i), r.rk.rkey, &v, 8, in_ms(1000)) == status::ok);
    const bool rang = r.uar_now() != last_uar;
    last_uar = r.uar_now();
    rings += rang;
    CHECK(rang == ((i + 1) % 4 == 0));
    CHECK(r.dbrec_now() == static_cast<std::uint32_t>((i + 1) / 4 * 4));  // the record moves only with the bell
    if (i == 2) {  // three posts, no doorbell: the NIC has not seen them
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      CHECK(r.nic.executed(r.qp) == 0);
      CHECK(*r.rword(0) == 0);
    }
  }
  CHECK(rings == 3);
  // The doorbell names the newest WQE (index 11) of this QP.
  CHECK(last_uar == ib::doorbell_word(&r.sq[11]));
  REQUIRE(eventually([&] { return r.nic.executed(r.qp) == 12; }));
  REQUIRE(ib::put_inline<poster::exclusive>(&r.q, r.R(8 * 12), r.rk.rkey, &v, 8, in_ms(1000)) == status::ok);
  REQUIRE(ib::put_inline<poster::exclusive>(&r.q, r.R(8 * 13), r.rk.rkey, &v, 8, in_ms(1000)) == status::ok);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(r.nic.executed(r.qp) == 12);
  CHECK(*r.rword(8 * 13) == 0);
  CHECK(ib::quiet<poster::exclusive>(&r.q, in_ms(1000)) == status::ok);
  CHECK(*r.rword(8 * 12) == v);
  CHECK(*r.rword(8 * 13) == v);
  CHECK(r.nic.executed(r.qp) == 15);  // 14 writes + quiet's NOP (ringing the two that waited)
  CHECK(r.dbrec_now() == 15);
  CHECK(r.nic.doorbells(r.qp) <= 4);
  CHECK(r.nic.violations() == 0);
}

namespace {

// A sender posts `iters` payloads (distinct source and destination per iteration) each followed by
// a signal; a receiver polls the signal word and, for every iteration the signal announces,
// compares the payload. `reversed` posts the signal before the payload: the control that shows the
// check can fail.
struct ordering_result {
  int checked = 0;
  int mismatches = 0;
};

ordering_result run_ordering(rig& r, int iters, std::size_t bytes, eaas::signal_op op, bool reversed) {
  std::mt19937_64 rng(77);
  const std::size_t src = 64;
  for (std::size_t i = 0; i < iters * bytes; ++i) r.lbytes()[src + i] = static_cast<std::uint8_t>(rng() | 1);
  const std::size_t sig = 0, dst = 64;
  ordering_result res;
  std::atomic<bool> done{false};
  std::thread receiver([&] {
    int next = 0;
    const std::uint64_t until = eaas::detail::now_ns() + 5000 * kMs;
    while (next < iters && eaas::detail::now_ns() < until) {
      const std::uint64_t seen = std::atomic_ref<std::uint64_t>(*r.rword(sig)).load(std::memory_order_acquire);
      if (static_cast<std::uint64_t>(next) >= seen) std::this_thread::yield();
      while (next < iters && static_cast<std::uint64_t>(next) < seen) {
        res.mismatches += std::memcmp(r.rbytes() + dst + next * bytes, r.lbytes() + src + next * bytes, bytes) != 0;
        ++res.checked;
        ++next;
      }
      if (done.load() && seen >= static_cast<std::uint64_t>(iters)) break;
    }
  });
  for (int i = 0; i < iters; ++i) {
    const eaas::deadline dl = in_ms(5000);
    const std::uint64_t value = op == eaas::signal_op::add ? 1 : static_cast<std::uint64_t>(i + 1);
    if (!reversed) {
      REQUIRE(ib::put_signal<poster::shared>(&r.q, r.R(dst + i * bytes), r.rk.rkey, r.L(src + i * bytes), bytes,
                                             r.R(sig), r.rk.rkey, value, op, dl) == status::ok);
    } else {
      REQUIRE(ib::signal<poster::shared>(&r.q, r.R(sig), r.rk.rkey, value, op, dl) == status::ok);
      REQUIRE(ib::put<poster::shared>(&r.q, r.R(dst + i * bytes), r.rk.rkey, r.L(src + i * bytes), bytes, dl) ==
              status::ok);
    }
  }
  CHECK(ib::quiet<poster::shared>(&r.q, in_ms(5000)) == status::ok);
  done = true;
  receiver.join();
  return res;
}

}  // namespace

TEST_CASE("put_signal: the signal is never visible before its payload") {
  for (const auto op : {eaas::signal_op::add, eaas::signal_op::set}) {
    CAPTURE(int(op));
    rig_config c;
    c.sq_size = 32;
    c.db_batch = 2;
    c.nic.wqe_delay_ns = 20'000;  // a window between the two WQEs for the receiver to look into
    c.local_bytes = 64 + 300 * 512;
    c.remote_bytes = 64 + 300 * 512;
    rig r(c);
    const ordering_result res = run_ordering(r, 300, 512, op, false);
    CHECK(res.checked == 300);
    CHECK(res.mismatches == 0);
    CHECK(r.nic.violations() == 0);
  }
}

TEST_CASE("put_signal control: with the signal posted before the payload the receiver does catch it") {
  {
    rig_config c;
    c.sq_size = 32;
    c.db_batch = 1;
    c.nic.wqe_delay_ns = 2'000'000;
    c.local_bytes = 64 + 10 * 512;
    c.remote_bytes = 64 + 10 * 512;
    rig r(c);
    const ordering_result res = run_ordering(r, 10, 512, eaas::signal_op::add, true);
    CHECK(res.checked == 10);
    CHECK(res.mismatches > 0);
  }
}

TEST_CASE("fence: a WRITE from a buffer an earlier READ fills sends the read bytes only when fenced") {
  for (const bool fenced : {false, true}) {
    CAPTURE(fenced);
    rig_config c;
    c.db_batch = 2;  // the READ and the WRITE reach the NIC under one doorbell
    c.nic.response_lag = 4;
    rig r(c);
    for (int i = 0; i < 64; ++i) r.rbytes()[1024 + i] = static_cast<std::uint8_t>(0x40 + i);
    std::memset(r.lbytes() + 4096, 0xEE, 64);
    ib::post_opts o;
    o.fence = fenced ? ib::fence_mode::full : ib::fence_mode::none;
    REQUIRE(ib::get<poster::exclusive>(&r.q, r.R(1024), r.rk.rkey, r.L(4096), 64, in_ms(1000)) == status::ok);
    REQUIRE(ib::put<poster::exclusive>(&r.q, r.R(2048), r.rk.rkey, r.L(4096), 64, in_ms(1000), o) == status::ok);
    REQUIRE(ib::quiet<poster::exclusive>(&r.q, in_ms(1000)) == status::ok);
    CHECK(std::memcmp(r.lbytes() + 4096, r.rbytes() + 1024, 64) == 0);  // the READ landed either way
    const bool fresh = std::memcmp(r.rbytes() + 2048, r.rbytes() + 1024, 64) == 0;
    CHECK(fresh == fenced);
    CHECK(r.nic.fenced_waits(r.qp) == (fenced ? 1u : 0u));
  }
}

// ---------------------------------------------------------------------------------------------------
// Errors become statuses, within deadlines.
// ---------------------------------------------------------------------------------------------------

TEST_CASE("injected error CQEs: the right status, earlier WQEs done, later ones not, the QP stays failed") {
  struct row {
    std::uint8_t syndrome;
    status want;
  };
  const row rows[] = {{0x15, status::peer_unreachable}, {0x13, status::remote_access_error},
                      {0x05, status::peer_unreachable}, {0x04, status::invalid_argument},
                      {0x11, status::invalid_argument}, {0x10, status::internal_error},
                      {0x22, status::internal_error}};
  for (const row& w : rows) {
    for (const bool exclusive : {false, true}) {
      CAPTURE(int(w.syndrome));
      CAPTURE(exclusive);
      rig r;
      r.nic.inject_error(r.qp, 1, w.syndrome);
      std::uint64_t a = 0xA, b = 0xB;
      auto put8 = [&](std::uint64_t* v, std::size_t off) {
        return exclusive ? ib::put_inline<poster::exclusive>(&r.q, r.R(off), r.rk.rkey, v, 8, in_ms(1000))
                         : ib::put_inline<poster::shared>(&r.q, r.R(off), r.rk.rkey, v, 8, in_ms(1000));
      };
      auto quiet = [&] {
        return exclusive ? ib::quiet<poster::exclusive>(&r.q, in_ms(2000))
                         : ib::quiet<poster::shared>(&r.q, in_ms(2000));
      };
      REQUIRE(put8(&a, 0) == status::ok);
      REQUIRE(put8(&b, 8) == status::ok);
      CHECK(quiet() == w.want);
      CHECK(*r.rword(0) == 0xA);
      CHECK(*r.rword(8) == 0);
      const std::uint64_t head = r.q.head;
      CHECK(put8(&a, 16) == w.want);  // refused at once: nothing more is posted
      CHECK(r.q.head == head);
      CHECK(quiet() == w.want);
    }
  }
}

TEST_CASE("an error in the middle flushes the rest: pollers see the error or the flush, never ok") {
  rig r;
  r.nic.inject_error(r.qp, 2, 0x13);
  std::uint64_t v[6] = {1, 2, 3, 4, 5, 6};
  for (int i = 0; i < 6; ++i)
    REQUIRE(ib::put_inline<poster::shared>(&r.q, r.R(8 * i), r.rk.rkey, &v[i], 8, in_ms(1000)) == status::ok);
  const status s = ib::quiet<poster::shared>(&r.q, in_ms(2000));
  CHECK((s == status::remote_access_error || s == status::peer_unreachable));
  REQUIRE(eventually([&] { return r.nic.error_cqes(r.qp) == 4; }));  // WQE 2 failed, 3..5 flushed
  CHECK(*r.rword(0) == 1);
  CHECK(*r.rword(8) == 2);
  for (int i = 2; i < 6; ++i) CHECK(*r.rword(8 * i) == 0);
  CHECK(r.nic.executed(r.qp) == 2);
}

TEST_CASE("real key and bounds violations reported by the NIC become statuses") {
  std::uint64_t v = 5;
  SUBCASE("wrong rkey") {
    rig r;
    REQUIRE(ib::put_inline<poster::shared>(&r.q, r.R(0), r.rk.rkey ^ 0x100, &v, 8, in_ms(1000)) == status::ok);
    CHECK(ib::quiet<poster::shared>(&r.q, in_ms(2000)) == status::remote_access_error);
    CHECK(*r.rword(0) == 0);
  }
  SUBCASE("the lkey used as an rkey") {
    rig r;
    REQUIRE(ib::put_inline<poster::shared>(&r.q, r.R(0), r.lk.lkey, &v, 8, in_ms(1000)) == status::ok);
    CHECK(ib::quiet<poster::shared>(&r.q, in_ms(2000)) == status::remote_access_error);
  }
  SUBCASE("remote write one byte past the region") {
    rig r;
    REQUIRE(ib::put<poster::shared>(&r.q, r.R(r.remote_bytes - 63), r.rk.rkey, r.L(64), 64, in_ms(1000)) == status::ok);
    CHECK(ib::quiet<poster::shared>(&r.q, in_ms(2000)) == status::remote_access_error);
    CHECK(r.rbytes()[r.remote_bytes - 63] == 0);
  }
  SUBCASE("local source outside the lkey's region") {
    rig r;
    REQUIRE(ib::put<poster::exclusive>(&r.q, r.R(0), r.rk.rkey, r.L(r.local_bytes - 8), 64, in_ms(1000)) == status::ok);
    CHECK(ib::quiet<poster::exclusive>(&r.q, in_ms(2000)) == status::invalid_argument);
  }
  SUBCASE("arguments the NIC could never accept are refused before posting") {
    rig r;
    std::uint64_t f = 0;
    CHECK(ib::put_inline<poster::shared>(&r.q, r.R(0), r.rk.rkey, &v, ib::kMaxInlineBytes + 1, in_ms(1000)) ==
          status::invalid_argument);
    CHECK(ib::fetch_add<poster::shared>(&r.q, r.R(4), r.rk.rkey, 1, &f, in_ms(1000)) == status::invalid_argument);
    CHECK(ib::put<poster::shared>(&r.q, r.R(0), r.rk.rkey, r.L(0), 1ull << 31, in_ms(1000)) ==
          status::invalid_argument);
    CHECK(ib::signal<poster::shared>(&r.q, r.R(4), r.rk.rkey, 1, eaas::signal_op::set, in_ms(1000)) ==
          status::invalid_argument);
    CHECK(r.q.head == 0);
  }
}

TEST_CASE("a dead peer surfaces as peer_unreachable once the NIC gives up, well before the deadline") {
  rig_config c;
  c.nic.retry_timeout_ns = 30 * kMs;
  rig r(c);
  std::uint64_t v = 9;
  REQUIRE(ib::put_inline<poster::shared>(&r.q, r.R(0), r.rk.rkey, &v, 8, in_ms(1000)) == status::ok);
  REQUIRE(ib::quiet<poster::shared>(&r.q, in_ms(1000)) == status::ok);
  r.nic.kill_peer(r.qp);
  const std::uint64_t t0 = eaas::detail::now_ns();
  REQUIRE(ib::put_inline<poster::shared>(&r.q, r.R(8), r.rk.rkey, &v, 8, in_ms(1000)) == status::ok);
  CHECK(ib::quiet<poster::shared>(&r.q, in_ms(3000)) == status::peer_unreachable);
  const std::uint64_t took = eaas::detail::now_ns() - t0;
  CHECK(took >= 30 * kMs);
  CHECK(took < 2000 * kMs);
  CHECK(*r.rword(8) == 0);
}

TEST_CASE("a stalled NIC: quiet and a full ring end with timeout at their deadlines; the QP recovers") {
  rig_config c;
  c.sq_size = 8;
  rig r(c);
  r.nic.pause(true);
  std::uint64_t v = 3;
  for (int i = 0; i < 8; ++i)
    REQUIRE(ib::put_inline<poster::shared>(&r.q, r.R(8 * i), r.rk.rkey, &v, 8, in_ms(1000)) == status::ok);
  std::uint64_t t0 = eaas::detail::now_ns();
  CHECK(ib::put_inline<poster::shared>(&r.q, r.R(64), r.rk.rkey, &v, 8, in_ms(50)) == status::timeout);  // ring full
  std::uint64_t took = eaas::detail::now_ns() - t0;
  CHECK(took >= 50 * kMs);
  CHECK(took < 1000 * kMs);
  CHECK(r.q.head == 8);  // nothing reserved
  t0 = eaas::detail::now_ns();
  CHECK(ib::quiet<poster::shared>(&r.q, in_ms(50)) == status::timeout);
  took = eaas::detail::now_ns() - t0;
  CHECK(took >= 50 * kMs);
  CHECK(took < 1000 * kMs);
  r.nic.pause(false);
  CHECK(ib::quiet<poster::shared>(&r.q, in_ms(2000)) == status::ok);
  CHECK(ib::put_inline<poster::shared>(&r.q, r.R(64), r.rk.rkey, &v, 8, in_ms(1000)) == status::ok);
  CHECK(ib::quiet<poster::shared>(&r.q, in_ms(2000)) == status::ok);
  for (int i = 0; i <= 8; ++i) CHECK(*r.rword(8 * i) == 3);
}

TEST_CASE("a poster that reserved and never published: the next one times out and the QP stays failed") {
  rig r;
  r.q.head = 1;  // slot 0 reserved by a poster that died before publishing
  std::uint64_t v = 1;
  const std::uint64_t t0 = eaas::detail::now_ns();
  CHECK(ib::put_inline<poster::shared>(&r.q, r.R(0), r.rk.rkey, &v, 8, in_ms(30)) == status::timeout);
  CHECK(eaas::detail::now_ns() - t0 >= 30 * kMs);
  CHECK(r.q.ready == 0);
  CHECK(r.dbrec_now() == 0);  // nothing was rung past the hole
  CHECK(ib::quiet<poster::shared>(&r.q, in_ms(30)) == status::timeout);
  CHECK(r.nic.executed(r.qp) == 0);
}
