// Consumer that builds eaas with add_subdirectory: two contexts in one process connect to each other
// over shm; A accumulates into B's region with put_signal(add) in two halves, B waits for the sum,
// then A reads B's region back with get and checks it.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "eaas/eaas.hpp"

namespace {

int fail(const char* what, eaas::status s) {
  std::fprintf(stderr, "add-subdirectory consumer: %s: %s (%s)\n", what, eaas::status_name(s),
               std::string(eaas::last_error()).c_str());
  return 1;
}

int fail(const char* what) {
  std::fprintf(stderr, "add-subdirectory consumer: %s\n", what);
  return 1;
}

}  // namespace

int main() {
  static_assert(EAAS_VERSION_MAJOR == 0 && EAAS_WITH_SHM == 1);

  std::unique_ptr<eaas::context> a;
  std::unique_ptr<eaas::context> b;
  eaas::context_options options;
  options.name = "consumer-a";
  if (eaas::status s = eaas::context::create(options, a); s != eaas::status::ok) return fail("create a", s);
  options.name = "consumer-b";
  if (eaas::status s = eaas::context::create(options, b); s != eaas::status::ok) return fail("create b", s);
  if (a->id() == b->id()) return fail("two contexts got the same id");

  constexpr std::size_t kRegionBytes = 2 * 4096;
  constexpr std::size_t kPayloadBytes = 1000;
  constexpr std::uint64_t kSignalOffset = 4096;
  constexpr std::uint64_t kDelta = 0x100000001ull;  // set bits in both halves of the word

  std::unique_ptr<eaas::memory_region> b_region;
  if (eaas::status s = b->allocate(kRegionBytes, b_region); s != eaas::status::ok) return fail("allocate", s);
  eaas::handle_bytes b_region_handle;
  eaas::handle_bytes b_connection;
  if (eaas::status s = b_region->export_handle(b_region_handle); s != eaas::status::ok) return fail("export", s);
  if (eaas::status s = b->connection_handle(b_connection); s != eaas::status::ok) return fail("connection", s);

  // Handles travel as text in real deployments; round-trip them that way.
  eaas::handle_bytes b_connection_copy;
  if (eaas::status s = eaas::handle_from_text(eaas::handle_to_text(b_connection), b_connection_copy);
      s != eaas::status::ok || b_connection_copy != b_connection) {
    return fail("handle text round trip", s);
  }

  std::unique_ptr<eaas::endpoint> a_to_b;
  if (eaas::status s = a->connect(b_connection_copy, a_to_b); s != eaas::status::ok) return fail("connect", s);
  if (a_to_b->peer_id() != b->id()) return fail("endpoint reports the wrong peer");
  std::unique_ptr<eaas::remote_region> b_remote;
  if (eaas::status s = a_to_b->import_region(b_region_handle, b_remote); s != eaas::status::ok) {
    return fail("import_region", s);
  }

  std::vector<std::byte> payload(kPayloadBytes);
  for (std::size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<std::byte>((i * 131 + 7) ^ (i >> 3));

  const eaas::device_endpoint ep = a_to_b->view();
  const eaas::remote_view rv = b_remote->view();
  const std::size_t half = kPayloadBytes / 2;
  for (std::size_t part = 0; part < 2; ++part) {
    const std::size_t off = part * half;
    const std::size_t n = part == 0 ? half : kPayloadBytes - half;
    if (eaas::status s = eaas::put_signal(eaas::coop_thread{}, ep, rv, off, payload.data() + off, n, rv, kSignalOffset,
                                          kDelta, eaas::signal_op::add);
        s != eaas::status::ok) {
      return fail("put_signal", s);
    }
  }
  if (eaas::status s = eaas::quiet(eaas::coop_thread{}, ep); s != eaas::status::ok) return fail("quiet", s);

  auto* b_base = static_cast<const std::byte*>(b_region->data());
  const auto* sig = reinterpret_cast<const std::uint64_t*>(b_base + kSignalOffset);
  std::uint64_t observed = 0;
  if (eaas::status s = eaas::wait_signal(b->view(), sig, eaas::cmp_op::eq, 2 * kDelta,
                                         eaas::deadline_after(5'000'000'000ull), &observed);
      s != eaas::status::ok) {
    return fail("wait_signal", s);
  }
  if (observed != 2 * kDelta) return fail("signal did not accumulate both adds");
  if (std::memcmp(b_base, payload.data(), payload.size()) != 0) return fail("payload corrupted in b's region");

  // Read it back through the endpoint into a poisoned buffer.
  std::vector<std::byte> back(kPayloadBytes, std::byte{0xa5});
  if (eaas::status s = eaas::get(eaas::coop_thread{}, ep, rv, 0, back.data(), back.size()); s != eaas::status::ok) {
    return fail("get", s);
  }
  if (eaas::status s = eaas::quiet(eaas::coop_thread{}, ep); s != eaas::status::ok) return fail("quiet", s);
  if (back != payload) return fail("get returned different bytes");

  // After close, ops through the endpoint are refused.
  a_to_b->close();
  const eaas::status closed = eaas::put(eaas::coop_thread{}, ep, rv, 0, payload.data(), 8);
  if (closed != eaas::status::not_connected) return fail("put after close was not refused", closed);

  std::printf("add-subdirectory consumer: eaas %s, %zu bytes a->b over %s, signal %#llx: ok\n", EAAS_VERSION_STRING,
              payload.size(), eaas::transport_name(a_to_b->transport()), static_cast<unsigned long long>(observed));
  return 0;
}
