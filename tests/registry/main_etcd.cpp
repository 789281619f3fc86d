// The conformance suite against a real etcd: exits 77 (ctest: skipped) with a message when no etcd
// binary is installed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "etcd_process.hpp"

int main(int argc, char** argv) {
  doctest::Context ctx(argc, argv);
  if (!ctx.shouldExit() && !eaas::test::etcd_process::available()) {
    std::printf("etcd is not installed (Debian: etcd-server): skipping the etcd registry tests\n");
    return 77;
  }
  return ctx.run();
}
