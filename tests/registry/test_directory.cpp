// Peer records and the pairwise handshake, over the backend of this binary.

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "../common/require_ok.hpp"
#include "backend.hpp"
#include "eaas/eaas.hpp"

using namespace eaas;
using namespace std::chrono_literals;

namespace eaas::regtest {
regtest::backend& shared_backend();
}

namespace {

std::string fresh_ns() {
  static std::atomic<int> n{0};
  return "t" + std::to_string(::getpid()) + "-" + std::to_string(n++);
}

/// A process's worth of state: context, a region, a registry client, a directory.
struct node {
  std::unique_ptr<context> ctx;
  std::unique_ptr<memory_region> inbox;
  std::unique_ptr<registry> reg;
  std::unique_ptr<directory> dir;
  peer_record self;

  node(const std::string& ns, const std::string& id, const std::string& role, std::uint32_t ttl = 2) {
    REQUIRE_OK(context::create({.name = id}, ctx));
    REQUIRE_OK(ctx->allocate(1 << 16, inbox));
    REQUIRE_OK(registry::open(regtest::shared_backend().options(), reg));
    self.id = id;
    self.role = role;
    self.experts = {3, 17, 42};
    self.capacity = 512;
    REQUIRE_OK(ctx->connection_handle(self.connection));
    handle_bytes h;
    REQUIRE_OK(inbox->export_handle(h));
    self.regions.emplace_back("inbox", h);
    REQUIRE_OK(directory::start(*reg, *ctx, ns, self, ttl, dir));
  }
  std::uint64_t* word(std::size_t off) const {
    return reinterpret_cast<std::uint64_t*>(static_cast<unsigned char*>(inbox->data()) + off);
  }
};

}  // namespace

TEST_CASE("directory: peer records round-trip and every corruption is refused") {
  peer_record rec;
  rec.id = "server-1.a_b";
  rec.role = "server";
  rec.experts = {0, 5, 255, 65535};
  rec.capacity = 4096;
  rec.connection = handle_bytes(90, std::byte{7});
  rec.regions = {{"slots", handle_bytes(96, std::byte{1})}, {"weights", handle_bytes(96, std::byte{2})}};
  std::string enc;
  REQUIRE_OK(encode_peer_record(rec, enc));
  peer_record back;
  REQUIRE_OK(decode_peer_record(enc, back));
  CHECK(back.id == rec.id);
  CHECK(back.role == rec.role);
  CHECK(back.experts == rec.experts);
  CHECK(back.capacity == rec.capacity);
  CHECK(back.connection == rec.connection);
  REQUIRE(back.regions.size() == 2);
  CHECK(back.regions[1].first == "weights");
  CHECK(back.regions[1].second == rec.regions[1].second);

  for (std::size_t bit = 0; bit < enc.size() * 8; ++bit) {
    std::string bad = enc;
    bad[bit / 8] = static_cast<char>(bad[bit / 8] ^ (1 << (bit % 8)));
    CHECK(decode_peer_record(bad, back) == status::invalid_handle);
  }
  for (std::size_t n = 0; n < enc.size(); ++n)
    CHECK(decode_peer_record(enc.substr(0, n), back) == status::invalid_handle);
  std::mt19937_64 rng(5);
  for (int i = 0; i < 5000; ++i) {
    std::string junk(rng() % 400, '\0');
    for (auto& c : junk) c = static_cast<char>(rng());
    CHECK(decode_peer_record(junk, back) != status::ok);
  }
  peer_record bad_id = rec;
  bad_id.id = "no spaces/or slashes";
  CHECK(encode_peer_record(bad_id, enc) == status::invalid_argument);
  peer_record huge = rec;
  huge.experts.assign(70000, 1);
  CHECK(encode_peer_record(huge, enc) == status::invalid_argument);
}

TEST_CASE("directory: links made before on_link is installed are held for it, not dropped") {
  // A record is public as soon as start() returns, so a client may link before the server installs
  // its callback; the client is told "accepted", so the server must still get the link.
  const std::string ns = fresh_ns();
  node server(ns, "early-server", "server");
  node client(ns, "early-client", "client");
  peer_link to_server;
  REQUIRE_OK(client.dir->link("early-server", {}, 5'000'000'000ull, to_server));
  std::vector<std::string> got;
  server.dir->on_link([&](peer_link&& l) { got.push_back(l.record.id); });
  REQUIRE(got.size() == 1);
  CHECK(got[0] == "early-client");
}

TEST_CASE("directory: a client links to a server on demand; both ends hold a working endpoint") {
  const std::string ns = fresh_ns();
  node server(ns, "server-1", "server");
  std::mutex mu;
  std::condition_variable cv;
  std::vector<peer_link> accepted;
  server.dir->on_link([&](peer_link&& l) {
    std::lock_guard lock(mu);
    accepted.push_back(std::move(l));
    cv.notify_all();
  });
  node client(ns, "client-1", "client");

  // The client's result area, offered to this server only.
  std::unique_ptr<memory_region> results;
  REQUIRE_OK(client.ctx->allocate(4096, results));
  handle_bytes rh;
  REQUIRE_OK(results->export_handle(rh));

  std::vector<peer_record> seen;
  REQUIRE_OK(client.dir->peers(seen));
  CHECK(seen.size() == 2);

  peer_link to_server;
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE_OK(client.dir->link("server-1", {{"results", rh}}, 5'000'000'000ull, to_server));
  const auto took = std::chrono::steady_clock::now() - t0;
  MESSAGE(regtest::shared_backend().name(), ": handshake (link) took ",
          std::chrono::duration_cast<std::chrono::microseconds>(took).count(), " us");
  CHECK(to_server.record.experts == std::vector<std::uint32_t>{3, 17, 42});
  REQUIRE(to_server.region("inbox") != nullptr);
  {
    std::unique_lock lock(mu);
    REQUIRE(cv.wait_for(lock, 5s, [&] { return !accepted.empty(); }));
  }
  peer_link& from_client = accepted.front();
  CHECK(from_client.record.id == "client-1");
  REQUIRE(from_client.region("results") != nullptr);
  REQUIRE(from_client.region("inbox") != nullptr);

  // Client -> server request, server -> client answer, through the handshake's endpoints.
  const std::uint64_t req = 0xC0FFEE;
  REQUIRE_OK(put_signal(coop_thread{}, to_server.ep->view(), to_server.region("inbox")->view(), 64, &req, 8,
                        to_server.region("inbox")->view(), 0, 1, signal_op::set));
  REQUIRE_OK(wait_signal(server.ctx->view(), server.word(0), cmp_op::ge, 1, timeout{1'000'000'000ull}));
  CHECK(*server.word(64) == req);
  const std::uint64_t ans = req + 1;
  REQUIRE_OK(put_signal(coop_thread{}, from_client.ep->view(), from_client.region("results")->view(), 8, &ans, 8,
                        from_client.region("results")->view(), 0, 1, signal_op::set));
  const auto* res = static_cast<const std::uint64_t*>(results->data());
  REQUIRE_OK(wait_signal(client.ctx->view(), res, cmp_op::ge, 1, timeout{1'000'000'000ull}));
  CHECK(res[1] == ans);
}

TEST_CASE("directory: peers join and leave without restarts; watchers see both") {
  const std::string ns = fresh_ns();
  node client(ns, "client-1", "client");
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<peer_change, std::string>> changes;
  std::unique_ptr<watch> w;
  REQUIRE_OK(client.dir->watch_peers(
      [&](peer_change c, const peer_record& r) {
        std::lock_guard lock(mu);
        changes.emplace_back(c, r.id);
        cv.notify_all();
      },
      w));
  auto saw = [&](peer_change c, const std::string& id) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, 6s, [&] {
      for (auto& [cc, i] : changes)
        if (cc == c && i == id) return true;
      return false;
    });
  };
  CHECK(saw(peer_change::online, "client-1"));
  auto joiner = std::make_unique<node>(ns, "server-9", "server");
  CHECK(saw(peer_change::online, "server-9"));
  peer_link l;
  REQUIRE_OK(client.dir->link("server-9", {}, 5'000'000'000ull, l));
  joiner.reset();  // leaves: its lease is revoked
  CHECK(saw(peer_change::offline, "server-9"));
  CHECK(client.dir->link("server-9", {}, 1'000'000'000ull, l) == status::not_found);
  CHECK(client.dir->link("bad id!", {}, 1'000'000'000ull, l) == status::invalid_argument);

  // A malformed record under peers/ is skipped by readers and watchers, never trusted.
  REQUIRE_OK(client.reg->put("/eaas/" + ns + "/peers/mallory", "not a record", 0));
  std::vector<peer_record> ps;
  REQUIRE_OK(client.dir->peers(ps));
  for (const auto& p : ps) CHECK(p.id != "mallory");
  std::this_thread::sleep_for(200ms);
  std::lock_guard lock(mu);
  for (auto& [c, id] : changes) CHECK(id != "mallory");
}

TEST_CASE("directory: a link to a peer that never answers times out within its bound") {
  const std::string ns = fresh_ns();
  node client(ns, "client-1", "client");
  // A record published by hand: the peer is "there" but serves no link requests.
  node ghost_owner(ns, "ghost-src", "server");
  peer_record ghost = ghost_owner.self;
  ghost.id = "ghost";
  std::string enc;
  REQUIRE_OK(encode_peer_record(ghost, enc));
  REQUIRE_OK(client.reg->put("/eaas/" + ns + "/peers/ghost", enc, 0));
  peer_link l;
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(client.dir->link("ghost", {}, 300'000'000ull, l) == status::timeout);
  const auto took = std::chrono::steady_clock::now() - t0;
  CHECK(took >= 300ms);
  CHECK(took < 2s);
}
