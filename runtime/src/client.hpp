#pragma once

// The attention client: runs the dense part of the model itself and sends every MoE layer's tokens
// to the servers that host their experts, then sums the servers' partial results.
//
// Servers are found through the registry (peers with role "server"); the client links to each on
// first use. An expert hosted by several servers (replicas) has its tokens spread over them. A server
// that does not answer in time, dies or leaves is dropped, and what it had is sent again to a replica:
// the result equals the no-failure result. A late answer from a dropped server lands in that server's
// own result area, which is never read again.

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "eaas/host/registry.hpp"
#include "eaas/runtime/model.hpp"
#include "reference.hpp"

namespace eaas::runtime {

namespace gpu {
struct client_step_config;
class client_step;
}  // namespace gpu

struct client_options {
  std::string id;
  registry_options registry;
  std::string ns = "moe";
  std::uint32_t ttl_seconds = 2;
  model_shape shape;
  std::uint64_t seed = 1;
  dense_options dense;
  std::uint32_t max_tokens = 512;  ///< most tokens per forward
  /// The CUDA device whose memory receives the servers' answers (over NVLink, from GPU servers of this
  /// host); -1: host memory (shm, CPU servers). The dense part runs on the CPU, unless device_step.
  int gpu = -1;
  /// Issue #9: the whole forward on that GPU (gpu::client_step: dense part, dispatch, wait and combine as
  /// kernels, no host in the loop). Needs gpu >= 0 and make_device_step. A forward in which a server
  /// fails is computed again on the host path, which drops the servers that failed.
  bool device_step = false;
  /// With device_step: capture the forward once in a CUDA graph and replay it.
  bool graph = false;
  /// With device_step: false leaves a forward's hidden states on the GPU (device_output()) instead of copying
  /// them and the routing to the host; `out` and last_routing() stay empty for such forwards. A forward that
  /// fell back to the host path fills `out` as usual (device_output() is then null).
  bool host_output = true;
  /// With device_step: programmatic dependent launch within each layer's round (client_step_config::pdl).
  bool pdl = true;
  /// Builds the device step: gpu::make_client_step, from the eaas_client_gpu library (kept out of eaas_moe
  /// so that servers need not load cuBLAS). Required with device_step.
  std::function<status(const gpu::client_step_config&, std::unique_ptr<gpu::client_step>&)> make_device_step;
  std::uint64_t request_timeout_ns = 2'000'000'000ull;  ///< a server silent this long is dropped
  std::uint64_t link_timeout_ns = 2'000'000'000ull;
  std::uint64_t relink_backoff_ns = 1'000'000'000ull;  ///< a server dropped while published is linked again after this
  /// Loads the routers (e.g. from a checkpoint); null: synthetic from `seed`.
  std::function<status(std::uint32_t layer, router_weights&)> load_router;
};

struct client_stats {
  std::uint64_t forwards = 0;
  std::uint64_t requests = 0;
  std::uint64_t dropped_servers = 0;    ///< servers dropped for silence, death or leaving
  std::uint64_t resent_entries = 0;     ///< (token, expert) entries sent again to a replica
  std::uint64_t device_forwards = 0;    ///< forwards computed on the device path (device_step)
  std::uint64_t direct_requests = 0;    ///< device path: requests packed straight into the server's slot
  std::uint64_t fallback_forwards = 0;  ///< device-path forwards a server failed, computed again on the host path
  std::uint64_t graph_captures = 0;     ///< CUDA graph captures of the device path
  std::uint64_t capture_retries = 0;    ///< captures begun again after an invalidation, or forwards run uncaptured
  std::uint32_t micro_batches = 1;      ///< micro-batches per forward (micro_batch.hpp; 0: still choosing)
  /// Device path: where the completed forwards' MoE layers spent their time on the GPU (sums, ns, device
  /// stamps): dispatch to every request committed, then to the last answer seen, then to the combine's end.
  std::uint64_t device_layers = 0;
  std::uint64_t device_send_ns = 0, device_round_ns = 0, device_combine_ns = 0;
  /// The attention and router between two MoE layers (device stamps; layers after the first, counted in
  /// device_dense_layers).
  std::uint64_t device_dense_layers = 0, device_dense_ns = 0;
  /// Per completed device forward, summed: its span on the device (first dispatch .. last combine). Per such
  /// forward that did not capture a graph (device_timed_forwards), summed: the step's forward call on the host, of
  /// that the preparation before the forward was queued and the wait for it, and attention_client::forward's call.
  std::uint64_t device_forward_ns = 0;
  std::uint64_t device_timed_forwards = 0, device_wall_ns = 0, device_prepare_ns = 0, device_wait_ns = 0;
  std::uint64_t device_call_ns = 0;
};

/// A server dropped while it held work, and that work answered by replicas.
struct failover_event {
  std::string server;
  std::string why;
  std::uint32_t layer = 0;
  std::uint64_t sent_ns = 0;      ///< steady_clock: the request that was lost was sent
  std::uint64_t detected_ns = 0;  ///< the loss was detected (wait ended without an answer)
  std::uint64_t done_ns = 0;      ///< the replicas' answers were all in
};

class attention_client {
 public:
  static status start(const client_options& opts, std::unique_ptr<attention_client>& out);
  virtual ~attention_client() = default;

  /// Waits until every expert is hosted by at least `replicas` online servers; `timeout` otherwise
  /// (the message names an expert without enough servers).
  virtual status wait_for_experts(std::uint32_t replicas, std::uint64_t timeout_ns) = 0;

  /// One forward pass: embedding, then per layer attention, routing and the remote MoE. `out` gets the
  /// final hidden states (tokens × hidden).
  virtual status forward(std::span<const std::uint32_t> tokens, std::vector<float>& out) = 0;

  /// The MoE round trip of each layer in the last forward (dispatch to combine), in ns.
  virtual const std::vector<std::uint64_t>& last_moe_ns() const = 0;

  /// The routing each layer of the last forward used (what a reference must use to compare).
  virtual const std::vector<routing>& last_routing() const = 0;

  /// Where the last forward left its hidden states on the GPU (tokens × hidden fp32, valid until the next
  /// forward), if it ran on the device path with host_output false; null otherwise (the answer is in `out`).
  virtual const float* device_output() const { return nullptr; }

  virtual client_stats stats() const = 0;

  /// Failovers since the last call (oldest first).
  virtual std::vector<failover_event> take_failovers() = 0;
  virtual const dense_model& dense() const = 0;

 protected:
  attention_client() = default;
};

}  // namespace eaas::runtime
