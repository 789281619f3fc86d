#pragma once

// The monolithic baseline of issue #9 on one GPU: every expert co-located with the dense part, so a
// MoE layer is a local regrouping plus the grouped GEMM (no communication).
//
// One MoE layer, from device-side routing (ids, weights: tokens × topk), as kernels on one stream:
//   1. count      rows per expert (atomics; each (token, k) pair gets its rank within its expert); the
//                 last block to finish scans: exclusive prefix scan of the counts into offsets[E+1], and the
//                 compacted list of active experts ("kernel shrinking": built on the device, never read by
//                 the host)
//   2. place      a warp per pair: its row = offsets[expert] + rank, that row's router weight, and its x row
//                 (bf16) copied from the normed activations
//   3. grouped_swiglu over the groups (grouped_gemm.hpp): its counts are read on the device and its work
//                 list walks only the active experts; the router weight is applied per row
//   4. combine    x[token] += Σ_k y[row of (token, k)], k in order (deterministic)
// Without shrinking (the ablation), the scan gives every empty expert one padding row (zeros, weight 0,
// never combined), so the grouped GEMM visits every expert and reads all of its weights, as a grouped
// GEMM over a fixed expert list would. Each row's result is the same either way (rows are independent
// and the products sum over K in a fixed order), so both modes give bit-identical outputs.
//
// Every call only queues work: no host synchronisation, no allocation, the token count fixed by the
// host (a captured graph's batch size). Calls must be made with the object's device current and must not
// run concurrently with each other.
//
// Plain C++ header; implemented in moe_local.cu.

#include <cstdint>
#include <memory>

#include "dense_gpu.hpp"
#include "eaas/common/status.hpp"
#include "eaas/runtime/model.hpp"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace eaas::runtime::gpu {

class moe_local {
 public:
  /// Allocates, on GPU `device`, every expert of every layer (bf16, zero until uploaded) and the buffers
  /// for up to `max_tokens` tokens. hidden and inter must be multiples of 32 and max_tokens * topk +
  /// experts at most 2^30 (`invalid_argument` otherwise).
  static status create(int device, const model_shape& shape, std::uint32_t max_tokens, std::unique_ptr<moe_local>& out);
  virtual ~moe_local() = default;

  virtual const model_shape& shape() const = 0;

  /// Programmatic dependent launch between a layer's kernels (pdl.cuh; on by default where the device has
  /// it, compute capability 9.0+): each kernel's launch overlaps the one before it. Off: plain launches (the
  /// ablation; same results). Not while a run is being queued or captured.
  virtual void set_pdl(bool on) = 0;

  /// Rounds one expert's fp32 weights to bf16 and copies them to the GPU (synchronous).
  virtual status upload(std::uint32_t layer, std::uint32_t expert, const expert_weights& w) = 0;
  /// Fills every expert with pseudo-random bf16 weights generated on the GPU, uniform in ±1/sqrt(fan-in)
  /// (for benchmarks at real sizes, where host generation would take minutes; not synthetic_expert's
  /// values). Each value is a function of (seed, layer, global expert, element): an object holding the
  /// experts first_expert .. first_expert + experts - 1 of a model with `total_experts` (0: this shape's
  /// experts, first_expert 0) gets exactly the weights one holding all of them has for those experts.
  /// Synchronous.
  virtual status fill_random(std::uint64_t seed, std::uint32_t first_expert = 0, std::uint32_t total_experts = 0) = 0;

  /// x[tokens × hidden] (fp32, device) += the MoE output of layer `layer` for the bf16 activations
  /// `normed` and their routing (device ids and weights, tokens × topk; ids >= experts are skipped).
  /// `shrink` false: the ablation that visits every expert (see above).
  virtual status run(std::uint32_t layer, std::uint32_t n_tokens, const void* normed_bf16, const std::uint32_t* ids,
                     const float* weights, float* x, bool shrink, CUstream_st* stream) = 0;

  /// Device int32 [layers]: the active experts of each layer's last run (written by the scan).
  virtual const std::int32_t* active_counts() const = 0;
  /// Device int32 [layers × experts]: each layer's compacted active-expert list (the first
  /// active_counts()[layer] entries are valid, ascending).
  virtual const std::int32_t* active_experts() const = 0;
  /// Device word: grouped_swiglu_error bits OR-ed over every run (0 when all were valid).
  virtual const std::uint32_t* error_word() const = 0;
};

/// The whole monolithic forward on one GPU: embedding, then per layer attention, router and the local
/// MoE layer. Owns the token ids, the hidden states and each layer's routing on the device.
class monolithic_gpu {
 public:
  /// The dense part from `dense` (see dense_gpu::create); the experts are zero until uploaded through
  /// moe() (upload or fill_random).
  static status create(int device, const model_shape& shape, const dense_options& opts, const dense_weights& dense,
                       std::uint32_t max_tokens, std::unique_ptr<monolithic_gpu>& out);
  virtual ~monolithic_gpu() = default;

  virtual dense_gpu& dense() = 0;
  virtual moe_local& moe() = 0;

  /// Device uint32 [max_tokens]: the token ids forward() reads (write them before a graph replay).
  virtual std::uint32_t* tokens() = 0;
  /// Device fp32 [max_tokens × hidden]: the hidden states forward() leaves (reference_model::forward's out).
  virtual const float* hidden_states() const = 0;
  /// Device routing of `layer` from the last forward: ids uint32 and weights fp32, [max_tokens × topk].
  virtual const std::uint32_t* ids(std::uint32_t layer) const = 0;
  virtual const float* weights(std::uint32_t layer) const = 0;

  /// Queues the forward of the first `n_tokens` ids of tokens() on `stream`. Capturable.
  virtual status forward(std::uint32_t n_tokens, bool shrink, CUstream_st* stream) = 0;
};

}  // namespace eaas::runtime::gpu
