#include "autoscale.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>

namespace eaas::runtime {

double utilisation(const autoscale_policy& p, std::size_t servers, const fleet_load& load) {
  const double offered = std::accumulate(load.expert_tps.begin(), load.expert_tps.end(), 0.0);
  if (servers == 0) return offered > 0 ? INFINITY : 0;
  return offered / (double(servers) * p.capacity_tps);
}

autoscale_decision autoscaler::tick(const std::vector<fleet_server>& fleet, const fleet_load& load) {
  autoscale_decision d;
  const std::size_t n = fleet.size(), experts = load.expert_tps.size();
  const double u = utilisation(p_, n, load);
  const double u_without = n > 1 ? utilisation(p_, n - 1, load) : INFINITY;
  const bool hot = u > p_.high || load.queue_depth > p_.queue_high;
  above_ = hot ? above_ + 1 : 0;
  below_ = (!hot && u_without < p_.low) ? below_ + 1 : 0;
  if (cooldown_ > 0) {
    --cooldown_;
    return d;
  }
  // Replicas per expert now.
  std::vector<std::uint32_t> replicas(experts, 0);
  for (const auto& s : fleet)
    for (auto e : s.experts)
      if (e < experts) replicas[e]++;

  if ((above_ >= p_.up_ticks || n < p_.min_servers) && n < p_.max_servers) {
    // The new server takes the experts with the most offered load per replica.
    std::uint32_t k = p_.experts_per_server;
    if (k == 0)
      k = static_cast<std::uint32_t>(std::ceil(double(experts) * p_.min_replicas / std::max(1u, p_.min_servers)));
    k = std::min<std::uint32_t>(std::max(k, 1u), static_cast<std::uint32_t>(experts));
    std::vector<std::uint32_t> order(experts);
    std::iota(order.begin(), order.end(), 0u);
    auto per_replica = [&](std::uint32_t e) { return load.expert_tps[e] / double(replicas[e] + 1e-9); };
    std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) {
      // Unhosted experts first, then by load per replica.
      if ((replicas[a] == 0) != (replicas[b] == 0)) return replicas[a] == 0;
      return per_replica(a) > per_replica(b);
    });
    d.kind = autoscale_decision::add_server;
    d.experts.assign(order.begin(), order.begin() + k);
    std::sort(d.experts.begin(), d.experts.end());
    d.why = n < p_.min_servers ? fmt::format("{} servers, below the minimum {}", n, p_.min_servers)
                               : fmt::format("utilisation {:.2f} > {:.2f} (or queue {:.1f} > {:.1f}) for {} ticks", u,
                                             p_.high, load.queue_depth, p_.queue_high, above_);
    above_ = 0;
    cooldown_ = p_.cooldown_ticks;
    return d;
  }
  if (below_ >= p_.down_ticks && n > p_.min_servers) {
    // Remove the server whose departure keeps every expert at min_replicas and loses the least
    // replica capacity for loaded experts.
    double best = INFINITY;
    for (const auto& s : fleet) {
      bool keeps = true;
      double cost = 0;
      for (auto e : s.experts) {
        if (e >= experts) continue;
        if (replicas[e] <= p_.min_replicas) keeps = false;
        cost += load.expert_tps[e] / double(replicas[e]);
      }
      if (keeps && cost < best) {
        best = cost;
        d.server = s.id;
      }
    }
    if (!d.server.empty()) {
      d.kind = autoscale_decision::remove_server;
      d.why = fmt::format("utilisation would be {:.2f} < {:.2f} without it, for {} ticks", u_without, p_.low, below_);
      below_ = 0;
      cooldown_ = p_.cooldown_ticks;
    }
  }
  return d;
}

std::vector<trace_sample> diurnal_trace(double peak, double trough, double tick_s, std::uint64_t seed, double day_s,
                                        double noise, double start_h) {
  std::vector<trace_sample> v;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> jitter(0.0, noise > 0 ? noise : 1.0);  // drawn only if noise > 0
  for (double t = 0; t < day_s; t += tick_s) {
    const double phase = 0.5 - 0.5 * std::cos(2 * M_PI * (t / day_s + (start_h - 4.0) / 24));
    const double f = trough + (1 - trough) * phase;
    v.push_back({t, std::max(0.0, peak * f * (1 + (noise > 0 ? jitter(rng) : 0.0)))});
  }
  return v;
}

bool load_trace_csv(const std::string& path, std::vector<trace_sample>& out) {
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream is(line);
    trace_sample s{};
    char comma = 0;
    if (!(is >> s.t_s >> comma >> s.tps) || comma != ',' || !(s.tps >= 0) || !std::isfinite(s.tps) ||
        !std::isfinite(s.t_s) || (!out.empty() && s.t_s <= out.back().t_s))
      return false;
    out.push_back(s);
  }
  return !out.empty();
}

double trace_span(const std::vector<trace_sample>& trace) {
  if (trace.empty()) return 0;
  const std::size_t n = trace.size();
  return trace[n - 1].t_s + (n > 1 ? trace[n - 1].t_s - trace[n - 2].t_s : 1.0);
}

}  // namespace eaas::runtime
