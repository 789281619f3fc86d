#pragma once

// The ibgda prerequisite probe, split into gathering facts (system calls) and judging them (pure),
// so that each verdict is tested with made-up facts.

#include <string>
#include <vector>

#include "eaas/host/ibgda.hpp"
#include "transport/ibgda/verbs_api.hpp"

namespace eaas::detail::ibgda {

/// What the probe found on this host.
struct host_facts {
  bool built = false;                    ///< rdma-core is in this build
  int list_errno = 0;                    ///< ibv_get_device_list's error, 0 if it answered
  std::vector<nic_info> devices;         ///< RDMA devices
  std::vector<std::string> devx_ok;      ///< mlx5 devices that opened with DEVX
  std::vector<std::string> devx_failed;  ///< "name (errno ...)" of those that did not
  bool nvidia_peermem = false;
  bool nvidia_driver = false;
  bool kernel_dmabuf = false;  ///< Linux >= 5.12
  int gpu_dma_buf = -1;        ///< the GPU's dma-buf attribute: 1, 0, or -1 when no GPU was asked about
  bool root = false;
  bool peer_mapping_override = false;
};

/// Asks `verbs` (null: not built) and the system; `gpu` (null: no GPU named) for the dma-buf attribute.
host_facts gather_facts(verbs_api* verbs, gpu_api* gpu);

/// The verdict: every field of ibgda_support, `missing` naming the first absent prerequisite.
ibgda_support evaluate(const host_facts& f);

}  // namespace eaas::detail::ibgda
