// Multi-process tests: the driver (this binary) and separately started eaas-test-peer processes.

#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "../common/spawn.hpp"
#include "../unit/fixture.hpp"
#include "common.hpp"

using namespace eaas;
using namespace eaas::mptest;

namespace {

constexpr std::uint64_t kSecond = 1'000'000'000ull;
constexpr std::size_t kMiB = std::size_t{1} << 20;

std::set<std::string> dev_shm_entries() {
  std::set<std::string> names;
  if (DIR* d = ::opendir("/dev/shm")) {
    while (dirent* e = ::readdir(d)) names.insert(e->d_name);
    ::closedir(d);
  }
  return names;
}

/// The driver side: a context and one region that every peer answers into.
struct driver {
  std::unique_ptr<context> ctx;
  std::unique_ptr<memory_region> region;
  handle_bytes conn, rh;
  explicit driver(std::size_t bytes) {
    REQUIRE_OK(context::create({.name = "driver"}, ctx));
    REQUIRE_OK(ctx->allocate(bytes, region));
    REQUIRE_OK(ctx->connection_handle(conn));
    REQUIRE_OK(region->export_handle(rh));
  }
  unsigned char* base() const { return static_cast<unsigned char*>(region->data()); }
  std::uint64_t* word(std::size_t off) const { return reinterpret_cast<std::uint64_t*>(base() + off); }
};

/// One eaas-test-peer process, bootstrapped over pipes, then driven through eaas.
struct peer_process {
  pid_t pid = -1;
  std::size_t index = 0;
  std::unique_ptr<endpoint> ep;
  std::unique_ptr<remote_region> rr;
  std::uint64_t seq = 0;
  const driver* drv = nullptr;

  peer_process(const driver& d, std::size_t idx, std::size_t bytes) : index(idx), drv(&d) {
    test::spawned child;
    REQUIRE(test::spawn_with_pipes(EAAS_TEST_PEER, {std::to_string(idx), std::to_string(bytes)}, child));
    pid = child.pid;
    handle_bytes ch, rh;
    REQUIRE(test::read_handle_line(child.from, 'C', ch));
    REQUIRE(test::read_handle_line(child.from, 'R', rh));
    REQUIRE_OK(d.ctx->connect(ch, ep));
    REQUIRE_OK(ep->import_region(rh, rr));
    std::fprintf(child.to, "C %s\nR %s\n", handle_to_text(d.conn).c_str(), handle_to_text(d.rh).c_str());
    std::fclose(child.to);
    std::fclose(child.from);
  }
  ~peer_process() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }

  /// Sends a command (args + signal in one put_signal); answer with await().
  status send(std::uint64_t cmd, std::uint64_t a0 = 0, std::uint64_t a1 = 0, std::uint64_t a2 = 0) {
    const std::uint64_t args[4] = {cmd, a0, a1, a2};
    ++seq;
    return put_signal(coop_thread{}, ep->view(), rr->view(), kCmdArgs, args, sizeof(args), rr->view(), kCmdSeq, seq,
                      signal_op::set);
  }
  status await(std::uint64_t& result, std::uint64_t timeout_ns = 60 * kSecond) {
    const std::size_t resp = kRespBlock * (index + 1);
    EAAS_CHECK(wait_signal(ep->view(), drv->word(resp + kRespSeq), cmp_op::ge, seq, deadline_after(timeout_ns)));
    result = *drv->word(resp + kRespValue);
    return status::ok;
  }
  status call(std::uint64_t& result, std::uint64_t cmd, std::uint64_t a0 = 0, std::uint64_t a1 = 0,
              std::uint64_t a2 = 0) {
    EAAS_CHECK(send(cmd, a0, a1, a2));
    return await(result);
  }
  void kill9() {
    REQUIRE(::kill(pid, SIGKILL) == 0);
    REQUIRE(::waitpid(pid, nullptr, 0) == pid);
    pid = -1;
  }
  void exit_cleanly() {
    REQUIRE_OK(send(cmd_exit));
    int st = 0;
    REQUIRE(::waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st));
    CHECK(WEXITSTATUS(st) == 0);
    pid = -1;
  }

  /// A put of `bytes` pattern bytes into the peer at `offset`, checked by the peer itself.
  void put_and_verify(std::uint64_t seed, std::size_t offset, std::size_t bytes, std::vector<unsigned char>& buf) {
    buf.resize(bytes);
    fill_pattern(seed, buf.data(), bytes);
    REQUIRE_OK(put(coop_thread{}, ep->view(), rr->view(), kData + offset, buf.data(), bytes));
    REQUIRE_OK(quiet(coop_thread{}, ep->view()));
    std::uint64_t bad = ~0ull;
    REQUIRE_OK(call(bad, cmd_verify, seed, offset, bytes));
    CHECK_MESSAGE(bad == 0, bytes, " bytes at ", offset);
  }
};

std::size_t log_uniform(std::mt19937_64& rng, std::size_t max) {
  std::uniform_real_distribution<double> u(0.0, std::log2(static_cast<double>(max)));
  return std::max<std::size_t>(1, static_cast<std::size_t>(std::exp2(u(rng))));
}

}  // namespace

TEST_CASE("two processes: put, get, put_signal and atomics with random sizes up to 64 MiB") {
  const auto shm_before = dev_shm_entries();
  constexpr std::size_t kArea = 72 * kMiB;
  driver d(kData + kArea);
  {
    peer_process p(d, 0, kData + kArea);
    std::mt19937_64 rng(20261128);
    std::vector<unsigned char> buf, back;
    std::vector<std::size_t> sizes = {1, 7, 8, 4096, 64 * kMiB};
    for (int i = 0; i < 40; ++i) sizes.push_back(log_uniform(rng, 64 * kMiB));
    std::uint64_t total = 0;
    for (std::size_t n : sizes) {
      const std::size_t off = rng() % (kArea - n + 1);
      const std::uint64_t seed = rng();
      // driver -> peer put, verified by the peer
      p.put_and_verify(seed, off, n, buf);
      // peer fills its own memory, driver gets it
      std::uint64_t r = ~0ull;
      REQUIRE_OK(p.call(r, cmd_fill, seed + 1, off, n));
      back.assign(n, 0xEE);
      REQUIRE_OK(get(coop_thread{}, p.ep->view(), p.rr->view(), kData + off, back.data(), n));
      CHECK(count_mismatches(seed + 1, back.data(), n) == 0);
      // peer -> driver put, verified here
      REQUIRE_OK(p.call(r, cmd_put, seed + 2, off, n));
      CHECK(r == static_cast<std::uint64_t>(status::ok));
      CHECK(count_mismatches(seed + 2, d.base() + kData + off, n) == 0);
      total += 3 * n;
    }
    MESSAGE("moved and verified ", total >> 20, " MiB in ", 3 * sizes.size(), " transfers");

    // put_signal with a payload lands before its signal; signal add accumulates.
    buf.resize(5000);
    fill_pattern(99, buf.data(), buf.size());
    REQUIRE_OK(put_signal(coop_thread{}, p.ep->view(), p.rr->view(), kData + 12345, buf.data(), buf.size(),
                          p.rr->view(), 256, 3, signal_op::add));
    REQUIRE_OK(signal(coop_thread{}, p.ep->view(), p.rr->view(), 256, 4, signal_op::add));
    alignas(8) std::uint64_t fetched = 0;
    REQUIRE_OK(fetch_add(coop_thread{}, p.ep->view(), p.rr->view(), 256, 0, &fetched));
    REQUIRE_OK(quiet(coop_thread{}, p.ep->view()));
    CHECK(fetched == 7);
    std::uint64_t bad = ~0ull;
    REQUIRE_OK(p.call(bad, cmd_verify, 99, 12345, 5000));
    CHECK(bad == 0);
    REQUIRE_OK(compare_swap(coop_thread{}, p.ep->view(), p.rr->view(), 256, 7, 100, &fetched));
    REQUIRE_OK(compare_swap(coop_thread{}, p.ep->view(), p.rr->view(), 256, 7, 200, &fetched));
    REQUIRE_OK(quiet(coop_thread{}, p.ep->view()));
    CHECK(fetched == 100);
    p.exit_cleanly();
  }
  CHECK(dev_shm_entries() == shm_before);
}

TEST_CASE("atomics from four processes sum exactly") {
  driver d(kData + kMiB);
  std::vector<std::unique_ptr<peer_process>> peers;
  for (std::size_t k = 0; k < 4; ++k) peers.push_back(std::make_unique<peer_process>(d, k, kData + kMiB));
  constexpr std::uint64_t kAdds = 50000;
  for (auto& p : peers) REQUIRE_OK(p->send(cmd_add, kAdds, kData + 64));
  for (auto& p : peers) {
    std::uint64_t r = ~0ull;
    REQUIRE_OK(p->await(r));
    CHECK(r == 0);
  }
  CHECK(*d.word(kData + 64) == 4 * kAdds);
  for (auto& p : peers) p->exit_cleanly();
}

TEST_CASE("ordering stress: a signal is never observed before its payload") {
  driver d(kData + kMiB);
  peer_process p(d, 0, kData + kMiB);
  constexpr std::uint64_t kIters = 4'000'000;
  constexpr std::size_t kPayload = kData + 4096, kSig = kData + 64;
  REQUIRE_OK(p.send(cmd_order_send, kIters, kPayload, kSig));
  const auto* payload = d.word(kPayload);
  // Read the signal, then the payload, as fast as possible while the peer streams: every word of the
  // payload must be at least as new as the signal that was read before it.
  std::uint64_t checks = 0, in_flight = 0, violations = 0, seen = 0;
  const deadline until = deadline_after(60 * kSecond);
  while (seen < kIters) {
    seen = detail::load_acquire(d.word(kSig));
    for (int w = 0; w < 32; ++w) violations += detail::load_relaxed(payload + w) < seen;
    ++checks;
    in_flight += seen > 0 && seen < kIters;
    if ((checks & 4095) == 0) REQUIRE(now_ns() < until.ns);
  }
  std::uint64_t r = ~0ull;
  REQUIRE_OK(p.await(r));
  CHECK(r == 0);
  MESSAGE(checks, " ordered observations, ", in_flight, " of them while the stream was in flight");
  CHECK(in_flight >= 100000);
  CHECK(violations == 0);
  CHECK(seen == kIters);
  p.exit_cleanly();
}

TEST_CASE("a SIGKILLed peer ends the survivor's waits; the survivor then works with a new peer") {
  const auto shm_before = dev_shm_entries();
  driver d(kData + 8 * kMiB);
  {
    auto p = std::make_unique<peer_process>(d, 0, kData + 8 * kMiB);
    std::vector<unsigned char> buf;
    p->put_and_verify(1, 0, 4096, buf);
    // Mid-run: the peer is streaming put_signals when it dies; the driver waits for a signal that
    // will never come, with a long deadline.
    REQUIRE_OK(p->send(cmd_order_send, ~0ull >> 1, kData + 4096, kData + 64));
    std::uint64_t seen = 0;
    REQUIRE_OK(wait_signal(p->ep->view(), d.word(kData + 64), cmp_op::ge, 1000, deadline_after(30 * kSecond), &seen));
    const auto t0 = std::chrono::steady_clock::now();
    std::thread killer([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      p->kill9();
    });
    const status s = wait_signal(p->ep->view(), d.word(kData + 64), cmp_op::eq, 0, deadline_after(30 * kSecond));
    const auto waited = std::chrono::steady_clock::now() - t0;
    killer.join();
    CHECK(s == status::peer_unreachable);
    CHECK(waited < std::chrono::seconds(2));
    CHECK(p->ep->state() == endpoint_state::peer_dead);
    // Every op to the dead peer reports it instead of pretending.
    const std::uint64_t v = 1;
    CHECK(put(coop_thread{}, p->ep->view(), p->rr->view(), kData, &v, 8) == status::peer_unreachable);
    CHECK(quiet(coop_thread{}, p->ep->view()) == status::peer_unreachable);
    // A plain context wait (no endpoint) still ends at its deadline.
    const auto t1 = std::chrono::steady_clock::now();
    CHECK(wait_signal(d.ctx->view(), d.word(kData + 64), cmp_op::eq, 0, deadline_after(100'000'000)) ==
          status::timeout);
    CHECK(std::chrono::steady_clock::now() - t1 < std::chrono::milliseconds(200));
    p.reset();

    peer_process q(d, 1, kData + 8 * kMiB);
    q.put_and_verify(2, 12345, 3 * kMiB, buf);
    std::uint64_t r = ~0ull;
    REQUIRE_OK(q.call(r, cmd_put, 3, 100, 1 * kMiB));
    CHECK(count_mismatches(3, d.base() + kData + 100, 1 * kMiB) == 0);
    q.exit_cleanly();
  }
  CHECK(dev_shm_entries() == shm_before);
}

TEST_CASE("one process, eight peers: one killed, the other seven keep working") {
  driver d(kData + 16 * kMiB);
  std::vector<std::unique_ptr<peer_process>> peers;
  for (std::size_t k = 0; k < 8; ++k) peers.push_back(std::make_unique<peer_process>(d, k, kData + 2 * kMiB));
  std::vector<unsigned char> buf;
  for (auto& p : peers) p->put_and_verify(p->index, 0, 64 * 1024, buf);
  constexpr std::size_t kVictim = 3;
  peers[kVictim]->kill9();
  // The monitor notices within milliseconds; ops to the victim then fail, the rest succeed.
  const std::uint64_t v = 42;
  status victim = status::ok;
  for (int i = 0; i < 200 && victim == status::ok; ++i) {
    victim = put(coop_thread{}, peers[kVictim]->ep->view(), peers[kVictim]->rr->view(), kData, &v, 8);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(victim == status::peer_unreachable);
  for (int round = 0; round < 5; ++round) {
    for (std::size_t k = 0; k < peers.size(); ++k) {
      if (k == kVictim) continue;
      auto& p = *peers[k];
      CHECK(p.ep->state() == endpoint_state::connected);
      p.put_and_verify(1000 * round + k, 4096 * round, 100000, buf);
      std::uint64_t r = ~0ull;
      // Each survivor writes into its own slice of the driver's data area.
      REQUIRE_OK(p.call(r, cmd_put, 7 * k + round, 2 * kMiB * k, 50000));
      CHECK(count_mismatches(7 * k + round, d.base() + kData + 2 * kMiB * k, 50000) == 0);
    }
  }
  for (std::size_t k = 0; k < peers.size(); ++k)
    if (k != kVictim) peers[k]->exit_cleanly();
}
