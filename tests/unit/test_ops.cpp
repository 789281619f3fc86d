#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "fixture.hpp"

using eaas::coop_thread;
using eaas::status;
using eaas::test::loopback;

namespace {
constexpr std::uint64_t kSecond = 1'000'000'000ull;
std::uint64_t* word(const loopback& lb, std::size_t offset) {
  return reinterpret_cast<std::uint64_t*>(lb.bytes() + offset);
}
}  // namespace

TEST_CASE("put, get and put_signal move the right bytes to the right place") {
  loopback lb(1 << 20);
  std::mt19937_64 rng(7);
  const auto ep = lb.ep->view();
  const auto rv = lb.remote->view();
  for (int i = 0; i < 200; ++i) {
    const std::size_t n = 1 + rng() % 70000;
    const std::size_t off = 64 + rng() % ((1 << 20) - 64 - n);
    std::vector<unsigned char> src(n), back(n, 0xEE);
    for (auto& c : src) c = static_cast<unsigned char>(rng());
    std::memset(lb.bytes() + 64, 0xAB, (1 << 20) - 64);
    if (i % 2 == 0) {
      REQUIRE_OK(eaas::put(coop_thread{}, ep, rv, off, src.data(), n));
    } else {
      REQUIRE_OK(eaas::put_signal(coop_thread{}, ep, rv, off, src.data(), n, rv, 8, i, eaas::signal_op::set));
      CHECK(*word(lb, 8) == static_cast<std::uint64_t>(i));
    }
    REQUIRE_OK(eaas::quiet(coop_thread{}, ep));
    CHECK(std::memcmp(lb.bytes() + off, src.data(), n) == 0);
    // Bytes around the target stay untouched.
    CHECK(lb.bytes()[off - 1] == 0xAB);
    if (off + n < (1u << 20)) CHECK(lb.bytes()[off + n] == 0xAB);
    REQUIRE_OK(eaas::get(coop_thread{}, ep, rv, off, back.data(), n));
    CHECK(back == src);
  }
}

TEST_CASE("signals and atomics compute the right values") {
  loopback lb(4096);
  const auto ep = lb.ep->view();
  const auto rv = lb.remote->view();
  REQUIRE_OK(eaas::signal(coop_thread{}, ep, rv, 16, 41, eaas::signal_op::set));
  REQUIRE_OK(eaas::signal(coop_thread{}, ep, rv, 16, 1, eaas::signal_op::add));
  CHECK(*word(lb, 16) == 42);
  alignas(8) std::uint64_t fetched = 0;
  REQUIRE_OK(eaas::fetch_add(coop_thread{}, ep, rv, 16, 8, &fetched));
  REQUIRE_OK(eaas::quiet(coop_thread{}, ep));
  CHECK(fetched == 42);
  CHECK(*word(lb, 16) == 50);
  REQUIRE_OK(eaas::compare_swap(coop_thread{}, ep, rv, 16, 49, 7, &fetched));
  CHECK(fetched == 50);
  CHECK(*word(lb, 16) == 50);  // expected value did not match: unchanged
  REQUIRE_OK(eaas::compare_swap(coop_thread{}, ep, rv, 16, 50, 7, &fetched));
  CHECK(fetched == 50);
  CHECK(*word(lb, 16) == 7);
}

TEST_CASE("concurrent fetch_add from many threads sums exactly") {
  loopback lb(4096);
  constexpr int kThreads = 8, kAdds = 20000;
  std::vector<std::thread> threads;
  std::vector<std::uint64_t> max_seen(kThreads, 0);
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      const auto ep = lb.ep->view();
      const auto rv = lb.remote->view();
      alignas(8) std::uint64_t f = 0;
      for (int i = 0; i < kAdds; ++i) {
        if (eaas::fetch_add(coop_thread{}, ep, rv, 64, 3, &f) != status::ok) return;
        max_seen[t] = std::max(max_seen[t], f);
      }
    });
  for (auto& t : threads) t.join();
  CHECK(*word(lb, 64) == 3ull * kThreads * kAdds);
  // The largest value fetched is the sum before the very last add.
  CHECK(*std::max_element(max_seen.begin(), max_seen.end()) == 3ull * kThreads * kAdds - 3);
}

TEST_CASE("ops validate their arguments and touch nothing when they fail") {
  loopback lb(4096);
  auto ep = lb.ep->view();
  auto rv = lb.remote->view();
  std::memset(lb.bytes(), 0x11, 4096);
  unsigned char src[64] = {};
  alignas(8) std::uint64_t f = 0;
  CHECK(eaas::put(coop_thread{}, ep, rv, 4096 - 63, src, 64) == status::invalid_argument);
  CHECK(eaas::put(coop_thread{}, ep, rv, ~std::uint64_t{0} - 2, src, 64) == status::invalid_argument);
  CHECK(eaas::put(coop_thread{}, ep, rv, 0, nullptr, 64) == status::invalid_argument);
  unsigned char dst[128] = {};
  CHECK(eaas::get(coop_thread{}, ep, rv, 4000, dst, 97) == status::invalid_argument);
  CHECK(eaas::signal(coop_thread{}, ep, rv, 4, 1, eaas::signal_op::set) == status::invalid_argument);
  CHECK(eaas::signal(coop_thread{}, ep, rv, 4096, 1, eaas::signal_op::set) == status::invalid_argument);
  CHECK(eaas::signal(coop_thread{}, ep, rv, 8, 1, static_cast<eaas::signal_op>(9)) == status::invalid_argument);
  CHECK(eaas::fetch_add(coop_thread{}, ep, rv, 12, 1, &f) == status::invalid_argument);
  CHECK(eaas::fetch_add(coop_thread{}, ep, rv, 8, 1, nullptr) == status::invalid_argument);
  CHECK(eaas::put_signal(coop_thread{}, ep, rv, 0, src, 8, rv, 4093, 1, eaas::signal_op::set) ==
        status::invalid_argument);
  // A zero-byte put at the very end is in bounds.
  CHECK(eaas::put(coop_thread{}, ep, rv, 4096, src, 0) == status::ok);

  auto garbage_rv = rv;
  garbage_rv.magic = 0;
  CHECK(eaas::put(coop_thread{}, ep, garbage_rv, 0, src, 8) == status::invalid_argument);
  auto foreign_rv = rv;
  foreign_rv.owner_id ^= 1;
  CHECK(eaas::put(coop_thread{}, ep, foreign_rv, 0, src, 8) == status::invalid_argument);
  auto garbage_ep = ep;
  garbage_ep.magic = 0;
  CHECK(eaas::put(coop_thread{}, garbage_ep, rv, 0, src, 8) == status::invalid_argument);
  CHECK(eaas::wait_signal(garbage_ep, word(lb, 0), eaas::cmp_op::eq, 0, eaas::deadline_after(kSecond)) ==
        status::invalid_argument);

  // Warp and block scopes exist only on the device.
  CHECK(eaas::put(eaas::coop_warp{}, ep, rv, 0, src, 8) == status::unsupported);
  CHECK(eaas::signal(eaas::coop_block{}, ep, rv, 0, 1, eaas::signal_op::set) == status::unsupported);

  for (int i = 0; i < 4096; ++i) REQUIRE(lb.bytes()[i] == 0x11);
}

TEST_CASE("a closed endpoint refuses ops, waits and imports; others are untouched") {
  loopback lb(4096);
  std::unique_ptr<eaas::endpoint> second;
  eaas::handle_bytes ch, rh;
  REQUIRE_OK(lb.ctx->connection_handle(ch));
  REQUIRE_OK(lb.ctx->connect(ch, second));
  REQUIRE_OK(lb.local->export_handle(rh));
  std::unique_ptr<eaas::remote_region> second_rr;
  REQUIRE_OK(second->import_region(rh, second_rr));

  const auto ep = lb.ep->view();
  const auto rv = lb.remote->view();
  lb.ep->close();
  lb.ep->close();  // idempotent
  CHECK(lb.ep->state() == eaas::endpoint_state::closed);
  unsigned char src[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  CHECK(eaas::put(coop_thread{}, ep, rv, 0, src, 8) == status::not_connected);
  CHECK(eaas::quiet(coop_thread{}, ep) == status::not_connected);
  CHECK(eaas::wait_signal(ep, word(lb, 0), eaas::cmp_op::eq, 1, eaas::deadline_after(kSecond)) ==
        status::not_connected);
  std::unique_ptr<eaas::remote_region> rr;
  CHECK(lb.ep->import_region(rh, rr) == status::not_connected);
  // The imported region stays mapped; the other endpoint still works.
  REQUIRE_OK(eaas::put(coop_thread{}, second->view(), second_rr->view(), 0, src, 8));
  CHECK(std::memcmp(lb.bytes(), src, 8) == 0);
}

TEST_CASE("wait_signal ends: ok, timeout within 2x the deadline, aborted") {
  loopback lb(4096);
  const auto dctx = lb.ctx->view();
  std::uint64_t* sig = word(lb, 0);
  std::uint64_t seen = 0;

  *sig = 5;
  CHECK(eaas::wait_signal(dctx, sig, eaas::cmp_op::ge, 5, eaas::deadline_after(kSecond), &seen) == status::ok);
  CHECK(seen == 5);

  for (const std::uint64_t ms : {100ull, 250ull}) {
    const auto t0 = std::chrono::steady_clock::now();
    CHECK(eaas::wait_signal(dctx, sig, eaas::cmp_op::ge, 6, eaas::deadline_after(ms * 1'000'000), &seen) ==
          status::timeout);
    const auto waited =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    CHECK(waited >= static_cast<long>(ms));
    CHECK(waited < static_cast<long>(2 * ms));
    CHECK(seen == 5);
  }

  // The relative form: the bound starts when the first poll misses.
  {
    CHECK(eaas::wait_signal(dctx, sig, eaas::cmp_op::eq, 5, eaas::timeout{0}, &seen) == status::ok);
    const auto t0 = std::chrono::steady_clock::now();
    CHECK(eaas::wait_signal(lb.ep->view(), sig, eaas::cmp_op::eq, 6, eaas::timeout{100'000'000}, &seen) ==
          status::timeout);
    const auto waited =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    CHECK(waited >= 100);
    CHECK(waited < 200);
    // A deadline already in the past still polls once.
    CHECK(eaas::wait_signal(dctx, sig, eaas::cmp_op::eq, 5, eaas::deadline{0}) == status::ok);
    CHECK(eaas::wait_signal(dctx, sig, eaas::cmp_op::eq, 6, eaas::deadline{0}) == status::timeout);
  }

  // Another thread signals through the endpoint while we wait.
  std::thread signaller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    (void)eaas::signal(coop_thread{}, lb.ep->view(), lb.remote->view(), 0, 9, eaas::signal_op::set);
  });
  CHECK(eaas::wait_signal(lb.ep->view(), sig, eaas::cmp_op::eq, 9, eaas::deadline_after(10 * kSecond), &seen) ==
        status::ok);
  signaller.join();
  CHECK(seen == 9);

  std::thread aborter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    lb.ctx->abort();
  });
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(eaas::wait_signal(dctx, sig, eaas::cmp_op::eq, 10, eaas::deadline_after(30 * kSecond)) == status::aborted);
  aborter.join();
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  lb.ctx->clear_abort();
  CHECK(eaas::wait_signal(dctx, sig, eaas::cmp_op::eq, 9, eaas::deadline_after(kSecond)) == status::ok);
  CHECK(eaas::wait_signal(dctx, reinterpret_cast<const std::uint64_t*>(lb.bytes() + 3), eaas::cmp_op::eq, 9,
                          eaas::deadline_after(kSecond)) == status::invalid_argument);
}

TEST_CASE("register_memory shares sub-ranges of allocated memory and refuses the rest") {
  loopback lb(1 << 16);
  std::unique_ptr<eaas::memory_region> sub;
  REQUIRE_OK(lb.ctx->register_memory(lb.bytes() + 8192, 4096, sub));
  CHECK(sub->data() == lb.bytes() + 8192);
  CHECK(sub->size() == 4096);
  eaas::handle_bytes h;
  REQUIRE_OK(sub->export_handle(h));
  std::unique_ptr<eaas::remote_region> rr;
  REQUIRE_OK(lb.ep->import_region(h, rr));
  CHECK(rr->size() == 4096);
  const std::uint64_t v = 0x0123456789abcdefull;
  REQUIRE_OK(eaas::put(coop_thread{}, lb.ep->view(), rr->view(), 8, &v, 8));
  CHECK(*word(lb, 8192 + 8) == v);
  CHECK(eaas::put(coop_thread{}, lb.ep->view(), rr->view(), 4090, &v, 8) == status::invalid_argument);

  std::vector<unsigned char> heap(4096);
  std::unique_ptr<eaas::memory_region> bad;
  CHECK(lb.ctx->register_memory(heap.data(), heap.size(), bad) == status::unsupported);
  CHECK(std::string(eaas::last_error()).find("memfd") != std::string::npos);
  CHECK(lb.ctx->register_memory(lb.bytes() + (1 << 16) - 100, 4096, bad) == status::unsupported);
  CHECK(lb.ctx->register_memory(nullptr, 16, bad) == status::invalid_argument);
  CHECK(bad == nullptr);
}

TEST_CASE("allocate refuses zero and absurd sizes") {
  std::unique_ptr<eaas::context> ctx;
  REQUIRE_OK(eaas::context::create({}, ctx));
  std::unique_ptr<eaas::memory_region> mr;
  CHECK(ctx->allocate(0, mr) == status::invalid_argument);
  CHECK(ctx->allocate(std::size_t{1} << 50, mr) == status::invalid_argument);
  CHECK(mr == nullptr);
}

TEST_CASE("connect refuses a peer that offers no common transport") {
  eaas::context_options no_shm;
  no_shm.enable_shm = false;
  std::unique_ptr<eaas::context> a, b;
  REQUIRE_OK(eaas::context::create({}, a));
  REQUIRE_OK(eaas::context::create(no_shm, b));
  eaas::handle_bytes bh;
  REQUIRE_OK(b->connection_handle(bh));
  std::unique_ptr<eaas::endpoint> ep;
  CHECK(a->connect(bh, ep) == status::peer_unreachable);
  CHECK(std::string(eaas::last_error()).find("no transport") != std::string::npos);
  std::unique_ptr<eaas::memory_region> mr;
  CHECK(b->allocate(4096, mr) == status::unsupported);
}

TEST_CASE("peer_pointer gives a mapped pointer inside the region, and nothing for a bad view, range or endpoint") {
  loopback lb(4096);
  const auto ep = lb.ep->view();
  const auto rv = lb.remote->view();
  auto* p = static_cast<unsigned char*>(eaas::peer_pointer(ep, rv, 128, 256));
  REQUIRE(p != nullptr);
  // Stores through it land at the region's bytes 128 .. 383, and a get reads them back.
  for (int i = 0; i < 256; ++i) p[i] = static_cast<unsigned char>(i * 7 + 1);
  for (int i = 0; i < 256; ++i) CHECK(lb.bytes()[128 + i] == static_cast<unsigned char>(i * 7 + 1));
  unsigned char back[256];
  REQUIRE_OK(eaas::get(coop_thread{}, ep, rv, 128, back, sizeof(back)));
  CHECK(std::memcmp(back, lb.bytes() + 128, sizeof(back)) == 0);
  // The whole region, and an empty range at its end, are fine; one byte past it is not.
  CHECK(eaas::peer_pointer(ep, rv, 0, 4096) == static_cast<void*>(p - 128));
  CHECK(eaas::peer_pointer(ep, rv, 4096, 0) != nullptr);
  CHECK(eaas::peer_pointer(ep, rv, 4095, 2) == nullptr);
  CHECK(eaas::peer_pointer(ep, rv, ~std::uint64_t{0} - 8, 16) == nullptr);
  auto forged = rv;
  forged.magic ^= 1;
  CHECK(eaas::peer_pointer(ep, forged, 0, 8) == nullptr);
  auto other = rv;
  other.owner_id ^= 1;  // registered by someone else than this endpoint's peer
  CHECK(eaas::peer_pointer(ep, other, 0, 8) == nullptr);
  lb.ep->close();
  CHECK(eaas::peer_pointer(ep, rv, 0, 8) == nullptr);  // a closed endpoint
}
