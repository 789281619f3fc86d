// eaas-info: what this build and this host offer — versions, transports, topology, and for ibgda the
// first missing prerequisite by name.

#include <cstdio>
#include <string>

#include "eaas/eaas.hpp"

#if EAAS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

int main() {
  std::printf("eaas %s\n", EAAS_VERSION_STRING);
  std::printf("build: CUDA %s, rdma-core mlx5dv %s\n", EAAS_WITH_CUDA ? "yes" : "no", EAAS_WITH_IBGDA ? "yes" : "no");
  eaas::topology_info topo;
  if (eaas::query_topology(topo) == eaas::status::ok) std::printf("host: %s\n", topo.summary.c_str());

  std::printf("transport shm:    available (processes of this host)\n");
#if EAAS_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
  if (n == 0) std::printf("transport nvlink: no CUDA device visible\n");
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    cudaGetDeviceProperties(&p, i);
    std::string peers;
    for (int j = 0; j < n; ++j) {
      int can = 0;
      if (j != i && cudaDeviceCanAccessPeer(&can, i, j) == cudaSuccess && can)
        peers.append(" ").append(std::to_string(j));
    }
    std::printf("transport nvlink: GPU %d %s, %d SMs, peer access to:%s\n", i, p.name, p.multiProcessorCount,
                peers.empty() ? " none" : peers.c_str());
  }
#else
  std::printf("transport nvlink: not built (configure with CUDA)\n");
#endif
  eaas::ibgda_support ib;
  if (eaas::probe_ibgda(ib) == eaas::status::ok) {
    std::printf("transport ibgda:  prerequisites present (%zu mlx5 DEVX device(s), GPUDirect via %s)\n",
                ib.mlx5_devx.size(), ib.gpudirect_path.c_str());
  } else {
    std::printf("transport ibgda:  unavailable: %s\n", ib.missing.c_str());
  }
  return 0;
}
