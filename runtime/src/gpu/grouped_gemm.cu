// The grouped SwiGLU GEMM of the expert server (contract: eaas/runtime/grouped_gemm.hpp).
//
// Launches with host-fixed arguments only:
//   prep     one block: validates offsets and the active experts' weight pointers, compacts the
//            active experts into a list (with their rows and a prefix sum of their 32-row chunks)
//   gate_up  h[r, j] = silu(gate_e[j] · x_r) * (up_e[j] · x_r), bf16, for work items
//            (active expert, 64 features, 32-row chunk)
//   down     y[r, i] = w_r * (down_e[i] · h_r), fp32, for work items (active expert, 128 features, chunk)
// The GEMM grids are sized to the device (as many blocks as fit at once) and walk the work items with a
// stride, so nothing depends on the host knowing the counts, and inactive experts never get a block.
// The tiled path's default runs gate_up and down in one kernel whose blocks take the items of both from
// a queue (fused_items): no kernel boundary and no per-product tail.
//
// The products use mma.sync m16n8k16 (bf16 in, fp32 accumulate) "swapped": the weight rows (output
// features) are the 16-row A operand and the tokens are the 8-column B operand, so 1..8 rows of an
// expert cost one tensor-core op per 16x16 weight tile and the kernel stays bound by weight bandwidth.
// Weights go global -> registers with one 16-byte load per thread and row: a sum over k may take its
// terms in any order, so within each 32-wide K step thread t of a quad holds k = 8t .. 8t+7 of its row
// for both operands and feeds them to two mmas as if they were the fragment's k = {2t, 2t+1, 2t+8,
// 2t+9} (first mma: elements 0-3, second: 4-7). No shared memory or ldmatrix is needed, and every
// weight byte is loaded exactly once per chunk.
//
// Ways to keep enough weight bytes in flight (grouped_swiglu_tuning):
//   registers (default)  each warp loads 2 or 4 K steps straight into registers, then computes; 3 blocks
//                        of 4 warps per SM. Measured on an H200 (see the report in grouped_gemm.hpp).
//   cp.async ring        each warp keeps a ring of 3, 4 or 6 K steps in flight in shared memory and
//                        refills a step as soon as it is consumed; meant for 16+ rows per expert, where
//                        the register path's compute phase leaves the memory pipe idle.
//   staged (tuning::staged)  for 16+ rows per expert. On the other two paths every warp loads its own
//                        copy of the token fragments (up to 4 LDG.128 of 8 rows x 64 bytes per K step,
//                        as many as its weight loads at 32 rows, all through L1 and its tag stage) and
//                        holds them in registers or ring slots. Here the block copies the chunk's tokens
//                        once per 256-wide K tile into shared memory (cp.async, coalesced 512-byte rows,
//                        two tiles: the next one lands while the current one is used) and the warps read
//                        their fragments with conflict-free LDS.128; the weights still go straight to
//                        registers, through a ring of 3 or 4 K steps per thread: step i is computed while
//                        steps i+1 .. i+2 (or i+3) are in flight, so a warp never waits with nothing in
//                        flight. Same fragment mapping and the same order of mmas as the register path,
//                        so the same sums.
//   auto (tuning::staged_from_rows)  one kernel holding the register path and the staged one; the
//                        device picks per call (the mean rows per active expert, from prep's header).
//   tiled (grouped_swiglu_layout::tiled; what the server runs)  the weights are stored in the fragment order
//                        the threads take them, 16 rows x 32 columns per KiB, so a warp's weights for a few K
//                        steps are two contiguous ranges: one lane moves them with bulk copies (TMA) into a
//                        per-warp shared-memory ring that keeps 3 or 4 copies in flight on mbarriers, and no
//                        register holds a weight in flight. Tokens are staged as on the staged path. Work
//                        items hold 32 or 64 rows of an expert; both kernels are launched and the device runs
//                        the one prep's counts pick (64 from 24 rows per active expert: an expert's weights
//                        are then read once for up to 64 of its rows); both with 1-step copies, 4 in flight,
//                        so that 3 blocks fit an SM. Same mma order, so the same sums.
//
// Raw PTX (the mma and the streaming load) stays in this file: it is private to this kernel, and the
// library's detail/ptx.cuh is the device vocabulary's, not the runtime's.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "grouped_gemm.cu needs sm_80 or later (bf16 mma.sync); set CMAKE_CUDA_ARCHITECTURES (default 90)"
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <string>

#include "eaas/host/error.hpp"
#include "eaas/runtime/grouped_gemm.hpp"
#include "pdl.cuh"

namespace eaas::runtime::gpu {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunkRows = 32;           // rows of one expert per work item (64 on the tiled path's 64-row kernels)
constexpr int kNTiles = kChunkRows / 8;  // mma n-tiles per chunk
constexpr int kGateUpFeatures = 16 * kWarps;  // per item; each warp: 16 gate rows and the same 16 up rows
constexpr int kDownFeatures = 32 * kWarps;    // per item; each warp: two 16-row tiles of down
// Active lists up to this long are searched in shared memory (DeepSeek-V3's 256 experts; longer lists are searched
// in global memory). 1 KiB: with 4 KiB the tiled path's 64-row kernel with 1-step copies fit 2 blocks per SM, not 3.
constexpr int kSmemExperts = 256;
constexpr int kPrepThreads = 1024;
constexpr int kBlocksPerSm = 4;  // what __launch_bounds__ asks registers for
// Blocks per SM the register path runs with by default. Measured on an H200 (eaas-grouped-gemm-bench
// --sweep): 3 beat 4 by 8-12% where several experts' rows need 2-4 n-tiles (Qwen3 128/256 tokens,
// DeepSeek-V3 128 tokens) and lost at most 3.5% elsewhere.
constexpr int kDefaultRegisterBlocksPerSm = 3;

struct ws_header {
  std::int32_t n_active;
  std::int32_t total_chunks;  // 32-row chunks of the active experts
  std::uint32_t error;
  std::int32_t rows;            // offsets[E] - offsets[0]: the rows of all groups
  std::int32_t total_chunks64;  // 64-row chunks (the tiled path's 64-row items)
  std::uint32_t next_item;      // the fused kernels' work queue: the next item to claim
};

// One active expert, as the GEMM kernels see it (written by prep: they never re-read offsets).
struct alignas(16) active_entry {
  const __nv_bfloat16* gate;
  const __nv_bfloat16* up;
  const __nv_bfloat16* down;
  std::int32_t begin, end;  // rows
  std::int32_t expert;
  std::int32_t reserved;
};
static_assert(sizeof(active_entry) == 48);

struct ws_layout {
  std::size_t entries, prefix, prefix64, ready, h, total;
};

// Chunks (of 32 rows; of 64 there are fewer) the capacity allows at most: one partial chunk per expert with rows.
constexpr std::size_t max_chunks(const grouped_swiglu_shape& s) {
  return std::size_t{s.max_rows} / kChunkRows + std::min(s.experts, s.max_rows);
}

constexpr std::size_t round256(std::size_t v) { return (v + 255) / 256 * 256; }

ws_layout layout(const grouped_swiglu_shape& s) {
  ws_layout l{};
  l.entries = 256;  // after the header
  l.prefix = l.entries + round256(std::size_t{s.experts} * sizeof(active_entry));
  l.prefix64 = l.prefix + round256((std::size_t{s.experts} + 1) * sizeof(std::int32_t));
  l.ready = l.prefix64 + round256((std::size_t{s.experts} + 1) * sizeof(std::int32_t));
  l.h = l.ready + round256(max_chunks(s) * sizeof(std::int32_t));
  l.total = l.h + round256(std::size_t{s.max_rows} * s.inter * sizeof(__nv_bfloat16));
  return l;
}

struct kparams {
  const __nv_bfloat16* x;
  const std::int32_t* offsets;
  const float* row_weight;
  const void* const* gate;
  const void* const* up;
  const void* const* down;
  float* y;
  ws_header* hdr;
  active_entry* entries;
  std::int32_t* prefix;    // 32-row chunk prefix over the active list, n_active + 1 entries
  std::int32_t* prefix64;  // the same in 64-row chunks
  std::int32_t* ready;     // the fused kernels: gate/up items finished per chunk (prep zeroes the call's chunks)
  __nv_bfloat16* h;
  std::uint32_t* error;
  int experts, hidden, inter, max_rows, max_chunks;
  int staged_from_rows;   // the auto kernels: staged path when rows >= this * active experts
  int tiled64_from_rows;  // the tiled default's pair: 64-row items when rows >= this * active experts
};

// ---- device helpers -------------------------------------------------------------------------------

// Weights are read once: keep them out of L1 (which holds the activations every warp of a block
// re-reads) and let L2 fetch 256 bytes per miss (the warp walks its rows sequentially).
__device__ __forceinline__ uint4 ld_weight(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 ld_act(const void* p) { return __ldg(static_cast<const uint4*>(p)); }

__device__ __forceinline__ void mma_bf16(float (&c)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                         std::uint32_t a3, std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// S consecutive 32-wide K steps starting at element k: all loads first (S * (2 MT + ntiles) 16-byte
// loads in flight per thread), then the mmas. a_lo/a_hi: this thread's rows g and g+8 of each A tile;
// b: its token row of each n-tile; all already offset by 8t elements.
template <int MT, int S>
__device__ __forceinline__ void k_steps(const char* const (&a_lo)[MT], std::size_t a_hi_off,
                                        const char* const (&b)[kNTiles], int ntiles, int k,
                                        float (&acc)[MT][kNTiles][4]) {
  uint4 lo[S][MT], hi[S][MT], bv[S][kNTiles];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const std::size_t off = static_cast<std::size_t>(k + 32 * s) * 2;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      lo[s][mt] = ld_weight(a_lo[mt] + off);
      hi[s][mt] = ld_weight(a_lo[mt] + a_hi_off + off);
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) bv[s][nt] = nt < ntiles ? ld_act(b[nt] + off) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int s = 0; s < S; ++s) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      if (nt >= ntiles) continue;  // warp-uniform
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_bf16(acc[mt][nt], lo[s][mt].x, hi[s][mt].x, lo[s][mt].y, hi[s][mt].y, bv[s][nt].x, bv[s][nt].y);
        mma_bf16(acc[mt][nt], lo[s][mt].z, hi[s][mt].z, lo[s][mt].w, hi[s][mt].w, bv[s][nt].z, bv[s][nt].w);
      }
    }
  }
}

// acc[mt][nt] += A_mt[16 rows, K] · B[rows of n-tile nt, K]^T for one warp. A rows and B rows are
// bf16 with row stride `ld` elements; B rows past `rows` are clamped to the last one (their results
// are never stored). A and B must be 16-byte aligned, K a multiple of 32.
template <int MT, int U>
__device__ __forceinline__ void warp_gemm(const __nv_bfloat16* const (&a)[MT], const __nv_bfloat16* b, int ld, int K,
                                          int rows, float (&acc)[MT][kNTiles][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const char* a_lo[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    a_lo[mt] = reinterpret_cast<const char*>(a[mt] + static_cast<std::size_t>(g) * ld + 8 * t);
  const std::size_t a_hi_off = static_cast<std::size_t>(8) * ld * 2;
  const char* bp[kNTiles];
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
    const int r = min(nt * 8 + g, rows - 1);
    bp[nt] = reinterpret_cast<const char*>(b + static_cast<std::size_t>(r) * ld + 8 * t);
  }
  const int ntiles = (rows + 7) / 8;
  int k = 0;
  for (; k + 32 * U <= K; k += 32 * U) k_steps<MT, U>(a_lo, a_hi_off, bp, ntiles, k, acc);
  for (; k < K; k += 32) k_steps<MT, 1>(a_lo, a_hi_off, bp, ntiles, k, acc);
}

// The cp.async pipeline: a ring of S 32-wide K steps per warp in shared memory, refilled one step as
// soon as one is consumed, so S steps of weights stay in flight without holding registers. Each
// thread copies and later reads back only its own 16-byte pieces (slot-major, lane-minor: conflict-free
// and no barrier is needed, only the thread's own cp.async.wait_group).
constexpr int kSlots = 2 * 2 + kNTiles;  // per step and lane: rows g and g+8 of 2 A tiles, one row per n-tile

__device__ __forceinline__ void cp_async_cg(uint4* smem, const void* gmem) {  // weights: L2 only
  asm volatile(
      "cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(smem))),
      "l"(gmem)
      : "memory");
}
__device__ __forceinline__ void cp_async_ca(uint4* smem, const void* gmem) {  // activations: via L1
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(smem))),
               "l"(gmem)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

template <int S>
__device__ __forceinline__ void warp_gemm_async(const __nv_bfloat16* const (&a)[2], const __nv_bfloat16* b, int ld,
                                                int K, int rows, uint4* ring, float (&acc)[2][kNTiles][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const char* a_lo[2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
    a_lo[mt] = reinterpret_cast<const char*>(a[mt] + static_cast<std::size_t>(g) * ld + 8 * t);
  const std::size_t a_hi_off = static_cast<std::size_t>(8) * ld * 2;
  const char* bp[kNTiles];
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
    const int r = min(nt * 8 + g, rows - 1);
    bp[nt] = reinterpret_cast<const char*>(b + static_cast<std::size_t>(r) * ld + 8 * t);
  }
  const int ntiles = (rows + 7) / 8, nk = K / 32;
  ring += lane;
  auto issue = [&](int step, int slot) {
    if (step < nk) {
      uint4* st = ring + slot * (kSlots * 32);
      const std::size_t off = static_cast<std::size_t>(step) * 64;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        cp_async_cg(st + (2 * mt) * 32, a_lo[mt] + off);
        cp_async_cg(st + (2 * mt + 1) * 32, a_lo[mt] + a_hi_off + off);
      }
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
        if (nt < ntiles) cp_async_ca(st + (4 + nt) * 32, bp[nt] + off);
    }
    cp_async_commit();  // always, so that "S-1 groups pending" means "this step has landed"
  };
#pragma unroll
  for (int s = 0; s < S; ++s) issue(s, s);
  int slot = 0;
  for (int i = 0; i < nk; ++i) {
    cp_async_wait<S - 1>();
    const uint4* st = ring + slot * (kSlots * 32);
    uint4 lo[2], hi[2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      lo[mt] = st[(2 * mt) * 32];
      hi[mt] = st[(2 * mt + 1) * 32];
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      if (nt >= ntiles) continue;  // warp-uniform
      const uint4 bv = st[(4 + nt) * 32];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        mma_bf16(acc[mt][nt], lo[mt].x, hi[mt].x, lo[mt].y, hi[mt].y, bv.x, bv.y);
        mma_bf16(acc[mt][nt], lo[mt].z, hi[mt].z, lo[mt].w, hi[mt].w, bv.z, bv.w);
      }
    }
    // The slot's values are in registers and consumed (the mmas depend on them): refill it.
    issue(i + S, slot);
    slot = slot + 1 == S ? 0 : slot + 1;
  }
  cp_async_wait<0>();  // the ring is free for the next work item
}

// One warp's products for a work item: the register path (S == 0, U steps per load batch) or the
// cp.async ring of S steps.
template <int U, int S>
__device__ __forceinline__ void warp_product(const __nv_bfloat16* const (&a)[2], const __nv_bfloat16* b, int ld, int K,
                                             int rows, uint4* ring, float (&acc)[2][kNTiles][4]) {
  if constexpr (S == 0)
    warp_gemm<2, U>(a, b, ld, K, rows, acc);
  else
    warp_gemm_async<S>(a, b, ld, K, rows, ring, acc);
}

template <int S>
constexpr int ring_bytes() {
  return S * kWarps * kSlots * 32 * 16;
}

// The staged path: the chunk's token rows go to shared memory once per block and K tile, the weights
// through a per-thread register ring that keeps U K steps in flight while one is computed.
// Geometry of the token tiles: NT n-tiles (8 rows each) per chunk, K elements per tile.
template <int NT, int K>
struct stage_geom {
  static constexpr int kNT = NT;
  static constexpr int kRows = 8 * NT;
  static constexpr int kK = K;
  static constexpr int kSteps = K / 32;
  static_assert((kSteps & (kSteps - 1)) == 0);
  // Row stride in elements: K + 32, i.e. 64 bytes modulo 128 for K = 128 and 256, so the two rows a quarter
  // warp reads with LDS.128 (lanes 4g .. 4g+7: rows g and g+1, 64 bytes each) fall in different banks.
  static constexpr int kLd = K + 32;
  static constexpr int kTile = kRows * kLd;        // elements of one tile
  static constexpr int kBytes = 2 * kTile * 2;     // two tiles, bf16
  static constexpr int kPieces = kRows * (K / 8);  // 16-byte pieces of one full tile
  static_assert(kPieces % kThreads == 0);
};
using geom32 = stage_geom<kNTiles, 256>;  // the staged path's, and the tiled path's with 32-row chunks
using geom64 = stage_geom<8, 128>;        // the tiled path's with 64-row chunks (half as wide: the same bytes)
constexpr int kStageK = geom32::kK;
constexpr int kStageSteps = geom32::kSteps;
constexpr int kStageTile = geom32::kTile;
constexpr int kStageBytes = geom32::kBytes;

// 16 bytes, or zeros where src_bytes is 0 (rows past the chunk's last row, within its last n-tile).
__device__ __forceinline__ void cp_async_cg_zfill(void* smem, const void* gmem, unsigned src_bytes) {
  asm volatile(
      "cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(smem))),
      "l"(gmem), "r"(src_bytes)
      : "memory");
}

// Whole block: tile `dst` <- rows 0 .. fill-1 of B, K elements k0 .. k0+len-1 (len a multiple of 32).
// Consecutive threads copy consecutive 16 bytes of a row.
template <class G>
__device__ __forceinline__ void stage_b_tile(__nv_bfloat16* dst, const __nv_bfloat16* b, int ld, int rows, int fill,
                                             int k0, int len) {
  const int pieces = len / 8;
#pragma unroll
  for (int i0 = 0; i0 < G::kPieces; i0 += kThreads) {
    const int i = i0 + static_cast<int>(threadIdx.x), r = i / (G::kK / 8), c = i % (G::kK / 8);
    if (r < fill && c < pieces)
      cp_async_cg_zfill(dst + r * G::kLd + 8 * c, b + static_cast<std::size_t>(min(r, rows - 1)) * ld + k0 + 8 * c,
                        r < rows ? 16u : 0u);
  }
}

// One K step of this thread's weights: rows g and g+8 of both A tiles, 8 elements each.
struct a_step {
  uint4 lo[2], hi[2];
};

__device__ __forceinline__ void load_a_step(const char* const (&a_lo)[2], std::size_t a_hi_off, int step, a_step& r) {
  const std::size_t off = static_cast<std::size_t>(step) * 64;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    r.lo[mt] = ld_weight(a_lo[mt] + off);
    r.hi[mt] = ld_weight(a_lo[mt] + a_hi_off + off);
  }
}

// The mmas of one K step, in the register path's order. `b_row`: this thread's token row g, element
// 8t, of the tile that holds the step.
template <class G>
__device__ __forceinline__ void mma_step(const a_step& r, const __nv_bfloat16* b_row, int step, int ntiles,
                                         float (&acc)[2][G::kNT][4]) {
  const int col = (step & (G::kSteps - 1)) * 32;
#pragma unroll
  for (int nt = 0; nt < G::kNT; ++nt) {
    if (nt >= ntiles) continue;  // warp-uniform
    const uint4 bv = *reinterpret_cast<const uint4*>(b_row + nt * 8 * G::kLd + col);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      mma_bf16(acc[mt][nt], r.lo[mt].x, r.hi[mt].x, r.lo[mt].y, r.hi[mt].y, bv.x, bv.y);
      mma_bf16(acc[mt][nt], r.lo[mt].z, r.hi[mt].z, r.lo[mt].w, r.hi[mt].w, bv.z, bv.w);
    }
  }
}

// Called by the whole block (it holds barriers); warps with live false only help stage B. A, B, ld,
// rows and acc as for warp_gemm; `stage`: kStageBytes of shared memory. The weights go through a
// register ring of D + 1 K steps: step i is computed while steps i+1 .. i+D are in flight.
template <int D>
__device__ __forceinline__ void block_gemm_staged(const __nv_bfloat16* const (&a)[2], bool live, const __nv_bfloat16* b,
                                                  int ld, int K, int rows, __nv_bfloat16* stage,
                                                  float (&acc)[2][kNTiles][4]) {
  constexpr int R = D + 1;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const char* a_lo[2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
    a_lo[mt] = reinterpret_cast<const char*>(a[mt] + static_cast<std::size_t>(g) * ld + 8 * t);
  const std::size_t a_hi_off = static_cast<std::size_t>(8) * ld * 2;
  const int ntiles = (rows + 7) / 8, nk = K / 32;
  const __nv_bfloat16* b_row = stage + g * geom32::kLd + 8 * t;

  auto stage_tile = [&](int j) {
    if (j * kStageSteps < nk)
      stage_b_tile<geom32>(stage + (j & 1) * kStageTile, b, ld, rows, ntiles * 8, j * kStageK,
                           min(kStageK, K - j * kStageK));
    cp_async_commit();  // always: at a tile's start, its group is the only one pending
  };

  stage_tile(0);
  a_step ring[R];
  if (live) {
#pragma unroll
    for (int s = 0; s < D; ++s)
      if (s < nk) load_a_step(a_lo, a_hi_off, s, ring[s]);
  }
  for (int i0 = 0; i0 < nk; i0 += R) {
#pragma unroll
    for (int j = 0; j < R; ++j) {  // ring slots by constant index: the ring stays in registers
      const int i = i0 + j;
      if (i >= nk) break;  // block-uniform
      if ((i & (kStageSteps - 1)) == 0) {
        // A tile starts: wait for it, and let every warp finish the previous tile before its buffer
        // is refilled with the next one.
        cp_async_wait<0>();
        __syncthreads();
        stage_tile(i / kStageSteps + 1);
      }
      if (live) {  // warp-uniform
        if (i + D < nk) load_a_step(a_lo, a_hi_off, i + D, ring[(j + D) % R]);
        mma_step<geom32>(ring[j], b_row + ((i / kStageSteps) & 1) * kStageTile, i, ntiles, acc);
      }
    }
  }
  __syncthreads();  // every warp is done with the tiles before the next item restages them
}

// The tiled path (grouped_swiglu_layout::tiled). Each 16-row tile of a weight matrix is stored as its K
// steps one after another, 1 KiB each, in the order the threads take them: the 16 bytes of lane l = 4g + t
// at l * 16 (row g, elements 8t .. 8t+7) and at 512 + l * 16 (row g + 8). A warp's weights for D K steps
// are two contiguous ranges (one per A tile), so one elected lane moves them with two bulk copies (TMA)
// into the warp's ring in shared memory, completing on an mbarrier; the lanes read their pieces back with
// consecutive, conflict-free LDS.128. No register holds a weight in flight, so the ring can keep R copies
// (more bytes than the register ring) in flight per warp. The waits on the mbarriers have no deadline, like
// cp.async's: a bulk copy either lands or faults the kernel (prep has checked the pointers for null and
// alignment only). The tokens are staged
// per block exactly as on the staged path, and the mmas run in the same order: the same sums, bit for bit.
constexpr int kTiledStepBytes = 1024;

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(std::uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}
// Arrives (the barrier's one arrival per phase) and announces `bytes` of bulk copies for this phase.
__device__ __forceinline__ void mbar_arrive_expect(std::uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(std::uint64_t* bar, unsigned parity) {
  unsigned done;
  asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
               : "=r"(done)
               : "r"(smem_addr(bar)), "r"(parity)
               : "memory");
  return done != 0;
}
// Global -> this block's shared memory, `bytes` (a multiple of 16) counted on `bar` when they land.
__device__ __forceinline__ void bulk_copy(void* smem, const void* gmem, unsigned bytes, std::uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(smem)),
      "l"(gmem), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
// Orders this thread's earlier shared-memory reads (made visible to it by __syncwarp) before bulk copies
// it issues next into the same bytes.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Shared memory of the tiled path: the token tiles (room for either chunk size, so that every tiled kernel has
// the same layout), then per warp a ring of R slots of 2 A tiles x D K steps, then per warp R mbarriers.
constexpr int kTiledStageArea = geom32::kBytes > geom64::kBytes ? geom32::kBytes : geom64::kBytes;
template <int D, int R>
__host__ __device__ constexpr int tiled_bars_offset() {
  return kTiledStageArea + kWarps * R * 2 * D * kTiledStepBytes;
}
template <int D, int R>
__host__ __device__ constexpr int tiled_smem_bytes() {
  return tiled_bars_offset<D, R>() + kWarps * R * 8;
}

// Called by the whole block; warps with live false only help stage B. `a`: the warp's two A tiles in the
// tiled layout; B, ld, K, rows and acc as for block_gemm_staged. `ring` and `bars`: this warp's; `uses`:
// copies this warp has waited for so far (slot = uses % R, phase parity = (uses / R) & 1), kept across
// work items. Every copy issued here is waited for here, so the ring is idle between items.
template <int D, int R, class G>
__device__ __forceinline__ void block_gemm_tiled(const char* const (&a)[2], bool live, const __nv_bfloat16* b, int ld,
                                                 int K, int rows, __nv_bfloat16* stage, char* ring, std::uint64_t* bars,
                                                 unsigned& uses, float (&acc)[2][G::kNT][4]) {
  static_assert(G::kSteps % D == 0, "a copy never straddles two token tiles");
  constexpr int kSlotBytes = 2 * D * kTiledStepBytes;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int ntiles = (rows + 7) / 8, nk = K / 32, ncopies = (nk + D - 1) / D;
  const __nv_bfloat16* b_row = stage + g * G::kLd + 8 * t;

  auto stage_tile = [&](int j) {
    if (j * G::kSteps < nk)
      stage_b_tile<G>(stage + (j & 1) * G::kTile, b, ld, rows, ntiles * 8, j * G::kK, min(G::kK, K - j * G::kK));
    cp_async_commit();  // always: at a tile's start, its group is the only one pending
  };
  auto issue = [&](int c) {  // one lane: copy c (K steps c*D ..) into its slot
    const unsigned slot = (uses + c) % R;
    const unsigned bytes = static_cast<unsigned>(min(D, nk - c * D)) * kTiledStepBytes;
    char* dst = ring + slot * kSlotBytes;
    const std::size_t src = static_cast<std::size_t>(c) * D * kTiledStepBytes;
    mbar_arrive_expect(bars + slot, 2 * bytes);
    bulk_copy(dst, a[0] + src, bytes, bars + slot);
    bulk_copy(dst + D * kTiledStepBytes, a[1] + src, bytes, bars + slot);
  };

  stage_tile(0);
  if (live && lane == 0) {
    // The slots were last read by the lanes (generic proxy) in this warp's previous item, ordered before this by
    // that item's closing __syncthreads; order those reads before the bulk copies (async proxy) too.
    fence_proxy_async();
    for (int c = 0; c < R && c < ncopies; ++c) issue(c);
  }
  for (int c = 0; c < ncopies; ++c) {
    const int i0 = c * D;
    if ((i0 & (G::kSteps - 1)) == 0) {
      // A token tile starts: wait for it, and let every warp finish the previous tile before its buffer
      // is refilled with the next one.
      cp_async_wait<0>();
      __syncthreads();
      stage_tile(i0 / G::kSteps + 1);
    }
    if (!live) continue;  // warp-uniform
    const unsigned u = uses + c, slot = u % R;
    while (!mbar_try_wait(bars + slot, (u / R) & 1)) {
    }
    const char* piece = ring + slot * kSlotBytes + lane * 16;
    a_step s[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const char* p = piece + (mt * D + d) * kTiledStepBytes;
        s[d].lo[mt] = *reinterpret_cast<const uint4*>(p);
        s[d].hi[mt] = *reinterpret_cast<const uint4*>(p + 512);
      }
    }
    const __nv_bfloat16* tile = b_row + ((i0 / G::kSteps) & 1) * G::kTile;
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (i0 + d < nk) mma_step<G>(s[d], tile, i0 + d, ntiles, acc);
    if (c + R < ncopies) {
      __syncwarp();  // every lane has read the slot (its values are in registers)
      if (lane == 0) {
        fence_proxy_async();
        issue(c + R);
      }
    }
  }
  if (live) uses += static_cast<unsigned>(ncopies);
  __syncthreads();  // every warp is done with the token tiles before the next item restages them
}

// Which product a kernel runs (template argument of the GEMM kernels).
enum b_mode : int {
  kBPerWarp = 0,  // register path or cp.async ring: every warp loads its own token fragments
  kBStaged = 1,   // block_gemm_staged
  kBAuto = 2,     // staged when the call's mean rows per active expert >= kparams::staged_from_rows
  kBTiled = 3,    // block_gemm_tiled (weights in the tiled layout); U = K steps per copy, S = copies in flight
};

// Register budget (ptxas, no spills): the staged path with 2 steps in flight fits 128 registers (4 blocks
// per SM), with 3 steps 166; the auto kernels hold the register path and the staged one: 168.
template <int U, int B>
constexpr int min_blocks() {
  return B == kBAuto || B == kBTiled || (B == kBStaged && U >= 3) ? 3 : kBlocksPerSm;
}

// The token-tile geometry of a kernel with NT n-tiles per chunk.
template <int NT>
using geom_of = std::conditional_t<NT == 8, geom64, geom32>;

// One work item's product, the same for both products (K = ld: the rows of A and B are contiguous). The staged
// and tiled paths are called by the whole block (warps with live false only help stage B); the per-warp paths by
// live warps only.
template <int U, int S, int B, int NT>
__device__ __forceinline__ void item_product(const __nv_bfloat16* const (&a)[2], bool live, bool staged,
                                             const __nv_bfloat16* b, int K, int rows, uint4* s_ring, int warp,
                                             unsigned& uses, float (&acc)[2][NT][4]) {
  static_assert(NT == kNTiles || B == kBTiled, "64-row chunks only on the tiled path");
  if constexpr (B == kBTiled) {
    using G = geom_of<NT>;
    auto* smem = reinterpret_cast<char*>(s_ring);
    const char* at[2] = {reinterpret_cast<const char*>(a[0]), reinterpret_cast<const char*>(a[1])};
    block_gemm_tiled<U, S, G>(at, live, b, K, K, rows, reinterpret_cast<__nv_bfloat16*>(smem),
                              smem + kTiledStageArea + warp * S * 2 * U * kTiledStepBytes,
                              reinterpret_cast<std::uint64_t*>(smem + tiled_bars_offset<U, S>()) + warp * S, uses, acc);
  } else if constexpr (B != kBPerWarp) {
    if (staged)
      block_gemm_staged<U>(a, live, b, K, K, rows, reinterpret_cast<__nv_bfloat16*>(s_ring), acc);
    else
      warp_gemm<2, U>(a, b, K, K, rows, acc);
  } else {
    warp_product<U, S>(a, b, K, K, rows, s_ring + warp * (S * kSlots * 32), acc);
  }
}

__device__ __forceinline__ bool use_staged(int mode, const kparams& p, int n_active) {
  return mode == kBStaged || mode == kBTiled ||
         (mode == kBAuto &&
          static_cast<long long>(p.hdr->rows) >= static_cast<long long>(p.staged_from_rows) * n_active);
}

struct work_item {
  active_entry e;
  int row0, rows, tile;
  int chunk;  // index of the item's chunk over all active experts (prefix order)
};

// Item w of (active expert, tile, chunk of CR rows), in that order: neighbouring blocks share an expert (its
// activations stay in L2) and, for long groups, the same weight tile (its re-reads hit L2).
template <int CR>
__device__ __forceinline__ work_item find_item(long long w, int tiles, const std::int32_t* prefix, int n_active,
                                               const active_entry* entries) {
  int lo = 0, hi = n_active - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (static_cast<long long>(prefix[mid]) * tiles <= w)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int chunks = prefix[lo + 1] - prefix[lo];
  const int rem = static_cast<int>(w - static_cast<long long>(prefix[lo]) * tiles);
  work_item it;
  it.e = entries[lo];
  it.tile = rem / chunks;
  it.row0 = it.e.begin + (rem % chunks) * CR;
  it.rows = min(CR, it.e.end - it.row0);
  it.chunk = prefix[lo] + rem % chunks;
  return it;
}

// The tiled path: each warp's lane 0 initialises the warp's S mbarriers (one arrival per phase); the
// __syncthreads in setup_items (fused_items: its first) publishes them before any copy is issued.
template <int U, int S, int B>
__device__ __forceinline__ void init_tiled(uint4* s_ring) {
  if constexpr (B == kBTiled) {
    if ((threadIdx.x & 31) == 0) {
      auto* bars = reinterpret_cast<std::uint64_t*>(reinterpret_cast<char*>(s_ring) + tiled_bars_offset<U, S>()) +
                   (threadIdx.x >> 5) * S;
      for (int r = 0; r < S; ++r) mbar_init(bars + r);
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
  }
}

// The prefix of NT * 8-row chunks, copied into shared memory when it fits (visible after the caller's next
// __syncthreads); returns where to search it.
template <int NT>
__device__ __forceinline__ const std::int32_t* load_prefix(const kparams& p, int n_active, std::int32_t* s_prefix) {
  const std::int32_t* prefix = NT == 8 ? p.prefix64 : p.prefix;
  if (n_active <= kSmemExperts) {
    for (int i = threadIdx.x; i <= n_active; i += blockDim.x) s_prefix[i] = prefix[i];
    prefix = s_prefix;
  }
  return prefix;
}

// Loads the header and (when it fits) the prefix of NT * 8-row chunks into shared memory. False: no work here.
template <int NT>
__device__ __forceinline__ bool setup_items(const kparams& p, int tiles, std::int32_t* s_prefix, int& n_active,
                                            long long& total, const std::int32_t*& prefix) {
  n_active = p.hdr->n_active;
  total = static_cast<long long>(NT == 8 ? p.hdr->total_chunks64 : p.hdr->total_chunks) * tiles;
  if (blockIdx.x >= total) return false;  // whole block: uniform
  prefix = load_prefix<NT>(p, n_active, s_prefix);
  __syncthreads();
  return true;
}

// Programmatic dependent launch (pdl.cuh). The GEMM kernels are launched with programmatic stream serialization,
// so each may start while the kernel before it (prep, or the other kernel of the pair, or gate/up) still runs;
// before reading anything that kernel wrote, every thread waits for it to complete and flush (pdl_enter). The
// wait is transitive (the kernel before waited for its own predecessor before completing), and every thread of
// every GEMM kernel passes it before it exits. Then it lets the next kernel launch: its blocks become resident as
// this kernel's blocks retire, so the launch latency between the kernels is hidden. Prep's is a plain launch: it
// waits for whatever the stream held before.

// ---- kernels --------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kPrepThreads) prep_kernel(kparams p) {
  pdl_release();  // gate/up may launch; it waits for prep
  __shared__ std::int32_t s_scan[3][32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;

  bool bad_offsets = false, bad_weights = false;
  if (tid == 0) bad_offsets = p.offsets[0] < 0 || p.offsets[p.experts] > p.max_rows;
  for (int e = tid; e < p.experts; e += blockDim.x) {
    const int b = p.offsets[e], en = p.offsets[e + 1];
    if (en < b) {
      bad_offsets = true;
    } else if (en > b) {
      const void* w[3] = {p.gate[e], p.up[e], p.down[e]};
      for (const void* q : w)
        if (q == nullptr || (reinterpret_cast<std::uintptr_t>(q) & 15) != 0) bad_weights = true;
    }
  }
  const bool any_bad_offsets = __syncthreads_or(bad_offsets) != 0;
  const bool any_bad_weights = __syncthreads_or(bad_weights) != 0;
  if (any_bad_offsets || any_bad_weights) {
    if (tid == 0) {
      const std::uint32_t bits =
          (any_bad_offsets ? kGroupedSwigluBadOffsets : 0u) | (any_bad_weights ? kGroupedSwigluBadWeights : 0u);
      *p.hdr = ws_header{0, 0, bits, 0, 0, 0};
      if (p.error != nullptr) atomicOr(p.error, bits);
    }
    return;
  }

  // Exclusive scans of (active, 32-row chunks, 64-row chunks) over the experts, one block-wide pass per
  // blockDim experts.
  int carry[3] = {0, 0, 0};
  for (int base = 0; base < p.experts; base += blockDim.x) {
    const int e = base + tid;
    int b = 0, m = 0;
    if (e < p.experts) {
      b = p.offsets[e];
      m = p.offsets[e + 1] - b;
    }
    const int mine[3] = {m > 0 ? 1 : 0, (m + 31) / 32, (m + 63) / 64};
    int incl[3] = {mine[0], mine[1], mine[2]};
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
#pragma unroll
      for (int q = 0; q < 3; ++q) {
        const int v = __shfl_up_sync(0xffffffffu, incl[q], o);
        if (lane >= o) incl[q] += v;
      }
    }
    if (lane == 31)
      for (int q = 0; q < 3; ++q) s_scan[q][warp] = incl[q];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int q = 0; q < 3; ++q) {
        int w = lane < nwarps ? s_scan[q][lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int v = __shfl_up_sync(0xffffffffu, w, o);
          if (lane >= o) w += v;
        }
        if (lane < nwarps) s_scan[q][lane] = w;
      }
    }
    __syncthreads();
    int excl[3];
#pragma unroll
    for (int q = 0; q < 3; ++q) excl[q] = carry[q] + (warp > 0 ? s_scan[q][warp - 1] : 0) + incl[q] - mine[q];
    if (mine[0] != 0) {
      const int pos = excl[0];
      p.entries[pos] = active_entry{static_cast<const __nv_bfloat16*>(p.gate[e]),
                                    static_cast<const __nv_bfloat16*>(p.up[e]),
                                    static_cast<const __nv_bfloat16*>(p.down[e]),
                                    b,
                                    b + m,
                                    e,
                                    0};
      p.prefix[pos] = excl[1];
      p.prefix64[pos] = excl[2];
    }
#pragma unroll
    for (int q = 0; q < 3; ++q) carry[q] += s_scan[q][nwarps - 1];
    __syncthreads();  // s_scan is rewritten by the next pass
  }
  // The fused kernels' per-chunk counters, for the chunks this call has (32-row ones; 64-row ones are fewer).
  for (int c = tid; c < carry[1]; c += blockDim.x) p.ready[c] = 0;
  if (tid == 0) {
    p.prefix[carry[0]] = carry[1];
    p.prefix64[carry[0]] = carry[2];
    *p.hdr = ws_header{carry[0], carry[1], 0, p.offsets[p.experts] - p.offsets[0], carry[2], 0};
  }
}

// One gate/up work item: h[rows, 64 features] = silu(gate · x) * (up · x). Called by the whole block on the
// staged and tiled paths, by every warp on the per-warp paths (dead warps return at once there).
template <int U, int S, int B, int NT>
__device__ __forceinline__ void gate_up_item(const kparams& p, const work_item& it, bool staged, uint4* s_ring,
                                             unsigned& uses) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int f0 = it.tile * kGateUpFeatures + warp * 16;
  const bool live = f0 < p.inter;
  if (!live && !staged) return;  // the staged and tiled paths need every warp at their barriers
  const std::size_t woff = static_cast<std::size_t>(live ? f0 : 0) * p.hidden;
  const __nv_bfloat16* a[2] = {it.e.gate + woff, it.e.up + woff};
  float acc[2][NT][4] = {};
  const __nv_bfloat16* b = p.x + static_cast<std::size_t>(it.row0) * p.hidden;
  item_product<U, S, B, NT>(a, live, staged, b, p.hidden, it.rows, s_ring, warp, uses, acc);
  if (!live) return;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = nt * 8 + 2 * t + (i & 1);
      if (tok >= it.rows) continue;
      const float gv = acc[0][nt][i], uv = acc[1][nt][i];
      const float hv = gv / (1.0f + __expf(-gv)) * uv;
      p.h[static_cast<std::size_t>(it.row0 + tok) * p.inter + f0 + g + 8 * (i >> 1)] = __float2bfloat16_rn(hv);
    }
  }
}

// One down work item: y[rows, 128 features] = w_r * (down · h_r). Called as gate_up_item.
template <int U, int S, int B, int NT>
__device__ __forceinline__ void down_item(const kparams& p, const work_item& it, bool staged, uint4* s_ring,
                                          unsigned& uses) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int f0 = it.tile * kDownFeatures + warp * 32;
  const bool live = f0 < p.hidden;
  if (!live && !staged) return;
  const int fa = live ? f0 : 0;
  const __nv_bfloat16* a[2] = {it.e.down + static_cast<std::size_t>(fa) * p.inter,
                               it.e.down + static_cast<std::size_t>(fa + 16) * p.inter};
  float acc[2][NT][4] = {};
  const __nv_bfloat16* b = p.h + static_cast<std::size_t>(it.row0) * p.inter;
  item_product<U, S, B, NT>(a, live, staged, b, p.inter, it.rows, s_ring, warp, uses, acc);
  if (!live) return;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int tok = nt * 8 + 2 * t + j;
      if (tok >= it.rows) continue;
      const int row = it.row0 + tok;
      const float scale = p.row_weight != nullptr ? p.row_weight[row] : 1.0f;
      float* yr = p.y + static_cast<std::size_t>(row) * p.hidden + f0 + g;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        yr[mt * 16] = acc[mt][nt][j] * scale;
        yr[mt * 16 + 8] = acc[mt][nt][2 + j] * scale;
      }
    }
  }
}

// The work items of one product (gate/up or down) with NT n-tiles (8 rows each) per item, walked with the
// grid's stride.
template <bool DOWN, int U, int S, int B, int NT>
__device__ __forceinline__ void product_items(const kparams& p, std::int32_t* s_prefix, uint4* s_ring,
                                              unsigned& uses) {
  const int tiles = DOWN ? (p.hidden + kDownFeatures - 1) / kDownFeatures
                         : (p.inter + kGateUpFeatures - 1) / kGateUpFeatures;
  int n_active;
  long long total;
  const std::int32_t* prefix;
  if (!setup_items<NT>(p, tiles, s_prefix, n_active, total, prefix)) return;
  const bool staged = use_staged(B, p, n_active);  // grid-uniform
  for (long long w = blockIdx.x; w < total; w += gridDim.x) {
    const work_item it = find_item<8 * NT>(w, tiles, prefix, n_active, p.entries);
    if constexpr (DOWN)
      down_item<U, S, B, NT>(p, it, staged, s_ring, uses);
    else
      gate_up_item<U, S, B, NT>(p, it, staged, s_ring, uses);
  }
}

// Both products in one kernel (the tiled path's default): the blocks claim work items one at a time from a queue
// in the workspace (zeroed by prep), all gate/up items first, then all down items, each in find_item's order. A
// finished gate/up item counts itself on its chunk (release); a down item first waits (acquire) until its chunk's
// count is the gate/up tile count, i.e. the chunk's h is complete. No wait can deadlock: a down item is claimed
// only after every gate/up item has been claimed, and a claimed gate/up item is being computed by a running block
// that waits for nothing; so, like the mbarrier waits, this wait has no deadline. Waits are rare: the first down
// items belong to the first experts, whose gate/up items were claimed first. There is no kernel boundary between
// the products, and no tail per product: a block that finishes early takes the next item, of either product.
template <int U, int S, int NT>
__device__ __forceinline__ void fused_items(const kparams& p, std::int32_t* s_prefix, uint4* s_ring, unsigned& uses) {
  __shared__ std::uint32_t s_item;
  const int tiles_gu = (p.inter + kGateUpFeatures - 1) / kGateUpFeatures;
  const int tiles_dn = (p.hidden + kDownFeatures - 1) / kDownFeatures;
  const int n_active = p.hdr->n_active;
  const long long chunks = NT == 8 ? p.hdr->total_chunks64 : p.hdr->total_chunks;
  const long long total_gu = chunks * tiles_gu, total = total_gu + chunks * tiles_dn;
  const std::int32_t* prefix = load_prefix<NT>(p, n_active, s_prefix);
  for (;;) {
    __syncthreads();  // s_prefix is loaded; every thread has read the previous s_item
    if (threadIdx.x == 0) s_item = atomicAdd(&p.hdr->next_item, 1u);
    __syncthreads();
    const long long w = s_item;
    if (w >= total) return;  // block-uniform
    if (w < total_gu) {
      const work_item it = find_item<8 * NT>(w, tiles_gu, prefix, n_active, p.entries);
      gate_up_item<U, S, kBTiled, NT>(p, it, true, s_ring, uses);
      __syncthreads();  // every warp's h stores are done
      if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(p.ready + it.chunk, 1);
      }
    } else {
      const work_item it = find_item<8 * NT>(w - total_gu, tiles_dn, prefix, n_active, p.entries);
      if (threadIdx.x == 0) {
        const std::int32_t* r = p.ready + it.chunk;
        for (;;) {
          std::int32_t v;
          asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(r) : "memory");
          if (v >= tiles_gu) break;
          __nanosleep(100);
        }
      }
      __syncthreads();  // the chunk's h is visible to the whole block (cp.async.cg reads it from L2)
      down_item<U, S, kBTiled, NT>(p, it, true, s_ring, uses);
    }
  }
}

// The tiled path's pick between 64- and 32-row items: 64 when the call's rows are at least
// p.tiled64_from_rows per active expert (prep's header). Both kernels are launched; the other one returns at
// once. (One kernel holding both paths measured 3-5 % slower on the 32-row one: 168 registers instead of 120.)
__device__ __forceinline__ bool use_64_rows(const kparams& p) {
  return static_cast<long long>(p.hdr->rows) >= static_cast<long long>(p.tiled64_from_rows) * p.hdr->n_active;
}

// The GEMM kernels: PHASE 0 gate/up, 1 down, 2 both (fused_items; tiled path only).
template <int PHASE, int U, int S, int B, int NT = kNTiles, bool PICKED = false>
__global__ void __launch_bounds__(kThreads, min_blocks<U, B>()) product_kernel(kparams p) {
  static_assert(!PICKED || B == kBTiled);
  static_assert(PHASE != 2 || B == kBTiled);
  __shared__ std::int32_t s_prefix[kSmemExperts + 1];
  extern __shared__ uint4 s_ring[];
  unsigned uses = 0;  // the tiled path's copies waited for (per warp)
  init_tiled<U, S, B>(s_ring);  // shared memory only: may run before the previous kernel is done
  pdl_enter();
  if constexpr (PICKED)
    if (use_64_rows(p) != (NT == 8)) return;  // grid-uniform: the other kernel of the pair runs
  if constexpr (PHASE == 2)
    fused_items<U, S, NT>(p, s_prefix, s_ring, uses);
  else
    product_items<PHASE == 1, U, S, B, NT>(p, s_prefix, s_ring, uses);
}

// dst = src [rows, cols] in the tiled layout; one thread per 16-byte piece of dst.
__global__ void tile_kernel(const uint4* src, uint4* dst, std::uint32_t rows, std::uint32_t cols) {
  const std::size_t pieces = static_cast<std::size_t>(rows) * cols / 8;
  for (std::size_t q = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; q < pieces;
       q += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::size_t block = q / 64, steps = cols / 32;
    const int in = static_cast<int>(q % 64), half = in / 32, lane = in % 32;
    const std::size_t row = block / steps * 16 + half * 8 + lane / 4, col = block % steps * 32 + (lane % 4) * 8;
    dst[q] = src[(row * cols + col) / 8];
  }
}

__global__ void pointers_kernel(const char* base, std::size_t stride, std::uint32_t n, const void** out) {
  for (std::uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x)
    out[e] = base + e * stride;
}

// ---- host side ------------------------------------------------------------------------------------

status fail(status s, int line, const std::string& what) noexcept {
  return ::eaas::detail::record_failure(s, __FILE__, line, what);
}

status cuda_fail(cudaError_t e, int line, const char* what) noexcept {
  try {
    return fail(status::internal_error, line, std::string("grouped_swiglu: ") + what + ": " + cudaGetErrorString(e));
  } catch (...) {
    return status::internal_error;
  }
}

#define GG_CUDA(x)                                                                         \
  do {                                                                                     \
    if (const cudaError_t e_ = (x); e_ != cudaSuccess) return cuda_fail(e_, __LINE__, #x); \
  } while (0)

#define GG_INVALID(cond, msg)                                                          \
  do {                                                                                 \
    if (cond) return fail(status::invalid_argument, __LINE__, "grouped_swiglu: " msg); \
  } while (0)

// The kernel variants (grouped_swiglu_tuning's stages / k_unroll / staged / staged_from_rows, or with tiled weights
// its tiled_* fields, pick one).
struct variant {
  void (*gate_up)(kparams);  // with down null: both products (fused_items)
  void (*down)(kparams);
  int smem;    // dynamic shared memory (the cp.async ring, the staged token tiles)
  int per_sm;  // blocks per SM without tuning::ctas_per_sm; 0 = all that fit
  // The other kernels of a picked pair (each launched right after its partner; one of the two returns at once),
  // with their own shared memory and grid.
  void (*gate_up_alt)(kparams) = nullptr;
  void (*down_alt)(kparams) = nullptr;
  int smem_alt = 0;
};
constexpr int kVariants = 16;
const variant kVariantTable[kVariants] = {
    {product_kernel<0, 2, 0, kBPerWarp>, product_kernel<1, 2, 0, kBPerWarp>, 0,
     kDefaultRegisterBlocksPerSm},  // registers x2
    {product_kernel<0, 4, 0, kBPerWarp>, product_kernel<1, 4, 0, kBPerWarp>, 0,
     kDefaultRegisterBlocksPerSm},  // registers x4
    {product_kernel<0, 0, 3, kBPerWarp>, product_kernel<1, 0, 3, kBPerWarp>, ring_bytes<3>(),
     0},  // cp.async ring of 3 steps
    {product_kernel<0, 0, 4, kBPerWarp>, product_kernel<1, 0, 4, kBPerWarp>, ring_bytes<4>(), 0},  // 4 steps
    {product_kernel<0, 0, 6, kBPerWarp>, product_kernel<1, 0, 6, kBPerWarp>, ring_bytes<6>(), 0},  // 6 steps
    {product_kernel<0, 2, 0, kBStaged>, product_kernel<1, 2, 0, kBStaged>, kStageBytes,
     0},  // staged, 2 steps in flight
    {product_kernel<0, 3, 0, kBStaged>, product_kernel<1, 3, 0, kBStaged>, kStageBytes,
     0},  // staged, 3 steps in flight
    // The device picks registers x2 or staged with 2 steps in flight; 3 blocks per SM (its registers).
    {product_kernel<0, 2, 0, kBAuto>, product_kernel<1, 2, 0, kBAuto>, kStageBytes, kDefaultRegisterBlocksPerSm},
    // Tiled weights, both products in one kernel, the rows per item picked on the device: the default. 32- and
    // 64-row items, each with 1 K step per copy and 4 copies in flight (3 blocks per SM). Measured on an H200
    // (2026-11-29, eaas-grouped-gemm-bench --sweep, one kernel): 1 x 4 beat 2 x 3 by 1 % at 32 rows (Qwen3 64-256
    // tokens, DeepSeek-V3 32 and 128) and by 19 % at 64 rows (Qwen3 512 tokens: 373 vs 459 us).
    {product_kernel<2, 1, 4, kBTiled, kNTiles, true>, nullptr, tiled_smem_bytes<1, 4>(), 0,
     product_kernel<2, 1, 4, kBTiled, 8, true>, nullptr, tiled_smem_bytes<1, 4>()},
    // The same pair with gate/up and down as separate kernels (tuning::tiled_two_kernels).
    {product_kernel<0, 1, 4, kBTiled, kNTiles, true>, product_kernel<1, 1, 4, kBTiled, kNTiles, true>,
     tiled_smem_bytes<1, 4>(), 0, product_kernel<0, 1, 4, kBTiled, 8, true>,
     product_kernel<1, 1, 4, kBTiled, 8, true>, tiled_smem_bytes<1, 4>()},
    // Tiled, fixed (one kernel): K steps per copy x copies in flight, 32-row items.
    {product_kernel<2, 2, 4, kBTiled>, nullptr, tiled_smem_bytes<2, 4>(), 0},
    {product_kernel<2, 1, 8, kBTiled>, nullptr, tiled_smem_bytes<1, 8>(), 0},
    {product_kernel<2, 2, 3, kBTiled>, nullptr, tiled_smem_bytes<2, 3>(), 0},
    {product_kernel<2, 1, 4, kBTiled>, nullptr, tiled_smem_bytes<1, 4>(), 0},
    // The same with 64-row work items (each expert's weights read once for up to 64 of its rows).
    {product_kernel<2, 2, 3, kBTiled, 8>, nullptr, tiled_smem_bytes<2, 3>(), 0},
    {product_kernel<2, 1, 4, kBTiled, 8>, nullptr, tiled_smem_bytes<1, 4>(), 0},
};
struct tiled_variant {
  int steps, depth, rows;  // all 0: the default pair, rows picked on the device
  int two_kernels;
};
constexpr int kTiledVariant = 8;  // the first; the default
constexpr tiled_variant kTiledVariants[kVariants - kTiledVariant] = {
    {0, 0, 0, 0},  {0, 0, 0, 1},  {2, 4, 32, 0}, {1, 8, 32, 0},
    {2, 3, 32, 0}, {1, 4, 32, 0}, {2, 3, 64, 0}, {1, 4, 64, 0}};
// The default's pick: 64-row items from this many rows per active expert. Measured on an H200 (2026-11-29,
// eaas-grouped-gemm-bench --sweep, Qwen3-30B-A3B, one kernel, 1 x 4): 32-row items won at 16 rows per expert
// (332 vs 348 us at 256 tokens), 64-row items at 32 (373 vs 433 us at 512 tokens).
constexpr int kTiled64FromRows = 24;
constexpr int kStagedVariant = 5;  // + 1 for 3 steps in flight
// The default: staged with 3 steps in flight, the fastest variant at every point of the H200 sweep of
// 2026-11-28 (eaas-grouped-gemm-bench --sweep; Qwen3-30B-A3B 512 tokens 557 vs 643 us for registers x2,
// DeepSeek-V3 128 tokens 6567 vs 7441 us; docs/PERF.md).
constexpr int kDefaultVariant = kStagedVariant + 1;
constexpr int kAutoVariant = 7;

int variant_index(const grouped_swiglu_tuning& t, bool tiled) {
  if (tiled) {
    if (t.stages != 0 || t.k_unroll != 0 || t.staged != 0 || t.staged_from_rows != 0) return -1;
    for (int v = 0; v < kVariants - kTiledVariant; ++v)
      if (static_cast<int>(t.tiled_steps) == kTiledVariants[v].steps &&
          static_cast<int>(t.tiled_depth) == kTiledVariants[v].depth &&
          static_cast<int>(t.tiled_rows) == kTiledVariants[v].rows &&
          static_cast<int>(t.tiled_two_kernels) == kTiledVariants[v].two_kernels)
        return kTiledVariant + v;
    return -1;
  }
  if (t.tiled_steps != 0 || t.tiled_depth != 0 || t.tiled_rows != 0 || t.tiled_two_kernels != 0) return -1;
  if (t.staged_from_rows != 0)
    return t.staged == 0 && t.stages == 0 && (t.k_unroll == 0 || t.k_unroll == 2) ? kAutoVariant : -1;
  if (t.staged == 1) {
    if (t.stages > 1) return -1;
    return t.k_unroll == 0 || t.k_unroll == 2 ? kStagedVariant : t.k_unroll == 3 ? kStagedVariant + 1 : -1;
  }
  if (t.staged != 0) return -1;
  switch (t.stages) {
    case 0:
      return t.k_unroll == 0 ? kDefaultVariant : t.k_unroll == 2 ? 0 : t.k_unroll == 4 ? 1 : -1;
    case 1:
      return t.k_unroll == 0 || t.k_unroll == 2 ? 0 : t.k_unroll == 4 ? 1 : -1;
    case 3:
      return 2;
    case 4:
      return 3;
    case 6:
      return 4;
    default:
      return -1;
  }
}

// Resident blocks per SM of each GEMM kernel, per device (asked once: the shared-memory attribute must
// be set before the first launch, and occupancy queries need not be repeated; both are legal during
// stream capture).
struct device_limits {
  int sms = 0;
  bool pdl = false;  // programmatic dependent launch (pdl_supported)
  int occupancy[kVariants][4] = {};  // gate_up, gate_up_alt, down, down_alt (0 where the variant has none)
};

// A variant's kernels in launch order, with their dynamic shared memory and the products they run.
struct launch_entry {
  void (*fn)(kparams);
  int smem;
  int phase;  // as product_kernel's PHASE
};
void launch_order(const variant& k, launch_entry (&out)[4]) {
  const int first = k.down == nullptr ? 2 : 0;
  out[0] = {k.gate_up, k.smem, first};
  out[1] = {k.gate_up_alt, k.smem_alt, first};
  out[2] = {k.down, k.smem, 1};
  out[3] = {k.down_alt, k.smem_alt, 1};
}

status limits_for(int dev, device_limits& out) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> ready[kMaxDevices] = {};
  static device_limits cache[kMaxDevices];
  if (dev >= 0 && dev < kMaxDevices && ready[dev].load(std::memory_order_acquire) == 2) {
    out = cache[dev];
    return status::ok;
  }
  device_limits l;
  GG_CUDA(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, dev));
  l.pdl = pdl_supported(dev);
  for (int v = 0; v < kVariants; ++v) {
    launch_entry ks[4];
    launch_order(kVariantTable[v], ks);
    for (int f = 0; f < 4; ++f) {
      if (ks[f].fn == nullptr) continue;
      if (ks[f].smem > 0)
        GG_CUDA(cudaFuncSetAttribute(ks[f].fn, cudaFuncAttributeMaxDynamicSharedMemorySize, ks[f].smem));
      GG_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&l.occupancy[v][f], ks[f].fn, kThreads, ks[f].smem));
    }
  }
  if (dev >= 0 && dev < kMaxDevices) {
    int expected = 0;
    if (ready[dev].compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      cache[dev] = l;
      ready[dev].store(2, std::memory_order_release);
    }
  }
  out = l;
  return status::ok;
}

}  // namespace

std::size_t grouped_swiglu_workspace_bytes(const grouped_swiglu_shape& s) noexcept { return layout(s).total; }

status grouped_swiglu_check(const grouped_swiglu_shape& s, const grouped_swiglu_args& a,
                            std::size_t workspace_bytes) noexcept {
  GG_INVALID(s.experts == 0 || s.experts > kGroupedSwigluMaxExperts, "experts must be 1 .. 2^20");
  GG_INVALID(s.hidden == 0 || s.hidden % kGroupedSwigluAlign != 0, "hidden must be a nonzero multiple of 32");
  GG_INVALID(s.inter == 0 || s.inter % kGroupedSwigluAlign != 0, "inter must be a nonzero multiple of 32");
  GG_INVALID(s.max_rows == 0 || s.max_rows > (1u << 30), "max_rows must be 1 .. 2^30");
  // Every element index must fit in 63 bits (it does) and every work-item count in an int32.
  // (The fused kernels queue both products' items: the sum of the two.)
  const std::uint64_t chunks = max_chunks(s) + 1;
  const std::uint64_t tiles =
      std::uint64_t{(s.inter + kGateUpFeatures - 1) / kGateUpFeatures} + (s.hidden + kDownFeatures - 1) / kDownFeatures;
  GG_INVALID(chunks * tiles >= (1ull << 31), "shape too large (work items exceed 2^31)");
  GG_INVALID(s.hidden > (1u << 20) || s.inter > (1u << 20), "hidden and inter must be at most 2^20");
  GG_INVALID(a.x == nullptr || a.offsets == nullptr || a.gate == nullptr || a.up == nullptr || a.down == nullptr ||
                 a.y == nullptr || a.workspace == nullptr,
             "x, offsets, gate, up, down, y and workspace must not be null");
  GG_INVALID((reinterpret_cast<std::uintptr_t>(a.x) & 15) != 0, "x must be 16-byte aligned");
  GG_INVALID((reinterpret_cast<std::uintptr_t>(a.workspace) & 15) != 0, "workspace must be 16-byte aligned");
  GG_INVALID((reinterpret_cast<std::uintptr_t>(a.y) & 3) != 0 ||
                 (reinterpret_cast<std::uintptr_t>(a.offsets) & 3) != 0 ||
                 (reinterpret_cast<std::uintptr_t>(a.row_weight) & 3) != 0,
             "y, offsets and row_weight must be 4-byte aligned");
  if (workspace_bytes < layout(s).total) {
    try {
      return fail(status::invalid_argument, __LINE__,
                  "grouped_swiglu: workspace of " + std::to_string(workspace_bytes) + " bytes, the shape needs " +
                      std::to_string(layout(s).total) + " (grouped_swiglu_workspace_bytes)");
    } catch (...) {
      return status::invalid_argument;
    }
  }
  return status::ok;
}

status grouped_swiglu(const grouped_swiglu_shape& s, const grouped_swiglu_args& a, std::size_t workspace_bytes,
                      CUstream_st* stream, const grouped_swiglu_tuning& tuning) noexcept {
  if (const status st = grouped_swiglu_check(s, a, workspace_bytes); st != status::ok) return st;
  const bool tiled = a.layout == grouped_swiglu_layout::tiled;
  GG_INVALID(!tiled && a.layout != grouped_swiglu_layout::row_major, "layout must be row_major or tiled");
  const int vi = variant_index(tuning, tiled);
  GG_INVALID(vi < 0 && tiled,
             "tuning for the tiled layout: stages, k_unroll, staged and staged_from_rows must be 0; (tiled_steps, "
             "tiled_depth, tiled_rows) one of (0, 0, 0), (2, 4, 32), (1, 8, 32), (2, 3, 32), (1, 4, 32), (2, 3, 64), "
             "(1, 4, 64); tiled_two_kernels 1 only with (0, 0, 0)");
  GG_INVALID(vi < 0,
             "tuning: stages must be 0, 1, 3, 4 or 6 and k_unroll 0, 2 or 4; staged 0 or 1 (with stages 0 or 1 and "
             "k_unroll 0, 2 or 3); staged_from_rows only with staged 0, stages 0 and k_unroll 0 or 2; tiled_steps "
             "tiled_depth, tiled_rows and tiled_two_kernels only with the tiled layout");
  const variant& kern = kVariantTable[vi];

  int dev = 0;
  GG_CUDA(cudaGetDevice(&dev));
  device_limits lim;
  if (const status st = limits_for(dev, lim); st != status::ok) return st;

  const ws_layout l = layout(s);
  auto* ws = static_cast<char*>(a.workspace);
  kparams p{};
  p.x = static_cast<const __nv_bfloat16*>(a.x);
  p.offsets = a.offsets;
  p.row_weight = a.row_weight;
  p.gate = a.gate;
  p.up = a.up;
  p.down = a.down;
  p.y = a.y;
  p.hdr = reinterpret_cast<ws_header*>(ws);
  p.entries = reinterpret_cast<active_entry*>(ws + l.entries);
  p.prefix = reinterpret_cast<std::int32_t*>(ws + l.prefix);
  p.h = reinterpret_cast<__nv_bfloat16*>(ws + l.h);
  p.error = a.error;
  p.experts = static_cast<int>(s.experts);
  p.hidden = static_cast<int>(s.hidden);
  p.inter = static_cast<int>(s.inter);
  p.max_rows = static_cast<int>(s.max_rows);
  p.staged_from_rows = static_cast<int>(std::min<std::uint32_t>(tuning.staged_from_rows, 1u << 30));
  p.tiled64_from_rows = kTiled64FromRows;
  p.prefix64 = reinterpret_cast<std::int32_t*>(ws + l.prefix64);
  p.ready = reinterpret_cast<std::int32_t*>(ws + l.ready);
  p.max_chunks = static_cast<int>(max_chunks(s));

  // Grids: as many blocks as fit the device at once (nothing relies on all being resident), never more than the
  // most work items the capacity allows.
  auto grid = [&](int occupancy, int tiles) {
    int per_sm = std::max(occupancy, 1);
    if (tuning.ctas_per_sm != 0)
      per_sm = std::min(per_sm, static_cast<int>(tuning.ctas_per_sm));
    else if (kern.per_sm != 0)
      per_sm = std::min(per_sm, kern.per_sm);
    return static_cast<unsigned>(
        std::max(1LL, std::min(static_cast<long long>(lim.sms) * per_sm, static_cast<long long>(p.max_chunks) * tiles)));
  };
  const int tiles_gu = (p.inter + kGateUpFeatures - 1) / kGateUpFeatures;
  const int tiles_dn = (p.hidden + kDownFeatures - 1) / kDownFeatures;

  prep_kernel<<<1, kPrepThreads, 0, stream>>>(p);
  GG_CUDA(cudaGetLastError());
  // The GEMM kernels in order, each allowed to launch while its predecessor runs (pdl_enter).
  launch_entry ks[4];
  launch_order(kern, ks);
  for (int f = 0; f < 4; ++f) {
    if (ks[f].fn == nullptr) continue;
    const int tiles = ks[f].phase == 0 ? tiles_gu : ks[f].phase == 1 ? tiles_dn : tiles_gu + tiles_dn;
    GG_CUDA(launch(stream, lim.pdl, ks[f].fn, dim3(grid(lim.occupancy[vi][f], tiles)), dim3(kThreads),
                   static_cast<std::size_t>(ks[f].smem), p));
  }
  return status::ok;
}

status grouped_swiglu_tile(const void* src, void* dst, std::uint32_t rows, std::uint32_t cols,
                           CUstream_st* stream) noexcept {
  GG_INVALID(src == nullptr || dst == nullptr, "tile: null pointer");
  GG_INVALID(rows == 0 || rows % 16 != 0 || cols == 0 || cols % 32 != 0,
             "tile: rows must be a nonzero multiple of 16 and cols of 32");
  const auto s0 = reinterpret_cast<std::uintptr_t>(src), d0 = reinterpret_cast<std::uintptr_t>(dst);
  const std::size_t bytes = std::size_t{rows} * cols * 2;
  GG_INVALID(s0 < d0 + bytes && d0 < s0 + bytes, "tile: src and dst overlap");
  GG_INVALID((reinterpret_cast<std::uintptr_t>(src) & 15) != 0 || (reinterpret_cast<std::uintptr_t>(dst) & 15) != 0,
             "tile: src and dst must be 16-byte aligned");
  const std::size_t pieces = std::size_t{rows} * cols / 8;
  const unsigned blocks = static_cast<unsigned>(std::min<std::size_t>((pieces + 255) / 256, 4096));
  tile_kernel<<<blocks, 256, 0, stream>>>(static_cast<const uint4*>(src), static_cast<uint4*>(dst), rows, cols);
  GG_CUDA(cudaGetLastError());
  return status::ok;
}

status grouped_swiglu_expert_pointers(const void* base, std::size_t stride_bytes, std::uint32_t experts,
                                      const void** out, CUstream_st* stream) noexcept {
  GG_INVALID(base == nullptr || out == nullptr || experts == 0, "expert_pointers: null pointer or zero experts");
  const unsigned blocks = std::min<std::uint32_t>((experts + 255) / 256, 1024);
  pointers_kernel<<<blocks, 256, 0, stream>>>(static_cast<const char*>(base), stride_bytes, experts, out);
  GG_CUDA(cudaGetLastError());
  return status::ok;
}

}  // namespace eaas::runtime::gpu
