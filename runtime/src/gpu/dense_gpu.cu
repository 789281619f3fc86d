// The dense part on one GPU (dense_gpu.hpp): embedding, attention stand-in, rmsnorm, router.

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <string>
#include <vector>

#include "bf16.hpp"
#include "cuda_fail.cuh"
#include "dense_gpu.hpp"
#include "dense_gpu_detail.cuh"
#include "synth.hpp"

namespace eaas::runtime::gpu {

namespace {

#define EAAS_DENSE_CUDA(x) EAAS_GPU_CUDA("gpu dense part", x)
#define EAAS_DENSE_BLAS(x)                                                                                     \
  do {                                                                                                         \
    if (const cublasStatus_t s_ = (x); s_ != CUBLAS_STATUS_SUCCESS)                                            \
      return EAAS_GPU_FAIL(status::internal_error, std::string("gpu dense part: ") + #x + ": cuBLAS status " + \
                                                       std::to_string(static_cast<int>(s_)));                  \
  } while (0)

constexpr std::size_t kBlasWorkspace = std::size_t{32} << 20;  // cuBLAS's recommendation for Hopper
constexpr int kNormThreads = 256;
constexpr int kTopkWarps = 4;

// x[t] = embed[tokens[t] % vocab]; one block per token, hidden % 4 == 0.
__global__ void k_embed(const std::uint32_t* tokens, const float* embed, std::uint32_t vocab, std::uint32_t hidden,
                        float* x) {
  const std::uint32_t row = tokens[blockIdx.x] % vocab;
  const float4* src = reinterpret_cast<const float4*>(embed + std::size_t{row} * hidden);
  float4* dst = reinterpret_cast<float4*>(x + std::size_t{blockIdx.x} * hidden);
  for (std::uint32_t j = threadIdx.x; j < hidden / 4; j += blockDim.x) dst[j] = src[j];
}

// One block per row: x += scale * a (when a is given, in place), then out = bf16(x / rms(x)), eps 1e-6
// as cpu::rmsnorm.
__global__ void __launch_bounds__(kNormThreads)
    k_add_rmsnorm(float* x, const float* a, float scale, std::uint32_t hidden, __nv_bfloat16* out) {
  float* xr = x + std::size_t{blockIdx.x} * hidden;
  __nv_bfloat16* o = out + std::size_t{blockIdx.x} * hidden;
  float ss = 0.0f;
  if (a != nullptr) {
    const float* ar = a + std::size_t{blockIdx.x} * hidden;
    for (std::uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) {
      const float v = xr[j] + scale * ar[j];
      xr[j] = v;
      ss += v * v;
    }
  } else {
    for (std::uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) ss += xr[j] * xr[j];
  }
  ss = block_sum<kNormThreads>(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(hidden) + 1e-6f);
  // Each thread reads back only the elements it wrote itself.
  for (std::uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) o[j] = __float2bfloat16_rn(xr[j] * inv);
}

// One warp per token: the top `topk` of its logits in cpu::route_topk's order (value descending, ties
// to the lower id), found as `topk` warp-wide arg-max passes, each over the experts strictly after the
// previous pick in that order; then the softmax renormalised over the chosen (the max cancels).
__global__ void __launch_bounds__(32 * kTopkWarps)
    k_topk(const float* logits, std::uint32_t n_tokens, std::uint32_t experts, std::uint32_t topk, std::uint32_t* ids,
           float* weights) {
  const std::uint32_t token = blockIdx.x * kTopkWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (token >= n_tokens) return;  // warp-uniform
  const float* l = logits + std::size_t{token} * experts;
  std::uint32_t* out_ids = ids + std::size_t{token} * topk;
  float* out_w = weights + std::size_t{token} * topk;
  float prev_v = INFINITY, mx = 0.0f, sum = 0.0f;
  long long prev_id = -1;
  for (std::uint32_t k = 0; k < topk; ++k) {
    float bv = -INFINITY;
    std::uint32_t bid = UINT_MAX;
    for (std::uint32_t e = lane; e < experts; e += 32) {
      const float v = l[e];
      const bool after = v < prev_v || (v == prev_v && static_cast<long long>(e) > prev_id);
      const bool better = v > bv || (v == bv && e < bid);
      if (after && better) {
        bv = v;
        bid = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const std::uint32_t oid = __shfl_xor_sync(0xffffffffu, bid, o);
      if (ov > bv || (ov == bv && oid < bid)) {
        bv = ov;
        bid = oid;
      }
    }
    // Every lane now holds the same pick (topk <= experts, so there always is one).
    prev_v = bv;
    prev_id = bid;
    if (k == 0) mx = bv;
    sum += expf(bv - mx);
    if (lane == 0) out_ids[k] = bid;
  }
  if (lane == 0)
    for (std::uint32_t k = 0; k < topk; ++k) out_w[k] = expf(l[out_ids[k]] - mx) / sum;
}

class dense_impl final : public dense_gpu {
 public:
  dense_impl(int device, const model_shape& s, const dense_options& o, std::uint32_t max_tokens)
      : device_(device), shape_(s), opts_(o), max_tokens_(max_tokens) {}
  ~dense_impl() override {
    if (blas_ != nullptr) cublasDestroy(blas_);
  }

  status init(const dense_weights& w) {
    const std::size_t h = shape_.hidden;
    EAAS_DENSE_CUDA(cudaSetDevice(device_));
    EAAS_DENSE_BLAS(cublasCreate(&blas_));
    EAAS_CHECK(embed_.alloc(w.embed.size() * sizeof(float)));
    EAAS_DENSE_CUDA(cudaMemcpy(embed_.p, w.embed.data(), w.embed.size() * sizeof(float), cudaMemcpyHostToDevice));
    EAAS_CHECK(attn_.alloc(std::size_t{shape_.layers} * h * h * 2));
    EAAS_CHECK(router_.alloc(std::size_t{shape_.layers} * shape_.experts * h * 2));
    for (std::uint32_t l = 0; l < shape_.layers; ++l) {
      EAAS_CHECK(upload_bf16(w.attn[l], attn_.as<char>() + std::size_t{l} * h * h * 2));
      EAAS_CHECK(upload_bf16(w.routers[l].gate, router_.as<char>() + std::size_t{l} * shape_.experts * h * 2));
    }
    EAAS_CHECK(a_.alloc(std::size_t{max_tokens_} * h * sizeof(float)));
    EAAS_CHECK(n_.alloc(std::size_t{max_tokens_} * h * 2));
    EAAS_CHECK(logits_.alloc(std::size_t{max_tokens_} * shape_.experts * sizeof(float)));
    EAAS_CHECK(blas_ws_.alloc(kBlasWorkspace));
    // The uploads and zero fills ran on the legacy stream (a pageable copy may even return before its DMA
    // lands); the steps run on the caller's streams, which need not wait for it.
    EAAS_DENSE_CUDA(cudaDeviceSynchronize());
    return status::ok;
  }

  const model_shape& shape() const override { return shape_; }
  std::uint32_t vocab() const override { return opts_.vocab; }
  std::uint32_t max_tokens() const override { return max_tokens_; }
  const float* logits() const override { return logits_.as<float>(); }

  status embed(const std::uint32_t* tokens, std::uint32_t n, float* x, CUstream_st* stream) override {
    EAAS_CHECK(check_tokens(n, tokens != nullptr && x != nullptr));
    k_embed<<<n, 128, 0, stream>>>(tokens, embed_.as<float>(), opts_.vocab, shape_.hidden, x);
    EAAS_DENSE_CUDA(cudaGetLastError());
    return status::ok;
  }

  status attention(std::uint32_t layer, std::uint32_t n, float* x, void* normed, CUstream_st* stream) override {
    EAAS_CHECK(check_tokens(n, x != nullptr && normed != nullptr && layer < shape_.layers));
    const std::uint32_t h = shape_.hidden;
    auto* nb = n_.as<__nv_bfloat16>();
    k_add_rmsnorm<<<n, kNormThreads, 0, stream>>>(x, nullptr, 0.0f, h, nb);
    EAAS_DENSE_CUDA(cudaGetLastError());
    // The first product feeds the residual; the others only stand in for attention's cost (as on the CPU).
    const void* w = attn_.as<char>() + std::size_t{layer} * h * h * 2;
    for (std::uint32_t c = 0; c < opts_.attention_cost; ++c)
      EAAS_CHECK(gemm_nt(nb, w, a_.as<float>(), n, h, h, stream));
    k_add_rmsnorm<<<n, kNormThreads, 0, stream>>>(x, a_.as<float>(), 0.5f, h, static_cast<__nv_bfloat16*>(normed));
    EAAS_DENSE_CUDA(cudaGetLastError());
    return status::ok;
  }

  status route(std::uint32_t layer, std::uint32_t n, const void* normed, std::uint32_t* ids, float* weights,
               CUstream_st* stream) override {
    EAAS_CHECK(check_tokens(n, normed != nullptr && ids != nullptr && weights != nullptr && layer < shape_.layers));
    const void* w = router_.as<char>() + std::size_t{layer} * shape_.experts * shape_.hidden * 2;
    EAAS_CHECK(gemm_nt(normed, w, logits_.as<float>(), n, shape_.experts, shape_.hidden, stream));
    k_topk<<<(n + kTopkWarps - 1) / kTopkWarps, 32 * kTopkWarps, 0, stream>>>(logits_.as<float>(), n, shape_.experts,
                                                                              shape_.topk, ids, weights);
    EAAS_DENSE_CUDA(cudaGetLastError());
    return status::ok;
  }

 private:
  status check_tokens(std::uint32_t n, bool ok) const {
    if (!ok || n == 0 || n > max_tokens_)
      return EAAS_GPU_FAIL(status::invalid_argument,
                           "gpu dense part: null pointer, bad layer, or a token count outside 1 .. " +
                               std::to_string(max_tokens_) + " (got " + std::to_string(n) + ")");
    return status::ok;
  }

  status upload_bf16(const std::vector<float>& src, void* dst) {
    std::vector<std::uint16_t> b(src.size());
    for (std::size_t i = 0; i < src.size(); ++i) b[i] = f32_to_bf16(src[i]);
    EAAS_DENSE_CUDA(cudaMemcpy(dst, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
    return status::ok;
  }

  // y[rows × n] = x[rows × k] · w[n × k]^T, row-major, bf16 in, fp32 compute and out. In cuBLAS's
  // column-major terms: y^T (n × rows) = op_T(w as k × n) · (x as k × rows).
  status gemm_nt(const void* x, const void* w, float* y, std::uint32_t rows, std::uint32_t n, std::uint32_t k,
                 CUstream_st* stream) {
    // cublasSetStream resets the workspace to cuBLAS's own pool: set ours after it, every time, so that
    // nothing is allocated during stream capture.
    EAAS_DENSE_BLAS(cublasSetStream(blas_, stream));
    EAAS_DENSE_BLAS(cublasSetWorkspace(blas_, blas_ws_.p, kBlasWorkspace));
    const float alpha = 1.0f, beta = 0.0f;
    EAAS_DENSE_BLAS(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(rows),
                                 static_cast<int>(k), &alpha, w, CUDA_R_16BF, static_cast<int>(k), x, CUDA_R_16BF,
                                 static_cast<int>(k), &beta, y, CUDA_R_32F, static_cast<int>(n), CUBLAS_COMPUTE_32F,
                                 CUBLAS_GEMM_DEFAULT));
    return status::ok;
  }

  int device_;
  model_shape shape_;
  dense_options opts_;
  std::uint32_t max_tokens_;
  cublasHandle_t blas_ = nullptr;
  device_buffer embed_, attn_, router_, a_, n_, logits_, blas_ws_;
};

}  // namespace

status dense_gpu::create(int device, const model_shape& shape, const dense_options& opts_in, const dense_weights& w,
                         std::uint32_t max_tokens, std::unique_ptr<dense_gpu>& out) {
  EAAS_CHECK(check_shape(shape));
  dense_options opts = opts_in;
  if (opts.vocab == 0) opts.vocab = 1;  // as dense_model
  if (opts.attention_cost == 0) opts.attention_cost = 1;
  const std::size_t h = shape.hidden;
  if (shape.hidden % 8 != 0 || max_tokens == 0 || max_tokens > (1u << 24))
    return EAAS_GPU_FAIL(status::invalid_argument,
                         "gpu dense part: hidden must be a multiple of 8 and max_tokens 1 .. 2^24");
  bool sizes = w.embed.size() == std::size_t{opts.vocab} * h && w.attn.size() == shape.layers &&
               w.routers.size() == shape.layers;
  for (std::uint32_t l = 0; sizes && l < shape.layers; ++l)
    sizes = w.attn[l].size() == h * h && w.routers[l].gate.size() == std::size_t{shape.experts} * h;
  if (!sizes) return EAAS_GPU_FAIL(status::invalid_argument, "gpu dense part: weights do not match the shape");
  auto d = std::make_unique<dense_impl>(device, shape, opts, max_tokens);
  EAAS_CHECK(d->init(w));
  out = std::move(d);
  return status::ok;
}

}  // namespace eaas::runtime::gpu
