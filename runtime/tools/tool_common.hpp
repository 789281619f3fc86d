#pragma once

// Command-line pieces the runtime's tools share.

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "eaas/eaas.hpp"
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

/// The p-th percentile (0..100) of `v`, nearest rank; 0 for none.
inline double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p / 100.0 * double(v.size())))];
}

inline int fail(const char* tool, const char* what, status s) {
  std::fprintf(stderr, "%s: %s: %s (%s)\n", tool, what, status_name(s), std::string(last_error()).c_str());
  return 1;
}

}  // namespace eaas::runtime::tool
