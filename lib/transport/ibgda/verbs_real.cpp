// verbs_api over rdma-core (libibverbs + libmlx5): one forwarding call per method.

#include <infiniband/mlx5dv.h>
#include <infiniband/verbs.h>
#include <limits.h>
#include <stdlib.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "transport/ibgda/verbs_api.hpp"

namespace eaas::detail::ibgda {

namespace {

int errno_or(int fallback) { return errno != 0 ? errno : fallback; }

std::string pci_of(const ibv_device* d) {
  // /sys/class/infiniband/<name>/device -> .../0000:3b:00.0
  const std::string link = std::string(d->ibdev_path) + "/device";
  char buf[PATH_MAX];
  if (::realpath(link.c_str(), buf) == nullptr) return {};
  const std::string full(buf);
  const auto slash = full.rfind('/');
  return slash == std::string::npos ? full : full.substr(slash + 1);
}

class real_verbs final : public verbs_api {
 public:
  int list_devices(std::vector<nic_info>& out) override {
    errno = 0;
    int n = 0;
    ibv_device** list = ::ibv_get_device_list(&n);
    out.clear();
    if (list == nullptr) return errno == ENOSYS ? 0 : errno_or(EIO);  // ENOSYS: no RDMA subsystem at all
    for (int i = 0; i < n; ++i)
      out.push_back(nic_info{::ibv_get_device_name(list[i]), ::mlx5dv_is_supported(list[i]), pci_of(list[i])});
    ::ibv_free_device_list(list);
    return 0;
  }
  int open_devx(const std::string& name, void*& ctx) override {
    int n = 0;
    ibv_device** list = ::ibv_get_device_list(&n);
    if (list == nullptr) return errno_or(ENODEV);
    int err = ENODEV;
    ctx = nullptr;
    for (int i = 0; i < n; ++i) {
      if (name != ::ibv_get_device_name(list[i])) continue;
      mlx5dv_context_attr attr{};
      attr.flags = MLX5DV_CONTEXT_FLAGS_DEVX;
      errno = 0;
      ctx = ::mlx5dv_open_device(list[i], &attr);
      err = ctx != nullptr ? 0 : errno_or(EOPNOTSUPP);
      break;
    }
    ::ibv_free_device_list(list);
    return err;
  }
  void close_device(void* ctx) override { ::ibv_close_device(static_cast<ibv_context*>(ctx)); }
  int query_device(void* ctx, device_attr& out) override {
    ibv_device_attr a{};
    if (const int e = ::ibv_query_device(static_cast<ibv_context*>(ctx), &a); e != 0) return e;
    out.ports = a.phys_port_cnt;
    out.max_qp_rd_atom = a.max_qp_rd_atom;
    out.atomic_host_endian = a.atomic_cap == IBV_ATOMIC_HCA;
    return 0;
  }
  int query_port(void* ctx, int port, port_attr& out) override {
    ibv_port_attr a{};
    if (const int e = ::ibv_query_port(static_cast<ibv_context*>(ctx), static_cast<std::uint8_t>(port), &a); e != 0)
      return e;
    out.active = a.state == IBV_PORT_ACTIVE;
    out.layer = a.link_layer == IBV_LINK_LAYER_ETHERNET ? link_layer::ethernet : link_layer::infiniband;
    out.active_mtu = static_cast<std::uint8_t>(a.active_mtu);
    out.lid = a.lid;
    out.gid_table_len = a.gid_tbl_len;
    return 0;
  }
  int query_gid(void* ctx, int port, int index, gid_entry& out) override {
    ibv_gid_entry e{};
    if (const int r = ::ibv_query_gid_ex(static_cast<ibv_context*>(ctx), static_cast<std::uint32_t>(port),
                                         static_cast<std::uint32_t>(index), &e, 0);
        r != 0)
      return r;
    out.index = index;
    out.type = e.gid_type == IBV_GID_TYPE_ROCE_V2   ? gid_type::roce_v2
               : e.gid_type == IBV_GID_TYPE_ROCE_V1 ? gid_type::roce_v1
                                                    : gid_type::ib;
    std::memcpy(out.gid.data(), e.gid.raw, out.gid.size());
    return 0;
  }
  int alloc_pd(void* ctx, void*& pd, std::uint32_t& pdn) override {
    errno = 0;
    ibv_pd* p = ::ibv_alloc_pd(static_cast<ibv_context*>(ctx));
    if (p == nullptr) return errno_or(ENOMEM);
    mlx5dv_pd dv{};
    mlx5dv_obj obj{};
    obj.pd.in = p;
    obj.pd.out = &dv;
    if (const int e = ::mlx5dv_init_obj(&obj, MLX5DV_OBJ_PD); e != 0) {
      ::ibv_dealloc_pd(p);
      return e;
    }
    pd = p;
    pdn = dv.pdn;
    return 0;
  }
  void dealloc_pd(void* pd) override { ::ibv_dealloc_pd(static_cast<ibv_pd*>(pd)); }
  int query_eqn(void* ctx, std::uint32_t& eqn) override {
    return ::mlx5dv_devx_query_eqn(static_cast<ibv_context*>(ctx), 0, &eqn);
  }
  int alloc_uar(void* ctx, uar_kind kind, void*& uar, uar_info& out) override {
    std::uint32_t flags = MLX5DV_UAR_ALLOC_TYPE_NC;
    switch (kind) {
      case uar_kind::nc_dedicated:
#ifdef MLX5DV_UAR_ALLOC_TYPE_NC_DEDICATED
        flags = MLX5DV_UAR_ALLOC_TYPE_NC_DEDICATED;
        break;
#else
        return EOPNOTSUPP;  // rdma-core too old to ask for a dedicated non-cached page
#endif
      case uar_kind::bf:
        flags = MLX5DV_UAR_ALLOC_TYPE_BF;
        break;
      case uar_kind::nc:
        flags = MLX5DV_UAR_ALLOC_TYPE_NC;
        break;
    }
    errno = 0;
    mlx5dv_devx_uar* u = ::mlx5dv_devx_alloc_uar(static_cast<ibv_context*>(ctx), flags);
    if (u == nullptr) return errno_or(ENOMEM);
    uar = u;
    out.page_id = u->page_id;
    out.reg_addr = u->reg_addr;
    out.base_addr = u->base_addr;
    return 0;
  }
  void free_uar(void* uar) override { ::mlx5dv_devx_free_uar(static_cast<mlx5dv_devx_uar*>(uar)); }
  int umem_reg(void* ctx, void* addr, std::size_t size, int dmabuf_fd, void*& umem, std::uint32_t& id) override {
    errno = 0;
    mlx5dv_devx_umem* u = nullptr;
    if (dmabuf_fd >= 0) {
      mlx5dv_devx_umem_in in{};
      in.addr = addr;
      in.size = size;
      in.access = IBV_ACCESS_LOCAL_WRITE;
      in.pgsz_bitmap = ~std::uint64_t{0} << 12;  // any page size from 4 KiB up
      in.comp_mask = MLX5DV_UMEM_MASK_DMABUF;
      in.dmabuf_fd = dmabuf_fd;
      u = ::mlx5dv_devx_umem_reg_ex(static_cast<ibv_context*>(ctx), &in);
    } else {
      u = ::mlx5dv_devx_umem_reg(static_cast<ibv_context*>(ctx), addr, size, IBV_ACCESS_LOCAL_WRITE);
    }
    if (u == nullptr) return errno_or(EINVAL);
    umem = u;
    id = u->umem_id;
    return 0;
  }
  int umem_dereg(void* umem) override { return ::mlx5dv_devx_umem_dereg(static_cast<mlx5dv_devx_umem*>(umem)); }
  int devx_create(void* ctx, std::span<const std::byte> in, std::span<std::byte> out, void*& obj) override {
    errno = 0;
    obj = ::mlx5dv_devx_obj_create(static_cast<ibv_context*>(ctx), in.data(), in.size(), out.data(), out.size());
    return obj != nullptr ? 0 : errno_or(EIO);
  }
  int devx_modify(void* obj, std::span<const std::byte> in, std::span<std::byte> out) override {
    return ::mlx5dv_devx_obj_modify(static_cast<mlx5dv_devx_obj*>(obj), in.data(), in.size(), out.data(), out.size());
  }
  int devx_destroy(void* obj) override { return ::mlx5dv_devx_obj_destroy(static_cast<mlx5dv_devx_obj*>(obj)); }
  int resolve_roce(void* pd, int port, int sgid_index, const gid_bytes& dgid, std::uint8_t traffic_class,
                   roce_path& out) override {
    ibv_ah_attr attr{};
    attr.is_global = 1;
    attr.port_num = static_cast<std::uint8_t>(port);
    std::memcpy(attr.grh.dgid.raw, dgid.data(), dgid.size());
    attr.grh.sgid_index = static_cast<std::uint8_t>(sgid_index);
    attr.grh.hop_limit = 64;
    attr.grh.traffic_class = traffic_class;
    errno = 0;
    ibv_ah* ah = ::ibv_create_ah(static_cast<ibv_pd*>(pd), &attr);
    if (ah == nullptr) return errno_or(EHOSTUNREACH);
    mlx5dv_ah dv{};
    mlx5dv_obj obj{};
    obj.ah.in = ah;
    obj.ah.out = &dv;
    int e = ::mlx5dv_init_obj(&obj, MLX5DV_OBJ_AH);
    if (e == 0) {
      std::memcpy(out.rmac.data(), dv.av->rmac, out.rmac.size());
      // For RoCE v2 the provider keeps the UDP source port where the LID would be.
      out.udp_sport = be16toh(dv.av->rlid);
    }
    ::ibv_destroy_ah(ah);
    return e;
  }
  int reg_mr(void* pd, void* addr, std::size_t size, int dmabuf_fd, std::uint64_t offset, bool relaxed, void*& mr,
             mr_keys& out) override {
    int access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;
    if (relaxed) access |= IBV_ACCESS_RELAXED_ORDERING;
    errno = 0;
    ibv_mr* m = dmabuf_fd >= 0 ? ::ibv_reg_dmabuf_mr(static_cast<ibv_pd*>(pd), offset, size,
                                                     reinterpret_cast<std::uint64_t>(addr), dmabuf_fd, access)
                               : ::ibv_reg_mr(static_cast<ibv_pd*>(pd), addr, size, access);
    if (m == nullptr) return errno_or(EINVAL);
    mr = m;
    out.lkey = m->lkey;
    out.rkey = m->rkey;
    return 0;
  }
  int dereg_mr(void* mr) override { return ::ibv_dereg_mr(static_cast<ibv_mr*>(mr)); }
};

}  // namespace

std::unique_ptr<verbs_api> make_real_verbs() { return std::make_unique<real_verbs>(); }

}  // namespace eaas::detail::ibgda
