#pragma once

// The GPU transports of eaas-pingpong and eaas-bw, in one place: their command-line flags, and the
// dispatch of `--transport nvlink` and `--transport ibgda --soft-nic` (a build without CUDA says so).

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "driver.hpp"
#include "nvlink_pair.hpp"
#if EAAS_PERF_WITH_GPU
#include "gpu_tools.hpp"
#endif

namespace eaas::perf {

struct gpu_flags {
  bool soft_nic = false;
  std::vector<std::uint32_t> warps;
  int gpu = -1, server_gpu = -1;
};

inline void add_gpu_flags(CLI::App& app, gpu_flags& f) {
  app.add_flag("--soft-nic", f.soft_nic, "ibgda: post from this GPU to the software NIC model (no NIC needed)");
  app.add_option("--warps", f.warps, "ibgda --soft-nic: posting-rate rows for these counts of posting warps");
  app.add_option("--gpu", f.gpu, "nvlink: this side's CUDA device (default: client 0, server 1 or 0)");
  app.add_option("--server-gpu", f.server_gpu, "nvlink, --role both: the server's CUDA device");
}

[[noreturn]] inline void die_without_cuda(const std::string& what) {
  die(what + ": this build has no CUDA (configure with -DEAAS_WITH_CUDA=ON on a GPU machine)", status::unsupported);
}

enum class nvlink_tool { pingpong, bw };

/// --transport nvlink: the tool's side `g.role` (both: a server process and the client here).
inline int run_nvlink(nvlink_pair_options g, const gpu_flags& f, nvlink_tool tool) {
  g.gpu = f.gpu;
  g.server_gpu = f.server_gpu;
#if EAAS_PERF_WITH_GPU
  return run_nvlink_tool(g, tool == nvlink_tool::pingpong ? run_nvlink_pingpong : run_nvlink_bw);
#else
  (void)tool;
  die_without_cuda("--transport nvlink");
#endif
}

/// --transport ibgda: the posting path against the software NIC (--soft-nic), or why not.
inline int run_ibgda(const gpu_flags& f, const std::vector<std::size_t>& sizes, std::size_t iters, std::size_t warmup,
                     const std::string& json) {
  if (!f.soft_nic)
    die("--transport ibgda: measuring against a real mlx5 NIC is not built yet (no machine here has one); "
        "--soft-nic measures the posting path against the software NIC model",
        status::unsupported);
#if EAAS_PERF_WITH_GPU
  return run_soft_nic(sizes, iters, warmup, f.gpu, f.warps, json);
#else
  (void)sizes, (void)iters, (void)warmup, (void)json;
  die_without_cuda("--soft-nic");
#endif
}

}  // namespace eaas::perf
