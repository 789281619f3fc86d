// The expert server's batch on its GPU: gather, grouped SwiGLU, combine, answer (expert_step.hpp).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "bf16.hpp"
#include "cuda_fail.cuh"
#include "eaas/device/grid_put.cuh"
#include "eaas/runtime/grouped_gemm.hpp"
#include "expert_step.hpp"

namespace eaas::runtime::gpu {
namespace {

#define EAAS_STEP_CUDA(x) EAAS_GPU_CUDA("gpu experts", x)

constexpr unsigned kPutBlocks = 32;  // most blocks one answer is put with

struct row_src {
  std::uint64_t addr;  // device address of the token's activation row
  std::uint32_t bf16;
  std::uint32_t pad;
};

struct answer_job {
  grid_put job;
  response_header header;
};

// x[r] = bf16(activation row of pair r). One block per row; hidden is a multiple of 32.
__global__ void k_gather(const row_src* src, std::uint32_t hidden, __nv_bfloat16* x) {
  const row_src s = src[blockIdx.x];
  __nv_bfloat16* dst = x + std::size_t{blockIdx.x} * hidden;
  if (s.bf16) {
    const uint4* in = reinterpret_cast<const uint4*>(s.addr);
    uint4* out = reinterpret_cast<uint4*>(dst);
    for (std::uint32_t j = threadIdx.x; j < hidden / 8; j += blockDim.x) out[j] = in[j];
  } else {
    const float4* in = reinterpret_cast<const float4*>(s.addr);
    for (std::uint32_t j = threadIdx.x; j < hidden / 4; j += blockDim.x) {
      const float4 v = in[j];
      __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
      uint2 packed;
      std::memcpy(&packed.x, &lo, 4);
      std::memcpy(&packed.y, &hi, 4);
      reinterpret_cast<uint2*>(dst)[j] = packed;
    }
  }
}

// Blocks 0 .. tokens-1: token i's answer row = the sum of its pairs' rows of y (router weights already
// applied), written at i*hidden*4 + (request+1)*64 of the staging buffer. Blocks tokens .. : the
// requests' response headers, at the start of each request's answer.
__global__ void k_combine(const std::int32_t* tok_rows, const std::uint32_t* tok_req, const answer_job* jobs,
                          std::uint32_t tokens, std::uint32_t topk, std::uint32_t hidden, const float* y,
                          unsigned char* staging) {
  if (blockIdx.x >= tokens) {
    const answer_job& a = jobs[blockIdx.x - tokens];
    if (threadIdx.x < 16)
      reinterpret_cast<std::uint32_t*>(const_cast<unsigned char*>(a.job.src))[threadIdx.x] =
          reinterpret_cast<const std::uint32_t*>(&a.header)[threadIdx.x];
    return;
  }
  const std::uint32_t i = blockIdx.x;
  const std::int32_t* rows = tok_rows + std::size_t{i} * topk;
  float4* out = reinterpret_cast<float4*>(staging + std::size_t{i} * hidden * 4 + (std::size_t{tok_req[i]} + 1) * 64);
  for (std::uint32_t j = threadIdx.x; j < hidden / 4; j += blockDim.x) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (std::uint32_t k = 0; k < topk; ++k) {
      const std::int32_t r = rows[k];
      if (r < 0) continue;
      const float4 v = reinterpret_cast<const float4*>(y + std::size_t(r) * hidden)[j];
      acc.x += v.x;
      acc.y += v.y;
      acc.z += v.z;
      acc.w += v.w;
    }
    out[j] = acc;
  }
}

// Answers every request, unless the grouped GEMM refused the plan (then y holds nothing of this
// batch, and no answer may go out: each request's result says why).
__global__ void k_answer(const answer_job* jobs, const std::uint32_t* gemm_error) {
  if (*gemm_error != 0) {
    if (blockIdx.x == 0 && threadIdx.x == 0)
      atomicCAS(jobs[blockIdx.y].job.result, 0, static_cast<int>(status::internal_error));
    return;
  }
  grid_put_signal(jobs[blockIdx.y].job, blockIdx.x, gridDim.x);
}

template <class T>
struct dev_buf {
  T* p = nullptr;
  std::size_t n = 0;
  status alloc(std::size_t count) {
    n = std::max<std::size_t>(count, 1);
    EAAS_STEP_CUDA(cudaMalloc(reinterpret_cast<void**>(&p), n * sizeof(T)));
    EAAS_STEP_CUDA(cudaMemset(p, 0, n * sizeof(T)));
    return status::ok;
  }
  ~dev_buf() { cudaFree(p); }
};

class step_impl final : public expert_step {
 public:
  status init(int device, const model_shape& shape, std::uint32_t local_experts, std::uint32_t max_requests,
              std::uint32_t max_tokens) {
    device_ = device;
    shape_ = shape;
    if (shape.hidden % kGroupedSwigluAlign != 0 || shape.inter % kGroupedSwigluAlign != 0)
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu experts: hidden (" + std::to_string(shape.hidden) +
                                                         ") and inter (" + std::to_string(shape.inter) +
                                                         ") must be multiples of 32");
    if (local_experts == 0 || max_requests == 0 || max_tokens == 0)
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu experts: no experts, requests or tokens");
    local_ = local_experts;
    groups_ = shape.layers * local_;
    max_requests_ = max_requests;
    max_tokens_ = std::uint64_t{max_requests} * max_tokens;
    max_rows_ = max_tokens_ * std::min(shape.topk, local_);
    if (max_rows_ > (1u << 30)) return EAAS_GPU_FAIL(status::invalid_argument, "gpu experts: batch too large");
    EAAS_STEP_CUDA(cudaSetDevice(device));
    EAAS_STEP_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));

    // Weights: [group][gate, up, down], bf16 in the grouped GEMM's tiled layout (its fastest: bulk copies into
    // shared memory), filled by upload().
    const std::size_t mat = std::size_t{shape.hidden} * shape.inter;
    EAAS_CHECK(weights_.alloc(std::size_t{groups_} * 3 * mat));
    std::vector<const void*> gate(groups_), up(groups_), down(groups_);
    for (std::uint32_t g = 0; g < groups_; ++g) {
      gate[g] = weights_.p + (std::size_t{g} * 3 + 0) * mat;
      up[g] = weights_.p + (std::size_t{g} * 3 + 1) * mat;
      down[g] = weights_.p + (std::size_t{g} * 3 + 2) * mat;
    }
    EAAS_CHECK(gate_.alloc(groups_));
    EAAS_CHECK(up_.alloc(groups_));
    EAAS_CHECK(down_.alloc(groups_));
    EAAS_STEP_CUDA(cudaMemcpy(gate_.p, gate.data(), groups_ * sizeof(void*), cudaMemcpyHostToDevice));
    EAAS_STEP_CUDA(cudaMemcpy(up_.p, up.data(), groups_ * sizeof(void*), cudaMemcpyHostToDevice));
    EAAS_STEP_CUDA(cudaMemcpy(down_.p, down.data(), groups_ * sizeof(void*), cudaMemcpyHostToDevice));

    gshape_ = {.experts = groups_,
               .hidden = shape.hidden,
               .inter = shape.inter,
               .max_rows = static_cast<std::uint32_t>(max_rows_)};
    ws_bytes_ = grouped_swiglu_workspace_bytes(gshape_);
    EAAS_CHECK(ws_.alloc((ws_bytes_ + 15) / 16));
    EAAS_CHECK(x_.alloc(max_rows_ * shape.hidden));
    EAAS_CHECK(y_.alloc(max_rows_ * shape.hidden));
    EAAS_CHECK(row_weight_.alloc(max_rows_));
    EAAS_CHECK(row_src_.alloc(max_rows_));
    EAAS_CHECK(offsets_.alloc(groups_ + 1));
    EAAS_CHECK(tok_rows_.alloc(max_tokens_ * shape.topk));
    EAAS_CHECK(tok_req_.alloc(max_tokens_));
    EAAS_CHECK(jobs_.alloc(max_requests));
    EAAS_CHECK(staging_.alloc(max_tokens_ * shape.hidden * 4 + std::uint64_t{max_requests} * 64));
    EAAS_CHECK(arrivals_.alloc(max_requests));
    EAAS_CHECK(results_.alloc(max_requests));
    EAAS_CHECK(error_.alloc(1));
    return status::ok;
  }

  ~step_impl() override {
    if (stream_) cudaStreamDestroy(stream_);
  }

  status upload(std::uint32_t layer, std::uint32_t e, const expert_weights& w) override {
    const std::size_t mat = std::size_t{shape_.hidden} * shape_.inter;
    if (layer >= shape_.layers || e >= local_)
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu experts: upload of an expert outside the shape");
    const std::vector<float>* m[3] = {&w.gate, &w.up, &w.down};
    const std::size_t cols[3] = {shape_.hidden, shape_.hidden, shape_.inter};  // gate, up [inter, hidden]; down
    std::vector<std::uint16_t> tmp(mat);
    EAAS_STEP_CUDA(cudaSetDevice(device_));
    for (int k = 0; k < 3; ++k) {
      if (m[k]->size() != mat)
        return EAAS_GPU_FAIL(status::invalid_argument, "gpu experts: a matrix has the wrong size");
      f32_to_bf16_tiled(m[k]->data(), mat / cols[k], cols[k], tmp.data());
      EAAS_STEP_CUDA(cudaMemcpy(weights_.p + ((std::size_t{layer} * local_ + e) * 3 + k) * mat, tmp.data(), mat * 2,
                                cudaMemcpyHostToDevice));
    }
    return status::ok;
  }

  status run(const void* slots, std::uint64_t slots_bytes, std::span<const step_request> reqs,
             std::span<const step_row> rows, std::span<const std::int32_t> offsets,
             std::vector<status>& answered) override {
    const std::uint32_t h = shape_.hidden, topk = shape_.topk;
    answered.assign(reqs.size(), status::internal_error);
    if (reqs.empty()) return status::ok;
    if (reqs.size() > max_requests_ || rows.size() > max_rows_ || offsets.size() != groups_ + 1u ||
        offsets.back() != static_cast<std::int32_t>(rows.size()))
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu experts: a batch outside the limits");
    // The plan, on the host.
    tok_base_.resize(reqs.size());
    std::uint64_t tokens = 0;
    for (std::size_t q = 0; q < reqs.size(); ++q) {
      const step_request& r = reqs[q];
      const std::uint64_t elt = r.bf16 ? 2 : 4;
      if (r.act_offset > slots_bytes || std::uint64_t{r.tokens} * h * elt > slots_bytes - r.act_offset ||
          (r.act_offset % 16) != 0)
        return EAAS_GPU_FAIL(status::invalid_argument, "gpu experts: a request's activations outside the slots");
      tok_base_[q] = tokens;
      tokens += r.tokens;
    }
    if (tokens > max_tokens_) return EAAS_GPU_FAIL(status::invalid_argument, "gpu experts: too many tokens");
    src_h_.resize(rows.size());
    weight_h_.resize(rows.size());
    tok_rows_h_.assign(tokens * topk, -1);
    tok_req_h_.resize(tokens);
    for (std::size_t q = 0; q < reqs.size(); ++q)
      std::fill_n(tok_req_h_.begin() + static_cast<std::ptrdiff_t>(tok_base_[q]), reqs[q].tokens,
                  static_cast<std::uint32_t>(q));
    const auto base = reinterpret_cast<std::uint64_t>(slots);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const step_row& w = rows[i];
      if (w.request >= reqs.size() || w.token >= reqs[w.request].tokens || w.slot >= topk)
        return EAAS_GPU_FAIL(status::invalid_argument, "gpu experts: a row outside its request");
      const step_request& r = reqs[w.request];
      src_h_[i] = {base + r.act_offset + std::uint64_t{w.token} * h * (r.bf16 ? 2 : 4), r.bf16 ? 1u : 0u, 0};
      weight_h_[i] = w.weight;
      tok_rows_h_[(tok_base_[w.request] + w.token) * topk + w.slot] = static_cast<std::int32_t>(i);
    }
    jobs_h_.resize(reqs.size());
    std::uint64_t most = 0;
    for (std::size_t q = 0; q < reqs.size(); ++q) {
      const step_request& r = reqs[q];
      const std::uint64_t bytes = 64 + std::uint64_t{r.tokens} * h * 4;
      most = std::max(most, bytes);
      jobs_h_[q].header = r.header;
      jobs_h_[q].job = {.ep = r.ep,
                        .dst = r.result,
                        .dst_offset = kResponse,
                        .src = reinterpret_cast<const unsigned char*>(staging_.p) + tok_base_[q] * h * 4 + q * 64,
                        .bytes = bytes,
                        .sig = r.result,
                        .sig_offset = kResultSig,
                        .value = r.header.seq,
                        .arrivals = arrivals_.p + q,
                        .result = results_.p + q};
    }

    EAAS_STEP_CUDA(cudaSetDevice(device_));
    cudaStream_t s = stream_;
    if (!rows.empty()) {
      EAAS_STEP_CUDA(
          cudaMemcpyAsync(row_src_.p, src_h_.data(), rows.size() * sizeof(row_src), cudaMemcpyHostToDevice, s));
      EAAS_STEP_CUDA(cudaMemcpyAsync(row_weight_.p, weight_h_.data(), rows.size() * 4, cudaMemcpyHostToDevice, s));
    }
    EAAS_STEP_CUDA(cudaMemcpyAsync(offsets_.p, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice, s));
    EAAS_STEP_CUDA(cudaMemcpyAsync(tok_rows_.p, tok_rows_h_.data(), tok_rows_h_.size() * 4, cudaMemcpyHostToDevice, s));
    EAAS_STEP_CUDA(cudaMemcpyAsync(tok_req_.p, tok_req_h_.data(), tok_req_h_.size() * 4, cudaMemcpyHostToDevice, s));
    EAAS_STEP_CUDA(
        cudaMemcpyAsync(jobs_.p, jobs_h_.data(), jobs_h_.size() * sizeof(answer_job), cudaMemcpyHostToDevice, s));
    EAAS_STEP_CUDA(cudaMemsetAsync(results_.p, 0, reqs.size() * sizeof(int), s));
    EAAS_STEP_CUDA(cudaMemsetAsync(error_.p, 0, sizeof(std::uint32_t), s));
    if (!rows.empty()) {
      k_gather<<<static_cast<unsigned>(rows.size()), 128, 0, s>>>(row_src_.p, h, x_.p);
      EAAS_STEP_CUDA(cudaGetLastError());
      const grouped_swiglu_args a{.x = x_.p,
                                  .offsets = offsets_.p,
                                  .row_weight = row_weight_.p,
                                  .gate = gate_.p,
                                  .up = up_.p,
                                  .down = down_.p,
                                  .y = y_.p,
                                  .workspace = ws_.p,
                                  .error = error_.p,
                                  .layout = grouped_swiglu_layout::tiled};
      EAAS_CHECK(grouped_swiglu(gshape_, a, ws_bytes_, s));
    }
    k_combine<<<static_cast<unsigned>(tokens + reqs.size()), 256, 0, s>>>(
        tok_rows_.p, tok_req_.p, jobs_.p, static_cast<std::uint32_t>(tokens), topk, h, y_.p, staging_.p);
    EAAS_STEP_CUDA(cudaGetLastError());
    k_answer<<<dim3(grid_put_blocks(most, kPutBlocks), static_cast<unsigned>(reqs.size())), 256, 0, s>>>(jobs_.p,
                                                                                                         error_.p);
    EAAS_STEP_CUDA(cudaGetLastError());
    results_h_.resize(reqs.size());
    std::uint32_t err = 0;
    EAAS_STEP_CUDA(
        cudaMemcpyAsync(results_h_.data(), results_.p, reqs.size() * sizeof(int), cudaMemcpyDeviceToHost, s));
    EAAS_STEP_CUDA(cudaMemcpyAsync(&err, error_.p, sizeof(err), cudaMemcpyDeviceToHost, s));
    EAAS_STEP_CUDA(cudaStreamSynchronize(s));
    if (err != 0)  // the host built the plan: a bad offset or weight pointer here is a bug of this step
      return EAAS_GPU_FAIL(status::internal_error,
                           "gpu experts: grouped_swiglu refused the plan (bits " + std::to_string(err) + ")");
    for (std::size_t q = 0; q < reqs.size(); ++q) answered[q] = static_cast<status>(results_h_[q]);
    return status::ok;
  }

  expert_weights_device device_weights() const override {
    return {.gate = gate_.p, .up = up_.p, .down = down_.p, .groups = groups_, .layout = grouped_swiglu_layout::tiled};
  }

 private:
  int device_ = 0;
  model_shape shape_{};
  std::uint32_t local_ = 0, groups_ = 0, max_requests_ = 0;
  std::uint64_t max_tokens_ = 0, max_rows_ = 0;
  cudaStream_t stream_ = nullptr;
  grouped_swiglu_shape gshape_{};
  std::size_t ws_bytes_ = 0;
  dev_buf<std::uint16_t> weights_;
  dev_buf<const void*> gate_, up_, down_;
  dev_buf<uint4> ws_;
  dev_buf<__nv_bfloat16> x_;
  dev_buf<float> y_, row_weight_;
  dev_buf<row_src> row_src_;
  dev_buf<std::int32_t> offsets_, tok_rows_;
  dev_buf<std::uint32_t> tok_req_, error_;
  dev_buf<answer_job> jobs_;
  dev_buf<unsigned char> staging_;
  dev_buf<unsigned int> arrivals_;
  dev_buf<int> results_;
  std::vector<std::uint64_t> tok_base_;
  std::vector<row_src> src_h_;
  std::vector<float> weight_h_;
  std::vector<std::int32_t> tok_rows_h_;
  std::vector<std::uint32_t> tok_req_h_;
  std::vector<answer_job> jobs_h_;
  std::vector<int> results_h_;
};

}  // namespace

status expert_step::create(int device, const model_shape& shape, std::uint32_t local_experts,
                           std::uint32_t max_requests, std::uint32_t max_tokens, std::unique_ptr<expert_step>& out) {
  auto s = std::make_unique<step_impl>();
  EAAS_CHECK(s->init(device, shape, local_experts, max_requests, max_tokens));
  out = std::move(s);
  return status::ok;
}

}  // namespace eaas::runtime::gpu
