// The MoE runtime on GPUs, with real processes: servers with their slots in GPU memory and their experts
// in bf16 on the grouped-GEMM kernel, clients receiving answers in GPU memory, everything between them
// over NVLink (or within one GPU). Exits 77 (ctest: skipped) where there is no CUDA device.

#define DOCTEST_CONFIG_IMPLEMENT
#include <fstream>

#include "../common/doctest_main.hpp"
#include "../common/require_ok.hpp"
#include "eaas/eaas.hpp"
#include "procs.hpp"
#include "wire.hpp"

using namespace eaas;
using eaas::test::proc;
using json = nlohmann::json;

namespace {

const runtime::model_shape kShape{.hidden = 256, .inter = 192, .experts = 12, .topk = 3, .layers = 3};

json run_demo(std::vector<std::string> args) {
  args.push_back("--gpu");
  int rc = -1;
  json j = test::demo_summary(EAAS_DEMO_BIN, args, rc);
  CHECK(rc == 0);
  REQUIRE(j.is_object());
  return j;
}

std::vector<std::string> shape(const std::vector<std::string>& more) {
  std::vector<std::string> a = {"--hidden",  std::to_string(kShape.hidden),  "--inter", std::to_string(kShape.inter),
                                "--experts", std::to_string(kShape.experts), "--topk",  std::to_string(kShape.topk),
                                "--layers",  std::to_string(kShape.layers)};
  a.insert(a.end(), more.begin(), more.end());
  return a;
}

// A registry on loopback and one GPU server "s" on GPU 0, its weights from `seed`, registered.
struct one_gpu_server {
  std::unique_ptr<registry_server> reg;
  std::string endpoint, ns;
  proc server;
  one_gpu_server(const std::string& tag, const std::string& seed) {
    REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
    endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
    ns = tag + std::to_string(::getpid());
    auto a = test::shape_args(endpoint, ns, kShape);
    a[5] = seed;  // --seed
    a.insert(a.end(), {"--id", "s", "--gpu", "0"});
    REQUIRE(server.start(EAAS_SERVER_BIN, a));
    REQUIRE(server.next("ready").value("id", "") == "s");
  }
  std::vector<std::string> client_args(std::vector<std::string> more) const {
    auto c = test::shape_args(endpoint, ns, kShape);
    c.insert(c.end(), more.begin(), more.end());
    return c;
  }
};

void check_clients(const json& j, double most_err) {
  REQUIRE(j["clients"].size() >= 1);
  for (const auto& [id, c] : j["clients"].items()) {
    CHECK(c.value("steps", 0) > 0);
    CHECK(c.value("verified_steps", -1) == c.value("steps", 0));  // every step checked
    // bf16 weights and activations: off the fp32 reference by more than fp32 rounding (the GPU path
    // ran), and within the bf16 tolerance.
    CHECK(c.value("max_rel_err", 1.0) <= most_err);
    CHECK(c.value("max_rel_err", 0.0) > 1e-5);
  }
}

}  // namespace

TEST_CASE("GPU runtime: 3 servers x 2 clients on the GPUs match the monolithic reference to 1e-2 (bf16)") {
  const json j =
      run_demo(shape({"--servers", "3", "--clients", "2", "--replicas", "2", "--tokens", "40", "--steps", "8"}));
  CHECK(j.value("ok", false));
  CHECK(j.value("device", "") == "gpu");
  CHECK(j.value("tolerance", 0.0) == doctest::Approx(1e-2));
  check_clients(j, 1e-2);
}

TEST_CASE("GPU runtime: a realistic layer shape (Qwen3-30B-A3B, 128 experts top-8) at 128 tokens per client") {
  const json j = run_demo({"--model", "qwen3-30b-a3b", "--layers", "1", "--servers", "2", "--clients", "1", "--tokens",
                           "128", "--steps", "4"});
  CHECK(j.value("ok", false));
  check_clients(j, 1e-2);
}

TEST_CASE("GPU runtime: a server on other weights is caught by the check (the comparison has teeth)") {
  one_gpu_server s("gpuneg", "12");  // the client's seed is 11
  proc client;
  REQUIRE(client.start(EAAS_CLIENT_BIN,
                       s.client_args({"--id", "c", "--gpu", std::to_string(runtime::cuda_device_count() - 1),
                                      "--tokens", "16", "--steps", "2", "--verify", "--tolerance", "1e-2"})));
  const json r = client.next("result");
  REQUIRE(r.is_object());
  CHECK(r.value("verified_steps", 0) == 2);
  CHECK(r.value("max_rel_err", 0.0) > 0.1);
  CHECK(client.wait() == 0);
}

TEST_CASE("GPU runtime: a CPU client cannot link to a GPU server, and says so instead of hanging") {
  one_gpu_server s("gpumix", "11");
  proc client;
  REQUIRE(client.start(EAAS_CLIENT_BIN, s.client_args({"--id", "c", "--tokens", "8", "--steps", "1", "--wait", "3"})));
  CHECK(client.next("result", 20000).is_null());  // no forward pass ever completes
  CHECK(client.wait() == 1);                      // "waiting for servers" failed within its bound
}

TEST_CASE("GPU runtime: a malicious GPU client gets error answers from a GPU server, which then still serves") {
  // The same attack as on the CPU (tests/runtime/evil_client.cpp): targeted and 300 random malformed
  // requests, each answered with the error the checks predict, a stranger's grant never answered, then
  // valid f32 and bf16 requests answered right (to 1e-2: bf16 experts) — all through GPU memory.
  one_gpu_server s("gpuevil", "11");
  const auto v = test::run_evil(
      EAAS_EVIL_BIN, {s.endpoint, s.ns, "s", std::to_string(kShape.hidden), std::to_string(kShape.inter),
                      std::to_string(kShape.experts), std::to_string(kShape.topk), std::to_string(kShape.layers), "11",
                      std::to_string(runtime::cuda_device_count() - 1)});
  REQUIRE(v.reported);
  CHECK(v.cases > 300);
  CHECK(v.failures == 0);
  CHECK(v.exit_code == 0);
  // An honest GPU client is still served, exactly enough.
  proc client;
  REQUIRE(client.start(EAAS_CLIENT_BIN, s.client_args({"--id", "c", "--gpu", "0", "--tokens", "16", "--steps", "2",
                                                       "--verify", "--tolerance", "1e-2"})));
  const json r = client.next("result");
  REQUIRE(r.is_object());
  CHECK(r.value("verified_steps", 0) == 2);
  CHECK(r.value("max_rel_err", 1.0) <= 1e-2);
  CHECK(client.wait() == 0);
}

TEST_CASE("GPU runtime: servers SIGKILLed every 0.5 s and replaced; clients fail over, every output checked") {
  const json j = run_demo(shape({"--servers", "3", "--clients", "2", "--replicas", "2", "--tokens", "24", "--duration",
                                 "3", "--kill-every", "0.5", "--request-timeout-ms", "2000"}));
  CHECK(j.value("ok", false));
  REQUIRE(j["kills"].size() >= 2);
  std::size_t joined = 0;
  for (const auto& k : j["kills"]) {
    CHECK(k.value("stall_ms", 0.0) < 2000.0);
    joined += k.value("join_ms", -1.0) >= 0.0 ? 1 : 0;
  }
  // Replacements took traffic without any client restarting; a GPU server needs about a second to
  // start (CUDA context, weights), so the last one may come up after the clients finished.
  CHECK(joined >= j["kills"].size() - 1);
  CHECK(joined >= 1);
  check_clients(j, 1e-2);
}

int main(int argc, char** argv) {
  return eaas::test::run_tests(argc, argv, [] {
    return runtime::cuda_device_count() == 0 ? "no CUDA device: skipping the GPU runtime tests" : nullptr;
  });
}
