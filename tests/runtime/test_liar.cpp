// A lying server: it links like a real one, then hands the client malformed welcomes (slots outside its
// region, offsets that overflow, the wrong shape, a grant that does not match the slot) and, once a
// welcome is valid, garbage answers. The client must refuse all of it — never write outside the
// server's region, never accept an answer that is not the one it asked for, never crash — and report
// errors within its bounds.

#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <thread>

#include "../common/require_ok.hpp"
#include "client.hpp"
#include "eaas/eaas.hpp"
#include "eaas/runtime/slot.hpp"

using namespace eaas;
using namespace eaas::runtime;
using namespace std::chrono_literals;

namespace {

const model_shape kShape{.hidden = 64, .inter = 96, .experts = 12, .topk = 3, .layers = 3};

struct liar {
  std::unique_ptr<context> ctx;
  std::unique_ptr<memory_region> slots;
  std::unique_ptr<registry> reg;
  std::unique_ptr<directory> dir;
  std::mutex mu;
  std::deque<peer_link> links;
  slots_geometry geo = slots_geometry_for(1, 64, kShape.hidden, kShape.topk);

  explicit liar(const std::string& endpoint, const std::string& ns) {
    REQUIRE_OK(context::create({.name = "liar"}, ctx));
    REQUIRE_OK(ctx->allocate(geo.bytes, slots));
    registry_options ro;
    ro.endpoint = endpoint;
    REQUIRE_OK(registry::open(ro, reg));
    peer_record self;
    self.id = "liar";
    self.role = "server";
    for (std::uint32_t e = 0; e < kShape.experts; ++e) self.experts.push_back(e);
    self.capacity = 64;
    REQUIRE_OK(ctx->connection_handle(self.connection));
    handle_bytes h;
    REQUIRE_OK(slots->export_handle(h));
    self.regions.emplace_back("slots", h);
    REQUIRE_OK(directory::start(*reg, *ctx, ns, self, 2, dir));
    dir->on_link([this](peer_link&& l) {
      std::lock_guard g(mu);
      links.push_back(std::move(l));
    });
  }
  server_welcome valid() const {
    server_welcome w{};
    w.magic = kSlotMagic;
    w.version = kSlotVersion;
    w.slot = 0;
    w.max_tokens = 64;
    w.sig_offset = 0;
    w.slot_offset = geo.slots_base;
    w.slot_bytes = geo.slot_stride;
    w.hidden = kShape.hidden;
    w.layers = kShape.layers;
    w.max_topk = kShape.topk;
    w.local_experts = kShape.experts;
    w.grant = 42;
    return w;
  }
};

}  // namespace

TEST_CASE("a lying server: malformed welcomes and garbage answers are refused, never trusted") {
  std::unique_ptr<registry_server> rs;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, rs));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(rs->port());
  const std::string ns = "liar" + std::to_string(::getpid());
  liar l(endpoint, ns);

  // One malformed welcome per link attempt (the client retries a failed link), then a valid one.
  std::vector<std::function<void(server_welcome&)>> lies = {
      [](server_welcome& w) { w.magic ^= 1; },
      [](server_welcome& w) { w.version = 77; },
      [&](server_welcome& w) { w.slot_offset = l.geo.bytes; },          // past the region
      [&](server_welcome& w) { w.slot_bytes = l.geo.bytes; },           // runs past it
      [](server_welcome& w) { w.sig_offset = ~std::uint64_t{0} - 3; },  // overflows + 8
      [](server_welcome& w) { w.sig_offset = 4; },                      // misaligned signal word
      [](server_welcome& w) { w.hidden = kShape.hidden * 2; },          // another model
      [](server_welcome& w) { w.local_experts = kShape.experts - 1; },  // not its record
      [](server_welcome& w) { w.max_tokens = 0; },
      [](server_welcome& w) { w.slot = 3; },  // not the slot signalled
  };
  std::atomic<bool> stop{false};
  std::atomic<int> welcomes{0}, answered{0};
  std::thread fake([&] {
    std::mt19937_64 rng(5);
    std::vector<peer_link> linked;
    std::uint64_t last = 0;
    while (!stop) {
      {
        std::lock_guard g(l.mu);
        while (!l.links.empty()) {
          peer_link pl = std::move(l.links.front());
          l.links.pop_front();
          server_welcome w = l.valid();
          const int n = welcomes++;
          if (n < static_cast<int>(lies.size())) lies[n](w);
          // A new link: its requests start at seq 1 again (as a real server resets the slot).
          std::atomic_ref<std::uint64_t>(*static_cast<std::uint64_t*>(l.slots->data())).store(0);
          last = 0;
          remote_region* res = pl.region("result");
          REQUIRE(res != nullptr);
          const auto rv = res->view();
          (void)put_signal(coop_thread{}, pl.ep->view(), rv, kWelcome, &w, sizeof(w), rv, kWelcomeSig, 1,
                           signal_op::set);
          linked.push_back(std::move(pl));
        }
      }
      // Answer every request with garbage: bad magic, a wrong seq, a wrong token count, an error, random.
      const auto* sig = static_cast<const std::uint64_t*>(l.slots->data());
      const std::uint64_t v = std::atomic_ref<const std::uint64_t>(*sig).load(std::memory_order_acquire);
      if (v != last && !linked.empty()) {
        last = v;
        response_header rh{};
        rh.magic = kSlotMagic;
        rh.version = kSlotVersion;
        rh.seq = v;
        rh.tokens = 1;
        switch (answered++ % 5) {
          case 0:
            rh.magic ^= 0x100;
            break;
          case 1:
            rh.seq = v + 1;
            break;
          case 2:
            rh.tokens = 1u << 30;
            break;
          case 3:
            rh.error = static_cast<std::uint32_t>(slot_error::unknown_layer);
            break;
          default:
            for (auto& b : rh.reserved) b = static_cast<std::uint8_t>(rng());
            rh.type = 9;
        }
        peer_link& pl = linked.back();
        const auto rv = pl.region("result")->view();
        std::vector<unsigned char> junk(sizeof(rh) + 1024);
        for (auto& b : junk) b = static_cast<unsigned char>(rng());
        std::memcpy(junk.data(), &rh, sizeof(rh));
        (void)put_signal(coop_thread{}, pl.ep->view(), rv, kResponse, junk.data(), junk.size(), rv, kResultSig, v,
                         signal_op::set);
      }
      std::this_thread::sleep_for(200us);
    }
  });

  client_options o;
  o.id = "victim";
  o.registry.endpoint = endpoint;
  o.ns = ns;
  o.shape = kShape;
  o.seed = 11;
  o.max_tokens = 8;
  o.request_timeout_ns = 200'000'000ull;
  o.link_timeout_ns = 300'000'000ull;
  o.relink_backoff_ns = 20'000'000ull;
  std::unique_ptr<attention_client> c;
  REQUIRE_OK(attention_client::start(o, c));
  // Every lie is refused: the client links only after the valid welcome comes.
  REQUIRE_OK(c->wait_for_experts(1, 30'000'000'000ull));
  CHECK(welcomes.load() > static_cast<int>(lies.size()));
  // Its answers are all garbage: no forward pass may succeed, and each ends within its bounds.
  std::vector<float> out;
  const std::vector<std::uint32_t> toks{1, 2, 3, 4};
  for (int i = 0; i < 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const status s = c->forward(toks, out);
    CHECK(s != status::ok);
    CHECK(std::chrono::steady_clock::now() - t0 < 15s);  // a few failed rounds, each bounded
  }
  CHECK(answered.load() >= 3);
  CHECK(c->stats().dropped_servers >= 3);
  CHECK(std::string(last_error()).find("liar") != std::string::npos);
  stop = true;
  fake.join();
}
