#include "cpu_math.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>

namespace eaas::runtime::cpu {

void gemm_nt(const float* x, const float* w, float* y, std::size_t rows, std::size_t n, std::size_t k,
             bool accumulate) {
  if (rows == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(rows), static_cast<blasint>(n),
              static_cast<blasint>(k), 1.0f, x, static_cast<blasint>(k), w, static_cast<blasint>(k),
              accumulate ? 1.0f : 0.0f, y, static_cast<blasint>(n));
}

void rmsnorm(const float* x, float* y, std::size_t rows, std::size_t hidden) {
  for (std::size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * hidden;
    double ss = 0;
    for (std::size_t i = 0; i < hidden; ++i) ss += double(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / double(hidden) + 1e-6));
    for (std::size_t i = 0; i < hidden; ++i) y[r * hidden + i] = xr[i] * inv;
  }
}

void swiglu_rows(const expert_weights& w, const float* x, std::size_t rows, std::uint32_t hidden, std::uint32_t inter,
                 float* y, swiglu_scratch& s) {
  if (rows == 0) return;
  s.g.resize(rows * inter);
  s.u.resize(rows * inter);
  gemm_nt(x, w.gate.data(), s.g.data(), rows, inter, hidden);
  gemm_nt(x, w.up.data(), s.u.data(), rows, inter, hidden);
  for (std::size_t i = 0; i < rows * inter; ++i) {
    const float g = s.g[i];
    s.g[i] = g / (1.0f + std::exp(-g)) * s.u[i];
  }
  gemm_nt(s.g.data(), w.down.data(), y, rows, hidden, inter);
}

void route_topk(const router_weights& r, const float* x, std::size_t rows, std::uint32_t hidden, std::uint32_t experts,
                std::uint32_t topk, std::uint32_t* ids, float* weights) {
  std::vector<float> logits(rows * experts);
  gemm_nt(x, r.gate.data(), logits.data(), rows, experts, hidden);
  std::vector<std::uint32_t> order(experts);
  for (std::size_t t = 0; t < rows; ++t) {
    const float* l = logits.data() + t * experts;
    std::iota(order.begin(), order.end(), 0u);
    std::partial_sort(order.begin(), order.begin() + topk, order.end(),
                      [l](std::uint32_t a, std::uint32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    // softmax over all experts, then renormalised over the chosen: the max cancels, so only the top-k
    // exponentials matter.
    const float mx = l[order[0]];
    float sum = 0;
    for (std::uint32_t k = 0; k < topk; ++k) sum += std::exp(l[order[k]] - mx);
    for (std::uint32_t k = 0; k < topk; ++k) {
      ids[t * topk + k] = order[k];
      weights[t * topk + k] = std::exp(l[order[k]] - mx) / sum;
    }
  }
}

}  // namespace eaas::runtime::cpu
