// eaas-autoscale: the autoscaler (runtime/src/autoscale.hpp), live or against a traffic trace.
//
//   eaas-autoscale run --registry embedded://127.0.0.1:23790 --ns moe --capacity TPS [--min-servers N] ...
//   eaas-autoscale replay [--trace diurnal|FILE.csv] [--capacity TPS] [--slo-util U] ...
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

#include <fcntl.h>
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

struct sample {
  double t_s, tps;
};

std::vector<sample> diurnal(double peak, double trough_frac, double tick_s, std::uint64_t seed) {
  std::vector<sample> v;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> noise(0.0, 0.03);
  const double day = 24 * 3600;
  for (double t = 0; t < day; t += tick_s) {
    // Lowest around 04:00, highest around 16:00, with a little noise.
    const double phase = 0.5 - 0.5 * std::cos(2 * M_PI * (t / day - 4.0 / 24));
    const double f = trough_frac + (1 - trough_frac) * phase;
    v.push_back({t, std::max(0.0, peak * f * (1 + noise(rng)))});
  }
  return v;
}

bool load_csv(const std::string& path, std::vector<sample>& out) {
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream is(line);
    sample s{};
    char comma = 0;
    if (!(is >> s.t_s >> comma >> s.tps) || comma != ',' || s.tps < 0) return false;
    out.push_back(s);
  }
  return !out.empty();
}

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
  const std::string prefix = "/eaas/" + ro.ns + "/load/";
  const auto t_end = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(static_cast<long>(ro.duration_s > 0 ? ro.duration_s * 1000 : 1e12));
  while (!g_stop && std::chrono::steady_clock::now() < t_end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<long>(ro.tick_ms)));
    for (auto it = children.begin(); it != children.end();)  // reap servers that left
      it = ::waitpid(it->first, nullptr, WNOHANG) == it->first ? children.erase(it) : std::next(it);
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
            {"server", d.server},
            {"servers", fleet.size()},
            {"offered_tps", offered},
            {"ok", ok},
            {"why", d.why}});
    }
  }
  for (const auto& [pid, ch] : children) ::kill(pid, SIGTERM);
  for (const auto& [pid, ch] : children) ::waitpid(pid, nullptr, 0);
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
  CLI11_PARSE(app, argc, argv);

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

  std::vector<sample> tr;
  if (trace == "diurnal") {
    tr = diurnal(peak, trough, tick_s, seed);
  } else if (!load_csv(trace, tr)) {
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
