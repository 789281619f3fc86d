#pragma once

#include <doctest/doctest.h>

#include <memory>

#include "../common/require_ok.hpp"
#include "eaas/eaas.hpp"

namespace eaas::test {

/// One context connected to itself, with a registered region imported through the endpoint.
struct loopback {
  std::unique_ptr<context> ctx;
  std::unique_ptr<memory_region> local;
  std::unique_ptr<endpoint> ep;
  std::unique_ptr<remote_region> remote;

  explicit loopback(std::size_t bytes) {
    REQUIRE_OK(context::create({}, ctx));
    REQUIRE_OK(ctx->allocate(bytes, local));
    handle_bytes ch, rh;
    REQUIRE_OK(ctx->connection_handle(ch));
    REQUIRE_OK(ctx->connect(ch, ep));
    REQUIRE_OK(local->export_handle(rh));
    REQUIRE_OK(ep->import_region(rh, remote));
  }
  unsigned char* bytes() const { return static_cast<unsigned char*>(local->data()); }
};

}  // namespace eaas::test
