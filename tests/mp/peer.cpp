// A test peer: a separately started executable that the multi-process tests drive through eaas.
//   eaas-test-peer <index> <region bytes>
// stdout: "C <connection handle hex>" and "R <region handle hex>"; stdin: the driver's two lines.
// Then it serves commands (tests/mp/common.hpp) until cmd_exit, or until the driver dies.

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "common.hpp"
#include "eaas/eaas.hpp"

using namespace eaas;
using namespace eaas::mptest;

namespace {

int die(const char* what, status s) {
  std::fprintf(stderr, "eaas-test-peer: %s: %s (%.*s)\n", what, status_name(s), static_cast<int>(last_error().size()),
               last_error().data());
  return 2;
}

bool read_handle(char tag, handle_bytes& out) {
  std::string line;
  if (!std::getline(std::cin, line) || line.size() < 2 || line[0] != tag || line[1] != ' ') return false;
  return handle_from_text(std::string_view(line).substr(2), out) == status::ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: eaas-test-peer <index> <region bytes>\n");
    return 2;
  }
  const std::size_t index = std::strtoull(argv[1], nullptr, 10);
  const std::size_t bytes = std::strtoull(argv[2], nullptr, 10);
  if (index >= kMaxPeers || bytes < kData) return 2;

  std::unique_ptr<context> ctx;
  if (status s = context::create({.name = "peer"}, ctx); s != status::ok) return die("context", s);
  std::unique_ptr<memory_region> mine;
  if (status s = ctx->allocate(bytes, mine); s != status::ok) return die("allocate", s);
  handle_bytes ch, rh;
  if (status s = ctx->connection_handle(ch); s != status::ok) return die("connection_handle", s);
  if (status s = mine->export_handle(rh); s != status::ok) return die("export", s);
  std::cout << "C " << handle_to_text(ch) << "\nR " << handle_to_text(rh) << std::endl;

  handle_bytes dch, drh;
  if (!read_handle('C', dch) || !read_handle('R', drh)) return die("bootstrap", status::invalid_handle);
  std::unique_ptr<endpoint> ep;
  if (status s = ctx->connect(dch, ep); s != status::ok) return die("connect", s);
  std::unique_ptr<remote_region> drv;
  if (status s = ep->import_region(drh, drv); s != status::ok) return die("import", s);

  const device_endpoint e = ep->view();
  const remote_view dv = drv->view();
  auto* base = static_cast<unsigned char*>(mine->data());
  auto* cmd_seq = reinterpret_cast<std::uint64_t*>(base + kCmdSeq);
  auto* args = reinterpret_cast<std::uint64_t*>(base + kCmdArgs);
  const std::size_t resp = kRespBlock * (index + 1);
  std::vector<unsigned char> scratch;

  for (std::uint64_t seq = 1;; ++seq) {
    // Wait for the next command; a dead driver ends the wait (and this process) with a status.
    status s;
    while ((s = wait_signal(e, cmd_seq, cmp_op::ge, seq, deadline_after(1'000'000'000ull))) == status::timeout) {
    }
    if (s != status::ok) return die("waiting for a command", s);
    const std::uint64_t a0 = args[1], a1 = args[2], a2 = args[3];
    std::uint64_t result = 0;
    switch (args[0]) {
      case cmd_verify:
        result = a1 + a2 > bytes - kData ? ~0ull : count_mismatches(a0, base + kData + a1, a2);
        break;
      case cmd_fill:
        if (a1 + a2 <= bytes - kData) fill_pattern(a0, base + kData + a1, a2);
        break;
      case cmd_put:
        scratch.resize(a2);
        fill_pattern(a0, scratch.data(), a2);
        result = static_cast<std::uint64_t>(put(coop_thread{}, e, dv, kData + a1, scratch.data(), a2));
        break;
      case cmd_add: {
        alignas(8) std::uint64_t fetched = 0;
        for (std::uint64_t i = 0; i < a0 && result == 0; ++i)
          result = static_cast<std::uint64_t>(fetch_add(coop_thread{}, e, dv, a1, 1, &fetched));
        break;
      }
      case cmd_order_send: {
        // Payload: 32 words all equal to i, then the signal set to i. The driver checks it never sees a
        // signal newer than the payload.
        std::uint64_t payload[32];
        for (std::uint64_t i = 1; i <= a0 && result == 0; ++i) {
          for (auto& w : payload) w = i;
          result = static_cast<std::uint64_t>(
              put_signal(coop_thread{}, e, dv, a1, payload, sizeof(payload), dv, a2, i, signal_op::set));
        }
        break;
      }
      case cmd_exit:
        return 0;
      default:
        result = ~0ull;
    }
    (void)quiet(coop_thread{}, e);
    if (status r =
            put_signal(coop_thread{}, e, dv, resp + kRespValue, &result, 8, dv, resp + kRespSeq, seq, signal_op::set);
        r != status::ok)
      return die("answer", r);
  }
}
