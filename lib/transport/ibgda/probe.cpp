// What the host offers for the ibgda transport (see eaas/host/ibgda.hpp).

#include <sys/utsname.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "eaas/config.hpp"
#include "eaas/host/ibgda.hpp"
#include "log.hpp"

#if EAAS_WITH_IBGDA
#include <infiniband/mlx5dv.h>
#include <infiniband/verbs.h>
#endif

namespace eaas {

namespace {

bool kernel_at_least(int major, int minor) {
  utsname u{};
  if (::uname(&u) != 0) return false;
  int a = 0, b = 0;
  if (std::sscanf(u.release, "%d.%d", &a, &b) != 2) return false;
  return a > major || (a == major && b >= minor);
}

std::string read_file(const char* path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

}  // namespace

status probe_ibgda(ibgda_support& out) {
  ibgda_support s;
  s.built = EAAS_WITH_IBGDA != 0;
#if EAAS_WITH_IBGDA
  int n = 0;
  ibv_device** list = ::ibv_get_device_list(&n);
  s.rdma_devices = list != nullptr ? n : 0;
  for (int i = 0; i < s.rdma_devices; ++i) {
    if (!::mlx5dv_is_supported(list[i])) continue;
    mlx5dv_context_attr attr{};
    attr.flags = MLX5DV_CONTEXT_FLAGS_DEVX;
    if (ibv_context* ctx = ::mlx5dv_open_device(list[i], &attr)) {
      s.mlx5_devx.emplace_back(::ibv_get_device_name(list[i]));
      ::ibv_close_device(ctx);
    }
  }
  if (list != nullptr) ::ibv_free_device_list(list);
#endif
  if (::access("/sys/module/nvidia_peermem", F_OK) == 0) {
    s.gpudirect = true;
    s.gpudirect_path = "nvidia_peermem";
  } else if (kernel_at_least(5, 12) && ::access("/proc/driver/nvidia/version", F_OK) == 0) {
    // dma-buf export of GPU memory: the NVIDIA driver and Linux ≥ 5.12 (the GPU's own support is
    // checked when a region is registered).
    s.gpudirect = true;
    s.gpudirect_path = "dma-buf";
  }
  const std::string params = read_file("/proc/driver/nvidia/params");
  s.uar_mapping = ::geteuid() == 0 || params.find("PeerMappingOverride=1") != std::string::npos;

  if (!s.built)
    s.missing =
        "eaas was built without rdma-core's mlx5dv (configure with -DEAAS_WITH_IBGDA=ON after installing "
        "libibverbs-dev)";
  else if (s.rdma_devices == 0)
    s.missing = "no RDMA device on this host (rdma-core lists none)";
  else if (s.mlx5_devx.empty())
    s.missing = fmt::format("no mlx5 device with DEVX among the {} RDMA device(s)", s.rdma_devices);
  else if (!s.gpudirect)
    s.missing = "no GPUDirect RDMA path: load nvidia_peermem, or use Linux >= 5.12 with the NVIDIA driver (dma-buf)";
  else if (!s.uar_mapping)
    s.missing =
        "GPUs may not map the NIC's doorbell page: run as root or set the NVIDIA driver option "
        "NVreg_RegistryDwords=\"PeerMappingOverride=1;\"";
  out = s;
  if (!s.missing.empty()) return EAAS_FAIL(status::unsupported, "ibgda: {}", s.missing);
  return status::ok;
}

}  // namespace eaas
