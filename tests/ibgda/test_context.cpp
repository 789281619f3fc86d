// context::connect over ibgda, through the public API: contexts in one process pose as contexts on
// different hosts (their host ids are set through ibgda::create_context), each with its own fake
// rdma-core / CUDA tables; every data registration lands in one software NIC model, which then
// serves the QPs the contexts paired. Ops go through eaas::put / get / ... on the endpoints' views.

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "eaas/device/ops.hpp"
#include "eaas/host/context.hpp"
#include "eaas/host/directory.hpp"
#include "eaas/host/error.hpp"
#include "eaas/host/registry.hpp"
#include "fake_verbs.hpp"
#include "handle.hpp"
#include "soft_nic.hpp"
#include "transport/ibgda/prm.hpp"
#include "transport/ibgda/station.hpp"
#include "transport/ibgda/wire.hpp"

using eaas::status;
namespace ib = eaas::detail::ibgda;
namespace prm = eaas::detail::ibgda::prm;

namespace {

std::string why() { return std::string(eaas::last_error()); }

// One "host": its fakes and its context.
struct host {
  host(eaas::test::soft_nic& model, std::uint64_t host_id, std::uint32_t pool = 2, std::uint32_t max_peers = 8,
       std::uint64_t close_notice_ns = 100'000'000) {
    v.on_reg_mr = [&model](void* a, std::size_t n) {
      const auto k = model.register_memory(a, n);
      return ib::mr_keys{k.lkey, k.rkey};
    };
    v.on_dereg_mr = [&model](const ib::mr_keys& k) { model.unregister_memory(k.rkey); };
    eaas::context_options o;
    o.name = "host" + std::to_string(host_id);
    o.enable_shm = false;
    o.ibgda_heap_bytes = 1 << 20;
    o.ibgda_qp_pool = pool;
    o.ibgda_max_peers = max_peers;
    ib::context_setup s;
    s.verbs = &v;
    s.gpu = &g;
    s.host_id = host_id;
    s.station.qp.sq_size = 64;
    s.station.op_timeout_ns = 2'000'000'000;
    s.station.close_notice_ns = close_notice_ns;
    REQUIRE(ib::create_context(o, s, ctx) == status::ok);
  }
  eaas::handle_bytes handle() const {
    eaas::handle_bytes h;
    REQUIRE(ctx->connection_handle(h) == status::ok);
    return h;
  }
  std::unique_ptr<eaas::memory_region> alloc(std::size_t n) {
    std::unique_ptr<eaas::memory_region> r;
    REQUIRE(ctx->allocate(n, eaas::memory_kind::network, r) == status::ok);
    return r;
  }
  eaas::test::fake_verbs v;
  eaas::test::fake_gpu g;
  std::unique_ptr<eaas::context> ctx;
};

const eaas::detail::ibgda::qp_state& qp_of(const eaas::endpoint& ep) {
  return static_cast<const ib::endpoint_state*>(ep.view().transport_state)->qp;
}

std::unique_ptr<eaas::remote_region> import(eaas::endpoint& ep, const eaas::memory_region& r) {
  eaas::handle_bytes h;
  REQUIRE(r.export_handle(h) == status::ok);
  std::unique_ptr<eaas::remote_region> out;
  REQUIRE(ep.import_region(h, out) == status::ok);
  return out;
}

// B dials A's handle, A accepts B's reply: both endpoints.
void pair(host& a, host& b, std::unique_ptr<eaas::endpoint>& at_a, std::unique_ptr<eaas::endpoint>& at_b) {
  eaas::handle_bytes reply;
  REQUIRE(b.ctx->connect(a.handle(), at_b, reply) == status::ok);
  REQUIRE(!reply.empty());
  REQUIRE(a.ctx->connect(reply, at_a) == status::ok);
}

// INIT2RTR of the QP `qpn` on host `h`: (remote QPN, next receive PSN); RTR2RTS: next send PSN.
struct qp_wiring {
  std::uint64_t remote_qpn = 0, rcv_psn = 0, snd_psn = 0;
};
qp_wiring wiring(const host& h, std::uint32_t qpn) {
  qp_wiring w;
  for (const auto& c : h.v.calls_named("devx_modify")) {
    if (prm::get(c.in, prm::modify_qp_in::qpn) != qpn) continue;
    if (c.opcode == prm::kInit2RtrQp) {
      w.remote_qpn = prm::get(c.in, prm::at(prm::modify_qp_in::kQpc, prm::qpc::remote_qpn));
      w.rcv_psn = prm::get(c.in, prm::at(prm::modify_qp_in::kQpc, prm::qpc::next_rcv_psn));
    } else if (c.opcode == prm::kRtr2RtsQp) {
      w.snd_psn = prm::get(c.in, prm::at(prm::modify_qp_in::kQpc, prm::qpc::next_send_psn));
    }
  }
  return w;
}

std::uint64_t word(const eaas::memory_region& r, std::size_t off) {
  std::uint64_t w;
  std::memcpy(&w, static_cast<const char*>(r.data()) + off, 8);
  return w;
}

// Random puts / put_signals from `src` (local, network memory) into `dst` through `ep`, checked
// against a shadow after every quiet.
void traffic(eaas::endpoint& ep, eaas::memory_region& src, const eaas::remote_region& dst,
             const eaas::memory_region& dst_mem, std::uint64_t seed) {
  const eaas::coop_thread th{};
  std::mt19937_64 rng(seed);
  auto* s = static_cast<std::uint8_t*>(src.data());
  for (std::size_t i = 0; i < src.size(); ++i) s[i] = static_cast<std::uint8_t>(rng());
  std::vector<std::uint8_t> shadow(static_cast<const std::uint8_t*>(dst_mem.data()),
                                   static_cast<const std::uint8_t*>(dst_mem.data()) + dst_mem.size());
  const auto v = ep.view();
  const auto rv = dst.view();
  for (int round = 0; round < 8; ++round) {
    for (int k = 0; k < 30; ++k) {
      const std::size_t from = rng() % (src.size() / 2), to = rng() % (dst_mem.size() / 2),
                        n = 1 + rng() % (src.size() / 4);
      if (rng() % 3 == 0) {
        const std::size_t w = dst_mem.size() - 8 * (1 + rng() % 64);
        const std::uint64_t val = rng();
        REQUIRE(eaas::put_signal(th, v, rv, to, s + from, n, rv, w, val, eaas::signal_op::set) == status::ok);
        std::memcpy(shadow.data() + to, s + from, n);
        std::memcpy(shadow.data() + w, &val, 8);
      } else {
        REQUIRE(eaas::put(th, v, rv, to, s + from, n) == status::ok);
        std::memcpy(shadow.data() + to, s + from, n);
      }
    }
    REQUIRE(eaas::quiet(th, v) == status::ok);
    REQUIRE(std::memcmp(dst_mem.data(), shadow.data(), shadow.size()) == 0);
  }
}

constexpr std::uint64_t kHostA = 0xa0a0, kHostB = 0xb0b0, kHostC = 0xc0c0;

}  // namespace

TEST_CASE("ibgda context: connect, import and every op end to end through the public API") {
  eaas::test::soft_nic_options mo;
  mo.response_lag = 2;
  eaas::test::soft_nic model(mo);
  host a(model, kHostA), b(model, kHostB);
  auto ra = a.alloc(64 << 10), la = a.alloc(32 << 10);
  auto rb = b.alloc(64 << 10), lb = b.alloc(32 << 10);
  CHECK(ra->transport() == eaas::transport_kind::ibgda);
  CHECK(word(*ra, 0) == 0);

  std::unique_ptr<eaas::endpoint> at_a, at_b;
  pair(a, b, at_a, at_b);
  CHECK(at_b->transport() == eaas::transport_kind::ibgda);
  CHECK(at_a->transport() == eaas::transport_kind::ibgda);
  CHECK(at_b->peer_id() == a.ctx->id());
  CHECK(at_a->peer_id() == b.ctx->id());
  CHECK(at_a->state() == eaas::endpoint_state::connected);
  // The two QPs are paired with each other: each one's INIT2RTR names the other's QPN and expects
  // the PSN the other sends from.
  const std::uint32_t qa = qp_of(*at_a).qpn, qb = qp_of(*at_b).qpn;
  const auto wa = wiring(a, qa), wb = wiring(b, qb);
  CHECK(wa.remote_qpn == qb);
  CHECK(wb.remote_qpn == qa);
  CHECK(wa.rcv_psn == wb.snd_psn);
  CHECK(wb.rcv_psn == wa.snd_psn);
  CHECK(wa.snd_psn != 0);

  model.attach(qp_of(*at_a));
  model.attach(qp_of(*at_b));
  model.start();
  auto ra_at_b = import(*at_b, *ra);
  auto rb_at_a = import(*at_a, *rb);
  CHECK(ra_at_b->view().rkey != 0);
  CHECK(ra_at_b->size() == ra->size());

  const eaas::coop_thread th{};
  const auto vb = at_b->view();
  const auto rva = ra_at_b->view();
  auto* src = static_cast<std::uint8_t*>(lb->data());
  std::mt19937_64 rng(11);
  for (std::size_t i = 0; i < lb->size(); ++i) src[i] = static_cast<std::uint8_t>(rng());

  // B → A: put, get back, signals, fetch_add, compare_swap, put_signal.
  REQUIRE(eaas::put(th, vb, rva, 96, src + 5, 5000) == status::ok);
  REQUIRE(eaas::quiet(th, vb) == status::ok);
  CHECK(std::memcmp(static_cast<char*>(ra->data()) + 96, src + 5, 5000) == 0);
  REQUIRE(eaas::get(th, vb, rva, 96, src + 16384, 5000) == status::ok);
  REQUIRE(eaas::quiet(th, vb) == status::ok);
  CHECK(std::memcmp(src + 16384, src + 5, 5000) == 0);
  REQUIRE(eaas::signal(th, vb, rva, 8192, 40, eaas::signal_op::set) == status::ok);
  REQUIRE(eaas::signal(th, vb, rva, 8192, 2, eaas::signal_op::add) == status::ok);
  auto* fetched = reinterpret_cast<std::uint64_t*>(src + 30000);
  REQUIRE(eaas::fetch_add(th, vb, rva, 8192, 100, fetched) == status::ok);
  REQUIRE(eaas::quiet(th, vb) == status::ok);
  CHECK(*fetched == 42);
  CHECK(word(*ra, 8192) == 142);
  REQUIRE(eaas::compare_swap(th, vb, rva, 8192, 141, 5, fetched) == status::ok);  // no swap
  REQUIRE(eaas::quiet(th, vb) == status::ok);
  CHECK(*fetched == 142);
  CHECK(word(*ra, 8192) == 142);
  REQUIRE(eaas::compare_swap(th, vb, rva, 8192, 142, 5, fetched) == status::ok);
  REQUIRE(eaas::quiet(th, vb) == status::ok);
  CHECK(word(*ra, 8192) == 5);
  REQUIRE(eaas::put_signal(th, vb, rva, 20000, src + 100, 777, rva, 8200, 9, eaas::signal_op::set) == status::ok);
  REQUIRE(eaas::quiet(th, vb) == status::ok);
  CHECK(std::memcmp(static_cast<char*>(ra->data()) + 20000, src + 100, 777) == 0);
  CHECK(word(*ra, 8200) == 9);

  // Random traffic both ways, every byte of the destination checked.
  traffic(*at_b, *lb, *ra_at_b, *ra, 1);
  traffic(*at_a, *la, *rb_at_a, *rb, 2);

  // A source outside the context's network memory is refused by the NIC (the heap's lkey).
  std::vector<std::uint8_t> stray(64, 1);
  REQUIRE(eaas::put(th, vb, rva, 0, stray.data(), 64) == status::ok);
  CHECK(eaas::quiet(th, vb) == status::invalid_argument);
  CHECK(model.violations() == 0);
  model.stop();
}

TEST_CASE("ibgda context: refusals — plain connect, exhausted pool, stale and misaddressed replies, other hosts") {
  eaas::test::soft_nic model;
  host a(model, kHostA, 1, 1), b(model, kHostB), c(model, kHostC);
  const auto ha = a.handle();

  // The plain connect cannot hand back the reply: refused, nothing made.
  std::unique_ptr<eaas::endpoint> ep;
  const auto live_b = b.v.live.size();
  CHECK(b.ctx->connect(ha, ep) == status::invalid_argument);
  CHECK(why().find("reply") != std::string::npos);
  CHECK(ep == nullptr);
  CHECK(b.v.live.size() == live_b);

  // B dials; C dials the same (only) advertised QP; A accepts B, so C's reply names a QP that is gone.
  std::unique_ptr<eaas::endpoint> at_b, at_c, at_a, at_a2;
  eaas::handle_bytes reply_b, reply_c;
  REQUIRE(b.ctx->connect(ha, at_b, reply_b) == status::ok);
  REQUIRE(c.ctx->connect(ha, at_c, reply_c) == status::ok);
  // A reply handed to the wrong context.
  CHECK(c.ctx->connect(reply_b, at_a) == status::invalid_handle);
  CHECK(why().find("addressed to") != std::string::npos);
  REQUIRE(a.ctx->connect(reply_b, at_a) == status::ok);
  CHECK(a.ctx->connect(reply_c, at_a2) == status::not_found);
  CHECK(why().find("not waiting in this context's pool") != std::string::npos);
  CHECK(at_a2 == nullptr);

  // A accepts one peer at most: its handle now advertises no QP, and a dial is refused.
  const auto ha_full = a.handle();
  std::unique_ptr<eaas::endpoint> at_c2;
  eaas::handle_bytes reply;
  CHECK(c.ctx->connect(ha_full, at_c2, reply) == status::no_resource);
  CHECK(why().find("pool is exhausted") != std::string::npos);
  CHECK(reply.empty());

  // Every single-bit flip of a connection handle and of a reply is refused before anything is made.
  const auto live_a = a.v.live.size();
  for (const eaas::handle_bytes* h : {&ha, static_cast<const eaas::handle_bytes*>(&reply_b)}) {
    for (std::size_t i = 0; i < h->size() * 8; ++i) {
      auto bad = *h;
      bad[i / 8] ^= std::byte{static_cast<unsigned char>(1u << (i % 8))};
      std::unique_ptr<eaas::endpoint> e;
      eaas::handle_bytes r;
      const status s = h == &ha ? c.ctx->connect(bad, e, r) : a.ctx->connect(bad, e);
      REQUIRE(s == status::invalid_handle);
      REQUIRE(e == nullptr);
    }
    for (std::size_t n = 0; n < h->size(); ++n) {
      std::unique_ptr<eaas::endpoint> e;
      eaas::handle_bytes r;
      REQUIRE(c.ctx->connect(std::span(*h).first(n), e, r) == status::invalid_handle);
    }
  }
  CHECK(a.v.live.size() == live_a);

  // A connection handle whose ibgda section describes another context or host.
  {
    ib::conn_desc fake;
    REQUIRE(ib::decode(reply_b, fake) == status::ok);  // a well-formed port description of B
    fake.target_id = 0;
    fake.target_qpn = 0;
    fake.host_id = kHostC;  // the section says host C, the identity says host B
    eaas::handle_bytes sec;
    REQUIRE(ib::encode(fake, sec) == status::ok);
    eaas::detail::handle_writer w;
    w.u64(b.ctx->id());
    w.u64(kHostB);
    w.u32(1234);
    w.u32(0);
    w.u64(1);
    w.u8(1);
    w.u8(static_cast<std::uint8_t>(eaas::transport_kind::ibgda));
    w.u16(static_cast<std::uint16_t>(sec.size()));
    w.raw(sec);
    const auto h = w.finish(eaas::handle_kind::connection, eaas::transport_kind::none);
    std::unique_ptr<eaas::endpoint> e;
    eaas::handle_bytes r;
    CHECK(c.ctx->connect(h, e, r) == status::invalid_handle);
    CHECK(why().find("describes context") != std::string::npos);
  }
  // A reply that claims to come from A's own host.
  {
    ib::conn_desc r;
    REQUIRE(ib::decode(reply_c, r) == status::ok);
    r.host_id = kHostA;
    eaas::handle_bytes h;
    REQUIRE(ib::encode(r, h) == status::ok);
    std::unique_ptr<eaas::endpoint> e;
    CHECK(a.ctx->connect(h, e) == status::invalid_handle);
    CHECK(why().find("on this host") != std::string::npos);
  }
  // Close-notice words: a reply without one, and an advertisement without one (a peer_set-style
  // description), are refused before anything is made.
  {
    ib::conn_desc r;
    REQUIRE(ib::decode(reply_c, r) == status::ok);
    REQUIRE(r.qps[0].notice.present());
    r.qps[0].notice = {};
    eaas::handle_bytes h;
    REQUIRE(ib::encode(r, h) == status::ok);
    std::unique_ptr<eaas::endpoint> e;
    const auto live = a.v.live.size();
    CHECK(a.ctx->connect(h, e) == status::invalid_handle);
    CHECK(why().find("no close-notice word") != std::string::npos);
    CHECK(a.v.live.size() == live);

    ib::conn_desc ad;
    REQUIRE(ib::decode(reply_b, ad) == status::ok);
    ad.target_id = 0;
    ad.target_qpn = 0;
    ad.qps[0].notice = {};
    eaas::handle_bytes sec;
    REQUIRE(ib::encode(ad, sec) == status::ok);
    eaas::detail::handle_writer w;
    w.u64(b.ctx->id());
    w.u64(kHostB);
    w.u32(1234);
    w.u32(0);
    w.u64(1);
    w.u8(1);
    w.u8(static_cast<std::uint8_t>(eaas::transport_kind::ibgda));
    w.u16(static_cast<std::uint16_t>(sec.size()));
    w.raw(sec);
    const auto hb = w.finish(eaas::handle_kind::connection, eaas::transport_kind::none);
    eaas::handle_bytes rr;
    const auto live_c = c.v.live.size();
    CHECK(c.ctx->connect(hb, e, rr) == status::invalid_handle);
    CHECK(why().find("without a close-notice word") != std::string::npos);
    CHECK(c.v.live.size() == live_c);
    CHECK(rr.empty());
  }
  // Region handles: another peer's region, and A's region claiming another host.
  {
    auto ra = a.alloc(4096);
    auto rc = c.alloc(4096);
    eaas::handle_bytes h;
    REQUIRE(rc->export_handle(h) == status::ok);
    std::unique_ptr<eaas::remote_region> out;
    CHECK(at_b->import_region(h, out) == status::invalid_argument);
    ib::region_wire rw;
    REQUIRE(ra->export_handle(h) == status::ok);
    REQUIRE(ib::decode(h, rw) == status::ok);
    REQUIRE(at_b->import_region(h, out) == status::ok);
    CHECK(out->view().addr == reinterpret_cast<std::uint64_t>(ra->data()));
    rw.host_id = kHostC;
    REQUIRE(ib::encode(rw, h) == status::ok);
    CHECK(at_b->import_region(h, out) == status::invalid_handle);
    CHECK(why().find("host") != std::string::npos);
    h[h.size() - 1] ^= std::byte{1};
    CHECK(at_b->import_region(h, out) == status::invalid_handle);
    // Other memory kinds: network memory needs ibgda; a context without it says so.
    eaas::context_options o;
    o.enable_shm = false;
    std::unique_ptr<eaas::context> plain;
    REQUIRE(eaas::context::create(o, plain) == status::ok);
    std::unique_ptr<eaas::memory_region> m;
    CHECK(plain->allocate(4096, eaas::memory_kind::network, m) == status::unsupported);
  }
}

TEST_CASE("ibgda context: closing one endpoint leaves another working; reconnect after close") {
  eaas::test::soft_nic model;
  host a(model, kHostA, 2, 2), b(model, kHostB), c(model, kHostC);
  auto ra = a.alloc(64 << 10);
  auto lb = b.alloc(32 << 10), lc = c.alloc(32 << 10);
  std::unique_ptr<eaas::endpoint> a_b, b_a, a_c, c_a;
  pair(a, b, a_b, b_a);
  pair(a, c, a_c, c_a);
  const int qb = model.attach(qp_of(*b_a));
  model.attach(qp_of(*c_a));
  model.start();
  auto ra_b = import(*b_a, *ra);
  auto ra_c = import(*c_a, *ra);
  traffic(*b_a, *lb, *ra_b, *ra, 3);
  traffic(*c_a, *lc, *ra_c, *ra, 4);

  // B closes: its view refuses ops; C's traffic goes on.
  const eaas::coop_thread th{};
  const auto old_view = b_a->view();
  b_a->close();
  CHECK(b_a->state() == eaas::endpoint_state::closed);
  CHECK(eaas::put(th, old_view, ra_b->view(), 0, lb->data(), 8) == status::not_connected);
  CHECK(eaas::quiet(th, old_view) == status::not_connected);
  std::unique_ptr<eaas::remote_region> again;
  eaas::handle_bytes h;
  REQUIRE(ra->export_handle(h) == status::ok);
  CHECK(b_a->import_region(h, again) == status::not_connected);
  traffic(*c_a, *lc, *ra_c, *ra, 5);

  // A is full (2 peers), until it lets B go.
  eaas::handle_bytes reply;
  std::unique_ptr<eaas::endpoint> tmp;
  CHECK(b.ctx->connect(a.handle(), tmp, reply) == status::no_resource);
  model.stop();
  model.detach(qb);
  ra_b.reset();
  b_a.reset();
  a_b->close();
  a_b.reset();

  // Reconnect: a fresh handle of A, a new pair of QPs.
  pair(a, b, a_b, b_a);
  CHECK(qp_of(*b_a).qpn != 0);
  model.attach(qp_of(*b_a));
  model.start();
  ra_b = import(*b_a, *ra);
  traffic(*b_a, *lb, *ra_b, *ra, 6);
  traffic(*c_a, *lc, *ra_c, *ra, 7);
  CHECK(model.violations() == 0);
  model.stop();
}

namespace {

std::uint64_t ms_since(std::uint64_t t0) { return (eaas::detail::now_ns() - t0) / 1'000'000; }

// The live MR (on host `h`'s fake) covering `p`, if any.
bool registered(const host& h, const void* p) {
  for (const auto& [mr, range] : h.v.mr_range)
    if (range.first == p) return true;
  return false;
}

bool moved_to_error(const host& h, std::uint32_t qpn) {
  for (const auto& c : h.v.calls_named("devx_modify"))
    if (c.opcode == prm::k2ErrQp && prm::get(c.in, prm::qp_2rst_in::qpn) == qpn) return true;
  return false;
}

}  // namespace

TEST_CASE("ibgda close notice: the peer's ops and waits end at once, others go on, both closing, reconnect") {
  // Retries of a dead peer take 5 s in this model: anything that waited for the NIC to notice
  // would take that long.
  eaas::test::soft_nic_options mo;
  mo.retry_timeout_ns = 5'000'000'000;
  eaas::test::soft_nic model(mo);
  host a(model, kHostA, 2, 4), b(model, kHostB), c(model, kHostC);
  auto ra = a.alloc(64 << 10), la = a.alloc(32 << 10);
  auto rb = b.alloc(64 << 10), lb = b.alloc(32 << 10);
  auto rc = c.alloc(64 << 10), lc = c.alloc(32 << 10);
  std::unique_ptr<eaas::endpoint> a_b, b_a, a_c, c_a;
  pair(a, b, a_b, b_a);  // B dialed, A accepted
  pair(a, c, a_c, c_a);
  int qa_b = model.attach(qp_of(*a_b)), qb_a = model.attach(qp_of(*b_a));
  int qa_c = model.attach(qp_of(*a_c)), qc_a = model.attach(qp_of(*c_a));
  model.start();
  auto ra_b = import(*b_a, *ra), rb_a = import(*a_b, *rb), ra_c = import(*c_a, *ra), rc_a = import(*a_c, *rc);
  traffic(*b_a, *lb, *ra_b, *ra, 31);
  traffic(*a_b, *la, *rb_a, *rb, 32);
  traffic(*c_a, *lc, *ra_c, *ra, 33);
  // Each endpoint's state word is registered (for its peer's notice) and travels in the handshake.
  const std::uint32_t* word_a_b = a_b->view().state;
  const std::uint32_t* word_b_a = b_a->view().state;
  CHECK(registered(a, word_a_b));
  CHECK(registered(b, word_b_a));

  const eaas::coop_thread th{};
  const auto vb = b_a->view();
  const auto va = a_b->view();
  auto* sig = reinterpret_cast<std::uint64_t*>(static_cast<char*>(rb->data()) + 4096);

  SUBCASE("the acceptor closes") {
    const std::uint64_t t0 = eaas::detail::now_ns();
    a_b->close();
    const std::uint64_t close_ms = ms_since(t0);
    CHECK(close_ms < 50);
    // A: closed, its word out of the peer's reach, its QP in ERR.
    CHECK(a_b->state() == eaas::endpoint_state::closed);
    CHECK(!registered(a, word_a_b));
    CHECK(moved_to_error(a, qp_of(*a_b).qpn));
    CHECK(eaas::put(th, va, rb_a->view(), 0, la->data(), 8) == status::not_connected);
    CHECK(eaas::quiet(th, va) == status::not_connected);
    // B was told: its next op, quiet and endpoint wait end now with peer_unreachable.
    CHECK(b_a->state() == eaas::endpoint_state::peer_dead);
    CHECK(eaas::put(th, vb, ra_b->view(), 0, lb->data(), 8) == status::peer_unreachable);
    std::uint64_t t1 = eaas::detail::now_ns();
    CHECK(eaas::quiet(th, vb) == status::peer_unreachable);
    CHECK(eaas::wait_signal(vb, sig, eaas::cmp_op::eq, 12345, eaas::timeout{10'000'000'000}) ==
          status::peer_unreachable);
    CHECK(ms_since(t1) < 50);
    std::unique_ptr<eaas::remote_region> again;
    eaas::handle_bytes h;
    REQUIRE(ra->export_handle(h) == status::ok);
    CHECK(b_a->import_region(h, again) == status::peer_unreachable);
    // C is untouched, both ways.
    CHECK(c_a->state() == eaas::endpoint_state::connected);
    CHECK(a_c->state() == eaas::endpoint_state::connected);
    traffic(*c_a, *lc, *ra_c, *ra, 34);
    traffic(*a_c, *la, *rc_a, *rc, 35);
    // B closes too: its notice finds A's word deregistered (refused by the NIC, at once), and A's
    // own "closed" stays.
    t1 = eaas::detail::now_ns();
    b_a->close();
    CHECK(ms_since(t1) < 50);
    CHECK(b_a->state() == eaas::endpoint_state::closed);
    CHECK(a_b->state() == eaas::endpoint_state::closed);
    CHECK(eaas::quiet(th, vb) == status::not_connected);
  }
  SUBCASE("the dialer closes") {
    b_a->close();
    CHECK(b_a->state() == eaas::endpoint_state::closed);
    CHECK(moved_to_error(b, qp_of(*b_a).qpn));
    CHECK(a_b->state() == eaas::endpoint_state::peer_dead);
    const std::uint64_t t1 = eaas::detail::now_ns();
    CHECK(eaas::quiet(th, va) == status::peer_unreachable);
    auto* sig_a = reinterpret_cast<std::uint64_t*>(static_cast<char*>(ra->data()) + 4096);
    CHECK(eaas::wait_signal(va, sig_a, eaas::cmp_op::eq, 999, eaas::timeout{10'000'000'000}) ==
          status::peer_unreachable);
    CHECK(ms_since(t1) < 50);
    traffic(*c_a, *lc, *ra_c, *ra, 36);
    traffic(*a_c, *la, *rc_a, *rc, 37);
  }
  SUBCASE("a notice arriving while quiet waits ends the wait") {
    // The model stalls, so B's put never completes; the word changes 30 ms in (as the notice's
    // write would): quiet returns then, not at its 2 s bound.
    model.pause(true);
    REQUIRE(eaas::put(th, vb, ra_b->view(), 0, lb->data(), 64) == status::ok);
    std::thread notice([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      std::atomic_ref<std::uint32_t>(*const_cast<std::uint32_t*>(word_b_a))
          .store(static_cast<std::uint32_t>(eaas::endpoint_state::peer_dead), std::memory_order_release);
    });
    const std::uint64_t t1 = eaas::detail::now_ns();
    CHECK(eaas::quiet(th, vb) == status::peer_unreachable);
    const std::uint64_t waited = ms_since(t1);
    notice.join();
    CHECK(waited >= 25);
    CHECK(waited < 500);
    model.pause(false);
    b_a->close();  // closed wins over peer_dead locally
    CHECK(b_a->state() == eaas::endpoint_state::closed);
  }

  // Reconnect B after the close, on fresh QPs and words; B's and C's traffic verified again. (Both
  // closed while the model runs: a notice needs the NIC.)
  a_b->close();
  b_a->close();
  model.stop();
  model.detach(qa_b);
  model.detach(qb_a);
  ra_b.reset();
  rb_a.reset();
  a_b.reset();
  b_a.reset();
  pair(a, b, a_b, b_a);
  CHECK(a_b->state() == eaas::endpoint_state::connected);
  CHECK(b_a->state() == eaas::endpoint_state::connected);
  CHECK(registered(a, a_b->view().state));
  model.attach(qp_of(*a_b));
  model.attach(qp_of(*b_a));
  model.start();
  ra_b = import(*b_a, *ra);
  rb_a = import(*a_b, *rb);
  traffic(*b_a, *lb, *ra_b, *ra, 38);
  traffic(*a_b, *la, *rb_a, *rb, 39);
  traffic(*c_a, *lc, *ra_c, *ra, 40);
  CHECK(model.violations() == 0);
  model.stop();
  (void)qa_c;
  (void)qc_a;
}

TEST_CASE("ibgda close notice: a dead peer costs close() its deadline at most; a dialer never answered stays quiet") {
  SUBCASE("the peer does not answer: close gives up at its deadline") {
    eaas::test::soft_nic_options mo;
    mo.retry_timeout_ns = 5'000'000'000;
    eaas::test::soft_nic model(mo);
    host a(model, kHostA), b(model, kHostB, 2, 8, 50'000'000);  // B's notices: 50 ms
    auto ra = a.alloc(64 << 10);
    auto lb = b.alloc(32 << 10);
    std::unique_ptr<eaas::endpoint> a_b, b_a;
    pair(a, b, a_b, b_a);
    const int qb = model.attach(qp_of(*b_a));
    model.start();
    auto ra_b = import(*b_a, *ra);
    traffic(*b_a, *lb, *ra_b, *ra, 41);
    model.kill_peer(qb);
    const std::uint64_t t0 = eaas::detail::now_ns();
    b_a->close();
    const std::uint64_t took = ms_since(t0);
    CHECK(took >= 45);
    CHECK(took < 1000);  // the NIC's retries would take 5 s
    CHECK(b_a->state() == eaas::endpoint_state::closed);
    CHECK(moved_to_error(b, qp_of(*b_a).qpn));
    CHECK(a_b->state() == eaas::endpoint_state::connected);  // a dead peer learns nothing, of course
    model.stop();
    model.detach(qb);
  }
  SUBCASE("the NIC reports the dead peer first: close returns with it") {
    eaas::test::soft_nic_options mo;
    mo.retry_timeout_ns = 20'000'000;
    eaas::test::soft_nic model(mo);
    host a(model, kHostA), b(model, kHostB, 2, 8, 2'000'000'000);
    auto ra = a.alloc(64 << 10);
    auto lb = b.alloc(32 << 10);
    std::unique_ptr<eaas::endpoint> a_b, b_a;
    pair(a, b, a_b, b_a);
    const int qb = model.attach(qp_of(*b_a));
    model.start();
    auto ra_b = import(*b_a, *ra);
    traffic(*b_a, *lb, *ra_b, *ra, 42);
    model.kill_peer(qb);
    const std::uint64_t t0 = eaas::detail::now_ns();
    b_a->close();
    const std::uint64_t took = ms_since(t0);
    CHECK(took >= 15);
    CHECK(took < 1000);
    CHECK(b_a->state() == eaas::endpoint_state::closed);
    // The failure is latched in the QP's device state, as a device poller would have latched it.
    CHECK(qp_of(*b_a).cq.error == static_cast<std::uint32_t>(status::peer_unreachable));
    model.stop();
    model.detach(qb);
  }
  SUBCASE("a dialer whose QP never completed a WQE does not write") {
    // B dials A's only advertised QP, C dials the same one; A accepts B. C's QP is served by the
    // model: were C to write, it would land in A's endpoint for B (the word A advertised with that
    // QP). C closes without having completed anything: no notice.
    eaas::test::soft_nic model;
    host a(model, kHostA, 1, 4), b(model, kHostB), c(model, kHostC);
    const auto ha = a.handle();
    std::unique_ptr<eaas::endpoint> a_b, b_a, c_a;
    eaas::handle_bytes reply_b, reply_c;
    REQUIRE(b.ctx->connect(ha, b_a, reply_b) == status::ok);
    REQUIRE(c.ctx->connect(ha, c_a, reply_c) == status::ok);
    REQUIRE(a.ctx->connect(reply_b, a_b) == status::ok);
    std::unique_ptr<eaas::endpoint> refused;
    CHECK(a.ctx->connect(reply_c, refused) == status::not_found);
    const int qc = model.attach(qp_of(*c_a));
    model.start();
    const std::uint64_t t0 = eaas::detail::now_ns();
    c_a->close();
    CHECK(ms_since(t0) < 50);
    CHECK(model.executed(qc) == 0);
    CHECK(a_b->state() == eaas::endpoint_state::connected);
    model.stop();
    model.detach(qc);
  }
}

namespace {

// RTR2RTS transitions the host's fakes saw (one per QP taken to RTS: one per dial or accept).
std::size_t rts_count(const host& h) {
  std::size_t n = 0;
  for (const auto& c : h.v.calls_named("devx_modify")) n += c.opcode == prm::kRtr2RtsQp ? 1 : 0;
  return n;
}

}  // namespace

TEST_CASE(
    "ibgda over the directory: the reply travels in the link request, accepts republish the pool, a stale "
    "record is dialed again") {
  eaas::test::soft_nic model;
  host a(model, kHostA, 1, 8), b(model, kHostB), c(model, kHostC);  // A advertises one QP at a time
  std::unique_ptr<eaas::registry_server> srv;
  REQUIRE(eaas::registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, srv) == status::ok);
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(srv->port());
  std::unique_ptr<eaas::registry> reg_a, reg_b, reg_c;
  REQUIRE(eaas::registry::open({.endpoint = endpoint}, reg_a) == status::ok);
  REQUIRE(eaas::registry::open({.endpoint = endpoint}, reg_b) == status::ok);
  REQUIRE(eaas::registry::open({.endpoint = endpoint}, reg_c) == status::ok);

  auto data = a.alloc(64 << 10), la = a.alloc(32 << 10);
  auto res_b = b.alloc(64 << 10), lb = b.alloc(32 << 10), lc = c.alloc(32 << 10);
  eaas::handle_bytes hdata, hres;
  REQUIRE(data->export_handle(hdata) == status::ok);
  REQUIRE(res_b->export_handle(hres) == status::ok);
  eaas::peer_record rec_a;
  rec_a.id = "a";
  rec_a.role = "server";
  rec_a.connection = a.handle();
  rec_a.regions = {{"data", hdata}};
  eaas::peer_record rec_b{.id = "b", .role = "client", .connection = b.handle()};
  eaas::peer_record rec_c{.id = "c", .role = "client", .connection = c.handle()};
  std::unique_ptr<eaas::directory> da, db, dc;
  REQUIRE(eaas::directory::start(*reg_a, *a.ctx, "ib", rec_a, 5, da) == status::ok);
  REQUIRE(eaas::directory::start(*reg_b, *b.ctx, "ib", rec_b, 5, db) == status::ok);
  REQUIRE(eaas::directory::start(*reg_c, *c.ctx, "ib", rec_c, 5, dc) == status::ok);
  std::mutex mu;
  std::deque<eaas::peer_link> incoming;  // grows on the directory's thread: references to elements stay valid
  da->on_link([&](eaas::peer_link&& l) {
    std::lock_guard g(mu);
    incoming.push_back(std::move(l));
  });
  auto wait_links = [&](std::size_t n) {
    for (int i = 0; i < 5000; ++i) {
      {
        std::lock_guard g(mu);
        if (incoming.size() >= n) return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return false;
  };
  constexpr std::uint64_t kFive = 5'000'000'000ull;

  // A reserved name is refused before anything is dialed.
  eaas::peer_link none;
  CHECK(db->link("a", {{"eaas.reply", hres}}, kFive, none) == status::invalid_argument);

  // B links: its QP was taken to RTS against the one A advertised, A accepted B's reply (it did not
  // dial B), and the regions arrived on both sides.
  eaas::peer_link b_to_a;
  REQUIRE_MESSAGE(db->link("a", {{"result", hres}}, kFive, b_to_a) == status::ok, why());
  REQUIRE(wait_links(1));
  eaas::peer_link& a_to_b = [&]() -> eaas::peer_link& {
    std::lock_guard g(mu);
    return incoming[0];
  }();
  CHECK(b_to_a.ep->transport() == eaas::transport_kind::ibgda);
  CHECK(a_to_b.ep->transport() == eaas::transport_kind::ibgda);
  CHECK(a_to_b.record.id == "b");
  CHECK(a_to_b.region("result") != nullptr);
  CHECK(a_to_b.region("eaas.reply") == nullptr);  // consumed, not imported
  REQUIRE(b_to_a.region("data") != nullptr);
  CHECK(wiring(a, qp_of(*a_to_b.ep).qpn).remote_qpn == qp_of(*b_to_a.ep).qpn);
  CHECK(wiring(b, qp_of(*b_to_a.ep).qpn).remote_qpn == qp_of(*a_to_b.ep).qpn);
  CHECK(rts_count(b) == 1);

  // A republished its record: the new handle advertises a fresh QP, not the one B took.
  eaas::kv_record kv;
  REQUIRE(reg_c->get("/eaas/ib/peers/a", kv) == status::ok);
  eaas::peer_record now;
  REQUIRE(eaas::decode_peer_record(kv.value, now) == status::ok);
  CHECK(now.connection != rec_a.connection);
  CHECK(now.regions == rec_a.regions);

  // C reads a stale record (the one before B's link, put back by hand): its first dial names B's QP,
  // A refuses it (not_found) and republishes; C dials again from the fresh record and gets through.
  std::string stale;
  REQUIRE(eaas::encode_peer_record(rec_a, stale) == status::ok);
  REQUIRE(reg_c->put("/eaas/ib/peers/a", stale, 0) == status::ok);
  eaas::peer_link c_to_a;
  REQUIRE_MESSAGE(dc->link("a", {}, kFive, c_to_a) == status::ok, why());
  CHECK(rts_count(c) == 2);  // two dials
  REQUIRE(wait_links(2));
  eaas::peer_link& a_to_c = [&]() -> eaas::peer_link& {
    std::lock_guard g(mu);
    return incoming[1];
  }();
  CHECK(a_to_c.record.id == "c");
  CHECK(wiring(a, qp_of(*a_to_c.ep).qpn).remote_qpn == qp_of(*c_to_a.ep).qpn);

  // Forged requests: a "reply" that is no reply (a region handle), and a genuine reply made by B put in a
  // request whose record is C's. Both refused (invalid_handle), neither reaches on_link.
  auto forge = [&](const std::string& from, const eaas::handle_bytes& reply) {
    eaas::peer_record req{.id = from, .role = "client", .connection = c.handle()};
    req.regions = {{"eaas.reply", reply}};
    std::string enc;
    REQUIRE(eaas::encode_peer_record(req, enc) == status::ok);
    REQUIRE(reg_c->put("/eaas/ib/links/a/" + from, enc, 0) == status::ok);
    for (int i = 0; i < 5000; ++i) {
      eaas::kv_record ack;
      if (reg_c->get("/eaas/ib/acks/" + from + "/a", ack) == status::ok) return ack.value;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return std::string("no ack");
  };
  CHECK(forge("x1", hdata).starts_with("error invalid_handle"));
  REQUIRE(reg_c->get("/eaas/ib/peers/a", kv) == status::ok);
  REQUIRE(eaas::decode_peer_record(kv.value, now) == status::ok);
  eaas::handle_bytes b_reply;
  std::unique_ptr<eaas::endpoint> b_dial;
  REQUIRE(b.ctx->connect(now.connection, b_dial, b_reply) == status::ok);
  CHECK(forge("x2", b_reply).starts_with("error invalid_handle"));
  {
    std::lock_guard g(mu);
    CHECK(incoming.size() == 2);
  }
  b_dial.reset();

  // Traffic over every link, every byte checked: B and C into A's data region, A into B's result.
  model.attach(qp_of(*b_to_a.ep));
  model.attach(qp_of(*c_to_a.ep));
  model.attach(qp_of(*a_to_b.ep));
  model.start();
  REQUIRE(c_to_a.region("data") != nullptr);
  traffic(*b_to_a.ep, *lb, *b_to_a.region("data"), *data, 21);
  traffic(*c_to_a.ep, *lc, *c_to_a.region("data"), *data, 22);
  traffic(*a_to_b.ep, *la, *a_to_b.region("result"), *res_b, 23);
  CHECK(model.violations() == 0);
  model.stop();
  da.reset();
  db.reset();
  dc.reset();
}
