#pragma once

// The GPU modes of eaas-pingpong and eaas-bw, shared by both tools (GPU builds only; gpu_tools.cpp).

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "nvlink_pair.hpp"

namespace eaas::perf {

/// --transport nvlink: runs `g.role` (server or client); role "both" starts the server as a second
/// process of this executable (same --max-size, --gpu = g.server_gpu) and runs `client` here.
int run_nvlink_tool(nvlink_pair_options g, int (*client)(const nvlink_pair_options&));

/// --transport ibgda --soft-nic: the ibgda posting path, kernels on GPU `gpu` (-1: 0) against the
/// software NIC model (ibgda_softnic.hpp): posting-rate rows for `warps` posting warps (empty: the
/// default set), then puts of `sizes` with local completion. `iters` 0: the default.
int run_soft_nic(const std::vector<std::size_t>& sizes, std::size_t iters, std::size_t warmup, int gpu,
                 const std::vector<std::uint32_t>& warps, const std::string& json);

}  // namespace eaas::perf
