#include "service.hpp"

#include <charconv>

#include "fail.hpp"

namespace eaas::runtime {
namespace {
struct preset {
  const char* name;
  model_shape shape;
};
constexpr preset kPresets[] = {
    {"tiny", {.hidden = 256, .inter = 256, .experts = 16, .topk = 4, .layers = 4}},
    {"small", {.hidden = 1024, .inter = 512, .experts = 32, .topk = 4, .layers = 4}},
    {"qwen3-30b-a3b", {.hidden = 2048, .inter = 768, .experts = 128, .topk = 8, .layers = 2}},
    {"qwen3-235b-a22b", {.hidden = 4096, .inter = 1536, .experts = 128, .topk = 8, .layers = 2}},
    {"deepseek-v3", {.hidden = 7168, .inter = 2048, .experts = 256, .topk = 8, .layers = 1}},
    {"gpt-oss-120b", {.hidden = 2880, .inter = 2880, .experts = 128, .topk = 4, .layers = 1}},
    {"mixtral-8x7b", {.hidden = 4096, .inter = 14336, .experts = 8, .topk = 2, .layers = 1}},
};
}  // namespace

status shape_preset(std::string_view name, model_shape& out) {
  for (const auto& p : kPresets)
    if (name == p.name) {
      out = p.shape;
      return status::ok;
    }
  return EAAS_RT_FAIL(status::not_found, "no model preset '{}' (known: {})", name, shape_preset_names());
}

std::string shape_preset_names() {
  std::string s;
  for (const auto& p : kPresets) s += (s.empty() ? "" : ", ") + std::string(p.name);
  return s;
}

status parse_id_list(std::string_view text, std::uint32_t limit, std::vector<std::uint32_t>& out) {
  out.clear();
  auto number = [&](std::string_view t, std::uint32_t& v) {
    const auto r = std::from_chars(t.data(), t.data() + t.size(), v);
    return r.ec == std::errc{} && r.ptr == t.data() + t.size() && !t.empty();
  };
  while (!text.empty()) {
    const std::size_t comma = text.find(',');
    const std::string_view item = text.substr(0, comma);
    text = comma == std::string_view::npos ? std::string_view{} : text.substr(comma + 1);
    const std::size_t dash = item.find('-');
    std::uint32_t a = 0, b = 0;
    const bool ok = dash == std::string_view::npos
                        ? number(item, a) && (b = a, true)
                        : number(item.substr(0, dash), a) && number(item.substr(dash + 1), b);
    if (!ok || a > b || b >= limit)
      return EAAS_RT_FAIL(status::invalid_argument, "id list: '{}' is not N or N-M with N <= M < {}", item, limit);
    for (std::uint32_t v = a; v <= b; ++v) out.push_back(v);
  }
  if (out.empty()) return EAAS_RT_FAIL(status::invalid_argument, "id list: empty");
  return status::ok;
}

std::vector<std::uint32_t> experts_of_server(std::uint32_t s, std::uint32_t servers, std::uint32_t experts,
                                             std::uint32_t replicas) {
  std::vector<std::uint32_t> out;
  if (servers == 0) return out;
  for (std::uint32_t e = 0; e < experts; ++e)
    if ((s + servers - e % servers) % servers < replicas) out.push_back(e);
  return out;
}

}  // namespace eaas::runtime
