// The production ibgda posting and polling code (eaas/detail/ibgda/{qp,cq}.hpp) run from GPU
// kernels against the software NIC, a host thread serving QPs whose ring, doorbell record, UAR word
// and CQ are host memory mapped into the GPU: data moved byte for byte (pointer and inline writes,
// reads, fetch-add and compare-swap with their old values), ring wrap-around, warps of many blocks
// sharing one QP with every op executed exactly once, doorbell batching, injected error CQEs and a
// dead peer turned into statuses inside the kernel within their deadlines.
// The binary exits with 77 (ctest: skipped) when there is no CUDA device.

#define DOCTEST_CONFIG_IMPLEMENT
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "../common/doctest_main.hpp"
#include "eaas/common/mlx5.hpp"
#include "eaas/common/status.hpp"
#include "eaas/detail/ibgda/qp.hpp"
#include "mapped_qp.hpp"
#include "soft_nic.hpp"
#include "soft_nic_gpu_kernels.hpp"

namespace m5 = eaas::mlx5;
namespace ib = eaas::detail::ibgda;
using eaas::status;
using namespace eaas::test;

namespace {

constexpr std::uint64_t kMs = 1'000'000;
constexpr std::uint8_t kPoison = 0xcd;

struct rig_config {
  std::uint32_t sq_size = 16;
  std::uint32_t db_batch = 1;
  std::uint32_t signal_period = 1;
  std::size_t local_bytes = 1 << 20;
  std::size_t remote_bytes = 1 << 20;
  soft_nic_options nic;
};

// One QP in mapped host memory, a local and a remote mapped region registered with the model, and
// the model serving the QP (started unless the caller wants to inject first).
struct gpu_rig {
  explicit gpu_rig(const rig_config& c, bool start = true) : nic(c.nic) {
    REQUIRE(local.allocate(c.local_bytes) == status::ok);
    REQUIRE(remote.allocate(c.remote_bytes) == status::ok);
    lk = nic.register_memory(local.get(), local.size());
    rk = nic.register_memory(remote.get(), remote.size());
    // Word 0 of the local region takes discarded atomic results; nothing else uses it.
    REQUIRE(qp.create({c.sq_size, c.db_batch, c.signal_period, 0x1234a}, lk.lkey, local.addr(0)) == status::ok);
    id = nic.attach(qp.initial());
    if (start) nic.start();
  }
  ~gpu_rig() { nic.stop(); }

  ib::qp_state state() {
    ib::qp_state s{};
    REQUIRE(qp.read_state(&s) == status::ok);
    return s;
  }
  // The model counts an executed WQE just after writing its CQE: give it a moment to catch up.
  bool nic_executed(std::uint64_t n) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (nic.executed(id) != n) {
      if (std::chrono::steady_clock::now() > until) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    return true;
  }

  soft_nic nic;
  mapped_buffer local, remote;
  soft_nic::keys lk{}, rk{};
  mapped_qp qp;
  int id = 0;
};

status st(std::uint32_t v) { return static_cast<status>(v); }

// Everything settled after a clean run: every reserved WQE published, completed and executed once,
// the ring wrapped `laps` times, the model saw no protocol violation.
void check_settled(gpu_rig& r, std::uint64_t min_laps) {
  const ib::qp_state s = r.state();
  CHECK(s.ready == s.head);
  CHECK(s.cq.completed == s.head);
  CHECK(s.cq.error == 0);
  CHECK(s.head >= min_laps * s.sq_size);
  CHECK(r.nic_executed(s.head));
  CHECK(r.nic.error_cqes(r.id) == 0);
  CHECK_MESSAGE(r.nic.violations() == 0, r.nic.first_violation());
}

// Random ops, each on its own 256-byte slot of the remote region (so the expected result does not
// depend on how posters interleave), checked against a reference computed on the host.
struct random_plan {
  static constexpr std::size_t kSlot = 256;
  std::vector<gpu_op> ops;
  std::vector<std::uint8_t> want_remote, want_local;
  std::vector<std::uint64_t> want_old;  // atomics: the old value
};

random_plan make_random_plan(gpu_rig& r, std::size_t n, std::uint64_t seed) {
  random_plan p;
  std::mt19937_64 rng(seed);
  const std::size_t slot = random_plan::kSlot;
  // Local: [0, 4096) scratch; sources; read destinations (poisoned); atomic results (poisoned).
  const std::size_t l_src = 4096, l_rd = l_src + n * slot, l_old = l_rd + n * slot;
  // Remote: one slot per op (random background); then a read-only source area.
  const std::size_t r_rs = n * slot, rs_len = 64 * 1024;
  REQUIRE(l_old + n * 8 <= r.local.size());
  REQUIRE(r_rs + rs_len <= r.remote.size());
  std::uint8_t* L = r.local.get();
  std::uint8_t* R = r.remote.get();
  for (std::size_t i = 0; i < n * slot; ++i) L[l_src + i] = static_cast<std::uint8_t>(rng());
  std::memset(L + l_rd, kPoison, n * slot);
  std::memset(L + l_old, kPoison, n * 8);
  for (std::size_t i = 0; i < r_rs + rs_len; ++i) R[i] = static_cast<std::uint8_t>(rng());
  p.want_remote.assign(R, R + r.remote.size());
  p.want_local.assign(L, L + r.local.size());
  p.want_old.assign(n, 0);
  for (std::size_t i = 0; i < n; ++i) {
    gpu_op op;
    const std::size_t dst = i * slot;
    switch (rng() % 5) {
      case 0: {
        op.kind = gpu_op_kind::write;
        op.bytes = 1 + static_cast<std::uint32_t>(rng() % slot);
        const std::size_t off = rng() % (slot - op.bytes + 1);
        op.raddr = r.remote.addr(dst + off);
        op.laddr = r.local.addr(l_src + i * slot);
        std::memcpy(&p.want_remote[dst + off], L + l_src + i * slot, op.bytes);
        break;
      }
      case 1: {
        op.kind = gpu_op_kind::write_inline;
        op.bytes = 1 + static_cast<std::uint32_t>(rng() % ib::kMaxInlineBytes);
        const std::size_t off = rng() % (slot - op.bytes + 1);
        op.raddr = r.remote.addr(dst + off);
        for (auto& b : op.inline_data) b = static_cast<std::uint8_t>(rng());
        std::memcpy(&p.want_remote[dst + off], op.inline_data, op.bytes);
        break;
      }
      case 2: {
        op.kind = gpu_op_kind::read;
        op.bytes = 1 + static_cast<std::uint32_t>(rng() % slot);
        const std::size_t from = r_rs + rng() % (rs_len - op.bytes + 1);
        op.raddr = r.remote.addr(from);
        op.laddr = r.local.addr(l_rd + i * slot);
        std::memcpy(&p.want_local[l_rd + i * slot], R + from, op.bytes);
        break;
      }
      case 3: {
        op.kind = gpu_op_kind::fetch_add;
        const std::size_t w = dst + 8 * (rng() % (slot / 8));
        op.raddr = r.remote.addr(w);
        op.laddr = r.local.addr(l_old + i * 8);
        op.operand = rng();
        std::uint64_t old;
        std::memcpy(&old, R + w, 8);
        const std::uint64_t now = old + op.operand;
        std::memcpy(&p.want_remote[w], &now, 8);
        std::memcpy(&p.want_local[l_old + i * 8], &old, 8);
        p.want_old[i] = old;
        break;
      }
      default: {
        op.kind = gpu_op_kind::compare_swap;
        const std::size_t w = dst + 8 * (rng() % (slot / 8));
        op.raddr = r.remote.addr(w);
        op.laddr = r.local.addr(l_old + i * 8);
        std::uint64_t old;
        std::memcpy(&old, R + w, 8);
        op.compare = (rng() & 1) != 0 ? old : old ^ (1ull << (rng() % 64));  // half of them refused
        op.operand = rng();
        const std::uint64_t now = op.compare == old ? op.operand : old;
        std::memcpy(&p.want_remote[w], &now, 8);
        std::memcpy(&p.want_local[l_old + i * 8], &old, 8);
        p.want_old[i] = old;
        break;
      }
    }
    p.ops.push_back(op);
  }
  return p;
}

// Compares whole regions; reports the first differing byte.
void check_bytes(const std::uint8_t* got, const std::vector<std::uint8_t>& want, const char* what) {
  const auto mm = std::mismatch(want.begin(), want.end(), got);
  const std::size_t at = static_cast<std::size_t>(mm.first - want.begin());
  CHECK_MESSAGE(at == want.size(), what << ": first difference at byte " << at);
}

void check_random_results(gpu_rig& r, const random_plan& p, const std::vector<gpu_op_result>& res) {
  REQUIRE(res.size() == p.ops.size());
  std::size_t bad_post = 0, bad_quiet = 0, bad_old = 0;
  for (std::size_t i = 0; i < res.size(); ++i) {
    bad_post += st(res[i].post) != status::ok;
    bad_quiet += st(res[i].quiet) != status::ok;
    const gpu_op_kind k = p.ops[i].kind;
    if (k == gpu_op_kind::fetch_add || k == gpu_op_kind::compare_swap) bad_old += res[i].fetched != p.want_old[i];
  }
  CHECK(bad_post == 0);
  CHECK(bad_quiet == 0);
  CHECK(bad_old == 0);  // the kernel's own read of each old value, after its quiet
  check_bytes(r.remote.get(), p.want_remote, "remote region");
  check_bytes(r.local.get(), p.want_local, "local region (reads, atomics' old values)");
}

// `ops` on a rig of shape c; ops ≥ 12 rings.
void random_ops_case(const rig_config& c, bool exclusive, std::uint32_t quiet_every, std::uint64_t seed) {
  gpu_rig r(c);
  const std::size_t n = std::max<std::size_t>(600, 12 * c.sq_size);
  const random_plan p = make_random_plan(r, n, seed);
  ops_launch l;
  l.exclusive = exclusive;
  l.rkey = r.rk.rkey;
  l.quiet_every = quiet_every;
  std::vector<gpu_op_result> res;
  REQUIRE(run_ops(r.qp, p.ops, l, res) == status::ok);
  check_random_results(r, p, res);
  check_settled(r, 10);
}

}  // namespace

TEST_CASE(
    "ibgda from kernels: random write / inline / read / fetch-add / compare-swap from one thread, ring wrapped > 10x") {
  struct shape {
    rig_config c;
    bool exclusive;
    std::uint32_t quiet_every;
  };
  std::vector<shape> shapes(4);
  shapes[0].c.sq_size = 16;  // batch 1, period 1: every post rings and is signalled
  shapes[0].exclusive = true;
  shapes[1].c.sq_size = 16;
  shapes[1].exclusive = false;
  shapes[1].quiet_every = 7;
  shapes[2].c.sq_size = 64;  // batched doorbells, a CQE every 4th WQE
  shapes[2].c.db_batch = 4;
  shapes[2].c.signal_period = 4;
  shapes[2].exclusive = false;
  shapes[3].c.sq_size = 32;
  shapes[3].c.db_batch = 2;
  shapes[3].c.signal_period = 8;
  shapes[3].c.nic.response_lag = 3;  // read / atomic results land 3 WQEs late: quiet must still cover them
  shapes[3].exclusive = true;
  shapes[3].quiet_every = 5;
  std::uint64_t seed = 1;
  for (const shape& s : shapes) {
    CAPTURE(s.c.sq_size);
    CAPTURE(s.c.db_batch);
    CAPTURE(s.c.signal_period);
    CAPTURE(s.exclusive);
    CAPTURE(s.quiet_every);
    random_ops_case(s.c, s.exclusive, s.quiet_every, seed++);
  }
}

TEST_CASE("ibgda from kernels: warps of many blocks share one QP, every op executed exactly once") {
  struct shape {
    std::uint32_t sq_size, db_batch, period, blocks, threads, ops_per_thread, quiet_every;
  };
  const shape shapes[] = {
      {256, 4, 4, 8, 128, 8, 0},   // 1024 posters, 8192 ops: 32 laps
      {64, 1, 1, 4, 64, 6, 3},     // 256 posters on a 64-slot ring, quiets among the posts
      {128, 16, 8, 16, 32, 4, 2},  // one warp per block
  };
  std::uint64_t seed = 100;
  for (const shape& s : shapes) {
    CAPTURE(s.sq_size);
    CAPTURE(s.blocks);
    CAPTURE(s.threads);
    rig_config c;
    c.sq_size = s.sq_size;
    c.db_batch = s.db_batch;
    c.signal_period = s.period;
    c.local_bytes = 4 << 20;
    c.remote_bytes = 4 << 20;
    gpu_rig r(c);
    const std::size_t n = std::size_t{s.blocks} * s.threads * s.ops_per_thread;
    std::mt19937_64 rng(seed++);
    // Remote: one 64-byte slot per op, then the shared counter. Local: sources, then old values.
    constexpr std::size_t kSlot = 64;
    const std::size_t counter = n * kSlot, l_src = 4096, l_old = l_src + n * kSlot;
    REQUIRE(counter + 8 <= r.remote.size());
    REQUIRE(l_old + 8 * n <= r.local.size());
    std::uint8_t* L = r.local.get();
    std::uint8_t* R = r.remote.get();
    for (std::size_t i = 0; i < n * kSlot; ++i) {
      L[l_src + i] = static_cast<std::uint8_t>(rng());
      R[i] = static_cast<std::uint8_t>(rng());
    }
    std::memset(L + l_old, kPoison, 8 * n);
    const std::uint64_t initial = rng() >> 8;
    std::memcpy(R + counter, &initial, 8);
    std::vector<std::uint8_t> want(R, R + counter);
    std::vector<gpu_op> ops(n);
    std::uint64_t sum = 0;
    for (std::size_t i = 0; i < n; ++i) {
      gpu_op& op = ops[i];
      switch (rng() % 3) {
        case 0:
          op.kind = gpu_op_kind::write;
          op.bytes = 1 + static_cast<std::uint32_t>(rng() % kSlot);
          op.raddr = r.remote.addr(i * kSlot);
          op.laddr = r.local.addr(l_src + i * kSlot);
          std::memcpy(&want[i * kSlot], L + l_src + i * kSlot, op.bytes);
          break;
        case 1:
          op.kind = gpu_op_kind::write_inline;
          op.bytes = 1 + static_cast<std::uint32_t>(rng() % ib::kMaxInlineBytes);
          op.raddr = r.remote.addr(i * kSlot + kSlot - op.bytes);
          for (auto& b : op.inline_data) b = static_cast<std::uint8_t>(rng());
          std::memcpy(&want[i * kSlot + kSlot - op.bytes], op.inline_data, op.bytes);
          break;
        default:
          op.kind = gpu_op_kind::fetch_add;
          op.raddr = r.remote.addr(counter);
          op.laddr = r.local.addr(l_old + 8 * i);
          op.operand = 1 + rng() % (1u << 20);
          sum += op.operand;
          break;
      }
    }
    ops_launch l;
    l.blocks = s.blocks;
    l.threads = s.threads;
    l.rkey = r.rk.rkey;
    l.quiet_every = s.quiet_every;
    l.timeout_ns = 20'000 * kMs;
    std::vector<gpu_op_result> res;
    REQUIRE(run_ops(r.qp, ops, l, res) == status::ok);

    std::size_t bad_post = 0, bad_quiet = 0;
    for (const gpu_op_result& x : res) {
      bad_post += st(x.post) != status::ok;
      bad_quiet += st(x.quiet) != status::ok;
    }
    CHECK(bad_post == 0);
    CHECK(bad_quiet == 0);
    check_bytes(R, want, "remote slots");
    std::uint64_t final_counter;
    std::memcpy(&final_counter, R + counter, 8);
    CHECK(final_counter == initial + sum);  // no fetch-add lost or repeated
    // The old values, in the order the NIC executed them, must chain: each is the previous plus its addend.
    std::vector<std::pair<std::uint64_t, std::uint64_t>> chain;  // (old, addend)
    std::size_t landed_mismatch = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (ops[i].kind != gpu_op_kind::fetch_add) continue;
      std::uint64_t landed;
      std::memcpy(&landed, L + l_old + 8 * i, 8);
      landed_mismatch += landed != res[i].fetched;
      chain.emplace_back(res[i].fetched, ops[i].operand);
    }
    CHECK(landed_mismatch == 0);
    std::sort(chain.begin(), chain.end());
    std::uint64_t expect = initial;
    std::size_t broken = 0;
    for (const auto& [old, add] : chain) {
      broken += old != expect;
      expect = old + add;
    }
    CHECK(broken == 0);
    check_settled(r, 10);
  }
}

TEST_CASE("ibgda from kernels: doorbell batching: WQEs wait for their doorbell, quiet rings the rest") {
  for (const std::uint32_t batch : {8u, 1u}) {
    CAPTURE(batch);
    rig_config c;
    c.sq_size = 64;
    c.db_batch = batch;
    c.signal_period = batch;
    gpu_rig r(c);
    constexpr std::uint32_t kN = 61;  // not a multiple of the batch: 5 WQEs are left waiting
    std::uint8_t* L = r.local.get();
    std::memset(r.remote.get(), kPoison, 8 * kN);
    std::vector<gpu_op> ops(kN);
    for (std::uint32_t i = 0; i < kN; ++i) {
      const std::uint64_t v = 0x5eed000000000000ull | (std::uint64_t{batch} << 32) | i;
      std::memcpy(L + 64 + 8 * i, &v, 8);
      ops[i].kind = gpu_op_kind::write;
      ops[i].bytes = 8;
      ops[i].raddr = r.remote.addr(8 * i);
      ops[i].laddr = r.local.addr(64 + 8 * i);
    }
    const std::uint64_t last = 0x5eed000000000000ull | (std::uint64_t{batch} << 32) | (kN - 1);
    std::uint64_t poison;
    std::memset(&poison, kPoison, 8);
    batch_result b;
    REQUIRE(run_batched(r.qp, ops, r.rk.rkey, 50 * kMs, b) == status::ok);
    CHECK(b.post_errors == 0);
    CHECK(st(b.quiet) == status::ok);
    CHECK(b.ready_before_quiet == kN);
    CHECK(b.rings == kN / batch);
    CHECK(b.rung_before_quiet == kN / batch * batch);
    if (batch > 1)
      CHECK(b.early_word == poison);  // published, not rung: the NIC must not have run it 50 ms later
    else
      CHECK(b.early_word == last);  // rung at once
    CHECK(b.late_word == last);
    for (std::uint32_t i = 0; i < kN; ++i) {
      std::uint64_t got;
      std::memcpy(&got, r.remote.get() + 8 * i, 8);
      CHECK(got == (0x5eed000000000000ull | (std::uint64_t{batch} << 32) | i));
    }
    // The model sees a doorbell as a change of the UAR word: at most one per ring (+ quiet's).
    CHECK(r.nic.doorbells(r.id) >= 1);
    CHECK(r.nic.doorbells(r.id) <= kN / batch + 1);
    check_settled(r, 0);
  }
}

TEST_CASE("ibgda from kernels: injected error CQEs become the syndrome's status in the kernel, and stay latched") {
  struct want {
    std::uint8_t syndrome;
    status s;
  };
  const want cases[] = {
      {static_cast<std::uint8_t>(m5::cqe_syndrome::remote_access), status::remote_access_error},
      {static_cast<std::uint8_t>(m5::cqe_syndrome::local_prot), status::invalid_argument},
      {static_cast<std::uint8_t>(m5::cqe_syndrome::transport_retry_exc), status::peer_unreachable},
      {static_cast<std::uint8_t>(m5::cqe_syndrome::remote_aborted), status::internal_error},
  };
  for (const want& w : cases) {
    for (const bool last : {true, false}) {
      CAPTURE(static_cast<int>(w.syndrome));
      CAPTURE(last);
      rig_config c;  // batch 1, period 1: the last WQE is signalled and rung, quiet adds no NOP
      gpu_rig r(c, /*start=*/false);
      constexpr std::uint32_t kN = 12;
      const std::uint32_t bad = last ? kN - 1 : 4;
      r.nic.inject_error(r.id, bad, w.syndrome);
      r.nic.start();
      std::vector<gpu_op> ops(kN);
      for (std::uint32_t i = 0; i < kN; ++i) {
        const std::uint64_t v = 0xabc0000000000000ull | i;
        std::memcpy(r.local.get() + 64 + 8 * i, &v, 8);
        ops[i].kind = gpu_op_kind::write;
        ops[i].bytes = 8;
        ops[i].raddr = r.remote.addr(8 * i);
        ops[i].laddr = r.local.addr(64 + 8 * i);
      }
      ops_launch l;
      l.exclusive = true;
      l.rkey = r.rk.rkey;
      l.timeout_ns = 2'000 * kMs;
      std::vector<gpu_op_result> res;
      REQUIRE(run_ops(r.qp, ops, l, res) == status::ok);
      // Posts before the NIC reaches the bad WQE are accepted; one that sees the latched error returns it.
      for (std::uint32_t i = 0; i < kN; ++i)
        CHECK((st(res[i].post) == status::ok || st(res[i].post) == w.s || st(res[i].post) == status::peer_unreachable));
      if (last) {
        CHECK(st(res[kN - 1].quiet) == w.s);
      } else {
        // Flush CQEs behind the failure can overwrite the collapsed CQ's single entry before a poll.
        CHECK((st(res[kN - 1].quiet) == w.s || st(res[kN - 1].quiet) == status::peer_unreachable));
      }
      CHECK(res[kN - 1].quiet_ns < 1'000 * kMs);
      for (std::uint32_t i = 0; i < kN; ++i) {
        std::uint64_t got;
        std::memcpy(&got, r.remote.get() + 8 * i, 8);
        CHECK(got == (i < bad ? (0xabc0000000000000ull | i) : 0));  // before the failure landed, after it not
      }
      const ib::qp_state s = r.state();
      CHECK(s.cq.error != 0);
      CHECK(s.cq.completed <= bad);
      // The error is latched: the next kernel's post gets it at once and posts nothing.
      const std::uint64_t head = s.head;
      REQUIRE(run_ops(r.qp, {ops[0]}, l, res) == status::ok);
      CHECK(st(res[0].post) == st(s.cq.error));
      CHECK(st(res[0].quiet) == st(s.cq.error));
      CHECK(r.state().head == head);
      CHECK(r.nic.error_cqes(r.id) >= 1);
      CHECK_MESSAGE(r.nic.violations() == 0, r.nic.first_violation());
    }
  }
}

TEST_CASE("ibgda from kernels: a bad remote or local address is the NIC's to refuse, and the kernel gets the status") {
  for (const bool remote_side : {true, false}) {
    CAPTURE(remote_side);
    rig_config c;
    gpu_rig r(c);
    gpu_op ok_op;
    ok_op.kind = gpu_op_kind::write;
    ok_op.bytes = 8;
    ok_op.raddr = r.remote.addr(0);
    ok_op.laddr = r.local.addr(64);
    gpu_op bad = ok_op;
    if (remote_side)
      bad.raddr = r.remote.addr(r.remote.size() - 4);  // crosses the end of the remote region
    else
      bad.laddr = r.local.addr(r.local.size() - 4);
    ops_launch l;
    l.exclusive = true;
    l.rkey = r.rk.rkey;
    l.timeout_ns = 2'000 * kMs;
    std::vector<gpu_op_result> res;
    REQUIRE(run_ops(r.qp, {ok_op, ok_op, bad}, l, res) == status::ok);
    CHECK(st(res[2].post) == status::ok);
    CHECK(st(res[2].quiet) == (remote_side ? status::remote_access_error : status::invalid_argument));
    CHECK_MESSAGE(r.nic.violations() == 0, r.nic.first_violation());
  }
}

TEST_CASE("ibgda from kernels: many posters on a QP that fails: everyone gets a status, nobody hangs") {
  rig_config c;
  c.sq_size = 64;
  c.db_batch = 4;
  c.signal_period = 4;
  gpu_rig r(c, /*start=*/false);
  r.nic.inject_error(r.id, 50, static_cast<std::uint8_t>(m5::cqe_syndrome::remote_access));
  r.nic.start();
  constexpr std::uint32_t kBlocks = 4, kThreads = 64, kPer = 4;
  std::vector<gpu_op> ops(kBlocks * kThreads * kPer);
  for (std::size_t i = 0; i < ops.size(); ++i) {
    ops[i].kind = gpu_op_kind::write;
    ops[i].bytes = 8;
    ops[i].raddr = r.remote.addr(8 * i);
    ops[i].laddr = r.local.addr(64 + 8 * i);
  }
  ops_launch l;
  l.blocks = kBlocks;
  l.threads = kThreads;
  l.rkey = r.rk.rkey;
  l.timeout_ns = 5'000 * kMs;
  std::vector<gpu_op_result> res;
  REQUIRE(run_ops(r.qp, ops, l, res) == status::ok);
  std::size_t unexpected = 0, errors = 0;
  auto allowed = [](status s) {
    return s == status::ok || s == status::remote_access_error || s == status::peer_unreachable;
  };
  for (const gpu_op_result& x : res) {
    unexpected += !allowed(st(x.post)) || !allowed(st(x.quiet));
    errors += st(x.quiet) != status::ok;
  }
  CHECK(unexpected == 0);  // in particular, no timeout
  CHECK(errors > 0);
  const ib::qp_state s = r.state();
  CHECK((st(s.cq.error) == status::remote_access_error || st(s.cq.error) == status::peer_unreachable));
  CHECK_MESSAGE(r.nic.violations() == 0, r.nic.first_violation());
}

TEST_CASE(
    "ibgda from kernels: a dead peer gives peer_unreachable within the deadline, a stalled NIC gives timeout at it") {
  SUBCASE("dead peer, one poster and many") {
    for (const bool many : {false, true}) {
      CAPTURE(many);
      rig_config c;
      c.sq_size = 64;
      c.nic.retry_timeout_ns = 2 * kMs;
      gpu_rig r(c, /*start=*/false);
      r.nic.kill_peer(r.id);
      r.nic.start();
      const std::size_t n = many ? 2 * 64 * 4 : 8;
      std::vector<gpu_op> ops(n);
      for (std::size_t i = 0; i < n; ++i) {
        ops[i].kind = gpu_op_kind::write;
        ops[i].bytes = 8;
        ops[i].raddr = r.remote.addr(8 * i);
        ops[i].laddr = r.local.addr(64 + 8 * i);
      }
      ops_launch l;
      l.exclusive = !many;
      l.blocks = many ? 2 : 1;
      l.threads = many ? 64 : 1;
      l.rkey = r.rk.rkey;
      l.timeout_ns = 5'000 * kMs;
      std::vector<gpu_op_result> res;
      const auto t0 = std::chrono::steady_clock::now();
      REQUIRE(run_ops(r.qp, ops, l, res) == status::ok);
      CHECK((std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2)));
      std::size_t bad = 0, quiets = 0;
      std::uint64_t slowest = 0;
      for (const gpu_op_result& x : res) {
        bad += st(x.post) != status::ok && st(x.post) != status::peer_unreachable;
        if (x.quiet != ~0u) {
          ++quiets;
          bad += st(x.quiet) != status::peer_unreachable;
          slowest = std::max(slowest, x.quiet_ns);
        }
      }
      CHECK(bad == 0);
      CHECK(quiets == n);
      CHECK(slowest < 1'000 * kMs);  // nominal: the model's 2 ms retry time
      CHECK(st(r.state().cq.error) == status::peer_unreachable);
    }
  }
  SUBCASE("stalled NIC: quiet and a full ring time out at their deadlines, and the QP recovers") {
    rig_config c;  // 16 slots, batch 1
    gpu_rig r(c);
    r.nic.pause(true);
    constexpr std::uint32_t kN = 19;
    std::vector<gpu_op> ops(kN);
    for (std::uint32_t i = 0; i < kN; ++i) {
      const std::uint64_t v = 0x77000000u + i;
      std::memcpy(r.local.get() + 64 + 8 * i, &v, 8);
      ops[i].kind = gpu_op_kind::write;
      ops[i].bytes = 8;
      ops[i].raddr = r.remote.addr(8 * i);
      ops[i].laddr = r.local.addr(64 + 8 * i);
    }
    ops_launch l;
    l.exclusive = true;
    l.rkey = r.rk.rkey;
    l.timeout_ns = 30 * kMs;
    std::vector<gpu_op_result> res;
    REQUIRE(run_ops(r.qp, ops, l, res) == status::ok);
    for (std::uint32_t i = 0; i < kN; ++i) CHECK(st(res[i].post) == (i < c.sq_size ? status::ok : status::timeout));
    CHECK(st(res[kN - 1].quiet) == status::timeout);
    CHECK(res[kN - 1].quiet_ns >= 30 * kMs);
    CHECK(res[kN - 1].quiet_ns < 300 * kMs);
    const ib::qp_state s = r.state();
    CHECK(s.head == c.sq_size);  // the refused posts reserved nothing
    CHECK(s.cq.error == 0);      // a timeout is not latched: the QP is fine once the NIC moves
    r.nic.pause(false);
    gpu_op more = ops[c.sq_size];
    l.timeout_ns = 5'000 * kMs;
    REQUIRE(run_ops(r.qp, {more}, l, res) == status::ok);
    CHECK(st(res[0].post) == status::ok);
    CHECK(st(res[0].quiet) == status::ok);
    for (std::uint32_t i = 0; i < kN; ++i) {
      std::uint64_t got;
      std::memcpy(&got, r.remote.get() + 8 * i, 8);
      CHECK(got == (i <= c.sq_size ? 0x77000000u + i : 0));
    }
    check_settled(r, 1);
  }
}

int main(int argc, char** argv) {
  return eaas::test::run_tests(
      argc, argv, [] { return cuda_device_count() == 0 ? "no CUDA device: skipping the ibgda GPU tests" : nullptr; });
}
