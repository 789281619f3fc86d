#include "reference.hpp"

#include <algorithm>
#include <cmath>

#include "fail.hpp"
#include "synth.hpp"

namespace eaas::runtime {

dense_weights synthetic_dense_weights(const model_shape& shape, std::uint64_t seed, const dense_options& opts) {
  const std::uint32_t vocab = opts.vocab == 0 ? 1 : opts.vocab;
  dense_weights w;
  w.embed.resize(std::size_t{vocab} * shape.hidden);
  detail::fill_uniform(w.embed.data(), w.embed.size(), detail::mix(seed, 0xE3BEDull), 1.0f);
  w.attn.resize(shape.layers);
  w.routers.reserve(shape.layers);
  for (std::uint32_t l = 0; l < shape.layers; ++l) {
    w.attn[l].resize(std::size_t{shape.hidden} * shape.hidden);
    detail::fill_uniform(w.attn[l].data(), w.attn[l].size(), detail::mix(seed, 0xA77Eull, l),
                         1.0f / std::sqrt(float(shape.hidden)));
    w.routers.push_back(synthetic_router(shape, seed, l));
  }
  return w;
}

dense_model::dense_model(const model_shape& shape, std::uint64_t seed, const dense_options& opts)
    : shape_(shape), opts_(opts) {
  if (opts_.vocab == 0) opts_.vocab = 1;
  if (opts_.attention_cost == 0) opts_.attention_cost = 1;
  w_ = synthetic_dense_weights(shape, seed, opts_);
}

void dense_model::embed(std::span<const std::uint32_t> tokens, std::vector<float>& x) const {
  const std::size_t h = shape_.hidden;
  x.resize(tokens.size() * h);
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const float* row = w_.embed.data() + std::size_t{tokens[t] % opts_.vocab} * h;
    std::copy(row, row + h, x.data() + t * h);
  }
}

void dense_model::attention(std::uint32_t layer, std::vector<float>& x, std::vector<float>& normed) const {
  const std::size_t h = shape_.hidden, rows = x.size() / h;
  normed.resize(x.size());
  cpu::rmsnorm(x.data(), normed.data(), rows, h);
  // The first product feeds the residual; the others stand in for the rest of attention's cost.
  std::vector<float> a(x.size());
  for (std::uint32_t c = 0; c < opts_.attention_cost; ++c)
    cpu::gemm_nt(normed.data(), w_.attn[layer].data(), a.data(), rows, h, h);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] += 0.5f * a[i];
  cpu::rmsnorm(x.data(), normed.data(), rows, h);
}

void dense_model::route(std::uint32_t layer, const std::vector<float>& normed, routing& out) const {
  const std::size_t rows = normed.size() / shape_.hidden;
  out.ids.resize(rows * shape_.topk);
  out.weights.resize(rows * shape_.topk);
  cpu::route_topk(w_.routers[layer], normed.data(), rows, shape_.hidden, shape_.experts, shape_.topk, out.ids.data(),
                  out.weights.data());
}

status dense_model::load_routers(const std::function<status(std::uint32_t layer, router_weights&)>& load) {
  for (std::uint32_t l = 0; l < shape_.layers; ++l) {
    router_weights r;
    EAAS_CHECK(load(l, r));
    if (r.gate.size() != std::size_t{shape_.experts} * shape_.hidden)
      return EAAS_RT_FAIL(status::invalid_argument, "router of layer {}: {} values, expected {} x {}", l, r.gate.size(),
                          shape_.experts, shape_.hidden);
    w_.routers[l] = std::move(r);
  }
  return status::ok;
}

status reference_model::load(
    const std::function<status(std::uint32_t layer, router_weights&)>& router,
    const std::function<status(std::uint32_t layer, std::uint32_t expert, expert_weights&)>& expert) {
  const model_shape& s = dense_.shape();
  if (router) EAAS_CHECK(dense_.load_routers(router));
  if (!expert) return status::ok;
  const std::size_t n = std::size_t{s.hidden} * s.inter;
  for (std::uint32_t l = 0; l < s.layers; ++l)
    for (std::uint32_t e = 0; e < s.experts; ++e) {
      expert_weights w;
      EAAS_CHECK(expert(l, e, w));
      if (w.gate.size() != n || w.up.size() != n || w.down.size() != n)
        return EAAS_RT_FAIL(status::invalid_argument, "expert {} of layer {} has the wrong size", e, l);
      experts_[l][e] = std::move(w);
    }
  return status::ok;
}

reference_model::reference_model(const model_shape& shape, std::uint64_t seed, const dense_options& opts)
    : dense_(shape, seed, opts) {
  experts_.resize(shape.layers);
  for (std::uint32_t l = 0; l < shape.layers; ++l) {
    experts_[l].reserve(shape.experts);
    for (std::uint32_t e = 0; e < shape.experts; ++e) experts_[l].push_back(synthetic_expert(shape, seed, l, e));
  }
}

void reference_model::moe(std::uint32_t layer, const std::vector<float>& normed, const routing& r,
                          std::vector<float>& out) const {
  const model_shape& s = dense_.shape();
  const std::size_t h = s.hidden, rows = normed.size() / h;
  out.assign(normed.size(), 0.0f);
  std::vector<float> xs, ys;
  std::vector<std::size_t> which;
  std::vector<float> wts;
  cpu::swiglu_scratch scratch;
  for (std::uint32_t e = 0; e < s.experts; ++e) {
    which.clear();
    wts.clear();
    for (std::size_t t = 0; t < rows; ++t)
      for (std::uint32_t k = 0; k < s.topk; ++k)
        if (r.ids[t * s.topk + k] == e) {
          which.push_back(t);
          wts.push_back(r.weights[t * s.topk + k]);
        }
    if (which.empty()) continue;
    xs.resize(which.size() * h);
    ys.resize(which.size() * h);
    for (std::size_t i = 0; i < which.size(); ++i) std::copy_n(normed.data() + which[i] * h, h, xs.data() + i * h);
    cpu::swiglu_rows(experts_[layer][e], xs.data(), which.size(), s.hidden, s.inter, ys.data(), scratch);
    for (std::size_t i = 0; i < which.size(); ++i)
      for (std::size_t j = 0; j < h; ++j) out[which[i] * h + j] += wts[i] * ys[i * h + j];
  }
}

void reference_model::forward(std::span<const std::uint32_t> tokens, std::vector<float>& out,
                              const std::vector<routing>* use_routing, std::uint64_t* disagreements) const {
  std::vector<float> normed, m;
  routing r;
  const std::uint32_t topk = dense_.shape().topk;
  dense_.embed(tokens, out);
  for (std::uint32_t l = 0; l < dense_.shape().layers; ++l) {
    dense_.attention(l, out, normed);
    dense_.route(l, normed, r);
    if (use_routing != nullptr && l < use_routing->size() && (*use_routing)[l].ids.size() == r.ids.size()) {
      const routing& u = (*use_routing)[l];
      if (disagreements != nullptr)
        for (std::size_t t = 0; t < tokens.size(); ++t) {
          std::vector<std::uint32_t> a(r.ids.begin() + t * topk, r.ids.begin() + (t + 1) * topk);
          std::vector<std::uint32_t> b(u.ids.begin() + t * topk, u.ids.begin() + (t + 1) * topk);
          std::sort(a.begin(), a.end());
          std::sort(b.begin(), b.end());
          *disagreements += a != b;
        }
      r = u;
    }
    moe(l, normed, r, m);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] += m[i];
  }
}

}  // namespace eaas::runtime
