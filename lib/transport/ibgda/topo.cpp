// PCI paths from hwloc, for choosing the NIC nearest to a GPU (see host.hpp).

#include <hwloc.h>

#include <algorithm>
#include <mutex>

#include "transport/ibgda/host.hpp"

namespace eaas::detail::ibgda {

namespace {

// One topology with the PCI tree (bridges included), loaded on first use.
struct pci_topology {
  hwloc_topology_t t = nullptr;
  bool ok = false;
  pci_topology() {
    if (hwloc_topology_init(&t) != 0) return;
    hwloc_topology_set_io_types_filter(t, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    ok = hwloc_topology_load(t) == 0;
  }
  ~pci_topology() {
    if (t != nullptr) hwloc_topology_destroy(t);
  }
};

pci_topology& topology() {
  static pci_topology instance;
  return instance;
}

}  // namespace

std::vector<std::uint64_t> pci_path(const std::string& bus_id) {
  std::vector<std::uint64_t> path;
  if (bus_id.empty()) return path;
  pci_topology& tp = topology();
  if (!tp.ok) return path;
  static std::mutex mu;  // hwloc topologies are not safe for concurrent queries
  std::lock_guard lock(mu);
  hwloc_obj_t o = hwloc_get_pcidev_by_busidstring(tp.t, bus_id.c_str());
  for (; o != nullptr; o = o->parent) path.push_back(o->gp_index);
  std::reverse(path.begin(), path.end());
  return path;
}

}  // namespace eaas::detail::ibgda
