#include <string>

#include "eaas/config.hpp"
#include "fixture.hpp"
#include "handle.hpp"

using eaas::status;

TEST_CASE("the ibgda probe names the first missing prerequisite") {
  eaas::ibgda_support s;
  const status st = eaas::probe_ibgda(s);
  CHECK(s.built == (EAAS_WITH_IBGDA != 0));
  if (st == status::ok) {
    // A host with everything: nothing may be reported missing.
    CHECK(s.missing.empty());
    CHECK_FALSE(s.mlx5_devx.empty());
    CHECK(s.gpudirect);
    CHECK(s.uar_mapping);
  } else {
    REQUIRE(st == status::unsupported);
    REQUIRE_FALSE(s.missing.empty());
    CHECK(std::string(eaas::last_error()).find(s.missing) != std::string::npos);
    // The first missing item is the one reported.
    if (!s.built)
      CHECK(s.missing.find("rdma-core") != std::string::npos);
    else if (s.rdma_devices == 0)
      CHECK(s.missing.find("no RDMA device") != std::string::npos);
    else if (s.mlx5_devx.empty())
      CHECK(s.missing.find("DEVX") != std::string::npos);
    else if (!s.gpudirect)
      CHECK(s.missing.find("GPUDirect") != std::string::npos);
    else
      CHECK(s.missing.find("doorbell") != std::string::npos);
  }
}

TEST_CASE("connecting to a context on another host says what the network transport lacks") {
  std::unique_ptr<eaas::context> ctx;
  REQUIRE_OK(eaas::context::create({}, ctx));
  eaas::handle_bytes mine;
  REQUIRE_OK(ctx->connection_handle(mine));
  // The same handle, as if made on another host: flip the host id (payload bytes 8..15), reseal.
  auto other = mine;
  other[16 + 8] ^= std::byte{0x01};
  std::span<const std::byte> all(other);
  std::uint32_t c = eaas::detail::crc32c(0, all.subspan(0, 12));
  c = eaas::detail::crc32c(c, all.subspan(16));
  for (int i = 0; i < 4; ++i) other[12 + i] = static_cast<std::byte>((c >> (8 * i)) & 0xffu);
  std::unique_ptr<eaas::endpoint> ep;
  const status st = ctx->connect(other, ep);
  const std::string why(eaas::last_error());
  CHECK(ep == nullptr);
  eaas::ibgda_support s;
  if (eaas::probe_ibgda(s) != status::ok) {
    CHECK(st == status::peer_unreachable);
    CHECK(why.find("another host") != std::string::npos);
    CHECK(why.find(s.missing) != std::string::npos);
  } else {
    CHECK(st == status::unsupported);
  }
}
