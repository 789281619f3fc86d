#pragma once

// Command-line pieces the runtime's tools share.

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "eaas/eaas.hpp"
#include "eaas/runtime/safetensors.hpp"
#include "service.hpp"

namespace eaas::runtime::tool {

/// The model a tool runs: a preset, optionally with sizes overridden.
struct model_args {
  std::string preset = "tiny";
  std::uint32_t hidden = 0, inter = 0, experts = 0, topk = 0, layers = 0;
  std::uint64_t seed = 1;

  void add(CLI::App& app) {
    app.add_option("--model", preset, "model shape preset: " + shape_preset_names())->capture_default_str();
    app.add_option("--hidden", hidden, "override the preset's hidden size");
    app.add_option("--inter", inter, "override the preset's expert intermediate size");
    app.add_option("--experts", experts, "override the preset's expert count");
    app.add_option("--topk", topk, "override the preset's top-k");
    app.add_option("--layers", layers, "override the preset's MoE layer count");
    app.add_option("--seed", seed, "synthetic weights' seed")->capture_default_str();
  }
  status resolve(model_shape& s) const {
    EAAS_CHECK(shape_preset(preset, s));
    if (hidden) s.hidden = hidden;
    if (inter) s.inter = inter;
    if (experts) s.experts = experts;
    if (topk) s.topk = topk;
    if (layers) s.layers = layers;
    return check_shape(s);
  }
};

inline int fail(const char* tool, const char* what, status s) {
  std::fprintf(stderr, "%s: %s: %s (%s)\n", tool, what, status_name(s), std::string(last_error()).c_str());
  return 1;
}

/// A safetensors checkpoint named on the command line: --checkpoint, --layout, --first-moe-layer.
struct checkpoint_args {
  std::string path, layout = "auto";
  std::uint32_t first_moe_layer = ~0u;

  void add(CLI::App& app, const std::string& what) {
    app.add_option("--checkpoint", path,
                   what + " from safetensors (a file, or a directory with model.safetensors.index.json)");
    app.add_option("--layout", layout, "checkpoint tensor names: auto, deepseek-v3, qwen3-moe, mixtral")
        ->capture_default_str();
    app.add_option("--first-moe-layer", first_moe_layer, "decoder layer of MoE layer 0 (default: the layout's)");
  }
  /// Opens it and settles the naming; false (with a message from `tool`) on failure. Nothing to do
  /// without --checkpoint (`naming` stays empty).
  bool open(const char* tool, checkpoint& ck, std::unique_ptr<hf_naming>& naming) const {
    if (path.empty()) return true;
    auto refuse = [tool](const char* what, status s) {
      fail(tool, what, s);
      return false;
    };
    if (status s = ck.open(path); s != status::ok) return refuse("--checkpoint", s);
    hf_naming n(hf_layout::qwen3_moe);
    if (layout == "auto") {
      if (status s = detect_hf_layout(ck, n); s != status::ok) return refuse("--layout auto", s);
    } else {
      hf_layout l;
      if (status s = parse_hf_layout(layout, l); s != status::ok) return refuse("--layout", s);
      n = hf_naming(l);
    }
    if (first_moe_layer != ~0u) n = hf_naming(n.layout, first_moe_layer);
    naming = std::make_unique<hf_naming>(n);
    return true;
  }
};

/// The p-th percentile (0..100) of `v`, nearest rank; 0 for none.
inline double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p / 100.0 * double(v.size())))];
}

}  // namespace eaas::runtime::tool
