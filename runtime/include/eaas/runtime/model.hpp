#pragma once

/// The MoE model the reference runtime serves: its shape and its expert weights.
///
/// Weight matrices follow Hugging Face's `nn.Linear` convention, row-major `[out, in]`:
///   gate, up  [inter, hidden]     down  [hidden, inter]     router  [experts, hidden]
/// An expert computes  y = down · (silu(gate · x) ⊙ (up · x)).

#include <cstdint>
#include <vector>

#include "eaas/common/status.hpp"

namespace eaas::runtime {

struct model_shape {
  std::uint32_t hidden = 0;   ///< model (hidden) size
  std::uint32_t inter = 0;    ///< expert intermediate size
  std::uint32_t experts = 0;  ///< routed experts per MoE layer
  std::uint32_t topk = 0;     ///< experts per token
  std::uint32_t layers = 0;   ///< MoE layers

  friend bool operator==(const model_shape&, const model_shape&) = default;
};

/// Checks that every size is nonzero, topk <= experts, experts <= 65535 (local ids are u16) and that
/// no matrix exceeds 2^31 elements. `invalid_argument` with the offending field otherwise.
status check_shape(const model_shape& s);

/// One expert's SwiGLU weights, fp32, row-major as above.
struct expert_weights {
  std::vector<float> gate;  ///< inter × hidden
  std::vector<float> up;    ///< inter × hidden
  std::vector<float> down;  ///< hidden × inter
};

/// One layer's router, fp32: experts × hidden.
struct router_weights {
  std::vector<float> gate;
};

/// Synthetic weights: a pure function of (seed, layer, expert), so that every server generates just
/// its own experts and a reference generates all of them, bit for bit the same. Entries are uniform
/// in ±1/sqrt(fan-in).
expert_weights synthetic_expert(const model_shape& s, std::uint64_t seed, std::uint32_t layer, std::uint32_t expert);
router_weights synthetic_router(const model_shape& s, std::uint64_t seed, std::uint32_t layer);

}  // namespace eaas::runtime
