// The slot protocol's commit record against a real server (an eaas-server process, over shm; this
// process writes the slot while the server reads it, which a thread sanitizer would call a race if the
// server ran on a thread here): a former holder of a slot leaves a foreign value in its signal word, the owner's next
// request then arrives in pieces, and the server must take it only once its commit word has landed, answer it exactly
// once (no stale_seq when the owner's own doorbell changes the word afterwards), and compute it from the bytes the
// owner wrote.
//
// "The server has had its chance": a second client (the probe) sends a request and waits for its answer,
// twice. The poll round that finds the probe's doorbell read every slot after it, so it saw every byte
// written before that doorbell; the second probe's answer comes after that round answered everything it
// took. Anything the server would do with a piece (or with a former holder's write) is visible after two
// probes.

#include <doctest/doctest.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "../common/require_ok.hpp"
#include "cpu_math.hpp"
#include "eaas/eaas.hpp"
#include "eaas/runtime/slot.hpp"
#include "procs.hpp"
#include "wire.hpp"

using namespace eaas;
using namespace eaas::runtime;

namespace {

const model_shape kShape{.hidden = 64, .inter = 96, .experts = 12, .topk = 3, .layers = 3};
constexpr std::uint64_t kSeed = 11;
constexpr std::uint32_t kTokens = 4;
constexpr std::uint64_t kWaitNs = 5'000'000'000ull;

// A client written out by hand: links, takes its welcome, then writes into its slot byte range by byte range.
struct raw_client {
  std::unique_ptr<wire> io = make_host_wire();
  std::unique_ptr<context> ctx;
  std::unique_ptr<registry> reg;
  std::unique_ptr<directory> dir;
  std::unique_ptr<memory_region> result;
  peer_link link;
  server_welcome w{};
  remote_view slots{};
  std::uint64_t seq = 0;

  raw_client(const std::string& endpoint, const std::string& ns, const std::string& id, const std::string& server) {
    REQUIRE_OK(context::create({.name = id}, ctx));
    registry_options ro;
    ro.endpoint = endpoint;
    REQUIRE_OK(registry::open(ro, reg));
    peer_record self;
    self.id = id;
    self.role = "client";
    REQUIRE_OK(ctx->connection_handle(self.connection));
    REQUIRE_OK(directory::start(*reg, *ctx, ns, self, 2, dir));
    REQUIRE_OK(ctx->allocate(result_region_bytes(16, kShape.hidden), memory_kind::host, result));
    handle_bytes h;
    REQUIRE_OK(result->export_handle(h));
    REQUIRE_OK(dir->link(server, {{"result", h}}, kWaitNs, link));
    REQUIRE_OK(io->wait(*link.ep, *result, kWelcomeSig, cmp_op::ne, 0, now_ns() + kWaitNs, nullptr));
    REQUIRE_OK(io->read(*result, kWelcome, &w, sizeof(w)));
    REQUIRE(link.region("slots") != nullptr);
    slots = link.region("slots")->view();
  }
  unsigned char* res() const { return static_cast<unsigned char*>(result->data()); }
  std::uint64_t answered() const {
    return std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(res() + kResultSig))
        .load(std::memory_order_acquire);
  }
  // Bytes [from, to) of a request into the slot, nothing else.
  void put_range(const std::vector<unsigned char>& req, std::uint64_t from, std::uint64_t to) {
    REQUIRE_OK(eaas::put(coop_thread{}, link.ep->view(), slots, w.slot_offset + from, req.data() + from, to - from));
    REQUIRE_OK(eaas::fence(coop_thread{}, link.ep->view()));
  }
  // The word at `offset` of the slot (the commit word), stored with release.
  void store_slot_word(std::uint64_t offset, std::uint64_t v) {
    REQUIRE_OK(eaas::signal(coop_thread{}, link.ep->view(), slots, w.slot_offset + offset, v, signal_op::set));
  }
  void doorbell(std::uint64_t v) {
    REQUIRE_OK(eaas::signal(coop_thread{}, link.ep->view(), slots, w.sig_offset, v, signal_op::set));
  }
  // A whole request as the runtime's client writes it (header last, commit word last of all), then `sig`.
  void send(const std::vector<unsigned char>& req, std::uint64_t sig) {
    REQUIRE_OK(io->put_signal(*link.ep, slots, w.slot_offset, req.data(), req.size(), slots, w.sig_offset, sig,
                              sizeof(slot_header)));
  }
  bool wait_answer(std::uint64_t s) {
    return io->wait(*link.ep, *result, kResultSig, cmp_op::eq, s, now_ns() + kWaitNs, nullptr) == status::ok;
  }
  response_header response() const {
    response_header rh;
    std::memcpy(&rh, res() + kResponse, sizeof(rh));
    return rh;
  }
  std::vector<unsigned char> outputs(std::uint32_t tokens) const {
    return {res() + kOutputs, res() + kOutputs + std::size_t{tokens} * kShape.hidden * 4};
  }
  // Poisons the answer area and the answer's signal word: a later answer would overwrite them.
  void poison() {
    std::memset(res() + kResponse, 0xEE, kOutputs - kResponse + std::size_t{kTokens} * kShape.hidden * 4);
    std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(res() + kResultSig))
        .store(0, std::memory_order_release);
  }
  bool poisoned() const {
    const unsigned char* p = res() + kResponse;
    for (std::size_t i = 0; i < kOutputs - kResponse + std::size_t{kTokens} * kShape.hidden * 4; ++i)
      if (p[i] != 0xEE) return false;
    return answered() == 0;
  }
};

struct request {
  std::vector<unsigned char> bytes;  // header + payload, as written into the slot
  std::uint32_t layer = 0;
  std::vector<float> act, weights;
  std::vector<std::uint16_t> ids;
};

// A valid request of kTokens tokens with random activations and routing over local experts 0..local-1.
request make_request(std::uint64_t seq, std::uint64_t grant, std::uint32_t local, std::uint64_t content_seed) {
  std::mt19937_64 rng(content_seed);
  std::normal_distribution<float> nd;
  request r;
  r.layer = static_cast<std::uint32_t>(rng() % kShape.layers);
  const slot_layout l = layout_for(kTokens, kShape.hidden, kShape.topk, dtype::f32);
  r.act.resize(std::size_t{kTokens} * kShape.hidden);
  for (auto& v : r.act) v = nd(rng);
  r.ids.resize(std::size_t{kTokens} * kShape.topk);
  r.weights.resize(r.ids.size());
  for (std::uint32_t t = 0; t < kTokens; ++t) {
    const auto base = static_cast<std::uint32_t>(rng() % local);
    for (std::uint32_t k = 0; k < kShape.topk; ++k) {
      r.ids[t * kShape.topk + k] = static_cast<std::uint16_t>((base + k) % local);
      r.weights[t * kShape.topk + k] = 0.25f + float(rng() % 100) / 100.0f;
    }
  }
  slot_header h{};
  h.magic = kSlotMagic;
  h.version = kSlotVersion;
  h.type = static_cast<std::uint16_t>(dtype::f32);
  h.seq = seq;
  h.layer = r.layer;
  h.tokens = kTokens;
  h.hidden = kShape.hidden;
  h.topk = kShape.topk;
  h.payload_bytes = l.end - sizeof(slot_header);
  h.grant = grant;
  h.commit = slot_commit(seq, grant);
  r.bytes.assign(l.end, 0);
  std::memcpy(r.bytes.data(), &h, sizeof(h));
  std::memcpy(r.bytes.data() + l.activations, r.act.data(), r.act.size() * 4);
  std::memcpy(r.bytes.data() + l.expert_ids, r.ids.data(), r.ids.size() * 2);
  std::memcpy(r.bytes.data() + l.weights, r.weights.data(), r.weights.size() * 4);
  return r;
}

// The answer computed here, another way: per token, Σ_k w_k · expert(x) with the synthetic weights.
std::vector<float> reference(const request& r, const std::vector<std::uint32_t>& hosted) {
  std::vector<float> want(std::size_t{kTokens} * kShape.hidden, 0.0f), y(kShape.hidden);
  cpu::swiglu_scratch s;
  for (std::uint32_t t = 0; t < kTokens; ++t)
    for (std::uint32_t k = 0; k < kShape.topk; ++k) {
      const auto w = synthetic_expert(kShape, kSeed, r.layer, hosted[r.ids[t * kShape.topk + k]]);
      cpu::swiglu_rows(w, r.act.data() + std::size_t{t} * kShape.hidden, 1, kShape.hidden, kShape.inter, y.data(), s);
      for (std::uint32_t j = 0; j < kShape.hidden; ++j)
        want[t * kShape.hidden + j] += r.weights[t * kShape.topk + k] * y[j];
    }
  return want;
}

double rel_err(const std::vector<unsigned char>& got_bytes, const std::vector<float>& want) {
  std::vector<float> got(want.size());
  std::memcpy(got.data(), got_bytes.data(), got.size() * 4);
  double err = 0, mx = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, double(std::fabs(got[i] - want[i])));
    mx = std::max(mx, double(std::fabs(want[i])));
  }
  return mx > 0 ? err / mx : 1.0;
}

}  // namespace

TEST_CASE("slot commit: a request after a former holder's write is taken once committed, answered once, exactly") {
  std::unique_ptr<registry_server> rs;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, rs));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(rs->port());
  const std::string ns = "commit" + std::to_string(::getpid());
  test::proc srv;
  auto args = test::shape_args(endpoint, ns, kShape);
  args.insert(args.end(),
              {"--id", "srv", "--host-experts", "0-5", "--max-clients", "4", "--max-tokens", "16", "--drain-ms", "50"});
  REQUIRE(srv.start(EAAS_SERVER_BIN, args));
  REQUIRE(srv.next("ready").is_object());

  raw_client owner(endpoint, ns, "owner", "srv"), probe(endpoint, ns, "probe", "srv");
  REQUIRE(owner.w.slot != probe.w.slot);
  const std::uint32_t local = owner.w.local_experts;
  REQUIRE(local == 6);
  const std::uint64_t grant = owner.w.grant, former = grant ^ 0x5A5A5A5A5A5Aull;
  std::uint64_t probes = 0;
  auto probe_round = [&] {
    for (int i = 0; i < 2; ++i) {
      ++probe.seq;
      const request p = make_request(probe.seq, probe.w.grant, local, 1000 + probe.seq);
      probe.send(p.bytes, probe.seq);
      REQUIRE(probe.wait_answer(probe.seq));
      REQUIRE(probe.response().error == 0);
      ++probes;
    }
  };
  const slot_layout l = layout_for(kTokens, kShape.hidden, kShape.topk, dtype::f32);
  constexpr std::uint64_t kCommitAt = offsetof(slot_header, commit);

  // Requests 1 (content X) and 2 (content Y) the ordinary way: their answers are the references for the
  // same contents sent again below, byte for byte.
  const request x1 = make_request(1, grant, local, 1), y2 = make_request(2, grant, local, 2);
  owner.send(x1.bytes, 1);
  REQUIRE(owner.wait_answer(1));
  CHECK(owner.response().seq == 1);
  CHECK(owner.response().error == 0);
  CHECK(owner.response().tokens == kTokens);
  const std::vector<unsigned char> answer_x = owner.outputs(kTokens);
  CHECK(rel_err(answer_x, reference(x1, owner.link.record.experts)) <= 1e-5);
  owner.send(y2.bytes, 2);
  REQUIRE(owner.wait_answer(2));
  CHECK(owner.response().error == 0);
  const std::vector<unsigned char> answer_y = owner.outputs(kTokens);
  CHECK(rel_err(answer_y, reference(y2, owner.link.record.experts)) <= 1e-5);
  CHECK(answer_x != answer_y);

  // A former holder (another grant) writes a whole request, committed under its grant, and signals 77.
  request junk = make_request(3, former, local, 3);
  for (std::size_t i = l.expert_ids; i < l.end; ++i) junk.bytes[i] = static_cast<unsigned char>(0xF0 + i % 7);
  owner.send(junk.bytes, 77);
  probe_round();
  CHECK(owner.answered() == 2);

  // Request 3 (content X) in pieces, the word still 77: header but for its commit word, and activations...
  const request x3 = make_request(3, grant, local, 1);
  owner.put_range(x3.bytes, 0, kCommitAt);
  owner.put_range(x3.bytes, l.activations, l.expert_ids);
  probe_round();
  CHECK(owner.answered() == 2);
  // ... then the routing arrays (the former holder's are still there until now).
  owner.put_range(x3.bytes, l.expert_ids, l.end);
  probe_round();
  CHECK(owner.answered() == 2);
  // The commit word, still no doorbell: taken and answered, from the owner's bytes.
  owner.store_slot_word(kCommitAt, slot_commit(3, grant));
  REQUIRE(owner.wait_answer(3));
  CHECK(owner.response().seq == 3);
  CHECK(owner.response().error == 0);
  CHECK(owner.response().tokens == kTokens);
  CHECK(owner.outputs(kTokens) == answer_x);

  // The owner's own doorbell changes the word (77 -> 3): no second answer, no stale_seq.
  owner.poison();
  owner.doorbell(3);
  probe_round();
  CHECK(owner.poisoned());

  // A stranger signals the owner's next seq (4), under its grant; then request 4 (content Y) comes the
  // ordinary way, signalling 4 as well: the word does not change. Answered once, from the owner's bytes.
  owner.send(make_request(4, former, local, 4).bytes, 4);
  probe_round();
  CHECK(owner.poisoned());
  owner.send(make_request(4, grant, local, 2).bytes, 4);
  REQUIRE(owner.wait_answer(4));
  CHECK(owner.response().seq == 4);
  CHECK(owner.response().error == 0);
  CHECK(owner.outputs(kTokens) == answer_y);
  owner.poison();
  probe_round();
  CHECK(owner.poisoned());

  // And the next request, the ordinary way.
  owner.send(make_request(5, grant, local, 1).bytes, 5);
  REQUIRE(owner.wait_answer(5));
  CHECK(owner.response().error == 0);
  CHECK(owner.outputs(kTokens) == answer_x);
  // The server's count: every answer (the owner's five and the probes'), none refused, the former holder's
  // two writes ignored.
  ::kill(srv.sp.pid, SIGTERM);
  const auto st = srv.next("stats");
  REQUIRE(st.is_object());
  CHECK(st.value("requests", 0ull) == 5 + probes);
  CHECK(st.value("refused", 1ull) == 0);
  CHECK(st.value("ignored", 0ull) == 2);
  CHECK(srv.wait() == 0);
}
