// What the host offers for the ibgda transport (see eaas/host/ibgda.hpp).

#include "transport/ibgda/probe.hpp"

#include <sys/utsname.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include "eaas/config.hpp"
#include "log.hpp"

namespace eaas {
namespace detail::ibgda {

namespace {

bool kernel_at_least(int major, int minor) {
  utsname u{};
  if (::uname(&u) != 0) return false;
  int a = 0, b = 0;
  if (std::sscanf(u.release, "%d.%d", &a, &b) != 2) return false;
  return a > major || (a == major && b >= minor);
}

std::string read_text(const char* path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

}  // namespace

host_facts gather_facts(verbs_api* verbs, gpu_api* gpu) {
  host_facts f;
  f.built = verbs != nullptr;
  if (verbs != nullptr) {
    f.list_errno = verbs->list_devices(f.devices);
    for (const auto& d : f.devices) {
      if (!d.mlx5) continue;
      void* ctx = nullptr;
      const int e = verbs->open_devx(d.name, ctx);
      if (e == 0 && ctx != nullptr) {
        f.devx_ok.push_back(d.name);
        verbs->close_device(ctx);
      } else {
        f.devx_failed.push_back(fmt::format("{} (errno {}: {})", d.name, e, std::strerror(e != 0 ? e : EOPNOTSUPP)));
      }
    }
  }
  f.nvidia_peermem = ::access("/sys/module/nvidia_peermem", F_OK) == 0;
  f.nvidia_driver = ::access("/proc/driver/nvidia/version", F_OK) == 0;
  f.kernel_dmabuf = kernel_at_least(5, 12);
  if (gpu != nullptr) f.gpu_dma_buf = gpu->dma_buf_supported() ? 1 : 0;
  f.root = ::geteuid() == 0;
  f.peer_mapping_override = read_text("/proc/driver/nvidia/params").find("PeerMappingOverride=1") != std::string::npos;
  return f;
}

ibgda_support evaluate(const host_facts& f) {
  ibgda_support s;
  s.built = f.built;
  s.rdma_devices = static_cast<int>(f.devices.size());
  s.mlx5_devx = f.devx_ok;
  s.nvidia_peermem = f.nvidia_peermem;
  s.dma_buf = f.kernel_dmabuf && f.nvidia_driver && f.gpu_dma_buf != 0;
  s.gpudirect = s.nvidia_peermem || s.dma_buf;
  s.gpudirect_path = s.nvidia_peermem ? "nvidia_peermem" : s.dma_buf ? "dma-buf" : "";
  s.uar_mapping = f.root || f.peer_mapping_override;

  std::string names, not_mlx5;
  for (const auto& d : f.devices) {
    names += (names.empty() ? "" : ", ") + d.name;
    if (!d.mlx5) not_mlx5 += (not_mlx5.empty() ? "" : ", ") + d.name;
  }
  if (!s.built) {
    s.missing =
        "eaas was built without rdma-core's mlx5dv (configure with -DEAAS_WITH_IBGDA=ON after installing "
        "libibverbs-dev)";
  } else if (f.list_errno != 0) {
    s.missing = fmt::format("no mlx5 device: ibv_get_device_list failed (errno {}: {})", f.list_errno,
                            std::strerror(f.list_errno));
  } else if (f.devices.empty()) {
    s.missing = "no mlx5 device: no RDMA device on this host (rdma-core lists none)";
  } else if (s.mlx5_devx.empty()) {
    std::string why;
    if (!not_mlx5.empty()) why = fmt::format("not mlx5: {}", not_mlx5);
    for (const auto& d : f.devx_failed)
      why += fmt::format("{}mlx5dv_open_device(DEVX) failed on {}", why.empty() ? "" : "; ", d);
    s.missing =
        fmt::format("no mlx5 device with DEVX among the {} RDMA device(s) ({}): {}", f.devices.size(), names, why);
  } else if (!s.gpudirect) {
    std::string dmabuf_why = !f.kernel_dmabuf     ? "Linux is older than 5.12"
                             : !f.nvidia_driver   ? "no NVIDIA driver is loaded"
                             : f.gpu_dma_buf == 0 ? "the GPU reports CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 0 (the "
                                                    "open kernel modules are needed)"
                                                  : "unknown";
    s.missing = fmt::format(
        "no GPUDirect RDMA path: nvidia_peermem is not loaded (/sys/module/nvidia_peermem) and dma-buf is not "
        "available ({})",
        dmabuf_why);
  } else if (!s.uar_mapping) {
    s.missing =
        "GPUs may not map the NIC's doorbell page (UAR): run as root or set the NVIDIA driver option "
        "NVreg_RegistryDwords=\"PeerMappingOverride=1;\"";
  }
  return s;
}

#if !EAAS_WITH_IBGDA
std::unique_ptr<verbs_api> make_real_verbs() { return nullptr; }
#endif
#if !EAAS_WITH_CUDA
std::unique_ptr<gpu_api> make_real_gpu(int) { return nullptr; }
#endif

}  // namespace detail::ibgda

status probe_ibgda(ibgda_support& out, int cuda_device) {
  using namespace detail::ibgda;
  std::unique_ptr<verbs_api> verbs;
  std::unique_ptr<gpu_api> gpu;
#if EAAS_WITH_IBGDA
  verbs = make_real_verbs();
#endif
#if EAAS_WITH_CUDA
  if (cuda_device >= 0) gpu = make_real_gpu(cuda_device);
#else
  (void)cuda_device;
#endif
  const host_facts f = gather_facts(verbs.get(), gpu.get());
  out = evaluate(f);
  if (!out.missing.empty()) return EAAS_FAIL(status::unsupported, "ibgda: {}", out.missing);
  return status::ok;
}

}  // namespace eaas
