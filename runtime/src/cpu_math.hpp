#pragma once

// The CPU expert math (OpenBLAS): everything fp32, row-major, weights in nn.Linear layout [out, in].

#include <cstddef>
#include <cstdint>
#include <vector>

#include "eaas/runtime/model.hpp"

namespace eaas::runtime::cpu {

/// y[rows × n] = x[rows × k] · w[n × k]^T (+ y when accumulate).
void gemm_nt(const float* x, const float* w, float* y, std::size_t rows, std::size_t n, std::size_t k,
             bool accumulate = false);

/// y = x / rms(x) per row (no learned scale), eps 1e-6.
void rmsnorm(const float* x, float* y, std::size_t rows, std::size_t hidden);

/// Scratch for swiglu_rows, reused across calls.
struct swiglu_scratch {
  std::vector<float> g, u;
};

/// y[rows × hidden] = down · (silu(gate · x) ⊙ (up · x)) for `rows` contiguous rows of x.
void swiglu_rows(const expert_weights& w, const float* x, std::size_t rows, std::uint32_t hidden, std::uint32_t inter,
                 float* y, swiglu_scratch& scratch);

/// Router: logits = x · gate^T, softmax over experts, the top `topk` (ties to the lower id), their
/// probabilities renormalised to sum to 1. ids/weights: rows × topk.
void route_topk(const router_weights& r, const float* x, std::size_t rows, std::uint32_t hidden, std::uint32_t experts,
                std::uint32_t topk, std::uint32_t* ids, float* weights);

}  // namespace eaas::runtime::cpu
