// Consumer of the installed eaas package: one context connects to itself over shm, writes a payload
// into its own registered region with put_signal, waits for the signal and checks every byte.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "eaas/eaas.hpp"

static_assert(EAAS_WITH_SHM == 1, "eaas/config.hpp must come from the installed package");
static_assert(EAAS_WITH_CUDA == EAAS_CONSUMER_EXPECTED_WITH_CUDA, "config.hpp disagrees with eaasConfig.cmake");
static_assert(EAAS_WITH_IBGDA == EAAS_CONSUMER_EXPECTED_WITH_IBGDA, "config.hpp disagrees with eaasConfig.cmake");

namespace {

int fail(const char* what, eaas::status s) {
  std::fprintf(stderr, "find-package consumer: %s: %s (%s)\n", what, eaas::status_name(s),
               std::string(eaas::last_error()).c_str());
  return 1;
}

int fail(const char* what) {
  std::fprintf(stderr, "find-package consumer: %s\n", what);
  return 1;
}

}  // namespace

int main() {
  if (std::strcmp(EAAS_VERSION_STRING, EAAS_CONSUMER_EXPECTED_VERSION) != 0) {
    std::fprintf(stderr, "find-package consumer: header version %s, package version %s\n", EAAS_VERSION_STRING,
                 EAAS_CONSUMER_EXPECTED_VERSION);
    return 1;
  }

  eaas::context_options options;
  options.name = "find-package-consumer";
  std::unique_ptr<eaas::context> ctx;
  if (eaas::status s = eaas::context::create(options, ctx); s != eaas::status::ok) return fail("context::create", s);

  constexpr std::size_t kRegionBytes = 3 * 4096;
  constexpr std::uint64_t kPayloadOffset = 64;
  constexpr std::size_t kPayloadBytes = 4096 + 17;  // odd size: exercises the tail of the copy
  constexpr std::uint64_t kSignalOffset = 2 * 4096;
  constexpr std::uint64_t kSignalValue = 0x5eed0000c0ffee01ull;

  std::unique_ptr<eaas::memory_region> region;
  if (eaas::status s = ctx->allocate(kRegionBytes, region); s != eaas::status::ok) return fail("allocate", s);

  eaas::handle_bytes region_handle;
  eaas::handle_bytes connection_handle;
  if (eaas::status s = region->export_handle(region_handle); s != eaas::status::ok) return fail("export_handle", s);
  if (eaas::status s = ctx->connection_handle(connection_handle); s != eaas::status::ok) {
    return fail("connection_handle", s);
  }

  std::unique_ptr<eaas::endpoint> ep;
  if (eaas::status s = ctx->connect(connection_handle, ep); s != eaas::status::ok) return fail("connect", s);
  if (ep->transport() != eaas::transport_kind::shm) return fail("connect did not pick the shm transport");
  if (ep->peer_id() != ctx->id()) return fail("a self-connection must report this context as its peer");

  std::unique_ptr<eaas::remote_region> remote;
  if (eaas::status s = ep->import_region(region_handle, remote); s != eaas::status::ok) return fail("import", s);
  if (remote->size() != region->size()) return fail("imported region has the wrong size");

  // A payload no two runs or offsets could confuse: bytes of a 64-bit LCG.
  std::vector<std::byte> payload(kPayloadBytes);
  std::uint64_t x = 0x9e3779b97f4a7c15ull;
  for (auto& b : payload) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    b = static_cast<std::byte>(x >> 56);
  }

  const eaas::device_endpoint epv = ep->view();
  const eaas::remote_view rv = remote->view();
  if (eaas::status s = eaas::put_signal(eaas::coop_thread{}, epv, rv, kPayloadOffset, payload.data(), payload.size(),
                                        rv, kSignalOffset, kSignalValue, eaas::signal_op::set);
      s != eaas::status::ok) {
    return fail("put_signal", s);
  }
  if (eaas::status s = eaas::quiet(eaas::coop_thread{}, epv); s != eaas::status::ok) return fail("quiet", s);

  auto* base = static_cast<const std::byte*>(region->data());
  const auto* sig = reinterpret_cast<const std::uint64_t*>(base + kSignalOffset);
  std::uint64_t observed = 0;
  if (eaas::status s = eaas::wait_signal(ctx->view(), sig, eaas::cmp_op::ge, kSignalValue,
                                         eaas::deadline_after(5'000'000'000ull), &observed);
      s != eaas::status::ok) {
    return fail("wait_signal", s);
  }
  if (observed != kSignalValue) return fail("signal word holds the wrong value");
  if (std::memcmp(base + kPayloadOffset, payload.data(), payload.size()) != 0) return fail("payload corrupted");
  // The region starts zero-filled: bytes just outside the payload must be untouched.
  if (base[kPayloadOffset - 1] != std::byte{0} || base[kPayloadOffset + kPayloadBytes] != std::byte{0}) {
    return fail("put wrote outside [offset, offset + bytes)");
  }

  // An out-of-bounds put is refused, not performed.
  const eaas::status oob = eaas::put(eaas::coop_thread{}, epv, rv, kRegionBytes - 8, payload.data(), 16);
  if (oob != eaas::status::invalid_argument) return fail("out-of-bounds put was not rejected", oob);

  std::printf("find-package consumer: eaas %s, %zu bytes over %s, signal %#llx: ok\n", EAAS_VERSION_STRING,
              payload.size(), eaas::transport_name(ep->transport()), static_cast<unsigned long long>(observed));
  return 0;
}
