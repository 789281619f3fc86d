#pragma once

/// The expert server's GPU grouped GEMM for SwiGLU experts (DESIGN.md §5), Hopper (sm_90) and later.
///
/// Tokens arrive regrouped by local expert: rows offsets[e] .. offsets[e+1] of `x` belong to expert e.
/// For every such row r, with the weights in nn.Linear layout (model.hpp):
///
///   h = silu(gate_e · x_r) ⊙ (up_e · x_r)      gate_e, up_e  [inter, hidden]
///   y_r = w_r · (down_e · h)                   down_e        [hidden, inter]
///
/// bf16 weights and activations, fp32 accumulation, fp32 output. `h` is rounded to bf16 between the
/// two products (it is the second product's tensor-core operand, as in common MoE kernels).
///
/// The per-expert row counts are read ON THE DEVICE, from `offsets`: the host passes only the shape and
/// the capacity `max_rows`. One call is a few kernel launches with fixed arguments (three with tiled
/// weights and the default tuning), so it can be captured in a CUDA graph once and replayed with different
/// counts. Experts with no rows cost nothing beyond one pass over `offsets`: a first kernel compacts the
/// active experts into a list in the workspace, and the GEMM kernels walk (active expert, output tile, chunk
/// of 32 or 64 rows) work items with a grid sized to the device, so each weight byte of an active expert is
/// read once per chunk of its rows (once, at decode sizes).
///
/// Expert weights are given as device arrays of E device pointers (one array each for gate, up and
/// down), so that experts may live in separate allocations; a contiguous [E, ...] tensor is the special
/// case `base + e * stride` (grouped_swiglu_expert_pointers fills such an array).
///
/// Weights may be row-major (as in checkpoints) or in a tiled layout (grouped_swiglu_layout) that the GEMMs
/// read with bulk copies (TMA) into shared memory; the expert server and the monolithic baseline store them
/// tiled. Speed with tiled weights and the default tuning (eaas-grouped-gemm-bench, one H200, 2026-11-29; copy
/// bandwidth 4.23 TB/s counting read + written bytes; bytes = the active experts' weights + x + y + h;
/// docs/PERF.md "Session 9"): Qwen3-30B-A3B (2048/768, 128 experts, top-8) 64 tokens 92 %, 128: 91 %, 256: 88 %,
/// 512: 80 % of copy (5.4-7.3x cuBLAS per expert); DeepSeek-V3 (7168/2048, 256 experts) 32 and 128 tokens: 100
/// and 99 % (1.6x). The row-major default (the staged path) is 1.04x slower at 64 tokens and 1.49x at 512.
///
/// Available where eaas was built with CUDA (EAAS_WITH_CUDA in eaas/config.hpp).
///
/// Plain C++: no CUDA header is needed to include this. Implemented in runtime/src/gpu/grouped_gemm.cu
/// (part of eaas_moe where CUDA is present).

#include <cstddef>
#include <cstdint>

#include "eaas/common/status.hpp"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace eaas::runtime::gpu {

/// hidden and inter must be multiples of this (the GEMMs step through K 32 elements at a time).
inline constexpr std::uint32_t kGroupedSwigluAlign = 32;
/// Largest number of local experts one call accepts.
inline constexpr std::uint32_t kGroupedSwigluMaxExperts = 1u << 20;

/// What the host knows: the shape and the capacity, never the per-expert counts.
struct grouped_swiglu_shape {
  std::uint32_t experts = 0;   ///< E, local experts (groups); 1 .. kGroupedSwigluMaxExperts
  std::uint32_t hidden = 0;    ///< model size; a nonzero multiple of kGroupedSwigluAlign
  std::uint32_t inter = 0;     ///< expert intermediate size; a nonzero multiple of kGroupedSwigluAlign
  std::uint32_t max_rows = 0;  ///< rows of x, y and row_weight; offsets[E] must not exceed it; >= 1
};

/// Bits of `grouped_swiglu_args::error` (set on the device with atomicOr; the host reads them).
enum grouped_swiglu_error : std::uint32_t {
  kGroupedSwigluBadOffsets = 1u,  ///< offsets not non-decreasing, offsets[0] < 0, or offsets[E] > max_rows
  kGroupedSwigluBadWeights = 2u,  ///< an expert with rows has a null or non-16-byte-aligned weight pointer
};

/// How the weight matrices lie in memory (grouped_swiglu_args::layout).
enum class grouped_swiglu_layout : std::uint32_t {
  row_major = 0,  ///< nn.Linear's [out, in], row-major, as in checkpoints
  /// grouped_swiglu_tiled_index: each 16-row tile of a matrix is its 32-column K steps one after another, 1 KiB
  /// each, in the order the tensor-core fragments take them; the GEMMs move a warp's weights with bulk copies
  /// (TMA) into shared memory. Convert with grouped_swiglu_tile (device) or grouped_swiglu_tiled_index (host).
  tiled = 1,
};

/// Where element (row, col) of a [rows, cols] matrix lies in the tiled layout (element index; rows a
/// multiple of 16, cols a multiple of 32, as for every weight matrix grouped_swiglu accepts).
constexpr std::size_t grouped_swiglu_tiled_index(std::size_t row, std::size_t col, std::size_t cols) noexcept {
  const std::size_t block = row / 16 * (cols / 32) + col / 32;                     // (16-row tile, K step): 1 KiB
  const std::size_t piece = (row % 16) / 8 * 32 + (row % 8) * 4 + (col % 32) / 8;  // 16 bytes
  return (block * 64 + piece) * 8 + col % 8;
}

/// Device pointers of one call. All must stay valid until the work queued on the stream has run.
struct grouped_swiglu_args {
  const void* x = nullptr;                ///< bf16 [max_rows, hidden], row-major, 16-byte aligned
  const std::int32_t* offsets = nullptr;  ///< E+1 entries, non-decreasing, 0 <= offsets[0], offsets[E] <= max_rows
  const float* row_weight = nullptr;      ///< fp32 [max_rows] (router weights), or null for 1
  const void* const* gate = nullptr;      ///< E pointers, each bf16 [inter, hidden], 16-byte aligned
  const void* const* up = nullptr;        ///< E pointers, each bf16 [inter, hidden], 16-byte aligned
  const void* const* down = nullptr;      ///< E pointers, each bf16 [hidden, inter], 16-byte aligned
  float* y = nullptr;                     ///< fp32 [max_rows, hidden]; rows outside every group are not written
  void* workspace = nullptr;              ///< grouped_swiglu_workspace_bytes(shape) bytes, 16-byte aligned
  std::uint32_t* error = nullptr;         ///< device word or null: grouped_swiglu_error bits are OR-ed in
  /// Layout of every gate, up and down matrix (the device cannot tell them apart: tiled weights given as
  /// row_major, or the reverse, give wrong sums, never an out-of-bounds access).
  grouped_swiglu_layout layout = grouped_swiglu_layout::row_major;
};

/// Optional knobs for benchmarks and tuning; the defaults (zeros) are what the server uses.
struct grouped_swiglu_tuning {
  /// Resident blocks per SM for the GEMM kernels (at most what fits); 0 = the default: 3 for the register
  /// path, all that fit for the cp.async ring.
  std::uint32_t ctas_per_sm = 0;
  /// How weights reach the tensor cores: 0 = the default (with k_unroll 0 and staged 0: the staged path with
  /// 3 steps in flight, see `staged`); 1 = straight into registers, k_unroll 32-wide K steps per batch of
  /// loads (0 = 2); 3, 4 or 6 = through a per-warp cp.async ring of that many K steps.
  std::uint32_t stages = 0;
  /// For stages 1: 2 or 4 (stages 0 with k_unroll 2 or 4: the same register path). For staged 1: 2 or 3.
  std::uint32_t k_unroll = 0;
  /// 1 = the staged path, meant for 16+ rows per expert: each block copies its 32-row chunk of tokens (x, or h
  /// for the down projection) into shared memory once per 256-wide K tile (cp.async, double-buffered) instead
  /// of every warp loading its own token fragments, and each warp streams its weights through a register ring
  /// that keeps k_unroll K steps (0 = 2) in flight while it computes one. Blocks per SM: all that fit (4 with
  /// k_unroll 2, 3 with k_unroll 3). Needs stages 0 or 1. All-zero tuning runs it with k_unroll 3.
  std::uint32_t staged = 0;
  /// Nonzero: the device picks, per call, the staged path (2 steps in flight) when the call's rows are at least
  /// this many per active expert, else the default register path; 3 blocks per SM either way unless
  /// ctas_per_sm says otherwise. Needs staged 0, stages 0 and k_unroll 0 or 2. 0 = off (the default).
  std::uint32_t staged_from_rows = 0;
  /// Tiled layout only (the others must then be 0): K steps (32 columns) per bulk copy, copies in flight per
  /// warp and rows per work item. (steps, depth) (2, 4), (1, 8), (2, 3) or (1, 4) with rows 32; (2, 3) or (1, 4)
  /// with rows 64 (an expert's weights are read once for up to 64 of its rows, with twice the accumulators).
  /// All three 0, the default: (1, 4) with rows picked by the device, per call: 64 from 24 rows per active
  /// expert, else 32. Blocks per SM: all that fit (2 for (2, 3), (2, 4) and (1, 8); 3 for (1, 4)).
  std::uint32_t tiled_steps = 0;
  std::uint32_t tiled_depth = 0;
  std::uint32_t tiled_rows = 0;
  /// Tiled layout, with the three above 0: 1 runs the default's gate/up and down as two kernels, one after the
  /// other, instead of one kernel whose blocks take the work items of both from a queue (the default).
  std::uint32_t tiled_two_kernels = 0;
};

/// Workspace bytes for `s`: a small header, the compacted active-expert list (48 bytes per expert), a counter
/// per 32-row chunk of the capacity and the intermediate h, bf16 [max_rows, inter]. Fixed for a shape, so it can be allocated once.
std::size_t grouped_swiglu_workspace_bytes(const grouped_swiglu_shape& s) noexcept;

/// Checks what the host can check: the shape's limits, non-null and aligned pointers, the workspace
/// size. `invalid_argument` (with a sentence for last_error()) otherwise. Called by grouped_swiglu.
status grouped_swiglu_check(const grouped_swiglu_shape& s, const grouped_swiglu_args& a,
                            std::size_t workspace_bytes) noexcept;

/// Queues y = the grouped SwiGLU of x on `stream` (null: the legacy default stream) of the current
/// CUDA device; returns without waiting. Legal inside stream capture (it makes no synchronous CUDA
/// call and allocates nothing).
///
/// What the device checks, as a remote-written header would be: if `offsets` is invalid, or an expert
/// with rows has a bad weight pointer, nothing is computed, y is left untouched and the error bit is
/// set in `*a.error` (when given). Rows of y outside offsets[0] .. offsets[E] are never written.
///
/// Returns `invalid_argument` for what grouped_swiglu_check rejects, `internal_error` when a launch
/// fails (with CUDA's message in last_error()).
status grouped_swiglu(const grouped_swiglu_shape& s, const grouped_swiglu_args& a, std::size_t workspace_bytes,
                      CUstream_st* stream, const grouped_swiglu_tuning& tuning = {}) noexcept;

/// Queues dst = src in the tiled layout: src a row-major bf16 [rows, cols] matrix, dst as many bytes, not
/// overlapping it (rows a nonzero multiple of 16, cols of 32, both 16-byte aligned). `invalid_argument`
/// otherwise, `internal_error` when the launch fails.
status grouped_swiglu_tile(const void* src, void* dst, std::uint32_t rows, std::uint32_t cols,
                           CUstream_st* stream) noexcept;

/// Queues out[e] = base + e * stride_bytes for e < experts (device array `out`): the per-expert
/// pointer array of a contiguous [E, rows, cols] weight tensor. `invalid_argument` for a null pointer
/// or zero experts, `internal_error` when the launch fails.
status grouped_swiglu_expert_pointers(const void* base, std::size_t stride_bytes, std::uint32_t experts,
                                      const void** out, CUstream_st* stream) noexcept;

}  // namespace eaas::runtime::gpu
