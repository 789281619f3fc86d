// The monolithic MoE layer and forward on one GPU (moe_local.hpp).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cuda/atomic>
#include <string>
#include <vector>

#include "bf16.hpp"
#include "combine.cuh"
#include "cuda_fail.cuh"
#include "dense_gpu_detail.cuh"
#include "eaas/runtime/grouped_gemm.hpp"
#include "moe_local.hpp"
#include "pdl.cuh"

namespace eaas::runtime::gpu {
namespace {

#define EAAS_MOE_CUDA(x) EAAS_GPU_CUDA("gpu monolithic moe", x)

constexpr int kPairThreads = 256;
constexpr int kPlaceThreads = 128;
constexpr unsigned kPlaceBlocks = 2048;   // a warp per pair, walked with the grid's stride
constexpr std::uint32_t kCopyUnroll = 8;  // 16-byte vectors a lane has in flight in a row copy
constexpr int kCombineThreads = 256;

// Run by k_count's last block: offsets = exclusive scan of the rows per expert (count, or max(count, 1) with
// padding), offsets[experts] = the total; the compacted list of active experts and its length; with padding,
// the padding row of each empty expert (zeros, weight 0). Passes of blockDim experts, with a carry. Each count is
// read from L2 (the other blocks' atomics) and zeroed once read, ready for the next layer's k_count (the buffer
// starts zeroed).
__device__ void scan_groups(std::int32_t* counts, std::uint32_t experts, int pad, std::int32_t* offsets,
                            float* row_weight, __nv_bfloat16* x, std::uint32_t hidden, std::int32_t* n_active,
                            std::int32_t* active) {
  __shared__ std::int32_t s_warp[2][32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  std::int32_t carry_rows = 0, carry_active = 0;
  for (std::uint32_t base = 0; base < experts; base += blockDim.x) {
    const std::uint32_t e = base + tid;
    const bool in = e < experts;
    const std::int32_t c = in ? __ldcg(counts + e) : 0;
    if (in && c != 0) counts[e] = 0;
    const std::int32_t act = c > 0 ? 1 : 0;
    const std::int32_t rows = pad && in && c == 0 ? 1 : c;
    std::int32_t ir = rows, ia = act;  // inclusive scans within the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const std::int32_t vr = __shfl_up_sync(0xffffffffu, ir, o), va = __shfl_up_sync(0xffffffffu, ia, o);
      if (lane >= o) {
        ir += vr;
        ia += va;
      }
    }
    if (lane == 31) {
      s_warp[0][warp] = ir;
      s_warp[1][warp] = ia;
    }
    __syncthreads();
    if (warp == 0) {
      std::int32_t wr = lane < nwarps ? s_warp[0][lane] : 0, wa = lane < nwarps ? s_warp[1][lane] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const std::int32_t vr = __shfl_up_sync(0xffffffffu, wr, o), va = __shfl_up_sync(0xffffffffu, wa, o);
        if (lane >= o) {
          wr += vr;
          wa += va;
        }
      }
      if (lane < nwarps) {
        s_warp[0][lane] = wr;
        s_warp[1][lane] = wa;
      }
    }
    __syncthreads();
    const std::int32_t row0 = carry_rows + (warp > 0 ? s_warp[0][warp - 1] : 0) + ir - rows;
    const std::int32_t pos = carry_active + (warp > 0 ? s_warp[1][warp - 1] : 0) + ia - act;
    if (in) {
      offsets[e] = row0;
      if (act != 0) {
        active[pos] = static_cast<std::int32_t>(e);
      } else if (pad) {
        row_weight[row0] = 0.0f;
        auto* xr = reinterpret_cast<uint4*>(x + std::size_t(row0) * hidden);
        for (std::uint32_t j = 0; j < hidden / 8; ++j) xr[j] = make_uint4(0, 0, 0, 0);
      }
    }
    carry_rows += s_warp[0][nwarps - 1];
    carry_active += s_warp[1][nwarps - 1];
    __syncthreads();  // s_warp is rewritten by the next pass
  }
  if (tid == 0) {
    offsets[experts] = carry_rows;
    *n_active = carry_active;
  }
}

// rank[i] = the position of pair i within its expert's rows (arrival order), -1 for an id out of range. The last
// block to finish (ticket: a device word, 0 again after) then scans (scan_groups): one kernel where a count
// kernel and a one-block scan kernel met at a kernel boundary.
__global__ void __launch_bounds__(kPairThreads)
    k_count(const std::uint32_t* ids, std::uint32_t pairs, std::uint32_t experts, std::int32_t* counts,
            std::int32_t* rank, unsigned int* ticket, int pad, std::int32_t* offsets, float* row_weight,
            __nv_bfloat16* x, std::uint32_t hidden, std::int32_t* n_active, std::int32_t* active) {
  pdl_enter();
  const std::uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < pairs) {
    const std::uint32_t e = ids[i];
    rank[i] = e < experts ? atomicAdd(&counts[e], 1) : -1;
  }
  __shared__ int s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device> done(*ticket);
    s_last = done.fetch_add(1, cuda::std::memory_order_acq_rel) + 1 == gridDim.x ? 1 : 0;
    if (s_last != 0) done.store(0, cuda::std::memory_order_relaxed);
  }
  __syncthreads();
  if (s_last != 0) scan_groups(counts, experts, pad, offsets, row_weight, x, hidden, n_active, active);
}

// pair_row[i] = the row of pair i in group order (-1: skipped); that row's router weight, and the pair's token
// row copied into x. A warp per pair, the pairs walked with the grid's stride; the lanes copy the row,
// kCopyUnroll 16-byte vectors each in flight.
__global__ void __launch_bounds__(kPlaceThreads)
    k_place(const std::uint32_t* ids, const float* weights, const std::int32_t* rank, const std::int32_t* offsets,
            std::uint32_t pairs, std::uint32_t topk, const __nv_bfloat16* normed, std::uint32_t hidden,
            std::int32_t* pair_row, float* row_weight, __nv_bfloat16* x) {
  pdl_enter();
  const std::uint32_t lane = threadIdx.x & 31, warps = gridDim.x * (blockDim.x / 32);
  for (std::uint32_t i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < pairs; i += warps) {
    const std::int32_t r = rank[i];
    const std::int32_t row = r < 0 ? -1 : offsets[ids[i]] + r;
    if (lane == 0) {
      pair_row[i] = row;
      if (row >= 0) row_weight[row] = weights[i];
    }
    if (row < 0) continue;  // warp-uniform
    const auto* in = reinterpret_cast<const uint4*>(normed + std::size_t{i / topk} * hidden);
    auto* out = reinterpret_cast<uint4*>(x + std::size_t(row) * hidden);
    const std::uint32_t vecs = hidden / 8;
    for (std::uint32_t j0 = lane; j0 < vecs; j0 += 32 * kCopyUnroll) {
      uint4 v[kCopyUnroll];
#pragma unroll
      for (std::uint32_t u = 0; u < kCopyUnroll; ++u)
        if (j0 + 32 * u < vecs) v[u] = in[j0 + 32 * u];
#pragma unroll
      for (std::uint32_t u = 0; u < kCopyUnroll; ++u)
        if (j0 + 32 * u < vecs) out[j0 + 32 * u] = v[u];
    }
  }
}

// One block per token: x[t] += Σ_k y[pair_row[t, k]] (router weights already applied), k in order.
__global__ void k_combine(const std::int32_t* pair_row, std::uint32_t topk, const float* y, std::uint32_t hidden,
                          float* x) {
  pdl_wait();  // the layer's last kernel: what the caller launches next waits for all of it
  add_topk_rows(pair_row + std::size_t{blockIdx.x} * topk, topk, y, hidden, x + std::size_t{blockIdx.x} * hidden);
}

__device__ __forceinline__ std::uint64_t d_splitmix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// out[i] = the value of global element index_base + i.
__global__ void k_fill_uniform_bf16(__nv_bfloat16* out, std::size_t n, std::size_t index_base, std::uint64_t key,
                                    float scale) {
  for (std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const std::uint64_t r = d_splitmix(key + (index_base + i) * 0x9E3779B97F4A7C15ull);
    out[i] = __float2bfloat16_rn((static_cast<float>(r >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * scale);
  }
}

class moe_impl final : public moe_local {
 public:
  moe_impl(int device, const model_shape& s, std::uint32_t max_tokens)
      : device_(device), shape_(s), max_tokens_(max_tokens) {}

  status init() {
    const std::size_t h = shape_.hidden, f = shape_.inter, E = shape_.experts, L = shape_.layers;
    pairs_cap_ = std::size_t{max_tokens_} * shape_.topk;
    rows_cap_ = pairs_cap_ + E;
    EAAS_MOE_CUDA(cudaSetDevice(device_));
    pdl_ok_ = pdl_supported(device_);
    pdl_ = pdl_ok_;
    per_expert_ = h * f;  // elements of gate, up or down
    EAAS_CHECK(gate_.alloc(L * E * per_expert_ * 2));
    EAAS_CHECK(up_.alloc(L * E * per_expert_ * 2));
    EAAS_CHECK(down_.alloc(L * E * per_expert_ * 2));
    std::vector<const void*> ptrs(L * 3 * E);
    for (std::size_t l = 0; l < L; ++l)
      for (std::size_t e = 0; e < E; ++e) {
        const std::size_t off = ((l * E) + e) * per_expert_ * 2;
        ptrs[(l * 3 + 0) * E + e] = gate_.as<char>() + off;
        ptrs[(l * 3 + 1) * E + e] = up_.as<char>() + off;
        ptrs[(l * 3 + 2) * E + e] = down_.as<char>() + off;
      }
    EAAS_CHECK(ptrs_.alloc(ptrs.size() * sizeof(void*)));
    EAAS_MOE_CUDA(cudaMemcpy(ptrs_.p, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice));

    EAAS_CHECK(counts_.alloc(E * 4));
    EAAS_CHECK(rank_.alloc(pairs_cap_ * 4));
    EAAS_CHECK(offsets_.alloc((E + 1) * 4));
    EAAS_CHECK(pair_row_.alloc(pairs_cap_ * 4));
    EAAS_CHECK(ticket_.alloc(4));
    EAAS_CHECK(row_weight_.alloc(rows_cap_ * 4));
    EAAS_CHECK(x_.alloc(rows_cap_ * h * 2));
    EAAS_CHECK(y_.alloc(rows_cap_ * h * 4));
    gg_shape_ =
        grouped_swiglu_shape{shape_.experts, shape_.hidden, shape_.inter, static_cast<std::uint32_t>(rows_cap_)};
    ws_bytes_ = grouped_swiglu_workspace_bytes(gg_shape_);
    EAAS_CHECK(ws_.alloc(ws_bytes_));
    EAAS_CHECK(error_.alloc(4));
    EAAS_CHECK(n_active_.alloc(L * 4));
    EAAS_CHECK(active_.alloc(L * E * 4));
    // The copies and zero fills ran on the legacy stream; run() uses the caller's stream, which need not
    // wait for it.
    EAAS_MOE_CUDA(cudaDeviceSynchronize());
    return status::ok;
  }

  const model_shape& shape() const override { return shape_; }
  void set_pdl(bool on) override { pdl_ = on && pdl_ok_; }
  const std::int32_t* active_counts() const override { return n_active_.as<std::int32_t>(); }
  const std::int32_t* active_experts() const override { return active_.as<std::int32_t>(); }
  const std::uint32_t* error_word() const override { return error_.as<std::uint32_t>(); }

  status upload(std::uint32_t layer, std::uint32_t expert, const expert_weights& w) override {
    if (layer >= shape_.layers || expert >= shape_.experts || w.gate.size() != per_expert_ ||
        w.up.size() != per_expert_ || w.down.size() != per_expert_)
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu monolithic moe: upload: bad layer, expert or weight size");
    const std::size_t off = (std::size_t{layer} * shape_.experts + expert) * per_expert_ * 2;
    std::vector<std::uint16_t> b(per_expert_);
    const std::vector<float>* src[3] = {&w.gate, &w.up, &w.down};
    char* dst[3] = {gate_.as<char>() + off, up_.as<char>() + off, down_.as<char>() + off};
    for (int m = 0; m < 3; ++m) {
      const std::size_t cols = m < 2 ? shape_.hidden : shape_.inter;  // gate, up [inter, hidden]; down
      f32_to_bf16_tiled(src[m]->data(), per_expert_ / cols, cols, b.data());
      EAAS_MOE_CUDA(cudaMemcpy(dst[m], b.data(), per_expert_ * 2, cudaMemcpyHostToDevice));
    }
    EAAS_MOE_CUDA(cudaDeviceSynchronize());  // a pageable copy may return before its DMA lands
    return status::ok;
  }

  status fill_random(std::uint64_t seed, std::uint32_t first_expert, std::uint32_t total_experts) override {
    const std::size_t E = shape_.experts, total = total_experts == 0 ? E : total_experts;
    if (total_experts == 0 ? first_expert != 0 : std::size_t{first_expert} + E > total)
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu monolithic moe: fill_random: experts outside the model");
    const float s_in = 1.0f / std::sqrt(float(shape_.hidden)), s_down = 1.0f / std::sqrt(float(shape_.inter));
    // Each matrix is drawn row-major into a scratch buffer (the values depend on the row-major index) and
    // tiled into place.
    device_buffer scratch;
    EAAS_CHECK(scratch.alloc(per_expert_ * 2));
    const std::uint32_t h = shape_.hidden, f = shape_.inter;
    for (std::size_t l = 0; l < shape_.layers; ++l)
      for (std::size_t e = 0; e < E; ++e) {
        const std::size_t here = (l * E + e) * per_expert_, global = ((l * total + first_expert) + e) * per_expert_;
        struct {
          device_buffer* dst;
          std::uint64_t which;
          float scale;
          std::uint32_t rows, cols;
        } const mats[3] = {{&gate_, 1, s_in, f, h}, {&up_, 2, s_in, f, h}, {&down_, 3, s_down, h, f}};
        for (const auto& m : mats) {
          k_fill_uniform_bf16<<<1024, 256>>>(scratch.as<__nv_bfloat16>(), per_expert_, global, d_key(seed, m.which),
                                             m.scale);
          EAAS_MOE_CUDA(cudaGetLastError());
          EAAS_CHECK(grouped_swiglu_tile(scratch.p, m.dst->as<__nv_bfloat16>() + here, m.rows, m.cols, nullptr));
        }
      }
    EAAS_MOE_CUDA(cudaDeviceSynchronize());
    return status::ok;
  }

  status run(std::uint32_t layer, std::uint32_t n, const void* normed, const std::uint32_t* ids, const float* weights,
             float* x, bool shrink, CUstream_st* stream) override {
    if (layer >= shape_.layers || n == 0 || n > max_tokens_ || normed == nullptr || ids == nullptr ||
        weights == nullptr || x == nullptr)
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu monolithic moe: bad layer, token count or null pointer (" +
                                                         std::to_string(n) + " tokens, most " +
                                                         std::to_string(max_tokens_) + ")");
    const std::uint32_t E = shape_.experts, h = shape_.hidden, topk = shape_.topk;
    const std::uint32_t pairs = n * topk;
    const unsigned pair_blocks = (pairs + kPairThreads - 1) / kPairThreads;
    // One chain of launches (pdl.cuh); the counts were left zero by the last layer's scan (the count kernel's
    // last block), the ticket by its last block.
    const bool p = pdl_;
    EAAS_MOE_CUDA(launch(stream, p, k_count, pair_blocks, kPairThreads, 0, ids, pairs, E, counts_.as<std::int32_t>(),
                         rank_.as<std::int32_t>(), ticket_.as<unsigned int>(), shrink ? 0 : 1,
                         offsets_.as<std::int32_t>(), row_weight_.as<float>(), x_.as<__nv_bfloat16>(), h,
                         n_active_.as<std::int32_t>() + layer, active_.as<std::int32_t>() + std::size_t{layer} * E));
    EAAS_MOE_CUDA(launch(stream, p, k_place,
                         std::min(kPlaceBlocks, (pairs + kPlaceThreads / 32 - 1) / (kPlaceThreads / 32)), kPlaceThreads,
                         0, ids, weights, rank_.as<std::int32_t>(), offsets_.as<std::int32_t>(), pairs, topk,
                         static_cast<const __nv_bfloat16*>(normed), h, pair_row_.as<std::int32_t>(),
                         row_weight_.as<float>(), x_.as<__nv_bfloat16>()));
    const void* const* ptrs = ptrs_.as<const void*>() + std::size_t{layer} * 3 * E;
    grouped_swiglu_args a;
    a.x = x_.p;
    a.offsets = offsets_.as<std::int32_t>();
    a.row_weight = row_weight_.as<float>();
    a.gate = ptrs;
    a.up = ptrs + E;
    a.down = ptrs + 2 * E;
    a.y = y_.as<float>();
    a.workspace = ws_.p;
    a.error = error_.as<std::uint32_t>();
    a.layout = grouped_swiglu_layout::tiled;  // upload and fill_random write the tiled layout
    EAAS_CHECK(grouped_swiglu(gg_shape_, a, ws_bytes_, stream));
    EAAS_MOE_CUDA(
        launch(stream, p, k_combine, n, kCombineThreads, 0, pair_row_.as<std::int32_t>(), topk, y_.as<float>(), h, x));
    return status::ok;
  }

 private:
  static std::uint64_t d_key(std::uint64_t seed, std::uint64_t which) {
    return seed * 0x9E3779B97F4A7C15ull ^ (which * 0xD1B54A32D192ED03ull);
  }

  int device_;
  model_shape shape_;
  std::uint32_t max_tokens_;
  std::size_t pairs_cap_ = 0, rows_cap_ = 0, per_expert_ = 0, ws_bytes_ = 0;
  bool pdl_ok_ = false, pdl_ = false;
  grouped_swiglu_shape gg_shape_{};
  device_buffer gate_, up_, down_, ptrs_;
  device_buffer counts_, rank_, offsets_, pair_row_, ticket_, row_weight_, x_, y_, ws_, error_, n_active_, active_;
};

class monolithic_impl final : public monolithic_gpu {
 public:
  monolithic_impl(const model_shape& s, std::uint32_t max_tokens) : shape_(s), max_tokens_(max_tokens) {}

  status init(int device, const dense_options& opts, const dense_weights& w) {
    EAAS_CHECK(dense_gpu::create(device, shape_, opts, w, max_tokens_, dense_));
    EAAS_CHECK(moe_local::create(device, shape_, max_tokens_, moe_));
    EAAS_MOE_CUDA(cudaSetDevice(device));
    const std::size_t routing = std::size_t{shape_.layers} * max_tokens_ * shape_.topk;
    EAAS_CHECK(tokens_.alloc(std::size_t{max_tokens_} * 4));
    EAAS_CHECK(x_.alloc(std::size_t{max_tokens_} * shape_.hidden * 4));
    EAAS_CHECK(normed_.alloc(std::size_t{max_tokens_} * shape_.hidden * 2));
    EAAS_CHECK(ids_.alloc(routing * 4));
    EAAS_CHECK(weights_.alloc(routing * 4));
    EAAS_MOE_CUDA(cudaDeviceSynchronize());  // the zero fills, before any work on the caller's streams
    return status::ok;
  }

  dense_gpu& dense() override { return *dense_; }
  moe_local& moe() override { return *moe_; }
  std::uint32_t* tokens() override { return tokens_.as<std::uint32_t>(); }
  const float* hidden_states() const override { return x_.as<float>(); }
  const std::uint32_t* ids(std::uint32_t layer) const override {
    return ids_.as<std::uint32_t>() + std::size_t{layer} * max_tokens_ * shape_.topk;
  }
  const float* weights(std::uint32_t layer) const override {
    return weights_.as<float>() + std::size_t{layer} * max_tokens_ * shape_.topk;
  }

  status forward(std::uint32_t n, bool shrink, CUstream_st* stream) override {
    float* x = x_.as<float>();
    EAAS_CHECK(dense_->embed(tokens_.as<std::uint32_t>(), n, x, stream));
    for (std::uint32_t l = 0; l < shape_.layers; ++l) {
      auto* ids = const_cast<std::uint32_t*>(this->ids(l));
      auto* w = const_cast<float*>(this->weights(l));
      EAAS_CHECK(dense_->attention(l, n, x, normed_.p, stream));
      EAAS_CHECK(dense_->route(l, n, normed_.p, ids, w, stream));
      EAAS_CHECK(moe_->run(l, n, normed_.p, ids, w, x, shrink, stream));
    }
    return status::ok;
  }

 private:
  model_shape shape_;
  std::uint32_t max_tokens_;
  std::unique_ptr<dense_gpu> dense_;
  std::unique_ptr<moe_local> moe_;
  device_buffer tokens_, x_, normed_, ids_, weights_;
};

}  // namespace

status moe_local::create(int device, const model_shape& shape, std::uint32_t max_tokens,
                         std::unique_ptr<moe_local>& out) {
  EAAS_CHECK(check_shape(shape));
  if (shape.hidden % kGroupedSwigluAlign != 0 || shape.inter % kGroupedSwigluAlign != 0 || max_tokens == 0 ||
      std::uint64_t{max_tokens} * shape.topk + shape.experts > (1ull << 30))
    return EAAS_GPU_FAIL(status::invalid_argument,
                         "gpu monolithic moe: hidden and inter must be multiples of 32, max_tokens >= 1 and "
                         "max_tokens * topk + experts at most 2^30");
  auto m = std::make_unique<moe_impl>(device, shape, max_tokens);
  EAAS_CHECK(m->init());
  out = std::move(m);
  return status::ok;
}

status monolithic_gpu::create(int device, const model_shape& shape, const dense_options& opts,
                              const dense_weights& dense, std::uint32_t max_tokens,
                              std::unique_ptr<monolithic_gpu>& out) {
  auto m = std::make_unique<monolithic_impl>(shape, max_tokens);
  EAAS_CHECK(m->init(device, opts, dense));
  out = std::move(m);
  return status::ok;
}

}  // namespace eaas::runtime::gpu
