#pragma once

#include <string>

#include "eaas/common/status.hpp"

namespace eaas {

/// What hwloc sees of this host.
struct topology_info {
  int packages = 0;  ///< CPU sockets
  int numa_nodes = 0;
  int cores = 0;        ///< physical cores
  int pus = 0;          ///< hardware threads
  int pci_devices = 0;  ///< PCI devices hwloc lists (GPUs and NICs among them)
  std::string summary;  ///< one line for logs
};

/// Reads the host topology.
status query_topology(topology_info& out);

/// Binds the calling thread to the first hardware thread of physical core `core`
/// (0 ≤ core < cores), so that latency runs do not migrate. `invalid_argument` when out of range.
status bind_thread_to_core(int core);

}  // namespace eaas
