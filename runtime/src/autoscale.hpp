#pragma once

// The autoscaler's policy: a pure function of the load it is shown, so that it is tested on traces and
// used unchanged by the live tool (eaas-autoscale) and the trace replay (eaas-autoscale --replay).
//
// Every tick it sees the offered load (tokens/s per expert, summed over clients) and the fleet (the
// servers and the experts each hosts). It changes the fleet by at most one server per decision:
//   * add a server when utilisation (offered / (servers × capacity)) stayed above `high` for
//     `up_ticks` ticks, or queues grew; the new server hosts the experts with the most load per replica
//     (so hot experts gain replicas);
//   * remove the least useful server when utilisation *after* removing it would stay below `low` for
//     `down_ticks` ticks, keeping every expert at `min_replicas`;
//   * after any change, wait `cooldown_ticks`.
// `low` < `high` and the post-removal test are the hysteresis: a load that sits near one threshold
// does not make it flap.

#include <cstdint>
#include <string>
#include <vector>

namespace eaas::runtime {

struct autoscale_policy {
  double capacity_tps = 1000;     ///< tokens/s one server computes within the latency SLO
  double high = 0.75;             ///< scale up above this utilisation
  double low = 0.55;              ///< scale down only if utilisation would stay below this
  std::uint32_t up_ticks = 2;     ///< ticks above `high` before adding
  std::uint32_t down_ticks = 10;  ///< ticks where removal is safe before removing
  std::uint32_t cooldown_ticks = 3;
  std::uint32_t min_servers = 1, max_servers = 64;
  std::uint32_t min_replicas = 1;        ///< every expert keeps at least this many servers
  std::uint32_t experts_per_server = 0;  ///< experts a new server hosts (0: experts × min_replicas / min_servers)
  double queue_high = 4;                 ///< mean requests waiting per server that count as overload
};

struct fleet_server {
  std::string id;
  std::vector<std::uint32_t> experts;
};

struct fleet_load {
  std::vector<double> expert_tps;  ///< offered tokens/s per expert (token-expert pairs per second)
  double queue_depth = 0;          ///< mean requests waiting per server
};

struct autoscale_decision {
  enum kind_t { none, add_server, remove_server } kind = none;
  std::vector<std::uint32_t> experts;  ///< add: what the new server hosts
  std::string server;                  ///< remove: which one
  std::string why;
};

class autoscaler {
 public:
  explicit autoscaler(autoscale_policy p) : p_(p) {}
  /// One tick: the fleet now and the load last tick. The caller carries out the decision.
  autoscale_decision tick(const std::vector<fleet_server>& fleet, const fleet_load& load);
  const autoscale_policy& policy() const { return p_; }

 private:
  autoscale_policy p_;
  std::uint32_t above_ = 0, below_ = 0, cooldown_ = 0;
};

/// Utilisation of `servers` servers under `load` (offered tokens/s over capacity).
double utilisation(const autoscale_policy& p, std::size_t servers, const fleet_load& load);

/// One step of a traffic trace: from `t_s` on (until the next sample), `tps` tokens/s are offered.
struct trace_sample {
  double t_s, tps;
};

/// A diurnal day of `day_s` seconds in steps of `tick_s`, starting at hour `start_h`: lowest at 04:00,
/// highest at 16:00, `trough` × `peak` at the bottom, multiplied by 1 + N(0, `noise`) per step (seeded).
/// The trace `eaas-autoscale replay` replays and `eaas-client --trace diurnal` offers.
std::vector<trace_sample> diurnal_trace(double peak, double trough, double tick_s, std::uint64_t seed,
                                        double day_s = 24 * 3600, double noise = 0.03, double start_h = 0);

/// A trace from a CSV of "seconds,tokens_per_s" lines ('#' comments); false if the file is missing,
/// empty, malformed, has a negative rate or times that do not increase.
bool load_trace_csv(const std::string& path, std::vector<trace_sample>& out);

/// How long a trace lasts: its last sample's time plus the step before it (one step for a single sample).
double trace_span(const std::vector<trace_sample>& trace);

}  // namespace eaas::runtime
