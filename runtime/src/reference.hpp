#pragma once

// The dense part of the model (embedding, attention stand-in, norms, routers) that every client
// runs, and the monolithic in-process reference: the same dense part plus every expert, local.

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "cpu_math.hpp"
#include "eaas/runtime/model.hpp"

namespace eaas::runtime {

struct dense_options {
  std::uint32_t vocab = 4096;
  std::uint32_t attention_cost = 1;  ///< dense GEMMs of hidden × hidden per layer and token (≥ 1)
};

/// One layer's routing for a batch: tokens × topk global expert ids and weights.
struct routing {
  std::vector<std::uint32_t> ids;
  std::vector<float> weights;
};

/// The dense part's weights, fp32, row-major (model.hpp's layout).
struct dense_weights {
  std::vector<float> embed;              ///< vocab × hidden
  std::vector<std::vector<float>> attn;  ///< per layer: hidden × hidden
  std::vector<router_weights> routers;   ///< per layer: experts × hidden
};

/// The synthetic dense weights of (shape, seed, opts): what a dense_model of them starts with.
dense_weights synthetic_dense_weights(const model_shape& shape, std::uint64_t seed, const dense_options& opts);

class dense_model {
 public:
  dense_model(const model_shape& shape, std::uint64_t seed, const dense_options& opts);

  const model_shape& shape() const { return shape_; }
  std::uint32_t vocab() const { return opts_.vocab; }

  /// x[T × hidden] = embedding rows of `tokens` (ids taken modulo vocab).
  void embed(std::span<const std::uint32_t> tokens, std::vector<float>& x) const;
  /// x += attention stand-in of x; then normed = rmsnorm(x), the experts' input.
  void attention(std::uint32_t layer, std::vector<float>& x, std::vector<float>& normed) const;
  /// The router of `layer` on normed activations.
  void route(std::uint32_t layer, const std::vector<float>& normed, routing& out) const;

  /// Its weights (e.g. for a copy on a GPU).
  const dense_weights& weights() const { return w_; }

  /// Replaces the synthetic routers with loaded ones (e.g. from a checkpoint); sizes are checked.
  status load_routers(const std::function<status(std::uint32_t layer, router_weights&)>& load);

 private:
  model_shape shape_;
  dense_options opts_;
  dense_weights w_;
};

/// Every expert in one process: the answer the disaggregated runtime must reproduce.
class reference_model {
 public:
  reference_model(const model_shape& shape, std::uint64_t seed, const dense_options& opts);

  const dense_model& dense() const { return dense_; }
  dense_model& dense() { return dense_; }
  /// Replaces the synthetic routers and experts with loaded ones (e.g. from a checkpoint).
  status load(const std::function<status(std::uint32_t layer, router_weights&)>& router,
              const std::function<status(std::uint32_t layer, std::uint32_t expert, expert_weights&)>& expert);

  /// The MoE output for normed activations and their routing: Σ_k w_k · expert_{id_k}(x).
  void moe(std::uint32_t layer, const std::vector<float>& normed, const routing& r, std::vector<float>& out) const;
  /// The whole forward pass: the final hidden states, T × hidden. With `use_routing` (one per layer),
  /// its experts and weights replace this model's own router decisions ("same routing"): a token
  /// whose top-k has a near-tie could otherwise pick another expert because of a rounding
  /// difference. `disagreements` then counts the (token, layer) pairs where its own router would have
  /// chosen a different set of experts.
  void forward(std::span<const std::uint32_t> tokens, std::vector<float>& out,
               const std::vector<routing>* use_routing = nullptr, std::uint64_t* disagreements = nullptr) const;

 private:
  dense_model dense_;
  std::vector<std::vector<expert_weights>> experts_;  // [layer][expert]
};

}  // namespace eaas::runtime
