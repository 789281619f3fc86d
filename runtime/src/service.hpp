#pragma once

// What the runtime's command-line tools share: model presets, expert placement, id lists.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "eaas/runtime/model.hpp"

namespace eaas::runtime {

/// Model shapes by name: "tiny" (the CPU demo's default), "small", and the layer shapes of
/// DESIGN.md §6: "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "gpt-oss-120b", "mixtral-8x7b".
/// `layers` is the number of MoE layers to run (the presets set a few, not the model's full depth).
status shape_preset(std::string_view name, model_shape& out);
/// The preset names, comma-separated (for --help).
std::string shape_preset_names();

/// "0-7,9,12-13" → {0..7, 9, 12, 13}; refuses anything else and values >= `limit`.
status parse_id_list(std::string_view text, std::uint32_t limit, std::vector<std::uint32_t>& out);

/// Placement: expert e lives on servers (e + j) mod servers, j < replicas. The experts of server `s`.
std::vector<std::uint32_t> experts_of_server(std::uint32_t s, std::uint32_t servers, std::uint32_t experts,
                                             std::uint32_t replicas);

}  // namespace eaas::runtime
