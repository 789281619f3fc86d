// GPU tests: the device side of the op vocabulary. The binary exits with 77 (ctest: skipped) when
// there is no CUDA device.

#define DOCTEST_CONFIG_IMPLEMENT
#include "../common/doctest_main.hpp"

#include <cstdio>

#include "eaas/common/status.hpp"
#include "kernels.hpp"

using eaas::status;
using namespace eaas::gputest;

TEST_CASE("device wait_signal: ok, timeout within 2x, abort through mapped host memory") {
  wait_result r{};
  REQUIRE(run_wait(7, 5, 1'000'000'000ull, -1, r) == status::ok);
  CHECK(r.result == status::ok);
  CHECK(r.observed == 7);

  REQUIRE(run_wait(3, 5, 20'000'000ull, -1, r) == status::ok);
  CHECK(r.result == status::timeout);
  CHECK(r.observed == 3);
  CHECK(r.elapsed_ns >= 20'000'000ull);
  CHECK(r.elapsed_ns < 40'000'000ull);

  REQUIRE(run_wait(3, 5, 30'000'000'000ull, 50, r) == status::ok);
  CHECK(r.result == status::aborted);
  CHECK(r.elapsed_ns < 5'000'000'000ull);
}

TEST_CASE("device ops check arguments, then report transports without a device body") {
  std::uint32_t s[6] = {};
  REQUIRE(run_dispatch(s) == status::ok);
  CHECK(static_cast<status>(s[0]) == status::unsupported);
  CHECK(static_cast<status>(s[1]) == status::unsupported);
  CHECK(static_cast<status>(s[2]) == status::unsupported);
  CHECK(static_cast<status>(s[3]) == status::invalid_argument);
  CHECK(static_cast<status>(s[4]) == status::invalid_argument);
  CHECK(static_cast<status>(s[5]) == status::unsupported);
}

int main(int argc, char** argv) {
  return eaas::test::run_tests(argc, argv, [] { return device_count() == 0 ? "no CUDA device: skipping the GPU tests" : nullptr; });
}
