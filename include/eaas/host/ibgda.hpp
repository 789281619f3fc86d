#pragma once

#include <string>
#include <vector>

#include "eaas/common/status.hpp"

namespace eaas {

/// What this host offers for GPU-initiated RDMA (the ibgda transport), prerequisite by prerequisite.
struct ibgda_support {
  bool built = false;                  ///< eaas was built against rdma-core's mlx5dv
  int rdma_devices = 0;                ///< RDMA devices rdma-core lists
  std::vector<std::string> mlx5_devx;  ///< mlx5 devices that open with DEVX
  bool gpudirect = false;              ///< a GPUDirect RDMA path exists
  std::string gpudirect_path;          ///< "nvidia_peermem", "dma-buf" or empty
  bool uar_mapping = false;            ///< GPUs may map the NIC's doorbell page (root, or PeerMappingOverride=1)
  std::string missing;                 ///< the first missing prerequisite, in words; empty when none is
};

/// Probes, in order: rdma-core in this build, an RDMA device, an mlx5 device with DEVX, a GPUDirect
/// RDMA path (nvidia_peermem, or dma-buf with Linux ≥ 5.12), permission to map the UAR into a GPU.
/// `ok` when all are present; otherwise `unsupported`, with `out.missing` (and last_error) naming
/// the first one that is not.
status probe_ibgda(ibgda_support& out);

}  // namespace eaas
