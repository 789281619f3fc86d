#pragma once

// The expert server's batch on its GPU (DESIGN.md §5): the requests' activations never leave the GPU.
//
// The host reads each request's header and routing out of the slot (a private copy), checks them with
// validate_request / validate_routing, and regroups the (token, expert) pairs by (layer, local expert).
// This step then, on the GPU, as kernels on one stream:
//   1. gathers every pair's activation row out of the slots region into x (bf16), in group order;
//   2. runs grouped_swiglu over all (layer, local expert) groups at once, the router weight applied
//      (per-group row counts read on the device: empty groups cost nothing);
//   3. sums each token's rows into its request's answer (fp32);
//   4. puts each answer (response header, then outputs) into its client's result region over NVLink
//      and signals the request's seq there, from many blocks per answer.
// Plain C++ header; implemented in expert_step.cu.

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "eaas/common/status.hpp"
#include "eaas/common/views.hpp"
#include "eaas/runtime/grouped_gemm.hpp"
#include "eaas/runtime/model.hpp"
#include "eaas/runtime/slot.hpp"

namespace eaas::runtime::gpu {

/// One checked request of a batch.
struct step_request {
  std::uint64_t act_offset = 0;  ///< its activations, in the slots region
  std::uint32_t tokens = 0;
  bool bf16 = false;     ///< activations are bf16 (else fp32)
  device_endpoint ep{};  ///< to its client
  remote_view result{};  ///< the client's result region (the answer goes to kResponse, the seq to kResultSig)
  response_header header{};
};

/// One (token, expert) pair. A batch's rows are sorted by group = layer * local_experts + local expert.
struct step_row {
  std::uint32_t request = 0;  ///< index into the batch's requests
  std::uint32_t token = 0;    ///< token of that request
  std::uint32_t slot = 0;     ///< which of the token's top-k entries (0 .. topk-1)
  float weight = 0;           ///< router weight
};

/// The experts' weights on the device, for a caller that runs the grouped GEMM itself (server_step.hpp).
struct expert_weights_device {
  const void* const* gate = nullptr;  ///< device array of `groups` pointers (bf16 [inter, hidden])
  const void* const* up = nullptr;    ///< the same for up
  const void* const* down = nullptr;  ///< and down (bf16 [hidden, inter])
  std::uint32_t groups = 0;           ///< layers × local experts; group = layer * local_experts + local expert
  grouped_swiglu_layout layout = grouped_swiglu_layout::tiled;  ///< how the matrices lie (grouped_gemm.hpp)
};

class expert_step {
 public:
  /// Allocates, on GPU `device`, the weights of `local_experts` experts in each of shape.layers layers
  /// (bf16) and the buffers for batches of up to `max_requests` requests of up to `max_tokens` tokens
  /// each. hidden and inter must be multiples of 32 (`invalid_argument` otherwise).
  static status create(int device, const model_shape& shape, std::uint32_t local_experts, std::uint32_t max_requests,
                       std::uint32_t max_tokens, std::unique_ptr<expert_step>& out);
  virtual ~expert_step() = default;

  /// Rounds one expert's fp32 weights to bf16 and copies them to the GPU. Every (layer, local expert)
  /// must be uploaded once before run(). Safe to call from several threads at once.
  virtual status upload(std::uint32_t layer, std::uint32_t local_expert, const expert_weights& w) = 0;

  /// Computes and answers a batch. `slots`: the device address of the slots region (`slots_bytes`
  /// long; every request's activations must lie inside it). `offsets`: groups + 1 entries over `rows`.
  /// `answered[q]` gets whether request q's answer reached its client (ok), else why not. Returns an
  /// error (and answers nothing) for a batch that breaks the limits or when the GPU fails.
  virtual status run(const void* slots, std::uint64_t slots_bytes, std::span<const step_request> reqs,
                     std::span<const step_row> rows, std::span<const std::int32_t> offsets,
                     std::vector<status>& answered) = 0;

  /// The weights' device pointer arrays (valid as long as this object).
  virtual expert_weights_device device_weights() const = 0;
};

}  // namespace eaas::runtime::gpu
