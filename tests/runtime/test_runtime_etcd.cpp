// The MoE runtime over a real etcd (the registry for many hosts): servers and clients as processes find
// each other through etcd, outputs are exact, and a SIGKILLed server's work moves to its replica. The
// binary exits 77 (ctest: skipped) when no etcd is installed.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <thread>

#include "../common/doctest_main.hpp"
#include "../common/require_ok.hpp"
#include "etcd_process.hpp"
#include "procs.hpp"

using namespace eaas;
using eaas::test::etcd_process;
using eaas::test::proc;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {
const runtime::model_shape kShape{.hidden = 64, .inter = 96, .experts = 12, .topk = 3, .layers = 3};
}

TEST_CASE("runtime over etcd: servers and clients meet through etcd; a killed server's work moves to a replica") {
  std::unique_ptr<etcd_process> etcd;
  REQUIRE_OK(etcd_process::start(etcd));
  const std::string endpoint = etcd->endpoint(), ns = "rtetcd";
  proc servers[3], client;
  for (int i = 0; i < 3; ++i) {
    auto a = test::shape_args(endpoint, ns, kShape);
    a.insert(a.end(), {"--id", "s" + std::to_string(i), "--placement", std::to_string(i) + "/3/2"});
    REQUIRE(servers[i].start(EAAS_SERVER_BIN, a));
    REQUIRE(servers[i].next("ready", 20000).is_object());
  }
  auto c = test::shape_args(endpoint, ns, kShape);
  c.insert(c.end(), {"--id", "c", "--tokens", "16", "--steps", "100000", "--replicas", "2", "--verify"});
  REQUIRE(client.start(EAAS_CLIENT_BIN, c));
  REQUIRE(client.next("progress", 20000).is_object());
  ::kill(servers[1].sp.pid, SIGKILL);
  servers[1].wait();
  const auto until = std::chrono::steady_clock::now() + 1500ms;
  int last = -1;
  while (std::chrono::steady_clock::now() < until) {
    const json p = client.next("progress", 5000);
    REQUIRE(p.is_object());
    CHECK(p.value("step", 0) > last);
    last = p.value("step", 0);
    CHECK(p.value("max_rel_err", 1.0) <= 1e-5);
  }
  ::kill(client.sp.pid, SIGKILL);
  client.wait();
  for (int i : {0, 2}) {
    ::kill(servers[i].sp.pid, SIGTERM);
    CHECK(servers[i].next("stats", 10000).value("tokens", 0) > 0);
  }
}

int main(int argc, char** argv) {
  return eaas::test::run_tests(argc, argv, [] {
    return etcd_process::available() ? nullptr
                                     : "etcd is not installed (Debian: apt-get install etcd-server; or set EAAS_ETCD): "
                                       "skipping the runtime-over-etcd test";
  });
}
