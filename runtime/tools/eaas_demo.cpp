// eaas-demo: the MoE reference runtime end to end on one machine. Starts an embedded registry, N expert
// servers and M attention clients as separate processes, shows their progress, and prints tokens/s,
// the per-layer MoE round trip and the check of every output against the monolithic reference.
//
//   eaas-demo                              (2 servers, 2 clients, the "tiny" model, on the CPU, or on
//                                           the GPUs where this host has any: --cpu / --gpu to choose)
//   eaas-demo --servers 3 --clients 2 --replicas 2 --model small --steps 100
//
// Elasticity (docs/RUNTIME.md, "Autoscaling"): with --trace the clients are open-loop and offer a traffic
// trace (eaas-client --trace); with --autoscale the servers are not started here but by an
// `eaas-autoscale run` child, from their published load. Either way the summary has the servers' timeline
// (how many were alive when, from their processes' start to their exit), its integral in server-seconds
// over the trace, and the forwards that missed the SLO.
//
//   eaas-demo --clients 2 --tokens 16 --trace diurnal --period-s 30 --peak-tps 3000 --slo-ms 250
//             --autoscale --capacity 1200 --max-servers 4

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "tool_common.hpp"
#include "wire.hpp"

extern char** environ;

using namespace eaas;
using namespace eaas::runtime;
using json = nlohmann::json;

namespace {

struct child {
  std::string name;
  pid_t pid = -1;
  int out = -1;  // its stdout
  std::string buf;
  bool exited = false;
  int status = 0;
  std::uint64_t start_ns = 0, end_ns = 0;  // its process's life, as this process saw it
};

bool spawn(const std::string& path, const std::vector<std::string>& args, child& c) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return false;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, p[1], 1);
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(path.c_str()));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const int rc = posix_spawn(&c.pid, path.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(p[1]);
  if (rc != 0) {
    ::close(p[0]);
    return false;
  }
  c.out = p[0];
  c.start_ns = eaas::now_ns();
  return true;
}

/// Reads what the children wrote (up to `ms`), calling `line` for each complete JSON line.
template <class F>
void pump(std::vector<child*>& cs, int ms, F&& line) {
  std::vector<pollfd> fds;
  for (auto* c : cs)
    if (c->out >= 0) fds.push_back({c->out, POLLIN, 0});
  if (fds.empty()) {
    ::usleep(static_cast<useconds_t>(ms) * 1000);
    return;
  }
  ::poll(fds.data(), fds.size(), ms);
  for (auto* c : cs) {
    if (c->out < 0) continue;
    pollfd p{c->out, POLLIN, 0};
    if (::poll(&p, 1, 0) <= 0) continue;
    char b[65536];
    const ssize_t n = ::read(c->out, b, sizeof(b));
    if (n <= 0) {
      ::close(c->out);
      c->out = -1;
      continue;
    }
    c->buf.append(b, static_cast<std::size_t>(n));
    std::size_t nl;
    while ((nl = c->buf.find('\n')) != std::string::npos) {
      const std::string l = c->buf.substr(0, nl);
      c->buf.erase(0, nl + 1);
      json j = json::parse(l, nullptr, false);
      if (!j.is_discarded() && j.is_object()) line(*c, j);
    }
  }
}

bool reap(child& c, bool block) {
  if (c.exited) return true;
  int st = 0;
  const pid_t r = ::waitpid(c.pid, &st, block ? 0 : WNOHANG);
  if (r == c.pid) {
    c.exited = true;
    c.status = st;
    c.end_ns = eaas::now_ns();
  }
  return c.exited;
}

std::string describe_exit(const child& c) {
  if (WIFEXITED(c.status)) return "exit " + std::to_string(WEXITSTATUS(c.status));
  if (WIFSIGNALED(c.status)) return std::string("signal ") + strsignal(WTERMSIG(c.status));
  return "?";
}

/// A server position (its placement S/N/R); replacements take the same position under a new id.
struct position {
  std::uint32_t index = 0, generation = 0;
  std::unique_ptr<child> proc;
};

struct kill_record {
  std::string server;
  std::uint64_t at_ns = 0;
  std::string replacement;
};

/// How many servers were alive when: +1 at a server's start, -1 at its exit.
struct server_timeline {
  std::vector<std::pair<std::uint64_t, int>> events;

  /// The count over [from, to] as (seconds from `from`, servers from then on) steps, and its integral.
  json over(std::uint64_t from, std::uint64_t to) const {
    auto ev = events;
    std::stable_sort(ev.begin(), ev.end(), [](auto& a, auto& b) { return a.first < b.first; });
    int n = 0, most = 0;
    std::size_t i = 0;
    for (; i < ev.size() && ev[i].first <= from; ++i) n += ev[i].second;
    json steps = json::array({json::array({0.0, n})});
    double seconds = 0;
    std::uint64_t t = from;
    most = n;
    for (; i < ev.size() && ev[i].first < to; ++i) {
      seconds += double(n) * double(ev[i].first - t) * 1e-9;
      t = ev[i].first;
      n += ev[i].second;
      most = std::max(most, n);
      steps.push_back(json::array({double(t - from) * 1e-9, n}));
    }
    seconds += double(n) * double(to - t) * 1e-9;
    const double span = double(to - from) * 1e-9;
    return {{"timeline", steps},
            {"interval_s", span},
            {"server_seconds", seconds},
            {"mean_servers", span > 0 ? seconds / span : 0.0},
            {"max_servers", most}};
  }
  /// Mean servers over [a, b].
  double mean(std::uint64_t a, std::uint64_t b) const {
    const json j = over(a, b);
    return j.value("mean_servers", 0.0);
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eaas-demo: registry, expert servers and attention clients as processes on this machine"};
  tool::model_args model;
  std::uint32_t servers = 2, clients = 2, replicas = 1, tokens = 32, steps = 30, attention_cost = 1;
  bool gpu = false, cpu = false, no_verify = false, verbose = false, no_replace = false;
  double tolerance = 1e-5, kill_every = 0, request_timeout_ms = 2000;
  std::string kill_signal = "KILL", json_path;
  model.add(app);
  app.add_option("--servers", servers, "expert servers")->capture_default_str();
  app.add_option("--clients", clients, "attention clients")->capture_default_str();
  app.add_option("--replicas", replicas, "servers per expert")->capture_default_str();
  app.add_option("--tokens", tokens, "tokens per client forward pass")->capture_default_str();
  app.add_option("--steps", steps, "forward passes per client")->capture_default_str();
  double duration = 0;
  app.add_option("--duration", duration, "clients run for this many seconds instead of --steps");
  app.add_option("--attention-cost", attention_cost, "dense GEMMs per layer in the attention stand-in")
      ->capture_default_str();
  app.add_option("--tolerance", tolerance, "largest relative error accepted against the reference")
      ->capture_default_str();
  app.add_option("--kill-every", kill_every,
                 "fault injection: every this many seconds, kill a random server (and start a replacement)");
  app.add_option("--kill-signal", kill_signal, "KILL (a crash) or TERM (a graceful leave)")->capture_default_str();
  app.add_flag("--no-replace", no_replace,
               "do not start a replacement for a killed server (then at most replicas - 1 are killed)");
  app.add_option("--request-timeout-ms", request_timeout_ms, "clients drop a server silent this long")
      ->capture_default_str();
  app.add_option("--json", json_path, "also write a summary (clients' results, kills, stalls, joins) to this file");
  app.add_flag("--no-verify", no_verify, "skip the check against the monolithic reference");
  auto* gpu_flag = app.add_flag("--gpu", gpu, "run on GPUs (the default where this host has any)");
  app.add_flag("--cpu", cpu, "run on the CPU even where GPUs are present")->excludes(gpu_flag);
  app.add_flag("--verbose", verbose, "show the servers' and clients' event lines (links, departures)");
  bool device_step = false, graph = false;
  std::string micro = "1";
  app.add_option("--micro-batches", micro, "clients' double batching: 1, 2 or auto (eaas-client)")
      ->check(CLI::IsMember({"1", "2", "auto"}))
      ->capture_default_str();
  auto* device_step_flag =
      app.add_flag("--device-step", device_step, "GPU clients run the whole forward on their GPU (eaas-client)");
  app.add_flag("--graph", graph, "with --device-step: clients replay their forward as a CUDA graph")
      ->needs(device_step_flag);
  bool server_device_step = false, server_no_graph = false, server_no_shrink = false;
  auto* server_device_step_flag =
      app.add_flag("--server-device-step", server_device_step,
                   "GPU servers run their whole poll round on their GPU, one CUDA graph (eaas-server --device-step)");
  app.add_flag("--server-no-graph", server_no_graph,
               "with --server-device-step: launch the round's kernels one by one (the ablation; eaas-server "
               "--device-no-graph)")
      ->needs(server_device_step_flag);
  app.add_flag("--server-no-shrink", server_no_shrink,
               "with --server-device-step: no kernel shrinking, the grouped GEMM computes every local expert of a "
               "served layer (the ablation; eaas-server --device-no-shrink)")
      ->needs(server_device_step_flag);
  std::uint32_t server_put_blocks = 0;
  app.add_option("--server-put-blocks", server_put_blocks,
                 "with --server-device-step: most blocks each server puts one answer with (eaas-server "
                 "--device-put-blocks; 0: the server's default)")
      ->check(CLI::Range(0, 1024))
      ->needs(server_device_step_flag);
  double server_batch_window_us = -1;
  app.add_option("--server-batch-window-us", server_batch_window_us,
                 "with --server-device-step: how long each server waits for the other clients in step before a round "
                 "(eaas-server --device-batch-window-us; 0: off; default: the server's)")
      ->check(CLI::Range(0.0, 1e6))
      ->needs(server_device_step_flag);
  bool no_pdl = false, server_no_pipeline = false;
  app.add_flag("--no-pdl", no_pdl,
               "plain launches instead of programmatic dependent launch in the device-step clients' and servers' "
               "rounds (the ablation; eaas-client --no-pdl, eaas-server --device-no-pdl)");
  app.add_flag("--server-no-pipeline", server_no_pipeline,
               "with --server-device-step: each round launched only after the host read the last one back (the "
               "ablation; eaas-server --device-no-pipeline)")
      ->needs(server_device_step_flag);
  bool server_direct_answers = false;
  app.add_flag("--server-direct-answers", server_direct_answers,
               "with --server-device-step: servers write answers straight into the clients' GPUs (eaas-server "
               "--device-direct-answers)")
      ->needs(server_device_step_flag);
  // Elasticity: open-loop clients on a trace, servers started by the autoscaler.
  std::string trace;
  double period_s = 60, peak_tps = 0, trough = 0.25, slo_ms = 1000, window_s = 0, capacity = 0, day_start_h = 0;
  std::uint64_t trace_seed = 1;
  bool autoscale = false;
  std::uint32_t max_servers = 4;
  std::vector<std::string> autoscale_args;
  app.add_option("--trace", trace, "clients offer a traffic trace, open loop: diurnal or a CSV (eaas-client --trace)");
  app.add_option("--period-s", period_s, "with --trace: seconds of the (compressed) day")->capture_default_str();
  app.add_option("--peak-tps", peak_tps, "with --trace: peak tokens/s of all clients together");
  app.add_option("--trough", trough, "with --trace diurnal: trough as a fraction of the peak")->capture_default_str();
  app.add_option("--trace-seed", trace_seed, "with --trace diurnal: noise seed (client i gets seed + i)")
      ->capture_default_str();
  app.add_option("--day-start-h", day_start_h, "with --trace diurnal: the hour the day starts at (4: trough to trough)")
      ->capture_default_str();
  app.add_option("--window-s", window_s, "with --trace: seconds per reported window (default period / 24)");
  app.add_option("--slo-ms", slo_ms, "with --trace: latency SLO of a forward, from its scheduled start")
      ->capture_default_str();
  auto* autoscale_flag = app.add_flag(
      "--autoscale", autoscale,
      "servers are started and stopped by an eaas-autoscale run child (--servers: its minimum) instead of fixed");
  app.add_option("--capacity", capacity, "with --autoscale: tokens/s one server takes within the SLO")
      ->needs(autoscale_flag);
  app.add_option("--max-servers", max_servers, "with --autoscale: the most servers")
      ->needs(autoscale_flag)
      ->capture_default_str();
  app.add_option("--autoscale-arg", autoscale_args,
                 "with --autoscale: an extra argument for eaas-autoscale run (repeatable, e.g. --autoscale-arg=--high "
                 "--autoscale-arg=0.7); ignored without --autoscale");
  CLI11_PARSE(app, argc, argv);

  model_shape shape;
  if (status s = model.resolve(shape); s != status::ok) return tool::fail("eaas-demo", "model", s);
  if (servers == 0 || clients == 0 || replicas == 0 || replicas > servers) {
    std::fprintf(stderr, "eaas-demo: need servers >= 1, clients >= 1, 1 <= replicas <= servers\n");
    return 2;
  }
  if (autoscale && (kill_every > 0 || !(capacity > 0) || max_servers < servers)) {
    std::fprintf(stderr,
                 "eaas-demo: --autoscale needs --capacity > 0 and --max-servers >= --servers, no --kill-every\n");
    return 2;
  }
  if (!trace.empty() && !(peak_tps > 0)) {
    std::fprintf(stderr, "eaas-demo: --trace needs --peak-tps > 0\n");
    return 2;
  }
  if (kill_signal != "KILL" && kill_signal != "TERM") {
    std::fprintf(stderr, "eaas-demo: --kill-signal is KILL or TERM\n");
    return 2;
  }
  if (kill_every > 0 && replicas < 2 && kill_signal == "KILL") {
    std::fprintf(stderr,
                 "eaas-demo: killing servers needs --replicas >= 2 (the killed server's experts need a replica)\n");
    return 2;
  }
  // GPUs: servers i on GPU i mod n, clients j on GPU (servers + j) mod n (so that with 2 GPUs a client
  // and a server sit on different GPUs where they can), expert weights in bf16.
  const int gpus = cuda_device_count();
  if (gpu && gpus == 0) {
    std::fprintf(stderr, "eaas-demo: --gpu: this host has no CUDA device%s\n",
                 EAAS_WITH_CUDA ? "" : " (and this eaas was built without CUDA)");
    return 2;
  }
  gpu = gpu || (!cpu && gpus > 0);
  if ((device_step || server_device_step) && !gpu) {
    std::fprintf(stderr, "eaas-demo: --device-step and --server-device-step need GPUs\n");
    return 2;
  }
  if (gpu && app.count("--tolerance") == 0) tolerance = 1e-2;  // bf16 weights and activations on the GPU
  // One BLAS thread per process: the processes already share the cores, and OpenBLAS's spinning
  // worker threads would fight them (the caller's setting wins).
  ::setenv("OPENBLAS_NUM_THREADS", "1", 0);
  if (!verbose) ::setenv("EAAS_QUIET", "1", 0);
  std::error_code ec;
  const auto dir = std::filesystem::read_symlink("/proc/self/exe", ec).parent_path();
  const std::string server_bin = (dir / "eaas-server").string(), client_bin = (dir / "eaas-client").string();
  const std::string autoscale_bin = (dir / "eaas-autoscale").string();

  std::unique_ptr<registry_server> reg;
  if (status s = registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg); s != status::ok)
    return tool::fail("eaas-demo", "registry", s);
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
  const std::string ns = "demo" + std::to_string(::getpid());
  std::vector<std::string> common = {"--registry", endpoint,
                                     "--ns",       ns,
                                     "--model",    model.preset,
                                     "--seed",     std::to_string(model.seed),
                                     "--hidden",   std::to_string(shape.hidden),
                                     "--inter",    std::to_string(shape.inter),
                                     "--experts",  std::to_string(shape.experts),
                                     "--topk",     std::to_string(shape.topk),
                                     "--layers",   std::to_string(shape.layers)};
  std::printf("eaas-demo: model %s (hidden %u, inter %u, %u experts, top-%u, %u MoE layers), registry %s\n",
              model.preset.c_str(), shape.hidden, shape.inter, shape.experts, shape.topk, shape.layers,
              endpoint.c_str());
  const std::string run_length =
      !trace.empty() ? fmt::format("trace {} over {:.1f} s (peak {:.0f} tokens/s in all, SLO {:.0f} ms)", trace,
                                   period_s, peak_tps, slo_ms)
      : duration > 0 ? fmt::format("{:.1f} s", duration)
                     : fmt::format("{} steps", steps);
  const std::string fleet =
      autoscale ? fmt::format("{} to {} servers (eaas-autoscale, capacity {:.0f} tokens/s each)", servers, max_servers,
                              capacity)
                : fmt::format("{} servers ({} replica{} per expert)", servers, replicas, replicas > 1 ? "s" : "");
  std::printf("eaas-demo: %s, %u clients × %s × %u tokens, %s\n", fleet.c_str(), clients, run_length.c_str(), tokens,
              gpu ? fmt::format("{} GPU{} (nvlink, bf16 experts)", gpus, gpus > 1 ? "s" : "").c_str() : "CPU");
  if (kill_every > 0)
    std::printf("eaas-demo: fault injection: SIG%s to a random server every %.1f s%s\n", kill_signal.c_str(),
                kill_every, no_replace ? "" : ", each replaced by a new server");

  std::vector<position> pos(servers);
  std::vector<std::unique_ptr<child>> retired;  // killed or left servers, still to be reaped
  std::vector<child> cli(clients);
  std::map<std::string, std::uint64_t> ready_ns, first_ns;
  std::map<std::string, json> server_stats, server_ready, progress, results;
  std::vector<json> failovers;
  std::vector<kill_record> kills;
  server_timeline alive;
  std::vector<json> scale_events;
  child scaler;  // --autoscale: the eaas-autoscale run child
  scaler.name = "autoscale";
  // What every server gets beyond the common arguments, started here or by the autoscaler. A client's forward
  // is one request per server and layer where it fits (larger ones the client splits).
  std::vector<std::string> server_extra;
  if (tokens > 512) {
    // A server sizes every client slot for its most tokens: at 4096 tokens, 16 slots (the server's default) are
    // hundreds of MiB per server. Slots for the clients that exist (two each with double batching), and two
    // to spare for a restarted client whose old slot has not lapsed yet.
    const std::uint32_t slots = std::min<std::uint32_t>(clients * (micro == "1" ? 1u : 2u) + 2u, 16u);
    server_extra.insert(server_extra.end(),
                        {"--max-tokens", std::to_string(tokens), "--max-clients", std::to_string(slots)});
  }
  if (server_device_step) server_extra.push_back("--device-step");
  if (server_no_graph) server_extra.push_back("--device-no-graph");
  if (server_no_shrink) server_extra.push_back("--device-no-shrink");
  if (server_put_blocks != 0)
    server_extra.insert(server_extra.end(), {"--device-put-blocks", std::to_string(server_put_blocks)});
  if (server_direct_answers) server_extra.push_back("--device-direct-answers");
  if (server_no_pipeline) server_extra.push_back("--device-no-pipeline");
  if (no_pdl && server_device_step) server_extra.push_back("--device-no-pdl");
  if (server_batch_window_us >= 0) {
    char w[32];
    std::snprintf(w, sizeof(w), "%.17g", server_batch_window_us);
    server_extra.insert(server_extra.end(), {"--device-batch-window-us", w});
  }
  auto start_server = [&](position& p) {
    auto c = std::make_unique<child>();
    c->name = "s" + std::to_string(p.index) + (p.generation ? "." + std::to_string(p.generation) : "");
    auto args = common;
    args.insert(args.end(), {"--id", c->name, "--placement",
                             std::to_string(p.index) + "/" + std::to_string(servers) + "/" + std::to_string(replicas)});
    if (gpu) args.insert(args.end(), {"--gpu", std::to_string(static_cast<int>(p.index) % gpus)});
    args.insert(args.end(), server_extra.begin(), server_extra.end());
    if (!spawn(server_bin, args, *c)) return false;
    alive.events.push_back({c->start_ns, +1});
    p.proc = std::move(c);
    return true;
  };
  auto everyone = [&] {
    std::vector<child*> v;
    for (auto& p : pos)
      if (p.proc) v.push_back(p.proc.get());
    for (auto& r : retired) v.push_back(r.get());
    for (auto& c : cli) v.push_back(&c);
    if (scaler.pid > 0) v.push_back(&scaler);
    return v;
  };
  auto stop_all = [&](int sig) {
    // The autoscaler's servers are its children, not ours: it must pass the signal on (it SIGTERMs them when
    // it stops), so it goes first, with a bounded wait, whatever the signal for the others.
    if (scaler.pid > 0 && !reap(scaler, false)) {
      ::kill(scaler.pid, SIGTERM);
      for (int i = 0; i < 100 && !reap(scaler, false); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    for (auto* c : everyone())
      if (c->pid > 0 && !reap(*c, false)) ::kill(c->pid, sig);
  };
  auto on_line = [&](child& c, const json& j) {
    const std::string type = j.value("type", "");
    if (type == "ready") {
      ready_ns[c.name] = j.value("ready_ns", 0ull);
      server_ready[c.name] = {{"slots", j.value("slots", 0u)},
                              {"max_tokens", j.value("max_tokens", 0u)},
                              {"slots_bytes", j.value("slots_bytes", 0ull)}};
    }
    if (type == "first_answer") first_ns[c.name] = j.value("ns", 0ull);
    if (type == "stats") server_stats[c.name] = j;
    if (type == "progress") progress[c.name] = j;
    if (type == "result") results[c.name] = j;
    // The autoscaler's servers: started at its scale line, gone at their exit line.
    if (&c == &scaler && type == "scale") {
      scale_events.push_back(j);
      if (j.value("action", "") == "add" && j.value("ok", false)) alive.events.push_back({j.value("ns", 0ull), +1});
      if (verbose)
        std::fprintf(stderr, "[demo] autoscale: %s %s (%s)\n", j.value("action", "").c_str(),
                     j.value("server", "").c_str(), j.value("why", "").c_str());
    }
    if (&c == &scaler && type == "server" && j.value("event", "") == "exit")
      alive.events.push_back({j.value("ns", 0ull), -1});
    if (type == "failover") {
      if (verbose)
        std::fprintf(stderr,
                     "[demo] failover at %s: server %s, layer %d, detected after %.1f ms, answered after %.1f ms: %s\n",
                     c.name.c_str(), j.value("server", "").c_str(), j.value("layer", 0),
                     double(j.value("detected_ns", 0ull) - j.value("sent_ns", 0ull)) * 1e-6,
                     double(j.value("done_ns", 0ull) - j.value("sent_ns", 0ull)) * 1e-6, j.value("why", "").c_str());
      failovers.push_back(j);
    }
  };
  if (autoscale) {
    // Its minimum at once; the clients wait for their experts.
    pos.clear();
    std::vector<std::string> args = common;
    args.insert(args.begin(), "run");
    args.insert(args.end(), {"--capacity", fmt::format("{}", capacity * shape.layers * shape.topk), "--min-servers",
                             std::to_string(servers), "--max-servers", std::to_string(max_servers)});
    // Its servers on the first GPUs, round robin; the clients keep the last ones where there are enough.
    if (gpu) args.insert(args.end(), {"--gpus", std::to_string(gpus > int(clients) ? gpus - int(clients) : gpus)});
    for (const auto& a : server_extra) args.push_back("--server-arg=" + a);  // '=': values may start with '-'
    args.insert(args.end(), autoscale_args.begin(), autoscale_args.end());
    if (!spawn(autoscale_bin, args, scaler)) {
      std::fprintf(stderr, "eaas-demo: cannot start %s\n", autoscale_bin.c_str());
      return 1;
    }
  }
  for (auto& p : pos) {
    p.index = static_cast<std::uint32_t>(&p - pos.data());
    if (!start_server(p)) {
      std::fprintf(stderr, "eaas-demo: cannot start %s\n", server_bin.c_str());
      stop_all(SIGKILL);
      return 1;
    }
  }
  // Servers first (they print "ready" once registered), then the clients.
  const auto t_start = std::chrono::steady_clock::now();
  while (!autoscale && ready_ns.size() < servers) {
    auto all = everyone();
    pump(all, 100, on_line);
    for (auto& p : pos)
      if (reap(*p.proc, false)) {
        std::fprintf(stderr, "eaas-demo: server %s ended early (%s)\n", p.proc->name.c_str(),
                     describe_exit(*p.proc).c_str());
        stop_all(SIGKILL);
        return 1;
      }
    if (std::chrono::steady_clock::now() - t_start > std::chrono::seconds(60)) {
      std::fprintf(stderr, "eaas-demo: servers not ready after 60 s\n");
      stop_all(SIGKILL);
      return 1;
    }
  }
  const double t_ready = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  if (!autoscale) std::printf("eaas-demo: %u servers ready in %.2f s\n", servers, t_ready);
  for (std::uint32_t i = 0; i < clients; ++i) {
    cli[i].name = "c" + std::to_string(i);
    auto args = common;
    if (duration > 0) args.insert(args.end(), {"--duration", std::to_string(duration)});
    args.insert(args.end(), {"--id", cli[i].name, "--tokens", std::to_string(tokens), "--steps", std::to_string(steps),
                             "--replicas", std::to_string(replicas), "--attention-cost", std::to_string(attention_cost),
                             "--request-timeout-ms", std::to_string(request_timeout_ms)});
    if (!no_verify) args.insert(args.end(), {"--verify", "--tolerance", fmt::format("{}", tolerance)});
    if (!trace.empty()) {
      args.insert(args.end(), {"--trace", trace, "--period-s", fmt::format("{}", period_s), "--peak-tps",
                               fmt::format("{}", peak_tps / clients), "--trough", fmt::format("{}", trough),
                               "--trace-seed", std::to_string(trace_seed + i), "--slo-ms", fmt::format("{}", slo_ms),
                               "--day-start-h", fmt::format("{}", day_start_h)});
      if (window_s > 0) args.insert(args.end(), {"--window-s", fmt::format("{}", window_s)});
    }
    if (gpu) {
      const int g = autoscale && gpus > int(clients) ? gpus - int(clients) + int(i) : int(servers + i) % gpus;
      args.insert(args.end(), {"--gpu", std::to_string(g)});
    }
    if (device_step) args.push_back("--device-step");
    if (micro != "1") args.insert(args.end(), {"--micro-batches", micro});
    if (graph) args.push_back("--graph");
    if (no_pdl && device_step) args.push_back("--no-pdl");
    if (!spawn(client_bin, args, cli[i])) {
      std::fprintf(stderr, "eaas-demo: cannot start %s\n", client_bin.c_str());
      stop_all(SIGKILL);
      return 1;
    }
  }
  const bool tty = ::isatty(1);
  auto show = [&] {
    std::string line = "  progress:";
    for (const auto& c : cli) {
      const auto it = progress.find(c.name);
      const int step = it == progress.end() ? 0 : it->second.value("step", 0);
      line += " " + c.name + " " + std::to_string(step) +
              (duration > 0 || !trace.empty() ? "" : "/" + std::to_string(steps));
    }
    if (autoscale) {
      int n = 0;
      for (const auto& [t, d] : alive.events) n += d;
      line += "   servers: " + std::to_string(n);
    }
    if (!kills.empty()) line += "   servers killed: " + std::to_string(kills.size());
    std::printf(tty ? "\r%s   " : "%s\n", line.c_str());
    std::fflush(stdout);
  };
  std::uint32_t done = 0;
  auto last_show = std::chrono::steady_clock::now();
  std::uint64_t next_kill = 0, kills_until = 0;
  std::mt19937 rng(static_cast<unsigned>(model.seed));
  bool failed = false;
  while (done < clients) {
    auto all = everyone();
    pump(all, 50, on_line);
    done = 0;
    for (auto& c : cli)
      if (reap(c, false)) {
        done++;
        if (!WIFEXITED(c.status) || WEXITSTATUS(c.status) != 0) failed = true;
      }
    for (auto& p : pos)
      if (p.proc && reap(*p.proc, false) && !failed) {
        std::fprintf(stderr, "\neaas-demo: server %s ended early (%s)\n", p.proc->name.c_str(),
                     describe_exit(*p.proc).c_str());
        failed = true;
      }
    for (auto& r : retired) reap(*r, false);
    if (autoscale && reap(scaler, false) && !failed) {
      std::fprintf(stderr, "\neaas-demo: eaas-autoscale ended early (%s)\n", describe_exit(scaler).c_str());
      failed = true;
    }
    if (failed) break;
    // Fault injection, once the clients are running.
    if (kill_every > 0 && !progress.empty()) {
      const std::uint64_t now = eaas::now_ns();
      if (next_kill == 0) {
        next_kill = now + static_cast<std::uint64_t>(kill_every * 1e9);
        // With --duration, no kill in the last stretch (at least 1 s, or two kill periods): each replacement
        // must have time to start and take traffic before the clients stop, so that every kill's join is
        // measured (a slow build, e.g. under a sanitizer, needs that time). Without replacements: no limit.
        if (duration > 0 && !no_replace)
          kills_until =
              now + static_cast<std::uint64_t>(
                        std::max(0.0, duration - std::min(duration / 2, std::max(1.0, 2 * kill_every))) * 1e9);
      }
      if (now >= next_kill && done == 0 && (kills_until == 0 || now < kills_until)) {
        next_kill = now + static_cast<std::uint64_t>(kill_every * 1e9);
        // A random live server. Without replacements at most replicas - 1 are taken (each expert keeps one).
        std::vector<position*> live;
        for (auto& q : pos)
          if (q.proc) live.push_back(&q);
        if (live.empty() || (no_replace && kills.size() + 1 >= replicas)) {
          kills_until = 1;  // no more kills
        } else {
          position& p = *live[rng() % live.size()];
          kills.push_back({p.proc->name, eaas::now_ns(), ""});
          ::kill(p.proc->pid, kill_signal == "KILL" ? SIGKILL : SIGTERM);
          retired.push_back(std::move(p.proc));
          if (!no_replace) {
            p.generation++;
            if (!start_server(p)) {
              std::fprintf(stderr, "\neaas-demo: cannot start a replacement server\n");
              failed = true;
              break;
            }
            kills.back().replacement = p.proc->name;
          }
        }
      }
    }
    if (std::chrono::steady_clock::now() - last_show > std::chrono::milliseconds(tty ? 200 : 2000)) {
      last_show = std::chrono::steady_clock::now();
      show();
    }
  }
  {
    auto all = everyone();
    for (int i = 0; i < 5; ++i) pump(all, 20, on_line);
  }
  show();
  std::printf("\n");
  stop_all(SIGTERM);
  for (auto& p : pos)
    if (p.proc) reap(*p.proc, true);
  for (auto& r : retired) reap(*r, true);
  // The autoscaler asks its servers to leave and waits for them; their exit lines come first.
  if (scaler.pid > 0) reap(scaler, true);
  for (auto& c : cli) {
    if (!reap(c, false)) ::kill(c.pid, SIGKILL);
    reap(c, true);
  }
  for (int i = 0; i < 20; ++i) {
    auto all = everyone();
    if (std::none_of(all.begin(), all.end(), [](const child* c) { return c->out >= 0; })) break;
    pump(all, 50, on_line);
  }
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();

  json summary = {{"kills", json::array()}, {"clients", json::object()}};
  std::printf("\n%-8s %12s %14s %14s %14s %14s %14s %12s\n", "client", "tokens/s", "step p50 ms", "step max ms",
              "moe p50 us", "moe p90 us", "moe p99 us", "max rel err");
  double total_tps = 0, worst = 0;
  std::vector<double> layer_all;
  bool ok = !failed;
  for (const auto& c : cli) {
    const auto it = results.find(c.name);
    if (it == results.end()) {
      std::printf("%-8s %s\n", c.name.c_str(), ("no result (" + describe_exit(c) + ")").c_str());
      ok = false;
      continue;
    }
    const json& r = it->second;
    total_tps += r.value("tokens_per_s", 0.0);
    worst = std::max(worst, r.value("max_rel_err", 0.0));
    for (const auto& v : r["layer_us_samples"]) layer_all.push_back(v.get<double>());
    std::printf("%-8s %12.0f %14.2f %14.2f %14.1f %14.1f %14.1f %12.2e\n", c.name.c_str(), r.value("tokens_per_s", 0.0),
                r["step_us"].value("p50", 0.0) / 1000, r["step_us"].value("max", 0.0) / 1000,
                r["moe_layer_us"].value("p50", 0.0), r["moe_layer_us"].value("p90", 0.0),
                r["moe_layer_us"].value("p99", 0.0), r.value("max_rel_err", 0.0));
    if (r.contains("device_layer_us") && r["device_layer_us"].value("round", 0.0) > 0) {
      const json& d = r["device_layer_us"];
      std::printf(
          "%-8s device MoE layers, mean us: dispatch and send %.1f, to the last answer %.1f, combine %.1f; "
          "attention and router between two %.1f\n",
          "", d.value("send", 0.0), d.value("round", 0.0), d.value("combine", 0.0), d.value("dense", 0.0));
    }
    if (r.contains("device_forward_us") && r["device_forward_us"].value("device", 0.0) > 0) {
      const json& f = r["device_forward_us"];
      std::printf(
          "%-8s device forwards, mean us: on the device from the first dispatch %.1f; on the host the "
          "client's call %.1f, the step's %.1f (preparing %.1f, waiting %.1f)\n",
          "", f.value("device", 0.0), f.value("client_call", 0.0), f.value("step_call", 0.0), f.value("prepare", 0.0),
          f.value("wait", 0.0));
    }
  }
  std::printf("\ntokens/s (sum of clients): %.0f   MoE round trip per layer: p50 %.1f us, p90 %.1f us, p99 %.1f us\n",
              total_tps, tool::percentile(layer_all, 50), tool::percentile(layer_all, 90),
              tool::percentile(layer_all, 99));
  double ref_tps = 0;
  for (const auto& [name, r] : results) ref_tps = std::max(ref_tps, r.value("reference_tokens_per_s", 0.0));
  if (ref_tps > 0)
    std::printf(
        "baseline: the monolithic reference (all experts in one process, one core) ran at %.0f tokens/s in the "
        "clients during this run\n",
        ref_tps);
  std::vector<child*> shown;
  for (auto& p : pos)
    if (p.proc) shown.push_back(p.proc.get());
  for (auto& r : retired) shown.push_back(r.get());
  for (const auto* c : shown) {
    const auto it = server_stats.find(c->name);
    if (it == server_stats.end()) {
      std::printf("server %-6s no counters (%s)\n", c->name.c_str(), describe_exit(*c).c_str());
      continue;
    }
    const json& st = it->second;
    std::printf("server %-6s %8llu requests, %8llu tokens computed, %6llu refused, expert math %.0f ms\n",
                c->name.c_str(), st.value("requests", 0ull), st.value("tokens", 0ull), st.value("refused", 0ull),
                st.value("compute_ms", 0.0));
    if (st.value("device_rounds", 0ull) != 0 && st.contains("round_us")) {
      const json& ru = st["round_us"];
      std::printf(
          "       %-6s device rounds that answered, mean us: wait %.1f, batch window %.1f, validate..scan %.1f, "
          "place+GEMM %.1f, combine+answer %.1f, gap before the round %.1f; request already waiting in %llu of %llu\n",
          "", ru.value("wait", 0.0), ru.value("window", 0.0), ru.value("front", 0.0), ru.value("gemm", 0.0),
          ru.value("back", 0.0), ru.value("gap", 0.0), st.value("late_rounds", 0ull), st.value("batches", 0ull));
    }
  }
  if (!kills.empty()) {
    std::printf("\nfault injection: %zu servers got SIG%s\n", kills.size(), kill_signal.c_str());
    for (std::size_t k = 0; k < kills.size(); ++k) {
      const auto& kr = kills[k];
      double stall_ms = -1;
      int events = 0;
      for (const auto& f : failovers)
        if (f.value("server", "") == kr.server) {
          events++;
          const std::uint64_t done_at = f.value("done_ns", std::uint64_t{0});
          stall_ms = std::max(stall_ms, double(done_at - std::min(done_at, kr.at_ns)) * 1e-6);
        }
      // Its replacement's join: from weights resident (registered) to its first answer.
      std::string joined = "no replacement";
      if (!kr.replacement.empty()) {
        const auto r = ready_ns.find(kr.replacement);
        const auto f = first_ns.find(kr.replacement);
        char b[96];
        if (r != ready_ns.end() && f != first_ns.end())
          std::snprintf(b, sizeof(b), "replacement %s served %.1f ms after registering", kr.replacement.c_str(),
                        double(f->second - r->second) * 1e-6);
        else
          std::snprintf(b, sizeof(b), "replacement %s served nothing", kr.replacement.c_str());
        joined = b;
      }
      summary["kills"].push_back(
          {{"server", kr.server},
           {"client_failovers", events},
           {"stall_ms", stall_ms},
           {"replacement", kr.replacement},
           {"join_ms", !kr.replacement.empty() && ready_ns.count(kr.replacement) && first_ns.count(kr.replacement)
                           ? double(first_ns[kr.replacement] - ready_ns[kr.replacement]) * 1e-6
                           : -1.0}});
      if (events)
        std::printf("  %-6s %d client failover%s, kill → replicas' answers in %.1f ms; %s\n", kr.server.c_str(), events,
                    events > 1 ? "s" : "", stall_ms, joined.c_str());
      else
        std::printf("  %-6s no request was lost (clients saw it go before sending); %s\n", kr.server.c_str(),
                    joined.c_str());
    }
  }
  // Elasticity: the servers alive over the trace (from the first client's trace start to the last one's
  // end; the whole run without a trace), their integral, and the SLO over all clients.
  for (auto& p : pos)
    if (p.proc && p.proc->exited) alive.events.push_back({p.proc->end_ns, -1});
  for (auto& r : retired)
    if (r->exited) alive.events.push_back({r->end_ns, -1});
  std::uint64_t span_from = ~0ull, span_to = 0;
  for (const auto& [name, r] : results)
    if (r.contains("trace") && r["trace"].is_object() && r["trace"].contains("start_ns")) {
      span_from = std::min<std::uint64_t>(span_from, r["trace"].value("start_ns", ~0ull));
      span_to = std::max<std::uint64_t>(span_to, r["trace"].value("end_ns", 0ull));
    }
  if (span_from >= span_to) {
    span_from = static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(t_start.time_since_epoch()).count());
    span_to = eaas::now_ns();
  }
  json fleet_json = alive.over(span_from, span_to);
  fleet_json["adds"] = std::count_if(scale_events.begin(), scale_events.end(),
                                     [](const json& e) { return e.value("action", "") == "add"; });
  fleet_json["removes"] = std::count_if(scale_events.begin(), scale_events.end(),
                                        [](const json& e) { return e.value("action", "") == "remove"; });
  fleet_json["scale_events"] = scale_events;
  fleet_json["slots"] = server_ready;  // per server: client slots, most tokens per request, the region's bytes
  // Per server with the device step: where its answering rounds' time went (mean us) and how many found
  // their request already waiting.
  for (const auto& [name, st] : server_stats)
    if (st.value("device_rounds", 0ull) != 0 && st.contains("round_us"))
      fleet_json["rounds"][name] = {
          {"us", st["round_us"]}, {"late", st.value("late_rounds", 0ull)}, {"answering", st.value("batches", 0ull)}};
  summary["servers"] = fleet_json;
  if (!trace.empty()) {
    std::uint64_t forwards = 0, over = 0, unserved = 0;
    std::vector<json> windows;
    double window = 0;
    for (const auto& [name, r] : results) {
      const json& t = r.value("trace", json::object());
      forwards += t.value("forwards", 0ull);
      over += t.value("over_slo", 0ull);
      unserved += t.value("unserved", 0ull);
      window = t.value("window_s", 0.0);
      const json ws = t.value("windows", json::array());
      for (std::size_t w = 0; w < ws.size(); ++w) {
        if (windows.size() <= w) windows.push_back({{"forwards", 0}, {"over_slo", 0}, {"offered_tps", 0.0}});
        json& a = windows[w];
        a["t_s"] = ws[w].value("t_s", 0.0);
        a["forwards"] = a.value("forwards", 0ull) + ws[w].value("forwards", 0ull);
        a["over_slo"] = a.value("over_slo", 0ull) + ws[w].value("over_slo", 0ull);
        a["offered_tps"] = a.value("offered_tps", 0.0) + ws[w].value("offered_tps", 0.0);
        // Percentiles do not add up over clients: the worst client's.
        a["p50_ms"] = std::max(a.value("p50_ms", 0.0), ws[w].value("p50_ms", 0.0));
        a["p99_ms"] = std::max(a.value("p99_ms", 0.0), ws[w].value("p99_ms", 0.0));
      }
    }
    std::printf("\n%-8s %10s %14s %10s %10s %10s %12s %12s\n", "window", "t s", "offered tok/s", "servers", "forwards",
                "over SLO", "p50 ms (*)", "p99 ms (*)");
    for (std::size_t w = 0; w < windows.size(); ++w) {
      json& a = windows[w];
      const double t0 = a.value("t_s", 0.0);
      a["mean_servers"] = alive.mean(span_from + static_cast<std::uint64_t>(t0 * 1e9),
                                     std::min(span_to, span_from + static_cast<std::uint64_t>((t0 + window) * 1e9)));
      std::printf("%-8zu %10.1f %14.0f %10.2f %10llu %10llu %12.1f %12.1f\n", w, t0, a.value("offered_tps", 0.0),
                  a.value("mean_servers", 0.0), a.value("forwards", 0ull), a.value("over_slo", 0ull),
                  a.value("p50_ms", 0.0), a.value("p99_ms", 0.0));
    }
    std::printf("(*) the worst client's; servers: the mean number alive over the window\n");
    std::printf("SLO %.0f ms: %llu of %llu forwards missed it (%.2f %%; %llu never started)\n", slo_ms,
                static_cast<unsigned long long>(over), static_cast<unsigned long long>(forwards),
                forwards ? 100.0 * double(over) / double(forwards) : 0.0, static_cast<unsigned long long>(unserved));
    summary["trace"] = {{"trace", trace},
                        {"period_s", period_s},
                        {"day_start_h", day_start_h},
                        {"peak_tps", peak_tps},
                        {"slo_ms", slo_ms},
                        {"forwards", forwards},
                        {"over_slo", over},
                        {"unserved", unserved},
                        {"miss_fraction", forwards ? double(over) / double(forwards) : 0.0},
                        {"windows", windows}};
  }
  std::printf("servers: %.1f server-seconds over %.1f s (mean %.2f, max %d alive%s)\n",
              fleet_json.value("server_seconds", 0.0), fleet_json.value("interval_s", 0.0),
              fleet_json.value("mean_servers", 0.0), fleet_json.value("max_servers", 0),
              autoscale ? fmt::format("; eaas-autoscale added {}, removed {}", fleet_json.value("adds", 0),
                                      fleet_json.value("removes", 0))
                              .c_str()
                        : "");
  if (no_verify) {
    std::printf("correctness: not checked (--no-verify)\n");
  } else {
    // Every step of every client was checked, or this is a failure.
    std::uint64_t checked = 0;
    for (const auto& [name, r] : results) {
      checked += r.value("verified_steps", 0ull);
      if (r.value("verified_steps", 0ull) != r.value("steps", 1ull)) ok = false;
    }
    const bool good = ok && worst <= tolerance;
    std::printf(
        "correctness: %s — every output of %llu steps (%u clients) against the monolithic reference, max "
        "relative error %.2e (tolerance %.0e)\n",
        good ? "PASS" : "FAIL", static_cast<unsigned long long>(checked), clients, worst, tolerance);
    ok = good;
  }
  std::printf("wall time %.1f s\n", wall);
  if (!json_path.empty()) {
    summary["ok"] = ok;
    summary["max_rel_err"] = worst;
    summary["tolerance"] = tolerance;
    summary["device"] = gpu ? "gpu" : "cpu";
    summary["tokens_per_s"] = total_tps;
    summary["reference_tokens_per_s"] = ref_tps;
    summary["wall_s"] = wall;
    summary["moe_layer_us"] = {{"p50", tool::percentile(layer_all, 50)},
                               {"p90", tool::percentile(layer_all, 90)},
                               {"p99", tool::percentile(layer_all, 99)}};
    for (const auto& [name, r] : results) {
      json c = r;
      c.erase("layer_us_samples");
      summary["clients"][name] = c;
    }
    std::FILE* f = std::fopen(json_path.c_str(), "w");
    if (f != nullptr) {
      const std::string text = summary.dump(2) + "\n";
      std::fwrite(text.data(), 1, text.size(), f);
      std::fclose(f);
    }
  }
  return ok ? 0 : 1;
}
