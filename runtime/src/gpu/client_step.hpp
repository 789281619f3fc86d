#pragma once

// The attention client's forward pass resident on its GPU (issue #9, DESIGN.md §5 "Speed"): the dense
// part (dense_gpu) and every MoE layer's dispatch, wait and combine as kernels on one stream, with no
// host synchronisation inside a forward, so that a whole forward can be captured once in a CUDA graph.
//
// One MoE layer, after the router left ids and weights on the device, as four kernels (five where a server's
// request may not go straight into its slot):
//   dispatch each (token, k) entry goes to a server hosting its expert: replica (t + e) mod replicas of
//            the routing table (global expert -> up to R (server, local id) pairs), as the host path's
//            first choice; then per server (a block each, reading the whole routing) a prefix scan over its
//            tokens (row of each token, the token list, the count), all on the device; a server with no
//            tokens gets no request; one given more than its max_tokens, or whose request would not fit its
//            slot, gets none and is marked failed
//   pack     per server, the request's payload (bf16 rows, local ids with kNoExpert padding, weights)
//            straight into the server's slot over NVLink (peer_pointer; at most 32 blocks per server), and
//            its header (slot_header with seq = ++counter) into a local staging buffer; then its last block to
//            finish commits: grid_put_signal of the header as its head, the header's commit word only after
//            every other byte, the slot's sequence word set to seq after that (grid_put.cuh's argument;
//            slot.hpp's commit record)
//   send     only where some server is not over NVLink (the graph then holds it): where peer_pointer gives
//            none (a check fails), the whole request goes into staging and this put moves it, committed as
//            above (it reports the failure); without this kernel such a request is not sent and reported
//            undelivered
//   wait     per server a bounded wait_signal on its result signal >= seq (slices, so that a revoked
//            slot ends it early), then the response header is checked on the device
//   combine  x[t] += Σ over servers, in table order, of the answer row of t (fp32, read in the local
//            result region): deterministic; its last block stamps the layer's end (the dispatch stamps its
//            start)
// A failure (no answer in time, dead peer, slot revoked, error or malformed answer, overflow) is
// written into the server's outcome word; later layers of the same forward send nothing (the host
// recomputes that forward on its own path anyway), so a failed forward costs one timeout at most.
//
// The servers and the routing table live in device memory and are uploaded before every forward (one
// small copy), so servers that join or leave need no re-capture while they fit the captured capacity
// (servers, replicas per expert); the graph is captured again when they do not, or when the token count
// changes. Each server's request counter is uploaded with the table and read back after the forward:
// the caller keeps it as the one source of truth between forwards.
//
// Plain C++ header; implemented in client_step.cu (library eaas_client_gpu, which brings cuBLAS).

#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "eaas/common/status.hpp"
#include "eaas/common/views.hpp"
#include "eaas/runtime/model.hpp"
#include "reference.hpp"

namespace eaas::runtime::gpu {

/// What the device step needs to build itself.
struct client_step_config {
  int device = 0;  ///< the client's CUDA device (its result regions live there)
  model_shape shape;
  dense_options dense;
  /// The dense part's weights (the client's dense_model's: loaded routers included); read by create only.
  const dense_weights* weights = nullptr;
  std::uint32_t max_tokens = 0;                         ///< most tokens per forward
  std::uint64_t request_timeout_ns = 2'000'000'000ull;  ///< one layer's bound on a server's answer
  bool graph = false;                                   ///< capture the forward once, replay it
  /// Copy each forward's hidden states and routing to the host (step_result::out / layers). false: they stay
  /// on the device (device_out()); a serving engine's next kernels read them there, and a forward costs no
  /// PCIe read-back and no host copy (T x hidden x 4 bytes: 4 MiB at Qwen3 x 512 tokens).
  bool host_output = true;
  /// Launch each layer's round of small kernels with programmatic dependent launch (pdl.cuh; compute
  /// capability 9.0+, ignored before): each kernel's launch overlaps the one before it. false: plain launches
  /// (the ablation; same results).
  bool pdl = true;
};

/// One linked server, as the client knows it.
struct step_server {
  device_endpoint ep{};
  remote_view slots{};             ///< the server's slots region
  std::uint64_t slot_offset = 0;   ///< this client's slot in it (header first)
  std::uint64_t sig_offset = 0;    ///< the slot's request signal word in it
  std::uint64_t slot_bytes = 0;    ///< the slot's size
  std::uint64_t grant = 0;         ///< what this client's requests carry
  std::uint32_t max_tokens = 0;    ///< most tokens per request
  void* result = nullptr;          ///< this client's result region for the server (device memory)
  std::uint64_t result_bytes = 0;  ///< its size
  std::uint64_t seq = 0;           ///< the last request seq sent to it: in before a forward, out after
  /// (global expert, local id) of every expert it hosts.
  std::vector<std::pair<std::uint32_t, std::uint16_t>> experts;
};

/// Why a server failed a forward (0: it did not).
enum class step_fail : std::uint32_t {
  none = 0,
  timeout,        ///< no answer before the deadline
  peer_gone,      ///< its endpoint says dead or closed
  revoked,        ///< it took the slot back (kRevoked, or a new grant)
  refused,        ///< it answered with an error (detail: slot_error)
  bad_answer,     ///< the response header does not match the request
  not_delivered,  ///< the request's put failed (detail: status)
  overflow,       ///< more tokens for it than its max_tokens (nothing sent: not its fault)
  exceeds_slot,   ///< the request would not fit its slot (nothing sent)
  aborted,        ///< the context's abort flag was raised
};
constexpr const char* step_fail_name(step_fail f) {
  switch (f) {
    case step_fail::none:
      return "none";
    case step_fail::timeout:
      return "timeout";
    case step_fail::peer_gone:
      return "peer_gone";
    case step_fail::revoked:
      return "revoked";
    case step_fail::refused:
      return "refused";
    case step_fail::bad_answer:
      return "bad_answer";
    case step_fail::not_delivered:
      return "not_delivered";
    case step_fail::overflow:
      return "overflow";
    case step_fail::exceeds_slot:
      return "exceeds_slot";
    case step_fail::aborted:
      return "aborted";
  }
  return "unknown";
}

/// One server's outcome of a forward.
struct step_outcome {
  step_fail fail = step_fail::none;
  std::uint32_t layer = 0;            ///< the layer that failed
  std::uint32_t detail = 0;           ///< slot_error for `refused`, a status for `not_delivered`
  std::uint64_t seq = 0;              ///< its request counter after the forward
  std::uint32_t requests = 0;         ///< requests sent to it in this forward
  std::uint32_t direct_requests = 0;  ///< of those, packed straight into its slot over NVLink (peer_pointer)
};

/// Where one MoE layer's time went on the client's GPU (device clock, ns).
struct layer_phases {
  std::uint64_t send_ns = 0;     ///< dispatch began .. every request committed (the wait began)
  std::uint64_t round_ns = 0;    ///< .. the last answer seen: the servers' time and both detections
  std::uint64_t combine_ns = 0;  ///< .. the combine ended
  /// The attention and router before this layer's dispatch: from the previous layer's combine end (0 in the
  /// first layer, whose start is not stamped).
  std::uint64_t dense_ns = 0;
};

/// What one forward left.
struct step_result {
  std::vector<float> out;                ///< hidden states, tokens × hidden (empty without host_output)
  std::vector<runtime::routing> layers;  ///< each layer's routing, as computed on the device (ditto)
  std::vector<std::uint64_t> layer_ns;   ///< each MoE layer's round trip (dispatch to combine, device clock)
  std::vector<layer_phases> phases;      ///< the same, split
  std::uint64_t device_ns = 0;           ///< the first layer's dispatch .. the last layer's combine end
  /// forward()'s own time on the host (its call to its return), of that the part before the forward was queued
  /// (the table, the tokens, the launch) and the wait for it to complete: with device_ns, what the host's turn
  /// between forwards costs.
  std::uint64_t wall_ns = 0, prepare_ns = 0, wait_ns = 0;
  bool captured = false;               ///< this forward captured its graph first (its host times include the capture)
  std::vector<step_outcome> outcomes;  ///< one per server, in the order given
  bool complete = false;               ///< no server failed and the table covered every entry: `out` is right
};

class client_step {
 public:
  /// Uploads *cfg.weights to cfg.device and allocates buffers for cfg.max_tokens tokens.
  static status create(const client_step_config& cfg, std::unique_ptr<client_step>& out);
  virtual ~client_step() = default;

  /// One forward pass of `tokens` (1 .. max_tokens) against `servers` (every expert hosted by one at
  /// least, else `invalid_argument`), in `r`. Each server's `seq` becomes its counter after the forward.
  /// A server failure is no error: it is in r.outcomes, and r.complete is false (then r.out is not the
  /// model's answer). An error means CUDA failed; the object is then unusable.
  virtual status forward(std::span<const std::uint32_t> tokens, std::span<step_server> servers, step_result& r) = 0;

  /// Graph captures so far (0 without graph).
  virtual std::uint32_t captures() const = 0;

  /// Captures begun again after another CUDA call of this process invalidated them (capture_graph), plus
  /// forwards run uncaptured because the capture failed again, so far.
  virtual std::uint32_t capture_retries() const = 0;

  /// The last forward's hidden states on the device (tokens × hidden fp32, row-major), valid until the next
  /// forward; right only where that forward's result was `complete`.
  virtual const float* device_out() const = 0;
};

/// client_step::create as a plain function, for client_options::make_device_step.
status make_client_step(const client_step_config& cfg, std::unique_ptr<client_step>& out);

}  // namespace eaas::runtime::gpu
