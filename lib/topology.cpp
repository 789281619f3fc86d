#include "eaas/host/topology.hpp"

#include <hwloc.h>

#include "log.hpp"

namespace eaas {

namespace {

// hwloc topologies are costly to load: one per process, loaded on first use.
struct topo {
  hwloc_topology_t t = nullptr;
  bool ok = false;
  topo() {
    if (hwloc_topology_init(&t) != 0) return;
    hwloc_topology_set_io_types_filter(t, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    ok = hwloc_topology_load(t) == 0;
  }
  ~topo() {
    if (t != nullptr) hwloc_topology_destroy(t);
  }
};

topo& the_topology() {
  static topo instance;
  return instance;
}

int count(hwloc_topology_t t, hwloc_obj_type_t type) {
  const int n = hwloc_get_nbobjs_by_type(t, type);
  return n < 0 ? 0 : n;
}

}  // namespace

status query_topology(topology_info& out) {
  topo& tp = the_topology();
  if (!tp.ok) return EAAS_FAIL(status::internal_error, "topology: hwloc could not load this host's topology");
  topology_info info;
  info.packages = count(tp.t, HWLOC_OBJ_PACKAGE);
  info.numa_nodes = count(tp.t, HWLOC_OBJ_NUMANODE);
  info.cores = count(tp.t, HWLOC_OBJ_CORE);
  info.pus = count(tp.t, HWLOC_OBJ_PU);
  info.pci_devices = count(tp.t, HWLOC_OBJ_PCI_DEVICE);
  info.summary = fmt::format("{} package(s), {} NUMA node(s), {} core(s), {} hardware thread(s), {} PCI device(s)",
                             info.packages, info.numa_nodes, info.cores, info.pus, info.pci_devices);
  out = std::move(info);
  return status::ok;
}

status bind_thread_to_core(int core) {
  topo& tp = the_topology();
  if (!tp.ok) return EAAS_FAIL(status::internal_error, "topology: hwloc could not load this host's topology");
  const int cores = count(tp.t, HWLOC_OBJ_CORE);
  if (core < 0 || core >= cores)
    return EAAS_FAIL(status::invalid_argument, "bind_thread_to_core: core {} does not exist (this host has {})", core,
                     cores);
  hwloc_obj_t c = hwloc_get_obj_by_type(tp.t, HWLOC_OBJ_CORE, static_cast<unsigned>(core));
  hwloc_obj_t pu = hwloc_get_obj_inside_cpuset_by_type(tp.t, c->cpuset, HWLOC_OBJ_PU, 0);
  if (pu == nullptr || hwloc_set_cpubind(tp.t, pu->cpuset, HWLOC_CPUBIND_THREAD) != 0)
    return EAAS_FAIL(status::internal_error, "bind_thread_to_core: hwloc_set_cpubind to core {} failed", core);
  return status::ok;
}

}  // namespace eaas
