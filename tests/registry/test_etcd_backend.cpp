// The etcd backend against real etcd processes on loopback: the conformance suite's backend
// (test_registry.cpp and test_directory.cpp are built into this binary too) and what only a real
// etcd can show — watches that outlive kill -9, cut connections and compaction; auth tokens.
// The binary exits 77 (ctest: skipped) when no etcd is installed.

#define DOCTEST_CONFIG_IMPLEMENT
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../common/doctest_main.hpp"
#include "../common/require_ok.hpp"
#include "backend.hpp"
#include "collector.hpp"
#include "eaas/eaas.hpp"
#include "etcd_process.hpp"
#include "registry/net.hpp"

using namespace eaas;
using eaas::regtest::collector;
using eaas::regtest::describe;
using namespace std::chrono_literals;
using eaas::test::etcd_process;

// ---- the conformance suite's backend ------------------------------------------------------------

namespace eaas::regtest {

namespace {

class etcd_backend final : public backend {
 public:
  explicit etcd_backend(std::unique_ptr<etcd_process> e) : etcd_(std::move(e)) {}
  std::string name() const override { return "etcd"; }
  registry_options options() const override {
    registry_options o;
    o.endpoint = etcd_->endpoint();
    return o;
  }
  status restart() override { return etcd_->restart(); }  // kill -9, then the same ports and data
  bool persistent() const override { return true; }

 private:
  std::unique_ptr<etcd_process> etcd_;
};

}  // namespace

status start_backend(std::unique_ptr<backend>& out) {
  std::unique_ptr<etcd_process> e;
  EAAS_CHECK(etcd_process::start(e));
  out = std::make_unique<etcd_backend>(std::move(e));
  return status::ok;
}

}  // namespace eaas::regtest

namespace {

using ms = std::chrono::milliseconds;

std::unique_ptr<etcd_process> start_etcd() {
  std::unique_ptr<etcd_process> e;
  REQUIRE_OK(etcd_process::start(e));
  return e;
}

std::unique_ptr<registry> open_at(const std::string& endpoint, ms timeout = 2000ms, std::string token = {}) {
  registry_options o;
  o.endpoint = endpoint;
  o.token = std::move(token);
  o.request_timeout_ns = static_cast<std::uint64_t>(timeout.count()) * 1'000'000ull;
  std::unique_ptr<registry> r;
  REQUIRE_OK(registry::open(o, r));
  return r;
}

const watch_event* find(const std::vector<watch_event>& ev, watch_event_type t, const std::string& key) {
  for (const auto& e : ev)
    if (e.type == t && e.record.key == key) return &e;
  return nullptr;
}

int count_key(const std::vector<watch_event>& ev, const std::string& key) {
  int n = 0;
  for (const auto& e : ev) n += e.record.key == key;
  return n;
}

bool nondecreasing(const std::vector<watch_event>& ev) {
  for (std::size_t i = 1; i < ev.size(); ++i)
    if (ev[i].record.mod_revision < ev[i - 1].record.mod_revision) return false;
  return true;
}

/// A TCP proxy to etcd that can cut every connection and refuse new ones, while etcd itself stays up:
/// the way to change the store behind a watch's back.
class tcp_proxy {
 public:
  explicit tcp_proxy(std::uint16_t target) : target_(target) {
    REQUIRE(eaas::detail::net::listen_on("127.0.0.1", 0, fd_, port_) == eaas::status::ok);
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~tcp_proxy() {
    stop_ = true;
    acceptor_.join();
    for (auto& t : pumps_) t.join();
    ::close(fd_);
  }
  std::string endpoint() const { return "etcd://127.0.0.1:" + std::to_string(port_); }
  /// Drops every open connection and refuses new ones until resume().
  void cut() {
    refusing_ = true;
    ++generation_;
  }
  void resume() { refusing_ = false; }

 private:
  void accept_loop() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      if (refusing_) {
        ::close(c);
        continue;
      }
      int u = -1;
      if (eaas::detail::net::connect_to("127.0.0.1", target_, 1'000'000'000ull, u) != eaas::status::ok) {
        ::close(c);
        continue;
      }
      pumps_.emplace_back([this, c, u, gen = generation_.load()] { pump(c, u, gen); });
    }
  }
  void pump(int c, int u, int gen) {
    char buf[65536];
    while (!stop_ && generation_.load() == gen) {
      pollfd p[2] = {{c, POLLIN, 0}, {u, POLLIN, 0}};
      if (::poll(p, 2, 20) <= 0) continue;
      bool closed = false;
      for (int i = 0; i < 2 && !closed; ++i) {
        if (p[i].revents == 0) continue;
        const ssize_t n = ::recv(p[i].fd, buf, sizeof(buf), 0);
        if (n <= 0) {
          closed = true;
          break;
        }
        for (ssize_t done = 0; done < n;) {
          const ssize_t w = ::send(p[1 - i].fd, buf + done, static_cast<std::size_t>(n - done), MSG_NOSIGNAL);
          if (w <= 0) {
            closed = true;
            break;
          }
          done += w;
        }
      }
      if (closed) break;
    }
    ::close(c);
    ::close(u);
  }

  std::uint16_t target_;
  int fd_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_{false}, refusing_{false};
  std::atomic<int> generation_{0};
  std::thread acceptor_;
  std::vector<std::thread> pumps_;  // only the acceptor adds; joined after it
};

/// A field of a flat JSON answer ("token":"…"), for test setup only.
std::string json_field(const std::string& body, const std::string& name) {
  const std::string tag = "\"" + name + "\":\"";
  const auto at = body.find(tag);
  if (at == std::string::npos) return {};
  const auto start = at + tag.size();
  return body.substr(start, body.find('"', start) - start);
}

}  // namespace

TEST_CASE("real etcd: a watch resynchronises after its connection is cut: changes arrive, vanished keys as expire") {
  auto etcd = start_etcd();
  tcp_proxy proxy(etcd->client_port());
  auto writer = open_at(etcd->endpoint());
  auto watcher = open_at(proxy.endpoint(), 500ms);
  const std::string p = "/resync/";
  std::int64_t lease = 0;
  REQUIRE_OK(writer->grant_lease(60, lease));
  REQUIRE_OK(writer->put(p + "keep", "k", 0));
  REQUIRE_OK(writer->put(p + "change", "v1", 0));
  REQUIRE_OK(writer->put(p + "leased", "l", lease));
  REQUIRE_OK(writer->put(p + "deleted", "d", 0));
  std::vector<kv_record> listed;
  std::int64_t rev = 0;
  REQUIRE_OK(watcher->list(p, listed, rev));
  REQUIRE(listed.size() == 4);
  collector c;
  std::unique_ptr<watch> w;
  REQUIRE_OK(watcher->watch_prefix(p, rev, c.fn(), w));
  REQUIRE_OK(writer->put(p + "live", "x", 0));
  REQUIRE(c.wait_size(1));

  proxy.cut();
  std::this_thread::sleep_for(300ms);  // the watch notices and fails to reconnect meanwhile
  kv_record rec;
  CHECK(watcher->get(p + "keep", rec) == status::peer_unreachable);
  REQUIRE_OK(writer->put(p + "change", "v2", 0));
  REQUIRE_OK(writer->revoke_lease(lease));
  REQUIRE_OK(writer->remove(p + "deleted"));
  REQUIRE_OK(writer->put(p + "new", "n", 0));
  std::vector<kv_record> truth;
  std::int64_t truth_rev = 0;
  REQUIRE_OK(writer->list(p, truth, truth_rev));
  proxy.resume();

  REQUIRE(c.wait_size(5));
  REQUIRE_OK(writer->put(p + "after", "a", 0));
  REQUIRE(c.wait_size(6));
  std::this_thread::sleep_for(100ms);
  const auto ev = c.snapshot();
  INFO(describe(ev));
  REQUIRE(ev.size() == 6);
  CHECK((ev[0].type == watch_event_type::put && ev[0].record.key == p + "live"));
  const watch_event* changed = find(ev, watch_event_type::put, p + "change");
  REQUIRE(changed != nullptr);
  CHECK(changed->record.value == "v2");
  CHECK(find(ev, watch_event_type::put, p + "new") != nullptr);
  // Gone while we were away: etcd's history is not consulted, so both read as expire.
  const watch_event* leased = find(ev, watch_event_type::expire, p + "leased");
  const watch_event* deleted = find(ev, watch_event_type::expire, p + "deleted");
  REQUIRE(leased != nullptr);
  REQUIRE(deleted != nullptr);
  CHECK(leased->record.mod_revision >= truth_rev);
  CHECK(ev[5].record.key == p + "after");
  CHECK(count_key(ev, p + "keep") == 0);  // unchanged: known from the list the watch started after
  CHECK(count_key(ev, p + "live") == 1);  // delivered before the cut: not again
  CHECK(nondecreasing(ev));
}

TEST_CASE("real etcd: a watch outlives kill -9 and restart of etcd; calls fail with peer_unreachable meanwhile") {
  auto etcd = start_etcd();
  auto r = open_at(etcd->endpoint(), 500ms);
  const std::string p = "/restart/";
  std::int64_t lease = 0;
  REQUIRE_OK(r->grant_lease(60, lease));
  REQUIRE_OK(r->put(p + "a", "leased", lease));
  REQUIRE_OK(r->put(p + "b", "plain", 0));
  std::vector<kv_record> listed;
  std::int64_t rev = 0;
  REQUIRE_OK(r->list(p, listed, rev));
  collector c;
  std::unique_ptr<watch> w;
  REQUIRE_OK(r->watch_prefix(p, rev, c.fn(), w));

  etcd->kill9();
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(r->put(p + "x", "x", 0) == status::peer_unreachable);
  CHECK(std::chrono::steady_clock::now() - t0 < 1500ms);
  CHECK(std::string(last_error()).find("cannot connect") != std::string::npos);
  std::this_thread::sleep_for(500ms);
  REQUIRE_OK(etcd->restart());

  REQUIRE_OK(r->put(p + "c", "after restart", 0));
  REQUIRE(c.wait_size(1));
  // etcd keeps leases across its restart: the lease is still there to revoke.
  REQUIRE_OK(r->revoke_lease(lease));
  REQUIRE(c.wait_size(2));
  std::this_thread::sleep_for(100ms);
  const auto ev = c.snapshot();
  INFO(describe(ev));
  REQUIRE(ev.size() == 2);
  CHECK((ev[0].type == watch_event_type::put && ev[0].record.key == p + "c" && ev[0].record.value == "after restart"));
  CHECK((ev[1].type == watch_event_type::expire && ev[1].record.key == p + "a"));
  CHECK(r->keep_alive(lease) == status::not_found);

  const auto t1 = std::chrono::steady_clock::now();
  w->cancel();
  CHECK(std::chrono::steady_clock::now() - t1 < 100ms);
}

TEST_CASE("real etcd: a watch from a compacted revision resynchronises to the current state") {
  auto etcd = start_etcd();
  auto r = open_at(etcd->endpoint());
  const std::string p = "/compact/";
  for (const char* v : {"v0", "v1", "v2", "v3", "v4"}) REQUIRE_OK(r->put(p + "k", v, 0));
  REQUIRE_OK(r->put(p + "gone", "g", 0));
  REQUIRE_OK(r->remove(p + "gone"));
  std::vector<kv_record> listed;
  std::int64_t rev = 0;
  REQUIRE_OK(r->list(p, listed, rev));
  std::string answer;
  int http = 0;
  const std::string compaction = R"({"physical":true,"revision":")" + std::to_string(rev) + "\"}";
  REQUIRE_OK(etcd->http("/v3/kv/compaction", compaction, answer, http));
  REQUIRE(http == 200);

  collector c;
  std::unique_ptr<watch> w;
  REQUIRE_OK(r->watch_prefix(p, 1, c.fn(), w));  // revision 2 onwards is history etcd no longer has
  REQUIRE(c.wait_size(1));
  REQUIRE_OK(r->put(p + "next", "n", 0));
  REQUIRE(c.wait_size(2));
  std::this_thread::sleep_for(100ms);
  const auto ev = c.snapshot();
  INFO(describe(ev));
  REQUIRE(ev.size() == 2);
  CHECK((ev[0].type == watch_event_type::put && ev[0].record.key == p + "k" && ev[0].record.value == "v4"));
  CHECK((ev[1].type == watch_event_type::put && ev[1].record.key == p + "next"));
}

TEST_CASE("real etcd: with auth on, the token goes in the Authorization header; none or a wrong one is refused") {
  auto etcd = start_etcd();
  std::string answer;
  int http = 0;
  for (const auto& [path, body] :
       std::vector<std::pair<std::string, std::string>>{{"/v3/auth/user/add", R"({"name":"root","password":"pw"})"},
                                                        {"/v3/auth/role/add", R"({"name":"root"})"},
                                                        {"/v3/auth/user/grant", R"({"user":"root","role":"root"})"},
                                                        {"/v3/auth/enable", "{}"}}) {
    INFO((path + " -> " + answer));
    REQUIRE_OK(etcd->http(path, body, answer, http));
    REQUIRE(http == 200);
  }
  REQUIRE_OK(etcd->http("/v3/auth/authenticate", R"({"name":"root","password":"pw"})", answer, http));
  const std::string token = json_field(answer, "token");
  REQUIRE(!token.empty());

  auto good = open_at(etcd->endpoint(), 2000ms, token);
  REQUIRE_OK(good->put("/auth/k", "v", 0));
  kv_record rec;
  REQUIRE_OK(good->get("/auth/k", rec));
  CHECK(rec.value == "v");
  collector c;
  std::unique_ptr<watch> w;
  REQUIRE_OK(good->watch_prefix("/auth/", rec.mod_revision, c.fn(), w));
  REQUIRE_OK(good->put("/auth/k", "v2", 0));
  REQUIRE(c.wait_size(1));

  auto none = open_at(etcd->endpoint());  // etcd's status call needs no token
  CHECK(none->get("/auth/k", rec) == status::permission_denied);
  CHECK(std::string(last_error()).find("token") != std::string::npos);
  std::unique_ptr<watch> w2;
  CHECK(none->watch_prefix(
            "/auth/", 0, [](const watch_event&) {}, w2) == status::permission_denied);
  auto wrong = open_at(etcd->endpoint(), 2000ms, "not-a-token");
  CHECK(wrong->put("/auth/k", "v", 0) == status::permission_denied);
}

// ---- main: skip (77) without etcd; fail when a filter matched no case --------------------------

int main(int argc, char** argv) {
  return eaas::test::run_tests(argc, argv, [] {
    return etcd_process::available() ? nullptr
                                     : "etcd is not installed (Debian: apt-get install etcd-server; or set EAAS_ETCD): "
                                       "skipping the etcd tests";
  });
}
