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
  bool nvidia_peermem = false;         ///< /sys/module/nvidia_peermem exists
  bool dma_buf = false;                ///< Linux >= 5.12, the NVIDIA driver, and (when a GPU was named) the GPU's
                                       ///< CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED
  bool uar_mapping = false;            ///< GPUs may map the NIC's doorbell page (root, or PeerMappingOverride=1)
  std::string missing;                 ///< the first missing prerequisite, in words; empty when none is
};

/// Probes, in order: rdma-core in this build, an mlx5 RDMA device, DEVX on it, a GPUDirect RDMA path
/// (nvidia_peermem, or dma-buf: Linux >= 5.12 with the NVIDIA driver and, when `cuda_device` >= 0 in
/// a CUDA build, the GPU's dma-buf attribute), permission to map the UAR into a GPU (root or the
/// driver option PeerMappingOverride=1; the mapping itself is tried when a QP is made). `ok` when
/// all are present; otherwise `unsupported`, with `out.missing` (and last_error) naming the first
/// one that is not: "no mlx5 device ...", "... DEVX ...", "no GPUDirect RDMA path ...", "... doorbell
/// page ...".
status probe_ibgda(ibgda_support& out, int cuda_device = -1);

}  // namespace eaas
