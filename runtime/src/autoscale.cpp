#include "autoscale.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

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

}  // namespace eaas::runtime
