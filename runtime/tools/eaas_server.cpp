// eaas-server: an expert server. Hosts a set of experts (synthetic weights from a seed, or a
// safetensors checkpoint), registers in the registry and serves every client that links to it, until
// SIGTERM / SIGINT, then leaves gracefully (withdraws its record, answers what is in flight). Prints
// JSON lines: "ready" once registered, "client" when a client gets or loses a slot, "stats" at the end.
//
//   eaas-server --id s0 --registry embedded://127.0.0.1:23790 --model tiny --experts 0-7
//   eaas-server --id s0 --gpu 0 --device-step ...   (the GPU-resident poll round, gpu/server_step.hpp)

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>

#include "eaas/runtime/safetensors.hpp"
#include "server.hpp"
#include "tool_common.hpp"

using namespace eaas;
using namespace eaas::runtime;

namespace {
std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eaas-server: an expert server of the eaas MoE reference runtime"};
  server_options o;
  tool::model_args model;
  std::string endpoint = "embedded://127.0.0.1:23790", experts, placement;
  app.add_option("--id", o.id, "server id, unique in the namespace")->required();
  app.add_option("--registry", endpoint, "registry: embedded://HOST:PORT or etcd://HOST:PORT")->capture_default_str();
  app.add_option("--token", o.registry.token, "registry token");
  app.add_option("--ns", o.ns, "registry namespace")->capture_default_str();
  app.add_option("--ttl", o.ttl_seconds, "lease TTL, seconds")->capture_default_str();
  model.add(app);
  auto* ex = app.add_option("--host-experts", experts, "experts hosted, e.g. 0-7,12");
  app.add_option("--placement", placement, "S/N/R: server S of N with R replicas per expert")->excludes(ex);
  app.add_option("--max-clients", o.max_clients, "client slots")->capture_default_str();
  app.add_option("--max-tokens", o.max_tokens, "most tokens per request")->capture_default_str();
  app.add_option("--gpu", o.gpu, "serve on this CUDA device (slots in GPU memory, GPU experts; GPU clients only)")
      ->capture_default_str();
  auto* device_step =
      app.add_flag("--device-step", o.device_step,
                   "with --gpu: the whole poll round on the GPU (poll, checks, regrouping, experts, answers), one CUDA "
                   "graph per round");
  double poll_us = double(o.device_poll_ns) / 1e3;
  app.add_option("--device-poll-us", poll_us, "with --device-step: a round's longest wait on the GPU for a request")
      ->capture_default_str();
  bool no_graph = false;
  app.add_flag("--device-no-graph", no_graph, "with --device-step: launch the round's kernels instead of a graph")
      ->needs(device_step);
  bool no_shrink = false;
  app.add_flag("--device-no-shrink", no_shrink,
               "with --device-step: no kernel shrinking (the ablation): the grouped GEMM computes every local "
               "expert of a served layer, empty ones on a padding row")
      ->needs(device_step);
  app.add_option("--device-put-blocks", o.device_put_blocks,
                 "with --device-step: most blocks one answer is put with (several servers answering one client "
                 "write into one GPU at once)")
      ->check(CLI::Range(1, 1024))
      ->needs(device_step)
      ->capture_default_str();
  double batch_window_us = double(o.device_batch_window_ns) * 1e-3;
  app.add_option("--device-batch-window-us", batch_window_us,
                 "with --device-step: once a request is seen, wait up to this long for the other clients served in "
                 "the last two rounds, and answer them in the same round (0: off)")
      ->check(CLI::Range(0.0, 1e6))
      ->needs(device_step)
      ->capture_default_str();
  app.add_flag("--device-direct-answers", o.device_direct_answers,
               "with --device-step: the combine writes each answer straight into the client's GPU (one copy fewer; "
               "every combine block writes there)")
      ->needs(device_step);
  bool no_pipeline = false;
  app.add_flag("--device-no-pipeline", no_pipeline,
               "with --device-step: launch each round only after the host read the last one back (the ablation)")
      ->needs(device_step);
  bool no_pdl = false;
  app.add_flag("--device-no-pdl", no_pdl,
               "with --device-step: plain launches instead of programmatic dependent launch in a round (the ablation)")
      ->needs(device_step);
  tool::checkpoint_args ckpt;
  ckpt.add(app, "experts");
  double drain_ms = 500;
  app.add_option("--drain-ms", drain_ms, "when leaving, answer requests until none came for this long")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  o.drain_quiet_ns = static_cast<std::uint64_t>(drain_ms * 1e6);
  o.device_poll_ns = static_cast<std::uint64_t>(std::max(poll_us, 1.0) * 1e3);
  o.device_graph = !no_graph;
  o.device_shrink = !no_shrink;
  o.device_pipeline = !no_pipeline;
  o.device_pdl = !no_pdl;
  o.device_batch_window_ns = static_cast<std::uint64_t>(batch_window_us * 1e3);
  o.on_first_answer = [](std::uint64_t ns) {
    std::printf("{\"type\":\"first_answer\",\"ns\":%llu}\n", static_cast<unsigned long long>(ns));
    std::fflush(stdout);
  };
  o.on_client = [](const std::string& event, const std::string& client, const std::string& why) {
    std::printf("{\"type\":\"client\",\"event\":\"%s\",\"client\":\"%s\",\"why\":\"%s\"}\n", event.c_str(),
                client.c_str(), why.c_str());
    std::fflush(stdout);
  };

  o.registry.endpoint = endpoint;
  if (status s = model.resolve(o.shape); s != status::ok) return tool::fail("eaas-server", "model", s);
  o.seed = model.seed;
  if (!placement.empty()) {
    unsigned s = 0, n = 0, r = 0;
    if (std::sscanf(placement.c_str(), "%u/%u/%u", &s, &n, &r) != 3 || n == 0 || s >= n || r == 0 || r > n) {
      std::fprintf(stderr, "eaas-server: --placement wants S/N/R with S < N and 1 <= R <= N\n");
      return 2;
    }
    o.experts = experts_of_server(s, n, o.shape.experts, r);
  } else if (!experts.empty()) {
    if (status s = parse_id_list(experts, o.shape.experts, o.experts); s != status::ok)
      return tool::fail("eaas-server", "--host-experts", s);
  } else {
    for (std::uint32_t e = 0; e < o.shape.experts; ++e) o.experts.push_back(e);
  }

  checkpoint ck;
  std::unique_ptr<hf_naming> naming;
  if (!ckpt.open("eaas-server", ck, naming)) return 1;
  if (naming) {
    o.load = [&ck, &naming, shape = o.shape](std::uint32_t layer, std::uint32_t expert, expert_weights& w) {
      return load_expert(ck, *naming, shape, layer, expert, w);
    };
  }
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  std::unique_ptr<expert_server> srv;
  if (status s = expert_server::start(o, srv); s != status::ok) return tool::fail("eaas-server", "start", s);
  const server_stats ready = srv->stats();
  std::printf(
      "{\"type\":\"ready\",\"id\":\"%s\",\"experts\":%zu,\"pid\":%d,\"ready_ns\":%llu,\"slots\":%u,\"max_tokens\":%u,"
      "\"slots_bytes\":%llu}\n",
      o.id.c_str(), o.experts.size(), static_cast<int>(::getpid()), static_cast<unsigned long long>(ready.ready_ns),
      ready.slots, o.max_tokens, static_cast<unsigned long long>(ready.slots_bytes));
  std::fflush(stdout);
  const status s = srv->serve(g_stop);
  const server_stats st = srv->stats();
  // Device-step round timing: mean microseconds per round that answered.
  const auto per_batch_us = [&st](std::uint64_t ns) {
    return st.batches != 0 ? double(ns) * 1e-3 / double(st.batches) : 0.0;
  };
  std::printf(
      "{\"type\":\"stats\",\"id\":\"%s\",\"requests\":%llu,\"refused\":%llu,\"tokens\":%llu,\"batches\":%llu,\"compute_"
      "ms\":%.1f,"
      "\"ready_ns\":%llu,\"first_served_ns\":%llu,\"ignored\":%llu,\"device_rounds\":%llu,\"graph_captures\":%u,"
      "\"padded_rows\":%llu,\"round_us\":{\"wait\":%.1f,\"window\":%.1f,\"front\":%.1f,\"gemm\":%.1f,\"back\":%.1f,"
      "\"gap\":%.1f},\"late_rounds\":%llu,\"direct_answers\":%llu}\n",
      o.id.c_str(), static_cast<unsigned long long>(st.requests), static_cast<unsigned long long>(st.refused),
      static_cast<unsigned long long>(st.tokens), static_cast<unsigned long long>(st.batches),
      double(st.compute_ns) * 1e-6, static_cast<unsigned long long>(st.ready_ns),
      static_cast<unsigned long long>(st.first_served_ns), static_cast<unsigned long long>(st.ignored),
      static_cast<unsigned long long>(st.device_rounds), st.graph_captures,
      static_cast<unsigned long long>(st.padded_rows), per_batch_us(st.round_wait_ns), per_batch_us(st.round_window_ns),
      per_batch_us(st.round_front_ns), per_batch_us(st.round_gemm_ns), per_batch_us(st.round_back_ns),
      per_batch_us(st.round_gap_ns), static_cast<unsigned long long>(st.late_rounds),
      static_cast<unsigned long long>(st.direct_answers));
  std::fflush(stdout);
  if (s != status::ok) return tool::fail("eaas-server", "serve", s);
  return 0;
}
