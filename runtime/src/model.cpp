#include "eaas/runtime/model.hpp"

#include <cmath>

#include "fail.hpp"
#include "synth.hpp"

namespace eaas::runtime {

status check_shape(const model_shape& s) {
  constexpr std::uint64_t kMaxMatrix = std::uint64_t{1} << 31;
  if (s.hidden == 0 || s.inter == 0 || s.experts == 0 || s.topk == 0 || s.layers == 0)
    return EAAS_RT_FAIL(status::invalid_argument,
                        "model shape: every size must be nonzero (hidden {}, inter {}, experts {}, topk {}, layers {})",
                        s.hidden, s.inter, s.experts, s.topk, s.layers);
  if (s.topk > s.experts)
    return EAAS_RT_FAIL(status::invalid_argument, "model shape: topk {} exceeds experts {}", s.topk, s.experts);
  if (s.experts > 65535)
    return EAAS_RT_FAIL(status::invalid_argument, "model shape: {} experts; at most 65535 (local ids are u16)",
                        s.experts);
  if (std::uint64_t{s.hidden} * s.inter > kMaxMatrix || std::uint64_t{s.hidden} * s.experts > kMaxMatrix)
    return EAAS_RT_FAIL(status::invalid_argument, "model shape: a weight matrix exceeds 2^31 elements");
  if (s.layers > 4096) return EAAS_RT_FAIL(status::invalid_argument, "model shape: {} layers; at most 4096", s.layers);
  return status::ok;
}

namespace {
enum : std::uint64_t { tag_gate = 1, tag_up = 2, tag_down = 3, tag_router = 4 };
}

expert_weights synthetic_expert(const model_shape& s, std::uint64_t seed, std::uint32_t layer, std::uint32_t expert) {
  const std::size_t n = std::size_t{s.hidden} * s.inter;
  const std::uint64_t base = detail::mix(seed, layer, expert);
  expert_weights w;
  w.gate.resize(n);
  w.up.resize(n);
  w.down.resize(n);
  detail::fill_uniform(w.gate.data(), n, detail::mix(base, tag_gate), 1.0f / std::sqrt(float(s.hidden)));
  detail::fill_uniform(w.up.data(), n, detail::mix(base, tag_up), 1.0f / std::sqrt(float(s.hidden)));
  detail::fill_uniform(w.down.data(), n, detail::mix(base, tag_down), 1.0f / std::sqrt(float(s.inter)));
  return w;
}

router_weights synthetic_router(const model_shape& s, std::uint64_t seed, std::uint32_t layer) {
  const std::size_t n = std::size_t{s.hidden} * s.experts;
  router_weights r;
  r.gate.resize(n);
  // Wider than 1/sqrt(hidden), so that routing is decisive (top-k margins well above rounding).
  detail::fill_uniform(r.gate.data(), n, detail::mix(seed, layer, 0xFFFFFFFFu, tag_router),
                       4.0f / std::sqrt(float(s.hidden)));
  return r;
}

}  // namespace eaas::runtime
