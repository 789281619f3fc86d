#pragma once

// The client's dense part (reference.hpp's dense_model) on one GPU, for the monolithic baseline and a
// GPU client (issue #9): embedding, per layer the attention stand-in and rmsnorm, and the router
// (gate GEMM, softmax, top-k). Same operations in the same order as dense_model:
//
//   x = embed[token % vocab]                       fp32 (exact: the table stays fp32)
//   n = rmsnorm(x); a = n · attn_l^T (attention_cost times); x += 0.5 a; normed = rmsnorm(x)
//   logits = normed · router_l^T; ids = top-k (ties to the lower id); weights = softmax over the top-k
//
// GEMM operands are bf16 (n, normed, attn, router), products and the residual fp32 (cuBLAS, bf16 in,
// fp32 compute and out). `normed` is handed on in bf16: it is the experts' input.
//
// Every call only queues work on the given stream: no host synchronisation, no allocation, sizes fixed
// by the host (the token count is the batch size of a captured graph; token ids, routing and counts are
// device data). So a whole forward can be captured in a CUDA graph and replayed with new token ids.
// Calls must be made with the object's device current and must not run concurrently with each other
// (they share scratch buffers and one cuBLAS handle).
//
// Plain C++ header; implemented in dense_gpu.cu.

#include <cstdint>
#include <memory>
#include <vector>

#include "eaas/common/status.hpp"
#include "eaas/runtime/model.hpp"
#include "reference.hpp"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace eaas::runtime::gpu {

class dense_gpu {
 public:
  /// Uploads `w` (embedding fp32, attention and routers rounded to bf16) to GPU `device` and allocates
  /// scratch for batches of up to `max_tokens` tokens. `invalid_argument` for a bad shape, weights of
  /// the wrong size, or hidden not a multiple of 8; `internal_error` when CUDA or cuBLAS fails.
  static status create(int device, const model_shape& shape, const dense_options& opts, const dense_weights& w,
                       std::uint32_t max_tokens, std::unique_ptr<dense_gpu>& out);
  virtual ~dense_gpu() = default;

  virtual const model_shape& shape() const = 0;
  virtual std::uint32_t vocab() const = 0;
  virtual std::uint32_t max_tokens() const = 0;

  /// x[tokens × hidden] (fp32, device) = embedding rows of the device token ids (taken modulo vocab).
  virtual status embed(const std::uint32_t* tokens, std::uint32_t n_tokens, float* x, CUstream_st* stream) = 0;
  /// x += attention stand-in of x (fp32, in place); normed (bf16 [tokens × hidden], device) = rmsnorm(x).
  virtual status attention(std::uint32_t layer, std::uint32_t n_tokens, float* x, void* normed_bf16,
                           CUstream_st* stream) = 0;
  /// The router of `layer` on bf16 normed activations: ids and weights, tokens × topk, device arrays.
  /// The logits stay readable in logits() until the next call.
  virtual status route(std::uint32_t layer, std::uint32_t n_tokens, const void* normed_bf16, std::uint32_t* ids,
                       float* weights, CUstream_st* stream) = 0;
  /// Device fp32 [max_tokens × experts]: the logits of the last route() (for tests: near-tie checks).
  virtual const float* logits() const = 0;
};

}  // namespace eaas::runtime::gpu
