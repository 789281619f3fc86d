// Registry conformance tests: the same cases against every backend (this file is built once per
// backend; see tests/registry/backend_*.cpp).

#include <doctest/doctest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "../common/require_ok.hpp"
#include "backend.hpp"
#include "collector.hpp"
#include "eaas/eaas.hpp"

extern char** environ;

using namespace eaas;
using eaas::regtest::collector;
using namespace std::chrono_literals;

namespace {

std::unique_ptr<regtest::backend> g_backend;

regtest::backend& be() {
  if (!g_backend) REQUIRE_OK(regtest::start_backend(g_backend));
  return *g_backend;
}

}  // namespace

namespace eaas::regtest {
/// One backend per test binary, shared by every test file in it.
backend& shared_backend() { return be(); }
}  // namespace eaas::regtest

namespace {

std::unique_ptr<registry> open_client() {
  std::unique_ptr<registry> r;
  REQUIRE_OK(registry::open(be().options(), r));
  return r;
}

/// A unique prefix per test, so the cases never see each other's keys.
std::string fresh_prefix(const char* what) {
  static std::atomic<int> n{0};
  return "/eaas-test/" + std::to_string(::getpid()) + "/" + what + "/" + std::to_string(n++) + "/";
}

/// Lists `prefix` and watches every change after that list: the events from now on.
std::unique_ptr<watch> watch_from_now(registry& r, const std::string& prefix, collector& c) {
  std::vector<kv_record> cur;
  std::int64_t rev = 0;
  REQUIRE_OK(r.list(prefix, cur, rev));
  std::unique_ptr<watch> w;
  REQUIRE_OK(r.watch_prefix(prefix, rev, c.fn(), w));
  return w;
}

bool has(const std::vector<watch_event>& ev, watch_event_type t, const std::string& key) {
  for (const auto& e : ev)
    if (e.type == t && e.record.key == key) return true;
  return false;
}

}  // namespace

TEST_CASE("registry: put, get, list, remove and compare-and-swap keep etcd's revisions") {
  auto r = open_client();
  const std::string p = fresh_prefix("kv");
  REQUIRE_OK(r->put(p + "b", "two", 0));
  REQUIRE_OK(r->put(p + "a", "one", 0));
  REQUIRE_OK(r->put(p + "c", std::string("\0bin\xff", 5), 0));
  kv_record rec;
  REQUIRE_OK(r->get(p + "a", rec));
  CHECK(rec.value == "one");
  CHECK(rec.lease == 0);
  CHECK(rec.create_revision == rec.mod_revision);
  const std::int64_t a_created = rec.create_revision;
  REQUIRE_OK(r->put(p + "a", "uno", 0));
  REQUIRE_OK(r->get(p + "a", rec));
  CHECK(rec.value == "uno");
  CHECK(rec.create_revision == a_created);
  CHECK(rec.mod_revision > a_created);

  std::vector<kv_record> all;
  std::int64_t rev = 0;
  REQUIRE_OK(r->list(p, all, rev));
  REQUIRE(all.size() == 3);
  CHECK(all[0].key == p + "a");
  CHECK(all[1].key == p + "b");
  CHECK(all[2].key == p + "c");
  CHECK(all[2].value == std::string("\0bin\xff", 5));
  CHECK(rev >= rec.mod_revision);
  std::vector<kv_record> none;
  REQUIRE_OK(r->list(p + "zzz", none, rev));
  CHECK(none.empty());

  REQUIRE_OK(r->remove(p + "b"));
  CHECK(r->get(p + "b", rec) == status::not_found);
  CHECK(r->remove(p + "b") == status::not_found);

  bool swapped = false;
  REQUIRE_OK(r->compare_and_swap(p + "id", 0, "first", 0, swapped));
  CHECK(swapped);
  REQUIRE_OK(r->compare_and_swap(p + "id", 0, "second", 0, swapped));
  CHECK_FALSE(swapped);
  REQUIRE_OK(r->get(p + "id", rec));
  CHECK(rec.value == "first");
  REQUIRE_OK(r->compare_and_swap(p + "id", rec.mod_revision, "third", 0, swapped));
  CHECK(swapped);
  REQUIRE_OK(r->compare_and_swap(p + "id", rec.mod_revision, "fourth", 0, swapped));
  CHECK_FALSE(swapped);
  REQUIRE_OK(r->get(p + "id", rec));
  CHECK(rec.value == "third");
}

TEST_CASE("registry: bad arguments are refused with invalid_argument") {
  auto r = open_client();
  kv_record rec;
  std::int64_t lease = 0;
  CHECK(r->put("", "x", 0) == status::invalid_argument);
  CHECK(r->put(std::string(kMaxKeyBytes + 1, 'k'), "x", 0) == status::invalid_argument);
  CHECK(r->put("/k", std::string(kMaxValueBytes + 1, 'v'), 0) == status::invalid_argument);
  CHECK(r->get("", rec) == status::invalid_argument);
  CHECK(r->grant_lease(0, lease) == status::invalid_argument);
  CHECK(r->grant_lease(3601, lease) == status::invalid_argument);
  // The largest allowed value goes through intact.
  const std::string p = fresh_prefix("big");
  const std::string big(kMaxValueBytes, 'v');
  REQUIRE_OK(r->put(p + "v", big, 0));
  REQUIRE_OK(r->get(p + "v", rec));
  CHECK(rec.value == big);
  std::unique_ptr<registry> bad;
  registry_options o = be().options();
  o.endpoint = "carrier-pigeon://x";
  CHECK(registry::open(o, bad) == status::invalid_argument);
}

TEST_CASE("registry: an unrefreshed lease expires within TTL + 1 s and watchers see expire") {
  auto r = open_client();
  const std::string p = fresh_prefix("lease");
  collector c;
  std::unique_ptr<watch> w = watch_from_now(*r, p, c);
  std::int64_t lease = 0;
  REQUIRE_OK(r->grant_lease(2, lease));
  REQUIRE_OK(r->put(p + "server-1", "record", lease));
  kv_record rec;
  REQUIRE_OK(r->get(p + "server-1", rec));
  CHECK(rec.lease == lease);
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(c.wait([&](auto& ev) { return has(ev, watch_event_type::expire, p + "server-1"); }, 6s));
  const auto waited = std::chrono::steady_clock::now() - t0;
  MESSAGE(be().name(), ": lease of 2 s expired after ",
          std::chrono::duration_cast<std::chrono::milliseconds>(waited).count(), " ms");
  CHECK(waited <= 3s);
  CHECK(r->get(p + "server-1", rec) == status::not_found);
  CHECK(r->keep_alive(lease) == status::not_found);
  CHECK(r->put(p + "late", "x", lease) == status::not_found);
  const auto ev = c.snapshot();
  REQUIRE(ev.size() == 2);
  CHECK(ev[0].type == watch_event_type::put);
  CHECK(ev[1].type == watch_event_type::expire);
  CHECK(ev[1].record.mod_revision > ev[0].record.mod_revision);
}

TEST_CASE("registry: keep-alive holds a lease; revoke ends it at once") {
  auto r = open_client();
  const std::string p = fresh_prefix("keep");
  std::int64_t lease = 0;
  REQUIRE_OK(r->grant_lease(1, lease));
  REQUIRE_OK(r->put(p + "k", "v", lease));
  for (int i = 0; i < 8; ++i) {
    std::this_thread::sleep_for(400ms);
    REQUIRE_OK(r->keep_alive(lease));
  }
  kv_record rec;
  REQUIRE_OK(r->get(p + "k", rec));  // 3.2 s after a 1 s lease was granted: kept alive
  collector c;
  std::unique_ptr<watch> w;
  REQUIRE_OK(r->watch_prefix(p, rec.mod_revision, c.fn(), w));
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE_OK(r->revoke_lease(lease));
  REQUIRE(c.wait([&](auto& ev) { return has(ev, watch_event_type::expire, p + "k"); }, 5s));
  CHECK(std::chrono::steady_clock::now() - t0 < 1s);
  CHECK(r->get(p + "k", rec) == status::not_found);
}

TEST_CASE("registry: list then watch sees every change once, in order, only under its prefix") {
  auto writer = open_client();
  auto reader = open_client();
  const std::string p = fresh_prefix("order");
  for (int i = 0; i < 20; ++i) REQUIRE_OK(writer->put(p + "pre" + std::to_string(i), "0", 0));
  std::vector<kv_record> state;
  std::int64_t rev = 0;
  REQUIRE_OK(reader->list(p, state, rev));
  REQUIRE(state.size() == 20);
  collector c;
  std::unique_ptr<watch> w;
  REQUIRE_OK(reader->watch_prefix(p, rev, c.fn(), w));
  constexpr int kOps = 300;
  for (int i = 0; i < kOps; ++i) {
    const std::string key = p + "k" + std::to_string(i % 37);
    if (i % 5 == 4)
      (void)writer->remove(key);  // may be not_found: then no event
    else
      REQUIRE_OK(writer->put(key, std::to_string(i), 0));
    if (i % 50 == 0) REQUIRE_OK(writer->put("/elsewhere/" + std::to_string(i), "x", 0));
  }
  std::vector<kv_record> final_state;
  std::int64_t final_rev = 0;
  REQUIRE_OK(writer->list(p, final_state, final_rev));
  REQUIRE(c.wait([&](auto& ev) { return !ev.empty() && ev.back().record.mod_revision >= final_rev - 0; }, 10s));
  const auto ev = c.snapshot();
  // Replaying the events over the listed state gives the final state.
  std::map<std::string, std::string> replay;
  for (const auto& rec : state) replay[rec.key] = rec.value;
  std::int64_t last = rev;
  bool ordered = true, scoped = true;
  for (const auto& e : ev) {
    ordered &= e.record.mod_revision > last;
    last = e.record.mod_revision;
    scoped &= e.record.key.starts_with(p);
    if (e.type == watch_event_type::put)
      replay[e.record.key] = e.record.value;
    else
      replay.erase(e.record.key);
  }
  CHECK(ordered);
  CHECK(scoped);
  std::map<std::string, std::string> expect;
  for (const auto& rec : final_state) expect[rec.key] = rec.value;
  CHECK(replay == expect);
}

TEST_CASE("registry: a SIGKILLed process's record goes offline within TTL + 1 s") {
  auto r = open_client();
  const std::string p = fresh_prefix("kill");
  collector c;
  std::unique_ptr<watch> w = watch_from_now(*r, p, c);
  int out[2];
  REQUIRE(::pipe(out) == 0);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_addclose(&fa, out[0]);
  const std::string ep = be().options().endpoint, key = p + "server-7";
  char* argv[] = {const_cast<char*>(EAAS_REGISTRY_PEER), const_cast<char*>(ep.c_str()), const_cast<char*>(key.c_str()),
                  const_cast<char*>("2"), nullptr};
  pid_t pid = -1;
  REQUIRE(::posix_spawn(&pid, EAAS_REGISTRY_PEER, &fa, nullptr, argv, environ) == 0);
  posix_spawn_file_actions_destroy(&fa);
  ::close(out[1]);
  char buf[16] = {};
  REQUIRE(::read(out[0], buf, 6) == 6);
  ::close(out[0]);
  REQUIRE(std::string(buf, 5) == "ready");
  REQUIRE(c.wait([&](auto& ev) { return has(ev, watch_event_type::put, key); }, 5s));
  std::this_thread::sleep_for(1500ms);  // the peer keeps its lease alive meanwhile
  kv_record rec;
  REQUIRE_OK(r->get(key, rec));
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(::kill(pid, SIGKILL) == 0);
  REQUIRE(::waitpid(pid, nullptr, 0) == pid);
  REQUIRE(c.wait([&](auto& ev) { return has(ev, watch_event_type::expire, key); }, 8s));
  const auto waited = std::chrono::steady_clock::now() - t0;
  MESSAGE(be().name(),
          ": SIGKILL to offline event: ", std::chrono::duration_cast<std::chrono::milliseconds>(waited).count(),
          " ms (TTL 2 s)");
  CHECK(waited <= 3s);
}

TEST_CASE("registry: clients survive a registry restart and re-register on their own") {
  auto r = open_client();
  auto watcher = open_client();
  const std::string p = fresh_prefix("restart");
  std::unique_ptr<lease_keeper> keeper;
  REQUIRE_OK(lease_keeper::start(*r, 2, {{p + "server-1", "handles"}}, keeper));
  collector c;
  std::unique_ptr<watch> w;
  REQUIRE_OK(watcher->watch_prefix(p, 0, c.fn(), w));
  REQUIRE(c.wait([&](auto& ev) { return has(ev, watch_event_type::put, p + "server-1"); }, 5s));
  const std::size_t before = c.snapshot().size();

  REQUIRE_OK(be().restart());
  // Meanwhile calls fail cleanly or succeed (after the reconnect); they never hang or crash.
  kv_record rec;
  const status during = r->get(p + "server-1", rec);
  CHECK((during == status::ok || during == status::peer_unreachable || during == status::not_found));

  // The record is back within a few seconds, and the watcher's view says so.
  bool back = false;
  for (int i = 0; i < 100 && !back; ++i) {
    back = r->get(p + "server-1", rec) == status::ok && rec.value == "handles";
    if (!back) std::this_thread::sleep_for(100ms);
  }
  CHECK(back);
  if (!be().persistent()) {
    CHECK(keeper->reregistrations() >= 1);
    // The watcher saw the record vanish with the old registry and come back.
    REQUIRE(c.wait(
        [&](auto& ev) {
          return ev.size() > before && ev.back().type == watch_event_type::put &&
                 ev.back().record.key == p + "server-1";
        },
        10s));
  }
  // And the registry works normally again for both clients.
  REQUIRE_OK(watcher->put(p + "after", "x", 0));
  REQUIRE(c.wait([&](auto& ev) { return has(ev, watch_event_type::put, p + "after"); }, 5s));
}

TEST_CASE("registry: a callback may call the registry, and cancel stops delivery") {
  auto r = open_client();
  const std::string p = fresh_prefix("cb");
  std::atomic<int> seen{0};
  std::unique_ptr<watch> w;
  std::unique_ptr<registry>* rp = &r;
  REQUIRE_OK(r->watch_prefix(
      p, 0,
      [&](const watch_event& e) {
        kv_record rec;
        if (e.type == watch_event_type::put && (*rp)->get(e.record.key, rec) == status::ok) ++seen;
      },
      w));
  REQUIRE_OK(r->put(p + "a", "1", 0));
  for (int i = 0; i < 100 && seen.load() < 1; ++i) std::this_thread::sleep_for(20ms);
  CHECK(seen.load() == 1);
  w->cancel();
  REQUIRE_OK(r->put(p + "b", "2", 0));
  std::this_thread::sleep_for(300ms);
  CHECK(seen.load() == 1);
}
