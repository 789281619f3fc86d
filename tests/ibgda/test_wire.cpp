// The ibgda connection and region descriptions (lib/transport/ibgda/wire.hpp): round trips, and
// every corruption refused — each truncation, each single-bit flip, and each out-of-range field
// in a handle whose checksum was made to match.

#include <doctest/doctest.h>

#include <functional>
#include <random>
#include <string>

#include "eaas/host/error.hpp"
#include "handle.hpp"
#include "transport/ibgda/wire.hpp"

using eaas::status;
namespace ib = eaas::detail::ibgda;

namespace {

std::string why() { return std::string(eaas::last_error()); }

ib::conn_desc sample(ib::link_layer l = ib::link_layer::ethernet, std::size_t n = 3) {
  ib::conn_desc d;
  d.context_id = 0x0123456789abcdefull;
  d.host_id = 0xfedcba9876543210ull;
  d.target_id = 0x1111222233334444ull;
  d.layer = l;
  d.mtu = 5;
  d.lid = l == ib::link_layer::infiniband ? 0x0042 : 0;
  d.gid = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3};
  for (std::size_t i = 0; i < n; ++i)
    d.qps.push_back({static_cast<std::uint32_t>(0x100 + i), static_cast<std::uint32_t>(0xfff000 + i),
                     ib::notice_word{0x7f0000001000ull + 4 * i, static_cast<std::uint32_t>(0x5000 + i), 4}});
  return d;
}

bool same(const ib::conn_desc& a, const ib::conn_desc& b) {
  if (a.context_id != b.context_id || a.host_id != b.host_id || a.target_id != b.target_id ||
      a.target_qpn != b.target_qpn || a.layer != b.layer || a.mtu != b.mtu || a.lid != b.lid || a.gid != b.gid ||
      a.qps.size() != b.qps.size())
    return false;
  for (std::size_t i = 0; i < a.qps.size(); ++i)
    if (a.qps[i].qpn != b.qps[i].qpn || a.qps[i].psn != b.qps[i].psn || a.qps[i].notice.addr != b.qps[i].notice.addr ||
        a.qps[i].notice.rkey != b.qps[i].notice.rkey || a.qps[i].notice.bytes != b.qps[i].notice.bytes)
      return false;
  return true;
}

// Rewrites the CRC so that only the semantic checks stand between a bad field and its use.
void reseal(eaas::handle_bytes& h) {
  std::span<const std::byte> all(h);
  std::uint32_t c = eaas::detail::crc32c(0, all.subspan(0, 12));
  c = eaas::detail::crc32c(c, all.subspan(16));
  for (int i = 0; i < 4; ++i) h[12 + i] = static_cast<std::byte>((c >> (8 * i)) & 0xffu);
}

// Offsets (after the 16-byte header) of the connection description's fields; a QP entry is 24 bytes:
// QPN, PSN, then its close-notice word's address, rkey and size.
constexpr std::size_t kFormat = 16, kContext = kFormat + 4, kTarget = kContext + 16, kTargetQpn = kContext + 24,
                      kLayer = kTargetQpn + 4, kMtu = kLayer + 1, kLid = kMtu + 1, kGid = kLid + 2, kCount = kGid + 16,
                      kQps = kCount + 1, kQpEntry = 24, kNoticeAddr = kQps + 8, kNoticeRkey = kQps + 16,
                      kNoticeBytes = kQps + 20;

}  // namespace

TEST_CASE("ibgda wire: connection descriptions round-trip") {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 2000; ++i) {
    const bool roce = rng() & 1;
    ib::conn_desc d =
        sample(roce ? ib::link_layer::ethernet : ib::link_layer::infiniband, 1 + rng() % ib::kMaxQpsPerPeer);
    d.context_id = rng() | 1;
    d.host_id = rng();
    d.target_id = rng() | 1;
    d.target_qpn = static_cast<std::uint32_t>(rng() % 0x1000000);
    d.mtu = static_cast<std::uint8_t>(1 + rng() % 5);
    if (!roce) d.lid = static_cast<std::uint16_t>(1 + rng() % 0xbfff);
    for (auto& b : d.gid) b = static_cast<std::uint8_t>(rng());
    d.gid[0] = roce ? static_cast<std::uint8_t>(rng() % 0xff) : d.gid[0];  // never multicast
    for (std::size_t k = 0; k < d.qps.size(); ++k) {
      d.qps[k].qpn = static_cast<std::uint32_t>((k << 16) + 1 + rng() % 0xfff0);  // distinct, nonzero
      d.qps[k].psn = static_cast<std::uint32_t>(rng() & 0xffffff);
      // A close-notice word, or none (peer_set's exchange has none).
      d.qps[k].notice =
          rng() % 4 == 0 ? ib::notice_word{}
                         : ib::notice_word{(rng() & ~std::uint64_t{3}) | 4, static_cast<std::uint32_t>(rng() | 1), 4};
    }
    eaas::handle_bytes h;
    REQUIRE(ib::encode(d, h) == status::ok);
    eaas::handle_info info{};
    REQUIRE(eaas::inspect_handle(h, info) == status::ok);
    CHECK(info.transport == eaas::transport_kind::ibgda);
    CHECK(info.kind == eaas::handle_kind::connection);
    ib::conn_desc back;
    REQUIRE(ib::decode(h, back) == status::ok);
    CHECK(same(d, back));
    const auto p = back.qp(back.qps.size() - 1);
    CHECK(p.qpn == d.qps.back().qpn);
    CHECK(p.psn == d.qps.back().psn);
    CHECK(p.gid == d.gid);
  }
}

TEST_CASE("ibgda wire: every truncation and every bit flip is refused") {
  eaas::handle_bytes h;
  REQUIRE(ib::encode(sample(), h) == status::ok);
  ib::conn_desc out;
  for (std::size_t n = 0; n < h.size(); ++n) {
    CAPTURE(n);
    CHECK(ib::decode(std::span(h).first(n), out) == status::invalid_handle);
  }
  auto longer = h;
  longer.push_back(std::byte{0});
  CHECK(ib::decode(longer, out) == status::invalid_handle);
  for (std::size_t i = 0; i < h.size(); ++i)
    for (int bit = 0; bit < 8; ++bit) {
      auto bad = h;
      bad[i] ^= static_cast<std::byte>(1u << bit);
      CAPTURE(i);
      CAPTURE(bit);
      CHECK(ib::decode(bad, out) == status::invalid_handle);
    }
  // A region handle, or another transport's connection handle, is not a connection description.
  ib::region_wire rg{1, 2, 0x1000, 64, 5};
  eaas::handle_bytes rh;
  REQUIRE(ib::encode(rg, rh) == status::ok);
  CHECK(ib::decode(rh, out) == status::invalid_handle);
  auto other = h;
  other[7] = static_cast<std::byte>(eaas::transport_kind::shm);
  reseal(other);
  CHECK(ib::decode(other, out) == status::invalid_handle);
  auto version = h;
  version[4] = std::byte{9};
  reseal(version);
  CHECK(ib::decode(version, out) == status::invalid_handle);
  CHECK(why().find("version") != std::string::npos);
}

TEST_CASE("ibgda wire: each out-of-range field is refused by name even with a valid checksum") {
  struct bad {
    const char* what;
    std::function<void(eaas::handle_bytes&)> edit;
    const char* says;
  };
  auto put16 = [](eaas::handle_bytes& h, std::size_t at, std::uint16_t v) {
    h[at] = static_cast<std::byte>(v & 0xff);
    h[at + 1] = static_cast<std::byte>(v >> 8);
  };
  auto put32 = [](eaas::handle_bytes& h, std::size_t at, std::uint32_t v) {
    for (int i = 0; i < 4; ++i) h[at + i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
  };
  const std::vector<bad> cases{
      {"format 1", [&](auto& h) { put32(h, kFormat, 1); }, "format 0x1"},
      {"context 0", [](auto& h) { std::fill(h.begin() + kContext, h.begin() + kContext + 8, std::byte{0}); },
       "context id 0"},
      {"link layer 0", [](auto& h) { h[kLayer] = std::byte{0}; }, "link layer 0"},
      {"link layer 3", [](auto& h) { h[kLayer] = std::byte{3}; }, "link layer 3"},
      {"MTU 0", [](auto& h) { h[kMtu] = std::byte{0}; }, "MTU enum 0"},
      {"MTU 6", [](auto& h) { h[kMtu] = std::byte{6}; }, "MTU enum 6"},
      {"RoCE zero GID", [](auto& h) { std::fill(h.begin() + kGid, h.begin() + kGid + 16, std::byte{0}); }, "zero GID"},
      {"RoCE multicast GID", [](auto& h) { h[kGid] = std::byte{0xff}; }, "multicast"},
      {"IB LID 0",
       [&](auto& h) {
         h[kLayer] = std::byte{1};
         put16(h, kLid, 0);
       },
       "LID 0"},
      {"IB multicast LID",
       [&](auto& h) {
         h[kLayer] = std::byte{1};
         put16(h, kLid, 0xc000);
       },
       "LID 0xc000"},
      {"no QPs", [](auto& h) { h[kCount] = std::byte{0}; }, "0 QPs"},
      {"65 QPs", [](auto& h) { h[kCount] = std::byte{65}; }, "65 QPs"},
      {"target QPN of 25 bits", [&](auto& h) { put32(h, kTargetQpn, 0x1000000); }, "target QPN 0x1000000"},
      {"target QPN addressed to no one",
       [&](auto& h) {
         for (int i = 0; i < 8; ++i) h[kTarget + i] = std::byte{0};
         put32(h, kTargetQpn, 5);
       },
       "addressed to no one"},
      {"count past the end", [](auto& h) { h[kCount] = std::byte{4}; }, "truncated QP list"},
      {"count short", [](auto& h) { h[kCount] = std::byte{2}; }, "trailing bytes"},
      {"QPN 0", [&](auto& h) { put32(h, kQps, 0); }, "QPN 0"},
      {"QPN of 25 bits", [&](auto& h) { put32(h, kQps, 0x1000000); }, "QPN 0x1000000"},
      {"PSN of 25 bits", [&](auto& h) { put32(h, kQps + 4, 0x1000000); }, "PSN 0x1000000"},
      {"duplicate QPN", [&](auto& h) { put32(h, kQps + kQpEntry, 0x100); }, "appears twice"},
      {"notice of 8 bytes", [&](auto& h) { put32(h, kNoticeBytes, 8); }, "close-notice word of 8 bytes"},
      {"notice of 0 bytes", [&](auto& h) { put32(h, kNoticeBytes + kQpEntry, 0); }, "close-notice word of 0 bytes"},
      {"notice at 0",
       [&](auto& h) {
         put32(h, kNoticeAddr, 0);
         put32(h, kNoticeAddr + 4, 0);
       },
       "close-notice address 0x0"},
      {"notice misaligned", [&](auto& h) { put32(h, kNoticeAddr, 0x1002); }, "close-notice address 0x7f0000001002"},
      {"notice wrapping around",
       [&](auto& h) {
         put32(h, kNoticeAddr, 0xfffffffc);
         put32(h, kNoticeAddr + 4, 0xffffffff);
       },
       "close-notice address 0xfffffffffffffffc"},
      {"notice rkey 0", [&](auto& h) { put32(h, kNoticeRkey, 0); }, "close-notice rkey 0"},
      {"only a notice rkey",
       [&](auto& h) {
         for (std::size_t i = 0; i < 8; ++i) h[kNoticeAddr + i] = std::byte{0};
         put32(h, kNoticeBytes, 0);
       },
       "close-notice word of 0 bytes"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    eaas::handle_bytes h;
    REQUIRE(ib::encode(sample(), h) == status::ok);
    c.edit(h);
    reseal(h);
    ib::conn_desc out;
    out.context_id = 77;
    CHECK(ib::decode(h, out) == status::invalid_handle);
    CHECK(why().find(c.says) != std::string::npos);
    if (why().find(c.says) == std::string::npos) MESSAGE(why());
    CHECK(out.context_id == 77);  // untouched on failure
  }
  // The encoder refuses what the decoder would refuse.
  auto d = sample();
  d.mtu = 7;
  eaas::handle_bytes h;
  CHECK(ib::encode(d, h) == status::invalid_argument);
  d = sample();
  d.qps.clear();
  CHECK(ib::encode(d, h) == status::invalid_argument);
  d = sample();
  d.qps[1].notice.bytes = 8;
  CHECK(ib::encode(d, h) == status::invalid_argument);
  // A QP entry without a notice word (all three zero) is well formed: peer_set's exchange.
  d = sample();
  d.qps[2].notice = {};
  REQUIRE(ib::encode(d, h) == status::ok);
  ib::conn_desc back;
  REQUIRE(ib::decode(h, back) == status::ok);
  CHECK(!back.qps[2].notice.present());
  CHECK(back.qps[1].notice.present());
}

TEST_CASE("ibgda wire: an advertisement may list no QP (an exhausted pool); an addressed description may not") {
  auto d = sample(ib::link_layer::infiniband, 0);
  d.target_id = 0;
  eaas::handle_bytes h;
  REQUIRE(ib::encode(d, h) == status::ok);
  ib::conn_desc back;
  REQUIRE(ib::decode(h, back) == status::ok);
  CHECK(same(d, back));
  CHECK(back.qps.empty());
  d.lid = 0;  // the port must still be described correctly
  CHECK(ib::encode(d, h) == status::invalid_argument);
  d = sample(ib::link_layer::infiniband, 0);
  CHECK(ib::encode(d, h) == status::invalid_argument);  // addressed, no QP
  d.target_id = 0;
  d.target_qpn = 9;
  CHECK(ib::encode(d, h) == status::invalid_argument);  // a target QPN needs an addressee
}

TEST_CASE("ibgda wire: region descriptions round-trip and refuse every corruption") {
  ib::region_wire r{0xabc, 0xdef, 0x7f0000001000ull, 1 << 20, 0x1234abcd};
  eaas::handle_bytes h;
  REQUIRE(ib::encode(r, h) == status::ok);
  ib::region_wire back;
  REQUIRE(ib::decode(h, back) == status::ok);
  CHECK(back.owner_id == r.owner_id);
  CHECK(back.host_id == r.host_id);
  CHECK(back.addr == r.addr);
  CHECK(back.size == r.size);
  CHECK(back.rkey == r.rkey);
  for (std::size_t n = 0; n < h.size(); ++n) CHECK(ib::decode(std::span(h).first(n), back) == status::invalid_handle);
  for (std::size_t i = 0; i < h.size(); ++i)
    for (int bit = 0; bit < 8; ++bit) {
      auto bad = h;
      bad[i] ^= static_cast<std::byte>(1u << bit);
      CHECK(ib::decode(bad, back) == status::invalid_handle);
    }
  // Semantic: empty, wrapping, owner 0, with a matching checksum.
  auto edit = [&](std::size_t at, std::uint64_t v) {
    auto b = h;
    for (int i = 0; i < 8; ++i) b[16 + at + i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
    reseal(b);
    return b;
  };
  CHECK(ib::decode(edit(24, 0), back) == status::invalid_handle);  // size 0
  CHECK(why().find("empty") != std::string::npos);
  CHECK(ib::decode(edit(16, ~0ull - 10), back) == status::invalid_handle);  // wraps
  CHECK(ib::decode(edit(0, 0), back) == status::invalid_handle);            // owner 0
  CHECK(why().find("owner") != std::string::npos);
  r.size = 0;
  CHECK(ib::encode(r, h) == status::invalid_argument);
}
