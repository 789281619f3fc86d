// eaas-autoscale: the autoscaler (runtime/src/autoscale.hpp) against a traffic trace.
//
//   eaas-autoscale replay [--trace diurnal|FILE.csv] [--capacity TPS] [--slo-util U] ...
//
// replay: a trace of offered tokens/s (built-in diurnal day, or a CSV of "seconds,tokens_per_s") is
// replayed tick by tick against (a) static provisioning for the trace's peak and (b) the autoscaler,
// both held to the same latency SLO. Servers are a fluid model: a server computes `--capacity` tokens/s,
// its latency grows as 1/(1-u) with utilisation u, so the SLO is a utilisation bound (`--slo-util`); a
// new server takes traffic `--join-s` after the decision (weights resident + join). Output: server-hours
// of both, the saving, and the ticks where the SLO was missed. The capacity and join time are inputs;
// measure them with eaas-demo on the target machine.

#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "autoscale.hpp"

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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eaas-autoscale: the eaas autoscaler"};
  app.require_subcommand(1);
  auto* replay = app.add_subcommand("replay", "replay a traffic trace against static peak provisioning and the autoscaler");
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
  replay->add_option("--slo-util", slo_util, "utilisation at which latency meets the SLO exactly")->capture_default_str();
  replay->add_option("--join-s", join_s, "seconds from a scale-up decision to the new server taking traffic")
      ->capture_default_str();
  replay->add_option("--experts", experts, "experts in the model")->capture_default_str();
  replay->add_option("--min-servers", min_servers, "")->capture_default_str();
  replay->add_option("--max-servers", max_servers, "")->capture_default_str();
  replay->add_option("--high", p.high, "scale up above this utilisation")->capture_default_str();
  replay->add_option("--low", p.low, "scale down only below this utilisation")->capture_default_str();
  replay->add_option("--seed", seed, "noise seed")->capture_default_str();
  replay->add_option("--json", json_path, "write the result as JSON");
  CLI11_PARSE(app, argc, argv);

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
  for (std::uint32_t s = 0; s < std::max(min_servers, initial); ++s)
    fleet.push_back({"s" + std::to_string(s), {}});
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
  std::printf("trace: %zu ticks of %.0f s, peak %.0f tokens/s; server capacity %.0f tokens/s, SLO at utilisation %.2f\n",
              tr.size(), tick_s, trace_peak, capacity, slo_util);
  std::printf("%-22s %10s %14s %12s\n", "provisioning", "servers", "server-hours", "SLO misses");
  std::printf("%-22s %10u %14.1f %12u\n", "static (peak)", static_servers, hours_static, miss_static);
  std::printf("%-22s %7s%3u %14.1f %12u   (%u added, %u removed)\n", "autoscaler", "max ", most, hours_auto, miss_auto,
              adds, removes);
  std::printf("server-hours saved by the autoscaler: %.1f %%\n", 100 * saved);
  if (!json_path.empty()) {
    std::ofstream(json_path) << json{{"ticks", tr.size()},          {"tick_s", tick_s},
                                     {"peak_tps", trace_peak},      {"capacity_tps", capacity},
                                     {"slo_util", slo_util},        {"join_s", join_s},
                                     {"static_servers", static_servers}, {"static_server_hours", hours_static},
                                     {"static_slo_misses", miss_static}, {"auto_server_hours", hours_auto},
                                     {"auto_slo_misses", miss_auto},    {"auto_max_servers", most},
                                     {"adds", adds},                    {"removes", removes},
                                     {"saved_fraction", saved}}
                                    .dump(2)
                             << "\n";
  }
  return 0;
}
