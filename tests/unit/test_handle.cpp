#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>

#include "fixture.hpp"
#include "handle.hpp"

using eaas::status;
using eaas::test::loopback;

namespace {

// Rewrites the header's checksum so that only the field a test changed is wrong.
void reseal(eaas::handle_bytes& h) {
  std::span<const std::byte> all(h);
  std::uint32_t c = eaas::detail::crc32c(0, all.subspan(0, 12));
  c = eaas::detail::crc32c(c, all.subspan(16));
  for (int i = 0; i < 4; ++i) h[12 + i] = static_cast<std::byte>((c >> (8 * i)) & 0xffu);
}

std::string reason() { return std::string(eaas::last_error()); }

}  // namespace

TEST_CASE("handles describe themselves and survive text round trips") {
  loopback lb(1 << 16);
  eaas::handle_bytes ch, rh;
  REQUIRE_OK(lb.ctx->connection_handle(ch));
  REQUIRE_OK(lb.local->export_handle(rh));
  eaas::handle_info info{};
  REQUIRE_OK(eaas::inspect_handle(ch, info));
  CHECK(info.kind == eaas::handle_kind::connection);
  CHECK(info.size == ch.size());
  REQUIRE_OK(eaas::inspect_handle(rh, info));
  CHECK(info.kind == eaas::handle_kind::region);
  CHECK(info.transport == eaas::transport_kind::shm);
  CHECK(info.version == 1);

  const std::string text = eaas::handle_to_text(rh);
  CHECK(text.size() == 2 * rh.size());
  eaas::handle_bytes back;
  REQUIRE_OK(eaas::handle_from_text(text + "\n", back));
  CHECK(back == rh);
  CHECK(eaas::handle_from_text("abc", back) == status::invalid_handle);
  CHECK(eaas::handle_from_text("zz", back) == status::invalid_handle);
}

TEST_CASE("every single-bit flip of a region handle is rejected") {
  loopback lb(1 << 16);
  eaas::handle_bytes rh;
  REQUIRE_OK(lb.local->export_handle(rh));
  int rejected = 0;
  for (std::size_t bit = 0; bit < rh.size() * 8; ++bit) {
    auto bad = rh;
    bad[bit / 8] ^= static_cast<std::byte>(1u << (bit % 8));
    std::unique_ptr<eaas::remote_region> rr;
    const status s = lb.ep->import_region(bad, rr);
    CHECK_MESSAGE(s == status::invalid_handle, "bit ", bit, ": ", eaas::status_name(s));
    CHECK(rr == nullptr);
    rejected += s == status::invalid_handle;
  }
  CHECK(rejected == static_cast<int>(rh.size() * 8));
}

TEST_CASE("every single-bit flip of a connection handle is rejected") {
  loopback lb(4096);
  eaas::handle_bytes ch;
  REQUIRE_OK(lb.ctx->connection_handle(ch));
  for (std::size_t bit = 0; bit < ch.size() * 8; ++bit) {
    auto bad = ch;
    bad[bit / 8] ^= static_cast<std::byte>(1u << (bit % 8));
    std::unique_ptr<eaas::endpoint> ep;
    const status s = lb.ctx->connect(bad, ep);
    CHECK_MESSAGE(s == status::invalid_handle, "bit ", bit, ": ", eaas::status_name(s));
    CHECK(ep == nullptr);
  }
}

TEST_CASE("truncated, extended and random garbage handles are rejected without crashing") {
  loopback lb(1 << 16);
  eaas::handle_bytes rh, ch;
  REQUIRE_OK(lb.local->export_handle(rh));
  REQUIRE_OK(lb.ctx->connection_handle(ch));
  std::unique_ptr<eaas::remote_region> rr;
  std::unique_ptr<eaas::endpoint> ep;
  for (std::size_t n = 0; n < rh.size(); ++n) {
    eaas::handle_bytes cut(rh.begin(), rh.begin() + static_cast<std::ptrdiff_t>(n));
    CHECK(lb.ep->import_region(cut, rr) == status::invalid_handle);
  }
  for (std::size_t n = 0; n < ch.size(); ++n) {
    eaas::handle_bytes cut(ch.begin(), ch.begin() + static_cast<std::ptrdiff_t>(n));
    CHECK(lb.ctx->connect(cut, ep) == status::invalid_handle);
  }
  auto longer = rh;
  longer.push_back(std::byte{0});
  CHECK(lb.ep->import_region(longer, rr) == status::invalid_handle);

  std::mt19937_64 rng(12345);
  int rejected = 0;
  constexpr int kTrials = 20000;
  for (int i = 0; i < kTrials; ++i) {
    auto bad = (i % 2) ? rh : ch;
    const int flips = 1 + static_cast<int>(rng() % 16);
    for (int f = 0; f < flips; ++f) bad[rng() % bad.size()] ^= static_cast<std::byte>(1u + rng() % 255u);
    if (i % 5 == 0) bad.resize(rng() % (bad.size() + 8));  // also random lengths
    const status s = (i % 2) ? lb.ep->import_region(bad, rr) : lb.ctx->connect(bad, ep);
    rejected += s == status::invalid_handle;
  }
  CHECK(rejected == kTrials);
  CHECK(rr == nullptr);
  CHECK(ep == nullptr);
}

TEST_CASE("a well-sealed handle with a wrong field says which field") {
  loopback lb(1 << 16);
  eaas::handle_bytes rh, ch;
  REQUIRE_OK(lb.local->export_handle(rh));
  REQUIRE_OK(lb.ctx->connection_handle(ch));
  std::unique_ptr<eaas::remote_region> rr;

  SUBCASE("version") {
    auto bad = rh;
    bad[4] = std::byte{2};
    reseal(bad);
    CHECK(lb.ep->import_region(bad, rr) == status::invalid_handle);
    CHECK(reason().find("version 2") != std::string::npos);
  }
  SUBCASE("transport") {
    auto bad = rh;
    bad[7] = static_cast<std::byte>(eaas::transport_kind::nvlink);
    reseal(bad);
    CHECK(lb.ep->import_region(bad, rr) == status::invalid_handle);
    CHECK(reason().find("transport nvlink") != std::string::npos);
  }
  SUBCASE("kind") {
    CHECK(lb.ep->import_region(ch, rr) == status::invalid_handle);
    CHECK(reason().find("connection handle was given") != std::string::npos);
  }
  SUBCASE("region bounds") {
    // Payload layout: owner(@0), host(@8), pid(@16), fd(@20), start(@24), token(@32), offset(@40),
    // size(@48), map_size(@56).
    auto bad = rh;
    bad[16 + 48 + 5] = std::byte{1};  // size += 2^40
    reseal(bad);
    CHECK(lb.ep->import_region(bad, rr) == status::invalid_handle);
    CHECK(reason().find("outside") != std::string::npos);
  }
  SUBCASE("unknown token: a freed or foreign memfd is never mapped") {
    auto bad = rh;
    bad[16 + 32] ^= std::byte{0x5a};
    reseal(bad);
    CHECK(lb.ep->import_region(bad, rr) == status::invalid_handle);
    CHECK(reason().find("not the exported region") != std::string::npos);
  }
  CHECK(rr == nullptr);
}

TEST_CASE("a region is imported only through an endpoint to its owner") {
  loopback a(4096), b(4096);
  eaas::handle_bytes bh;
  REQUIRE_OK(b.local->export_handle(bh));
  std::unique_ptr<eaas::remote_region> rr;
  CHECK(a.ep->import_region(bh, rr) == status::invalid_argument);
  CHECK(reason().find("belongs to context") != std::string::npos);
  // Through an endpoint to b it works.
  eaas::handle_bytes bch;
  REQUIRE_OK(b.ctx->connection_handle(bch));
  std::unique_ptr<eaas::endpoint> a_to_b;
  REQUIRE_OK(a.ctx->connect(bch, a_to_b));
  REQUIRE_OK(a_to_b->import_region(bh, rr));
  CHECK(rr->size() == 4096);
}

TEST_CASE("a freed region cannot be imported") {
  loopback lb(4096);
  std::unique_ptr<eaas::memory_region> mr;
  REQUIRE_OK(lb.ctx->allocate(8192, mr));
  eaas::handle_bytes h;
  REQUIRE_OK(mr->export_handle(h));
  mr.reset();
  std::unique_ptr<eaas::remote_region> rr;
  const status s = lb.ep->import_region(h, rr);
  CHECK(s == status::invalid_handle);
  CHECK(rr == nullptr);
}

TEST_CASE("shm regions are size-sealed: a peer that opens the memfd can neither shrink nor grow it") {
  loopback lb(1 << 16);
  // Find the region's memfd as a peer would reach it, through /proc, and open it read-write.
  int found = 0;
  for (int fd = 0; fd < 4096; ++fd) {
    char link[64], target[256] = {};
    std::snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    const ssize_t n = ::readlink(link, target, sizeof(target) - 1);
    if (n <= 0 || std::string(target).rfind("/memfd:eaas-", 0) != 0) continue;
    const int peer = ::open(link, O_RDWR | O_CLOEXEC);
    REQUIRE(peer >= 0);
    const int seals = ::fcntl(peer, F_GET_SEALS);
    CHECK((seals & F_SEAL_SHRINK) != 0);
    CHECK((seals & F_SEAL_GROW) != 0);
    CHECK((seals & F_SEAL_SEAL) != 0);  // and the seals cannot be lifted
    struct stat st {};
    REQUIRE(::fstat(peer, &st) == 0);
    errno = 0;
    CHECK(::ftruncate(peer, st.st_size / 2) != 0);
    CHECK(errno == EPERM);
    CHECK(::ftruncate(peer, st.st_size * 2) != 0);
    CHECK(::fstat(peer, &st) == 0);
    CHECK(st.st_size >= (1 << 16));
    ::close(peer);
    ++found;
  }
  CHECK(found >= 1);
  // The region still works.
  std::memset(lb.local->data(), 0x5A, lb.local->size());
  CHECK(static_cast<unsigned char*>(lb.local->data())[lb.local->size() - 1] == 0x5A);
}
