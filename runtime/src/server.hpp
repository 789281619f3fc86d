#pragma once

// The expert server: hosts a subset of the experts (the same subset in every MoE layer), gives every
// client that links to it a request slot in its "slots" region, and serves what arrives there.
// Stateless between requests: a request carries everything needed to answer it.

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "eaas/host/registry.hpp"
#include "eaas/runtime/model.hpp"

namespace eaas::runtime {

struct server_options {
  std::string id;                 ///< unique in the namespace
  registry_options registry;      ///< where the registry is
  std::string ns = "moe";         ///< registry namespace
  std::uint32_t ttl_seconds = 2;  ///< lease TTL
  model_shape shape;
  std::uint64_t seed = 1;              ///< synthetic weights' seed
  std::vector<std::uint32_t> experts;  ///< global expert ids hosted (every layer); sorted and unique after start
  std::uint32_t max_clients = 16;      ///< slots
  std::uint32_t max_tokens = 512;      ///< most tokens per request
  /// The CUDA device to serve on (slots in its memory, experts computed by its grouped GEMM, answers put
  /// over NVLink; clients must then be GPU clients of this host); -1: the CPU (shm, OpenBLAS).
  int gpu = -1;
  /// With gpu >= 0: serve with the GPU-resident round (gpu/server_step.hpp): the GPU polls the slots,
  /// checks every request (validate_request / validate_routing, as here), regroups, computes and answers,
  /// one CUDA graph per round, with no host round trip between a request and its answer; the host keeps
  /// its bookkeeping (links, leaves, dead clients, stats) between rounds. Answers are the host path's, bit
  /// for bit. Off: the host-driven path (the default).
  bool device_step = false;
  /// device_step: the longest a round waits on the GPU for a request before the host gets a turn.
  std::uint64_t device_poll_ns = 30'000;
  /// device_step: replay the round as a CUDA graph (off: launch its kernels every round; for debugging).
  bool device_graph = true;
  /// device_step: kernel shrinking, the grouped GEMM walks only the experts with rows (off: the ablation of
  /// issue #9, every local expert of a served layer is computed, with a padding row; same answers).
  bool device_shrink = true;
  /// device_step: most blocks one answer is put with (server_step_config::put_blocks).
  std::uint32_t device_put_blocks = 32;
  /// device_step: batching across clients (server_step_config::batch_window_ns; 0: off).
  std::uint64_t device_batch_window_ns = 30'000;
  /// device_step: answers written straight into the clients' result regions (server_step_config::direct_answers).
  bool device_direct_answers = false;
  /// device_step: the next round queued before the host reads the last one back (server_step_config::pipeline).
  bool device_pipeline = true;
  /// device_step: programmatic dependent launch between a round's kernels (server_step_config::pdl).
  bool device_pdl = true;
  /// Loads one expert's weights (e.g. from safetensors); null: synthetic from `seed`.
  std::function<status(std::uint32_t layer, std::uint32_t expert, expert_weights&)> load;
  /// Called on the serving thread when a client gets a slot ("linked") or loses it ("left", with why).
  std::function<void(const std::string& event, const std::string& client, const std::string& why)> on_client;
  /// Called on the serving thread once, when the first answer went out (join-time measurements).
  std::function<void(std::uint64_t steady_ns)> on_first_answer;
  /// Leaving: after `stop`, answer requests until none came for this long (bounded by drain_max_ns).
  std::uint64_t drain_quiet_ns = 500'000'000ull;
  std::uint64_t drain_max_ns = 10'000'000'000ull;
};

struct server_stats {
  std::uint64_t requests = 0;         ///< answered (including refused ones)
  std::uint64_t refused = 0;          ///< answered with an error
  std::uint64_t ignored = 0;          ///< not answered: written by a client that no longer owns the slot
  std::uint64_t tokens = 0;           ///< tokens computed
  std::uint64_t batches = 0;          ///< poll rounds that computed something
  /// Time spent in the expert math (device step: on the GPU's clock, from a round's request seen to its answers
  /// done, summed over the answering rounds; rounds do not overlap, so this never exceeds the time served).
  std::uint64_t compute_ns = 0;
  std::uint32_t clients = 0;          ///< slots in use now
  std::uint64_t ready_ns = 0;         ///< steady_clock time when it was registered, weights resident
  std::uint64_t first_served_ns = 0;  ///< steady_clock time of its first answer (0: none yet)
  std::uint64_t device_rounds = 0;    ///< device step: GPU rounds run (with or without requests)
  std::uint32_t graph_captures = 0;   ///< device step: CUDA graph captures of the round (1 once it ran)
  std::uint64_t padded_rows = 0;      ///< device step without shrinking: padding rows computed
  std::uint32_t slots = 0;            ///< client slots (max_clients), each sized for max_tokens
  std::uint64_t slots_bytes = 0;      ///< the slots region's size
  /// Device step: where the time of the rounds that answered went (sums over those rounds, ns, from the
  /// round's device stamps): waiting for the first request, the batch window (waiting for other clients),
  /// validation, counts and scan (front), placement and grouped GEMM, combine and answers; and the gap from the end of the round
  /// before to this round's poll (the host's read-back and launch). late_rounds: rounds whose request was
  /// already there when the poll began. direct_answers: answers the combine wrote straight into the client.
  std::uint64_t round_wait_ns = 0, round_window_ns = 0, round_front_ns = 0, round_gemm_ns = 0, round_back_ns = 0,
                round_gap_ns = 0;
  std::uint64_t late_rounds = 0, direct_answers = 0;
};

class expert_server {
 public:
  /// Loads (or generates) the weights, allocates the slots, publishes the record.
  static status start(const server_options& opts, std::unique_ptr<expert_server>& out);
  virtual ~expert_server() = default;

  /// Serves until `stop` is set, then leaves gracefully: withdraws its record (clients stop sending
  /// new work to it as they see it go), keeps answering until no request came for drain_quiet_ns,
  /// and returns ok. Nothing in flight is lost.
  virtual status serve(const std::atomic<bool>& stop) = 0;

  /// Counters so far (thread-safe).
  virtual server_stats stats() const = 0;

 protected:
  expert_server() = default;
};

}  // namespace eaas::runtime
