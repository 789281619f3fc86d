#pragma once

// For the GPU runtime tests: a registry on loopback, eaas-server processes on a GPU and in-process GPU clients
// (the client on the last GPU: with two, not the servers' GPU 0). Needs EAAS_SERVER_BIN and a CUDA build.

#include <signal.h>

#include <memory>
#include <string>
#include <vector>

#include "../common/require_ok.hpp"
#include "client.hpp"
#include "eaas/eaas.hpp"
#include "gpu/client_step.hpp"
#include "micro_batch.hpp"
#include "procs.hpp"
#include "wire.hpp"

namespace eaas::test {

/// How a test client runs: the device path (optionally in a graph) or the host path.
struct gpu_client_options {
  bool device_step = true;
  bool graph = true;
  std::uint32_t max_tokens = 32;
  bool host_output = true;
  bool pdl = true;  ///< programmatic dependent launch in the device step (false: plain launches)
  runtime::micro_batching batching = runtime::micro_batching::one;  ///< two: two inner clients (double batching)
};

struct gpu_cluster {
  runtime::model_shape shape;
  std::uint64_t seed;
  std::unique_ptr<registry_server> reg;
  std::string endpoint, ns;
  std::vector<std::unique_ptr<proc>> servers;

  gpu_cluster(const std::string& tag, const runtime::model_shape& s, std::uint64_t sd) : shape(s), seed(sd) {
    REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
    endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
    ns = tag + std::to_string(::getpid());
  }
  /// Server `id` on `gpu` with `more` eaas-server arguments; waits for "ready".
  proc& add(const std::string& id, int gpu, const std::vector<std::string>& more) {
    auto a = shape_args(endpoint, ns, shape);
    a.insert(a.end(), {"--id", id, "--gpu", std::to_string(gpu)});
    a.insert(a.end(), more.begin(), more.end());
    auto p = std::make_unique<proc>();
    REQUIRE(p->start(EAAS_SERVER_BIN, a));
    REQUIRE(p->next("ready").value("id", "") == id);
    servers.push_back(std::move(p));
    return *servers.back();
  }
  void kill(std::size_t i) {
    REQUIRE(servers[i]->sp.pid > 0);
    ::kill(servers[i]->sp.pid, SIGKILL);
    CHECK(servers[i]->wait() == 128 + SIGKILL);
  }
  std::unique_ptr<runtime::attention_client> client(const std::string& id, const gpu_client_options& g) {
    runtime::client_options o;
    o.id = id;
    o.registry.endpoint = endpoint;
    o.ns = ns;
    o.shape = shape;
    o.seed = seed;
    o.max_tokens = g.max_tokens;
    o.gpu = runtime::cuda_device_count() - 1;
    o.device_step = g.device_step;
    o.graph = g.device_step && g.graph;
    o.host_output = g.host_output;
    o.pdl = g.pdl;
    if (g.device_step) o.make_device_step = runtime::gpu::make_client_step;
    o.request_timeout_ns = 2'000'000'000ull;
    o.relink_backoff_ns = 500'000'000ull;
    std::unique_ptr<runtime::attention_client> c;
    REQUIRE_OK(runtime::start_micro_batched(o, g.batching, c));
    return c;
  }
};

}  // namespace eaas::test
