// A registry client process for liveness tests: holds a lease on one record until killed.
//   eaas-registry-peer ENDPOINT KEY TTL_SECONDS
// Prints "ready" once the record is in the registry, then sleeps.

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "eaas/eaas.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: eaas-registry-peer ENDPOINT KEY TTL_SECONDS\n");
    return 2;
  }
  eaas::registry_options o;
  o.endpoint = argv[1];
  std::unique_ptr<eaas::registry> reg;
  if (eaas::registry::open(o, reg) != eaas::status::ok) {
    std::fprintf(stderr, "eaas-registry-peer: %s\n", std::string(eaas::last_error()).c_str());
    return 2;
  }
  std::unique_ptr<eaas::lease_keeper> keeper;
  const auto ttl = static_cast<std::uint32_t>(std::atoi(argv[3]));
  if (eaas::lease_keeper::start(*reg, ttl, {{argv[2], "alive"}}, keeper) != eaas::status::ok) {
    std::fprintf(stderr, "eaas-registry-peer: %s\n", std::string(eaas::last_error()).c_str());
    return 2;
  }
  std::printf("ready\n");
  std::fflush(stdout);
  for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
}
