// The op vocabulary (eaas/device/ops.hpp) on an ibgda endpoint, end to end without a NIC: the QP is
// brought up by the host side (lib/transport/ibgda) through the fake rdma-core / CUDA tables, whose
// "GPU memory" and "UAR page" are host memory; data regions are registered through the fake into
// the software NIC model's key table; the model then serves the QP the host side built. Ops are
// issued through eaas::put / get / signal / ... from host threads, as kernels would issue them.

#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "eaas/device/ops.hpp"
#include "eaas/host/error.hpp"
#include "fake_verbs.hpp"
#include "soft_nic.hpp"
#include "transport/ibgda/host.hpp"

using eaas::status;
namespace ib = eaas::detail::ibgda;

namespace {

constexpr std::uint64_t kPeer = 0x7ee7;

struct e2e {
  explicit e2e(std::uint32_t sq_size = 64, std::uint32_t db_batch = 1, std::uint32_t period = 1,
               eaas::test::soft_nic_options mo = {})
      : model(mo) {
    v.on_reg_mr = [this](void* a, std::size_t n) {
      const auto k = model.register_memory(a, n);
      return ib::mr_keys{k.lkey, k.rkey};
    };
    REQUIRE(ib::nic::open(v, g, {}, nic) == status::ok);
    ib::qp_options o;
    o.sq_size = sq_size;
    o.db_batch = db_batch;
    o.signal_period = period;
    REQUIRE(ib::rc_qp::create(*nic, o, qp) == status::ok);
    ib::peer_qp p;
    p.mtu = 5;
    p.lid = 7;
    p.qpn = 0x42;
    REQUIRE(qp->connect(p) == status::ok);
    local.assign(1 << 16, 0);
    remote.assign(1 << 16, 0);
    REQUIRE(ib::data_region::create(*nic, local.data(), local.size(), false, lmr) == status::ok);
    REQUIRE(ib::data_region::create(*nic, remote.data(), remote.size(), false, rmr) == status::ok);
    ib::qp_config c = qp->device_config();
    c.lkey = lmr->lkey();
    c.scratch_laddr = reinterpret_cast<std::uint64_t>(local.data());  // word 0: discarded atomic results
    REQUIRE(ib::make_qp_state(c, &es.qp) == status::ok);
    es.op_timeout_ns = 2'000'000'000;
    model.attach(es.qp);
    model.start();

    ep = eaas::device_endpoint{};
    ep.magic = eaas::kEndpointViewMagic;
    ep.transport = eaas::transport_kind::ibgda;
    ep.state = &state;
    ep.abort = &abort_flag;
    ep.transport_state = &es;
    ep.peer_id = kPeer;
    rv = eaas::remote_view{};
    rv.magic = eaas::kRemoteViewMagic;
    rv.transport = eaas::transport_kind::ibgda;
    rv.addr = reinterpret_cast<std::uint64_t>(remote.data());
    rv.size = remote.size();
    rv.owner_id = kPeer;
    rv.rkey = rmr->rkey();
  }
  ~e2e() { model.stop(); }

  eaas::test::fake_verbs v;
  eaas::test::fake_gpu g;
  eaas::test::soft_nic model;
  std::unique_ptr<ib::nic> nic;
  std::unique_ptr<ib::rc_qp> qp;
  std::vector<std::uint8_t> local, remote;
  std::unique_ptr<ib::data_region> lmr, rmr;
  alignas(64) ib::endpoint_state es{};
  std::uint32_t state = 0, abort_flag = 0;
  eaas::device_endpoint ep{};
  eaas::remote_view rv{};
};

}  // namespace

TEST_CASE("ibgda endpoint: every op of the vocabulary through a host-side-built QP and the NIC model") {
  eaas::test::soft_nic_options mo;
  mo.response_lag = 3;  // READ / atomic results land three WQEs late unless a fence waits for them
  e2e t(64, 1, 1, mo);
  const eaas::coop_thread th{};
  std::mt19937_64 rng(5);
  for (std::size_t i = 0; i < 4096; ++i) t.local[1024 + i] = static_cast<std::uint8_t>(rng());

  // put, then quiet: the bytes are there.
  REQUIRE(eaas::put(th, t.ep, t.rv, 100, t.local.data() + 1024, 3000) == status::ok);
  REQUIRE(eaas::quiet(th, t.ep) == status::ok);
  CHECK(std::memcmp(t.remote.data() + 100, t.local.data() + 1024, 3000) == 0);

  // get back into another place of the local region.
  REQUIRE(eaas::get(th, t.ep, t.rv, 100, t.local.data() + 8192, 3000) == status::ok);
  REQUIRE(eaas::quiet(th, t.ep) == status::ok);
  CHECK(std::memcmp(t.local.data() + 8192, t.local.data() + 1024, 3000) == 0);

  // signal set and add, fetch_add, compare_swap on remote words.
  auto rword = [&](std::size_t off) {
    std::uint64_t w;
    std::memcpy(&w, t.remote.data() + off, 8);
    return w;
  };
  REQUIRE(eaas::signal(th, t.ep, t.rv, 4096, 41, eaas::signal_op::set) == status::ok);
  REQUIRE(eaas::signal(th, t.ep, t.rv, 4096, 1, eaas::signal_op::add) == status::ok);
  auto* fetched = reinterpret_cast<std::uint64_t*>(t.local.data() + 16384);
  REQUIRE(eaas::fetch_add(th, t.ep, t.rv, 4096, 8, fetched) == status::ok);
  REQUIRE(eaas::quiet(th, t.ep) == status::ok);
  CHECK(rword(4096) == 50);
  CHECK(*fetched == 42);
  REQUIRE(eaas::compare_swap(th, t.ep, t.rv, 4096, 49, 7, fetched) == status::ok);  // no swap
  REQUIRE(eaas::quiet(th, t.ep) == status::ok);
  CHECK(rword(4096) == 50);
  CHECK(*fetched == 50);
  REQUIRE(eaas::compare_swap(th, t.ep, t.rv, 4096, 50, 7, fetched) == status::ok);
  REQUIRE(eaas::quiet(th, t.ep) == status::ok);
  CHECK(rword(4096) == 7);

  // put_signal: payload and signal in one go; fence then a write of what a get fetched.
  REQUIRE(eaas::put_signal(th, t.ep, t.rv, 8192, t.local.data() + 2048, 512, t.rv, 4104, 99, eaas::signal_op::set) ==
          status::ok);
  REQUIRE(eaas::quiet(th, t.ep) == status::ok);
  CHECK(std::memcmp(t.remote.data() + 8192, t.local.data() + 2048, 512) == 0);
  CHECK(rword(4104) == 99);
  // The model lands outstanding responses when it runs idle, so it is paused while the three are
  // posted: it then sees them together, and only the fence keeps the WRITE from sending stale bytes.
  t.model.pause(true);
  REQUIRE(eaas::get(th, t.ep, t.rv, 8192, t.local.data() + 20000, 512) == status::ok);
  REQUIRE(eaas::fence(th, t.ep) == status::ok);
  REQUIRE(eaas::put(th, t.ep, t.rv, 30000, t.local.data() + 20000, 512) == status::ok);
  t.model.pause(false);
  REQUIRE(eaas::quiet(th, t.ep) == status::ok);
  CHECK(std::memcmp(t.remote.data() + 30000, t.local.data() + 2048, 512) == 0);
  CHECK(t.model.fenced_waits(0) >= 1);  // the fenced NOP made the NIC wait for the READ's response
  CHECK(t.model.violations() == 0);

  // Refusals before anything is posted.
  const std::uint64_t head = t.es.qp.head;
  CHECK(eaas::put(th, t.ep, t.rv, t.rv.size - 10, t.local.data(), 11) == status::invalid_argument);
  CHECK(eaas::signal(th, t.ep, t.rv, 3, 1, eaas::signal_op::set) == status::invalid_argument);  // misaligned
  auto wrong_owner = t.rv;
  wrong_owner.owner_id = 1;
  CHECK(eaas::put(th, t.ep, wrong_owner, 0, t.local.data(), 8) == status::invalid_argument);
  CHECK(eaas::put(eaas::coop_warp{}, t.ep, t.rv, 0, t.local.data(), 8) == status::unsupported);  // host: thread only
  auto no_state = t.ep;
  no_state.transport_state = nullptr;
  CHECK(eaas::put(th, no_state, t.rv, 0, t.local.data(), 8) == status::invalid_argument);
  CHECK(t.es.qp.head == head);

  // A source outside the registered local region: the NIC refuses it (local protection).
  std::vector<std::uint8_t> stray(64, 1);
  REQUIRE(eaas::put(th, t.ep, t.rv, 0, stray.data(), 64) == status::ok);
  CHECK(eaas::quiet(th, t.ep) == status::invalid_argument);
  CHECK(eaas::put(th, t.ep, t.rv, 0, t.local.data(), 8) == status::invalid_argument);  // the QP stays failed
}

TEST_CASE("ibgda endpoint: endpoint state and random ops against a shadow, with batching and wrap-around") {
  for (auto [sq, batch, period] : {std::tuple{16u, 1u, 1u}, std::tuple{64u, 4u, 4u}, std::tuple{8u, 2u, 2u}}) {
    CAPTURE(sq);
    e2e t(sq, batch, period);
    const eaas::coop_thread th{};
    std::mt19937_64 rng(sq);
    for (std::size_t i = 0; i < 8192; ++i) t.local[8192 + i] = static_cast<std::uint8_t>(rng());
    std::vector<std::uint8_t> shadow(t.remote);
    for (int round = 0; round < 30; ++round) {
      for (int k = 0; k < 40; ++k) {
        const std::size_t src = 8192 + rng() % 4096, dst = rng() % 32768, n = 1 + rng() % 2048;
        if (rng() % 4 == 0) {
          const std::size_t w = 40000 + 8 * (rng() % 64);
          const std::uint64_t val = rng();
          REQUIRE(eaas::put_signal(th, t.ep, t.rv, dst, t.local.data() + src, n, t.rv, w, val, eaas::signal_op::set) ==
                  status::ok);
          std::memcpy(shadow.data() + w, &val, 8);
        } else {
          REQUIRE(eaas::put(th, t.ep, t.rv, dst, t.local.data() + src, n) == status::ok);
        }
        std::memcpy(shadow.data() + dst, t.local.data() + src, n);
      }
      REQUIRE(eaas::quiet(th, t.ep) == status::ok);
      REQUIRE(t.remote == shadow);
    }
    CHECK(t.es.qp.head > 10 * sq);  // the ring wrapped more than ten times
    CHECK(t.model.violations() == 0);
    // The endpoint's state word is honoured: closed → not_connected, peer dead → peer_unreachable.
    t.state = static_cast<std::uint32_t>(eaas::endpoint_state::closed);
    CHECK(eaas::put(th, t.ep, t.rv, 0, t.local.data(), 8) == status::not_connected);
    CHECK(eaas::quiet(th, t.ep) == status::not_connected);
    t.state = static_cast<std::uint32_t>(eaas::endpoint_state::peer_dead);
    CHECK(eaas::quiet(th, t.ep) == status::peer_unreachable);
  }
}

TEST_CASE("ibgda endpoint: a dead peer surfaces as peer_unreachable from quiet") {
  e2e t;
  const eaas::coop_thread th{};
  REQUIRE(eaas::put(th, t.ep, t.rv, 0, t.local.data(), 64) == status::ok);
  REQUIRE(eaas::quiet(th, t.ep) == status::ok);
  t.model.kill_peer(0);
  REQUIRE(eaas::put(th, t.ep, t.rv, 0, t.local.data(), 64) == status::ok);
  CHECK(eaas::quiet(th, t.ep) == status::peer_unreachable);
}
