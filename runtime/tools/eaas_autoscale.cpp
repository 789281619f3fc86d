// eaas-autoscale: the autoscaler (runtime/src/autoscale.hpp), live or against a traffic trace.
//
//   eaas-autoscale run --registry embedded://127.0.0.1:23790 --ns moe --capacity TPS [--min-servers N] ...
//   eaas-autoscale replay [--trace diurnal|FILE.csv] [--capacity TPS] [--slo-util U] ...
//   eaas-autoscale live --peak-tps X --period-s P [--capacity TPS | --static-servers N] ... -- EAAS-DEMO ARGS
//
// run: every tick, reads the load records the servers publish (/eaas/NS/load/ID: token-expert pairs
// per second per expert, queue depth, pid), asks the policy, and carries out its decision on this
// machine: starts an eaas-server hosting the experts it names, or asks a server to leave (SIGTERM:
// it withdraws its record and drains). One JSON line per decision on stdout.
//
// replay: a trace of offered tokens/s (built-in diurnal day, or a CSV of "seconds,tokens_per_s") is
// replayed tick by tick against (a) static provisioning for the trace's peak and (b) the autoscaler,
// both held to the same latency SLO. Servers are a fluid model: a server computes `--capacity` tokens/s,
// its latency grows as 1/(1-u) with utilisation u, so the SLO is a utilisation bound (`--slo-util`); a
// new server takes traffic `--join-s` after the decision (weights resident + join). Output: server-hours
// of both, the saving, and the ticks where the SLO was missed. The capacity and join time are inputs;
// measure them with eaas-demo on the target machine.
//
// live: the same comparison on real processes. Runs eaas-demo twice on one trace (open-loop clients,
// eaas-client --trace): once with a static fleet, the fewest servers that meet the SLO at the peak
// (--static-servers, or ceil(peak / (capacity × slo-util)) with --capacity given or measured by a short
// closed-loop eaas-demo run of one server), once with --autoscale (an eaas-autoscale run child starting
// and stopping eaas-servers, clients never restarted). Reports, for each, the server-seconds integrated
// from the servers alive over the trace, the forwards over the latency SLO, and the saving.

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <sstream>
#include <thread>

#include "autoscale.hpp"
#include "eaas/eaas.hpp"
#include "tool_common.hpp"

extern char** environ;

using namespace eaas;
using namespace eaas::runtime;
using json = nlohmann::json;

namespace {

std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }

struct run_options {
  std::string endpoint = "embedded://127.0.0.1:23790", token, ns = "moe", server_bin;
  tool::model_args model;
  double tick_ms = 1000, duration_s = 0;
  int gpus = 0;  // > 0: start servers on GPUs 0 .. gpus-1, round robin (--gpu)
  std::vector<std::string> server_args;
};

void emit(const json& j) {
  const std::string s = j.dump() + "\n";
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
}

/// Runs a program with this process's stdout and stderr, waits for it; its exit status (-1: not run).
int run_child(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawn(&pid, args[0].c_str(), nullptr, nullptr, argv.data(), environ) != 0) return -1;
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

json read_json(const std::string& path) {
  std::ifstream f(path);
  return json::parse(f, nullptr, false);
}

struct live_options {
  std::string trace = "diurnal", json_path, demo_bin;
  double period_s = 60, peak_tps = 0, trough = 0.25, day_start_h = 4, slo_ms = 1000, window_s = 0;
  double capacity = 0, slo_util = 0.8, calibrate_s = 5;
  std::uint32_t static_servers = 0, max_servers = 0, min_servers = 1;
  std::vector<std::string> demo_args;  // model, --cpu/--gpu, --clients, --tokens, --autoscale-arg ...
};

int run_compare(live_options lo) {
  const std::string tmp = "/tmp/eaas-live-" + std::to_string(::getpid());
  auto demo = [&](std::vector<std::string> extra, const std::string& json_file) {
    std::vector<std::string> args = {lo.demo_bin};
    args.insert(args.end(), lo.demo_args.begin(), lo.demo_args.end());
    args.insert(args.end(), extra.begin(), extra.end());
    args.insert(args.end(), {"--json", json_file});
    std::string line;
    for (const auto& a : args) line += (line.empty() ? "" : " ") + a;
    std::printf("\n$ %s\n", line.c_str());
    std::fflush(stdout);
    const int rc = run_child(args);
    json j = read_json(json_file);
    std::remove(json_file.c_str());
    if (rc != 0 || !j.is_object()) {
      std::fprintf(stderr, "eaas-autoscale live: eaas-demo failed (exit %d)\n", rc);
      return json();
    }
    return j;
  };
  std::string capacity_from = "given";
  if (lo.static_servers == 0 && lo.capacity <= 0) {
    // Closed loop, one server, the same clients: what one server answers with these clients (a lower
    // bound on its capacity where the clients, not the server, are the limit).
    const json c =
        demo({"--servers", "1", "--duration", fmt::format("{}", lo.calibrate_s), "--no-verify"}, tmp + "-cal.json");
    if (!c.is_object()) return 1;
    lo.capacity = c.value("tokens_per_s", 0.0);
    capacity_from = "measured (closed loop, one server)";
    if (!(lo.capacity > 0)) {
      std::fprintf(stderr, "eaas-autoscale live: the calibration run measured no throughput\n");
      return 1;
    }
  }
  if (lo.static_servers == 0)
    lo.static_servers = std::max<std::uint32_t>(
        1, static_cast<std::uint32_t>(std::ceil(lo.peak_tps / (lo.capacity * lo.slo_util) - 1e-9)));
  if (lo.capacity <= 0) lo.capacity = lo.peak_tps / (lo.static_servers * lo.slo_util);
  if (lo.max_servers == 0) lo.max_servers = lo.static_servers;
  lo.min_servers = std::min(lo.min_servers, lo.max_servers);
  std::printf(
      "eaas-autoscale live: capacity %.0f tokens/s per server (%s); static fleet %u servers; autoscaler %u..%u\n",
      lo.capacity, capacity_from.c_str(), lo.static_servers, lo.min_servers, lo.max_servers);
  std::vector<std::string> trace_args = {"--trace",       lo.trace,
                                         "--period-s",    fmt::format("{}", lo.period_s),
                                         "--peak-tps",    fmt::format("{}", lo.peak_tps),
                                         "--trough",      fmt::format("{}", lo.trough),
                                         "--day-start-h", fmt::format("{}", lo.day_start_h),
                                         "--slo-ms",      fmt::format("{}", lo.slo_ms)};
  if (lo.window_s > 0) trace_args.insert(trace_args.end(), {"--window-s", fmt::format("{}", lo.window_s)});
  // The static fleet: every server hosts every expert, as the autoscaler's do.
  auto st_args = trace_args;
  st_args.insert(st_args.end(),
                 {"--servers", std::to_string(lo.static_servers), "--replicas", std::to_string(lo.static_servers)});
  const json st = demo(st_args, tmp + "-static.json");
  if (!st.is_object()) return 1;
  auto as_args = trace_args;
  as_args.insert(as_args.end(), {"--autoscale", "--servers", std::to_string(lo.min_servers), "--max-servers",
                                 std::to_string(lo.max_servers), "--capacity", fmt::format("{}", lo.capacity)});
  const json as = demo(as_args, tmp + "-auto.json");
  if (!st.is_object() || !as.is_object()) return 1;
  auto row = [](const json& j) {
    const json& s = j["servers"];
    const json& t = j["trace"];
    double p99 = 0;
    for (const auto& w : t["windows"]) p99 = std::max(p99, w.value("p99_ms", 0.0));
    return json{{"server_seconds", s.value("server_seconds", 0.0)},
                {"interval_s", s.value("interval_s", 0.0)},
                {"mean_servers", s.value("mean_servers", 0.0)},
                {"max_servers", s.value("max_servers", 0)},
                {"adds", s.value("adds", 0)},
                {"removes", s.value("removes", 0)},
                {"forwards", t.value("forwards", 0)},
                {"over_slo", t.value("over_slo", 0)},
                {"miss_fraction", t.value("miss_fraction", 0.0)},
                {"worst_window_p99_ms", p99},
                {"ok", j.value("ok", false)},
                {"timeline", s["timeline"]}};
  };
  const json a = row(st), b = row(as);
  const double saved = 1 - b.value("server_seconds", 0.0) / std::max(1e-9, a.value("server_seconds", 0.0));
  std::printf("\ntrace %s over %.0f s, peak %.0f tokens/s, SLO %.0f ms; server capacity %.0f tokens/s\n",
              lo.trace.c_str(), lo.period_s, lo.peak_tps, lo.slo_ms, lo.capacity);
  std::printf("%-12s %8s %14s %12s %10s %10s %8s %16s\n", "provisioning", "servers", "server-seconds", "mean servers",
              "forwards", "over SLO", "miss %", "worst p99 ms");
  for (const auto& [name, r] : {std::pair{"static", a}, std::pair{"autoscaler", b}})
    std::printf("%-12s %8d %14.1f %12.2f %10d %10d %8.2f %16.1f\n", name, r.value("max_servers", 0),
                r.value("server_seconds", 0.0), r.value("mean_servers", 0.0), r.value("forwards", 0),
                r.value("over_slo", 0), 100 * r.value("miss_fraction", 0.0), r.value("worst_window_p99_ms", 0.0));
  std::printf("server-seconds saved by the autoscaler: %.1f %% (%d added, %d removed); outputs %s\n", 100 * saved,
              b.value("adds", 0), b.value("removes", 0),
              a.value("ok", false) && b.value("ok", false) ? "ok in both runs" : "NOT ok");
  if (!lo.json_path.empty())
    std::ofstream(lo.json_path) << json{{"trace", lo.trace},
                                        {"period_s", lo.period_s},
                                        {"peak_tps", lo.peak_tps},
                                        {"trough", lo.trough},
                                        {"slo_ms", lo.slo_ms},
                                        {"capacity_tps", lo.capacity},
                                        {"capacity_from", capacity_from},
                                        {"static_servers", lo.static_servers},
                                        {"static", a},
                                        {"autoscaler", b},
                                        {"saved_fraction", saved}}
                                       .dump(2)
                                << "\n";
  return a.value("ok", false) && b.value("ok", false) ? 0 : 1;
}

int run_live(const run_options& ro, autoscale_policy p) {
  model_shape shape;
  if (status s = ro.model.resolve(shape); s != status::ok) return tool::fail("eaas-autoscale", "model", s);
  registry_options reg_opts;
  reg_opts.endpoint = ro.endpoint;
  reg_opts.token = ro.token;
  std::unique_ptr<registry> reg;
  if (status s = registry::open(reg_opts, reg); s != status::ok) return tool::fail("eaas-autoscale", "registry", s);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  autoscaler a(p);
  struct child_server {
    std::string id;
    std::vector<std::uint32_t> experts;
  };
  std::map<pid_t, child_server> children;  // servers this process started (the only ones it signals)
  int next = 0;
  // Every server's life, start (the scale line) to exit, with the monotonic clock every process of this
  // machine shares: what an orchestrator (eaas-demo --autoscale) integrates into server-seconds.
  auto emit_exit = [](const std::string& id) {
    emit({{"type", "server"}, {"event", "exit"}, {"server", id}, {"ns", eaas::now_ns()}});
  };
  const std::string prefix = "/eaas/" + ro.ns + "/load/";
  const auto t_end = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(static_cast<long>(ro.duration_s > 0 ? ro.duration_s * 1000 : 1e12));
  while (!g_stop && std::chrono::steady_clock::now() < t_end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<long>(ro.tick_ms)));
    for (auto it = children.begin(); it != children.end();) {  // reap servers that left
      if (::waitpid(it->first, nullptr, WNOHANG) != it->first) {
        ++it;
        continue;
      }
      emit_exit(it->second.id);
      it = children.erase(it);
    }
    std::vector<kv_record> recs;
    std::int64_t rev = 0;
    if (reg->list(prefix, recs, rev) != status::ok) continue;  // registry away: try next tick
    std::vector<fleet_server> fleet;
    fleet_load load{std::vector<double>(shape.experts, 0.0), 0};
    for (const auto& r : recs) {
      // A peer wrote it: every field is type-checked, and a record that does not fit is skipped.
      const json j = json::parse(r.value, nullptr, false);
      if (!j.is_object() || !j.contains("v") || !j["v"].is_number_integer() || j["v"].get<int>() != 1 ||
          !j.contains("experts") || !j.contains("expert_tps") || (j.contains("queue") && !j["queue"].is_number()))
        continue;
      const auto& ex = j["experts"];
      const auto& tps = j["expert_tps"];
      if (!ex.is_array() || !tps.is_array() || ex.size() != tps.size()) continue;
      fleet_server f{r.key.substr(prefix.size()), {}};
      bool ok = true;
      for (std::size_t i = 0; i < ex.size() && ok; ++i) {
        if (!ex[i].is_number_unsigned() || ex[i].get<std::uint64_t>() >= shape.experts || !tps[i].is_number()) {
          ok = false;
          break;
        }
        f.experts.push_back(ex[i].get<std::uint32_t>());
        load.expert_tps[f.experts.back()] += std::max(0.0, tps[i].get<double>());
      }
      if (!ok) continue;
      load.queue_depth += j.contains("queue") ? std::max(0.0, j["queue"].get<double>()) : 0.0;
      fleet.push_back(std::move(f));
    }
    // Servers it started that do not report yet (loading weights, registering) count as coming: the
    // policy must not add more for the same load.
    for (const auto& [pid, ch] : children)
      if (std::none_of(fleet.begin(), fleet.end(), [&](const fleet_server& f) { return f.id == ch.id; }))
        fleet.push_back({ch.id, ch.experts});
    if (!fleet.empty()) load.queue_depth /= double(fleet.size());
    const double offered = std::accumulate(load.expert_tps.begin(), load.expert_tps.end(), 0.0);
    const autoscale_decision d = a.tick(fleet, load);
    if (d.kind == autoscale_decision::add_server) {
      const std::string id = "as" + std::to_string(::getpid()) + "-" + std::to_string(next++);
      std::string list;
      for (auto e : d.experts) list += (list.empty() ? "" : ",") + std::to_string(e);
      std::vector<std::string> args = {ro.server_bin, "--id",           id,  "--registry", ro.endpoint, "--ns",
                                       ro.ns,         "--host-experts", list};
      if (!ro.token.empty()) args.insert(args.end(), {"--token", ro.token});
      if (ro.gpus > 0) args.insert(args.end(), {"--gpu", std::to_string((next - 1) % ro.gpus)});
      args.insert(args.end(), ro.server_args.begin(), ro.server_args.end());
      std::vector<char*> argv;
      for (auto& x : args) argv.push_back(x.data());
      argv.push_back(nullptr);
      pid_t pid = -1;
      posix_spawn_file_actions_t fa;
      posix_spawn_file_actions_init(&fa);
      posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);  // its JSON lines are not ours
      const int rc = posix_spawn(&pid, ro.server_bin.c_str(), &fa, nullptr, argv.data(), environ);
      posix_spawn_file_actions_destroy(&fa);
      if (rc == 0) children[pid] = {id, d.experts};
      emit({{"type", "scale"},
            {"action", "add"},
            {"ns", eaas::now_ns()},
            {"server", id},
            {"experts", d.experts},
            {"servers", fleet.size()},
            {"offered_tps", offered},
            {"ok", rc == 0},
            {"why", d.why}});
    } else if (d.kind == autoscale_decision::remove_server) {
      // Only servers this process started, by the pid it holds: a load record's word is no reason to
      // signal a process.
      pid_t pid = 0;
      for (const auto& [p, ch] : children)
        if (ch.id == d.server) pid = p;
      const bool ok = pid > 0 && ::kill(pid, SIGTERM) == 0;  // a graceful leave: it drains first
      emit({{"type", "scale"},
            {"action", "remove"},
            {"ns", eaas::now_ns()},
            {"server", d.server},
            {"servers", fleet.size()},
            {"offered_tps", offered},
            {"ok", ok},
            {"why", d.why}});
    }
  }
  for (const auto& [pid, ch] : children) ::kill(pid, SIGTERM);
  for (const auto& [pid, ch] : children) {
    ::waitpid(pid, nullptr, 0);
    emit_exit(ch.id);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eaas-autoscale: the eaas autoscaler"};
  app.require_subcommand(1);
  auto* replay =
      app.add_subcommand("replay", "replay a traffic trace against static peak provisioning and the autoscaler");
  std::string trace = "diurnal", json_path;
  double capacity = 1000, slo_util = 0.8, peak = 20000, trough = 0.25, tick_s = 60, join_s = 30;
  std::uint32_t experts = 128, min_servers = 2, max_servers = 256;
  std::uint64_t seed = 1;
  autoscale_policy p;
  replay->add_option("--trace", trace, "diurnal, or a CSV file of seconds,tokens_per_s")->capture_default_str();
  replay->add_option("--peak", peak, "diurnal: peak offered tokens/s")->capture_default_str();
  replay->add_option("--trough", trough, "diurnal: trough as a fraction of the peak")->capture_default_str();
  replay->add_option("--tick-s", tick_s, "seconds per tick")->capture_default_str();
  replay->add_option("--capacity", capacity, "tokens/s one server computes")->capture_default_str();
  replay->add_option("--slo-util", slo_util, "utilisation at which latency meets the SLO exactly")
      ->capture_default_str();
  replay->add_option("--join-s", join_s, "seconds from a scale-up decision to the new server taking traffic")
      ->capture_default_str();
  replay->add_option("--experts", experts, "experts in the model")->capture_default_str();
  replay->add_option("--min-servers", min_servers, "")->capture_default_str();
  replay->add_option("--max-servers", max_servers, "")->capture_default_str();
  replay->add_option("--high", p.high, "scale up above this utilisation")->capture_default_str();
  replay->add_option("--low", p.low, "scale down only below this utilisation")->capture_default_str();
  replay->add_option("--seed", seed, "noise seed")->capture_default_str();
  replay->add_option("--json", json_path, "write the result as JSON");
  auto* run = app.add_subcommand("run", "scale the servers of a registry namespace on this machine");
  run_options ro;
  autoscale_policy rp;
  rp.up_ticks = 2;
  rp.down_ticks = 5;
  rp.cooldown_ticks = 3;
  run->add_option("--registry", ro.endpoint, "registry")->capture_default_str();
  run->add_option("--token", ro.token, "registry token");
  run->add_option("--ns", ro.ns, "registry namespace")->capture_default_str();
  run->add_option("--server-bin", ro.server_bin, "eaas-server to start (default: next to this tool)");
  run->add_option("--capacity", rp.capacity_tps, "token-expert pairs per second one server computes within the SLO")
      ->required();
  run->add_option("--min-servers", rp.min_servers, "")->capture_default_str();
  run->add_option("--max-servers", rp.max_servers, "")->capture_default_str();
  run->add_option("--experts-per-server", rp.experts_per_server, "experts a new server hosts (0: all / min)")
      ->capture_default_str();
  run->add_option("--high", rp.high, "scale up above this utilisation")->capture_default_str();
  run->add_option("--low", rp.low, "scale down only below this utilisation")->capture_default_str();
  run->add_option("--up-ticks", rp.up_ticks, "")->capture_default_str();
  run->add_option("--down-ticks", rp.down_ticks, "")->capture_default_str();
  run->add_option("--cooldown-ticks", rp.cooldown_ticks, "")->capture_default_str();
  run->add_option("--tick-ms", ro.tick_ms, "")->capture_default_str();
  run->add_option("--duration", ro.duration_s, "seconds to run (0: until SIGTERM)")->capture_default_str();
  ro.model.add(*run);
  run->add_option("--server-arg", ro.server_args, "extra argument for every server started (repeatable)");
  run->add_option("--gpus", ro.gpus, "start servers on GPUs 0..N-1, round robin (0: on the CPU)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  auto* live = app.add_subcommand(
      "live", "a trace against static peak provisioning and the autoscaler, on real processes (eaas-demo twice)");
  live_options lo;
  live->add_option("--trace", lo.trace, "diurnal, or a CSV of seconds,tokens_per_s")->capture_default_str();
  live->add_option("--period-s", lo.period_s, "seconds the day is compressed into")->capture_default_str();
  live->add_option("--peak-tps", lo.peak_tps, "peak tokens/s of all clients together")->required();
  live->add_option("--trough", lo.trough, "diurnal: trough as a fraction of the peak")->capture_default_str();
  live->add_option("--day-start-h", lo.day_start_h, "diurnal: the hour the day starts at")->capture_default_str();
  live->add_option("--slo-ms", lo.slo_ms, "latency SLO of a forward, from its scheduled start")->capture_default_str();
  live->add_option("--window-s", lo.window_s, "seconds per reported window (default period / 24)");
  live->add_option("--capacity", lo.capacity, "tokens/s one server takes within the SLO (0: measure it)")
      ->capture_default_str();
  live->add_option("--slo-util", lo.slo_util, "static fleet: ceil(peak / (capacity x this))")->capture_default_str();
  live->add_option("--static-servers", lo.static_servers, "the static fleet (0: from the capacity)")
      ->capture_default_str();
  live->add_option("--min-servers", lo.min_servers, "autoscaler: fewest servers")->capture_default_str();
  live->add_option("--max-servers", lo.max_servers, "autoscaler: most servers (0: the static fleet)")
      ->capture_default_str();
  live->add_option("--calibrate-s", lo.calibrate_s, "seconds of the capacity measurement")->capture_default_str();
  live->add_option("--json", lo.json_path, "write both runs' results as JSON");
  live->add_option("--demo-bin", lo.demo_bin, "eaas-demo to run (default: next to this tool)");
  live->add_option("demo-args", lo.demo_args,
                   "after --: arguments for both eaas-demo runs (model, --cpu, --clients, ...)");
  CLI11_PARSE(app, argc, argv);

  if (live->parsed()) {
    if (lo.demo_bin.empty()) {
      std::error_code ec;
      lo.demo_bin = (std::filesystem::read_symlink("/proc/self/exe", ec).parent_path() / "eaas-demo").string();
    }
    if (!(lo.peak_tps > 0) || !(lo.period_s > 0) || !(lo.slo_util > 0 && lo.slo_util <= 1)) {
      std::fprintf(stderr, "eaas-autoscale live: need --peak-tps > 0, --period-s > 0, 0 < --slo-util <= 1\n");
      return 2;
    }
    return run_compare(lo);
  }
  if (run->parsed()) {
    if (ro.server_bin.empty()) {
      std::error_code ec;
      ro.server_bin = (std::filesystem::read_symlink("/proc/self/exe", ec).parent_path() / "eaas-server").string();
    }
    // The servers get the model the autoscaler reasons about.
    model_shape shape;
    if (status s = ro.model.resolve(shape); s != status::ok) return tool::fail("eaas-autoscale", "model", s);
    for (std::string x : {"--model", ro.model.preset.c_str()}) ro.server_args.push_back(x);
    ro.server_args.insert(ro.server_args.end(),
                          {"--seed", std::to_string(ro.model.seed), "--hidden", std::to_string(shape.hidden), "--inter",
                           std::to_string(shape.inter), "--experts", std::to_string(shape.experts), "--topk",
                           std::to_string(shape.topk), "--layers", std::to_string(shape.layers)});
    if (rp.low >= rp.high) {
      std::fprintf(stderr, "eaas-autoscale: need --low < --high\n");
      return 2;
    }
    return run_live(ro, rp);
  }

  std::vector<trace_sample> tr;
  if (trace == "diurnal") {
    tr = diurnal_trace(peak, trough, tick_s, seed);
  } else if (!load_trace_csv(trace, tr)) {
    std::fprintf(stderr, "eaas-autoscale: %s: not a CSV of seconds,tokens_per_s\n", trace.c_str());
    return 2;
  }
  if (capacity <= 0 || slo_util <= 0 || slo_util > 1 || p.low >= p.high || p.high > slo_util) {
    std::fprintf(stderr, "eaas-autoscale: need capacity > 0, 0 < low < high <= slo-util <= 1\n");
    return 2;
  }
  p.capacity_tps = capacity;
  p.min_servers = min_servers;
  p.max_servers = max_servers;
  p.up_ticks = 1;
  p.down_ticks = 5;
  p.cooldown_ticks = 1;
  p.experts_per_server = experts;  // a fluid model: every server can serve every expert
  double trace_peak = 0;
  for (const auto& s : tr) trace_peak = std::max(trace_peak, s.tps);
  const auto static_servers = static_cast<std::uint32_t>(std::ceil(trace_peak / (capacity * slo_util)));

  autoscaler a(p);
  std::vector<fleet_server> fleet;
  std::vector<double> joining;  // times at which pending servers start taking traffic
  // Start sized for the first sample (the replay measures tracking, not a cold start).
  const auto initial = static_cast<std::uint32_t>(std::ceil(tr.front().tps / (capacity * (p.low + p.high) / 2)));
  for (std::uint32_t s = 0; s < std::max(min_servers, initial); ++s) fleet.push_back({"s" + std::to_string(s), {}});
  int next = static_cast<int>(fleet.size());
  double hours_static = 0, hours_auto = 0;
  std::uint32_t miss_static = 0, miss_auto = 0, adds = 0, removes = 0, most = 0;
  for (std::size_t i = 0; i < tr.size(); ++i) {
    const double dt = i + 1 < tr.size() ? tr[i + 1].t_s - tr[i].t_s : tick_s;
    const double now = tr[i].t_s;
    // Servers whose join completed take traffic from this tick on.
    for (auto it = joining.begin(); it != joining.end();)
      if (*it <= now) {
        fleet.push_back({"s" + std::to_string(next++), {}});
        it = joining.erase(it);
      } else {
        ++it;
      }
    for (auto& s : fleet) {
      s.experts.resize(experts);
      for (std::uint32_t e = 0; e < experts; ++e) s.experts[e] = e;
    }
    const fleet_load load{std::vector<double>(experts, tr[i].tps / experts), 0};
    hours_static += static_servers * dt / 3600;
    // Pending servers are paid for from the decision on (they are loading weights).
    hours_auto += double(fleet.size() + joining.size()) * dt / 3600;
    most = std::max<std::uint32_t>(most, static_cast<std::uint32_t>(fleet.size() + joining.size()));
    if (tr[i].tps > static_servers * capacity * slo_util) miss_static++;
    if (tr[i].tps > double(fleet.size()) * capacity * slo_util) miss_auto++;
    // The policy sees the servers that take traffic; pending ones count toward its limit.
    std::vector<fleet_server> visible = fleet;
    for (std::size_t j = 0; j < joining.size(); ++j) visible.push_back({"pending", {}});
    const autoscale_decision d = a.tick(visible, load);
    if (d.kind == autoscale_decision::add_server) {
      joining.push_back(now + join_s);
      adds++;
    } else if (d.kind == autoscale_decision::remove_server && fleet.size() > 1) {
      fleet.pop_back();
      removes++;
    }
  }
  const double saved = 1 - hours_auto / hours_static;
  std::printf(
      "trace: %zu ticks of %.0f s, peak %.0f tokens/s; server capacity %.0f tokens/s, SLO at utilisation %.2f\n",
      tr.size(), tick_s, trace_peak, capacity, slo_util);
  std::printf("%-22s %10s %14s %12s\n", "provisioning", "servers", "server-hours", "SLO misses");
  std::printf("%-22s %10u %14.1f %12u\n", "static (peak)", static_servers, hours_static, miss_static);
  std::printf("%-22s %7s%3u %14.1f %12u   (%u added, %u removed)\n", "autoscaler", "max ", most, hours_auto, miss_auto,
              adds, removes);
  std::printf("server-hours saved by the autoscaler: %.1f %%\n", 100 * saved);
  if (!json_path.empty()) {
    std::ofstream(json_path) << json{{"ticks", tr.size()},
                                     {"tick_s", tick_s},
                                     {"peak_tps", trace_peak},
                                     {"capacity_tps", capacity},
                                     {"slo_util", slo_util},
                                     {"join_s", join_s},
                                     {"static_servers", static_servers},
                                     {"static_server_hours", hours_static},
                                     {"static_slo_misses", miss_static},
                                     {"auto_server_hours", hours_auto},
                                     {"auto_slo_misses", miss_auto},
                                     {"auto_max_servers", most},
                                     {"adds", adds},
                                     {"removes", removes},
                                     {"saved_fraction", saved}}
                                    .dump(2)
                             << "\n";
  }
  return 0;
}
