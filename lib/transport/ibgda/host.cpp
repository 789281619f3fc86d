// ibgda host side: NIC choice, DEVX QP/CQ bring-up, region registration, per-peer QPs (see host.hpp).

#include "transport/ibgda/host.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>
#include <vector>

#include "eaas/detail/clock.hpp"
#include "log.hpp"
#include "transport/ibgda/prm.hpp"

namespace eaas::detail::ibgda {

namespace {

constexpr std::size_t kPage = 4096;
constexpr std::uint32_t kMinRnrNak = 12;  // 0.64 ms; no SENDs are used, so never exercised

std::string err_text(int err) { return fmt::format("errno {} ({})", err, std::strerror(err)); }

std::size_t round_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

std::uint32_t log2_floor(std::uint32_t v) {
  std::uint32_t l = 0;
  while ((v >> (l + 1)) != 0) ++l;
  return l;
}

const char* layer_name(link_layer l) { return l == link_layer::ethernet ? "Ethernet (RoCE)" : "InfiniBand"; }

std::string gid_text(const gid_bytes& g) {
  std::string s;
  for (std::size_t i = 0; i < g.size(); i += 2) {
    if (i != 0) s += ':';
    s += fmt::format("{:02x}{:02x}", g[i], g[i + 1]);
  }
  return s;
}

// "…: firmware status 0x3, syndrome 0x…" when the command's answer carries one.
std::string prm_answer(std::span<const std::byte> out) {
  const auto st = prm::get(out, prm::cmd::out_status);
  if (st == 0) return {};
  return fmt::format(", firmware status {:#x} syndrome {:#x}", st, prm::get(out, prm::cmd::out_syndrome));
}

std::uint32_t random_psn() {
  static thread_local std::mt19937 rng{std::random_device{}()};
  return rng() & 0xffffffu;
}

}  // namespace

status status_from_errno(int err) {
  switch (err) {
    case ENOMEM:
    case ENOSPC:
      return status::no_resource;
    case EPERM:
    case EACCES:
      return status::permission_denied;
    case EOPNOTSUPP:
    case ENOSYS:
    case EPROTONOSUPPORT:
      return status::unsupported;
    case EINVAL:
      return status::invalid_argument;
    default:
      return status::internal_error;
  }
}

status check_options(const qp_options& o) {
  if (!is_pow2(o.sq_size) || o.sq_size < 2 || o.sq_size > kMaxSqSize)
    return EAAS_FAIL(status::invalid_argument, "ibgda: sq_size {} (a power of two, 2 .. {})", o.sq_size, kMaxSqSize);
  if (o.ack_timeout < 1 || o.ack_timeout > 31)
    return EAAS_FAIL(status::invalid_argument, "ibgda: ack_timeout {} (1 .. 31; 0 would mean wait forever)",
                     o.ack_timeout);
  if (o.retry_count > 7) return EAAS_FAIL(status::invalid_argument, "ibgda: retry_count {} (0 .. 7)", o.retry_count);
  if (o.rnr_retry > 7) return EAAS_FAIL(status::invalid_argument, "ibgda: rnr_retry {} (0 .. 7)", o.rnr_retry);
  if (o.max_rd_atomic == 0 || !is_pow2(o.max_rd_atomic))
    return EAAS_FAIL(status::invalid_argument, "ibgda: max_rd_atomic {} (a power of two, >= 1)", o.max_rd_atomic);
  if (o.max_mtu < 1 || o.max_mtu > 5)
    return EAAS_FAIL(status::invalid_argument, "ibgda: max_mtu {} (ibv_mtu 1 .. 5)", o.max_mtu);
  if (o.service_level > 15)
    return EAAS_FAIL(status::invalid_argument, "ibgda: service_level {} (0 .. 15)", o.service_level);
  if (o.db_batch == 0 || !is_pow2(o.signal_period) ||
      static_cast<std::uint64_t>(o.db_batch) - 1 + o.signal_period > o.sq_size)
    return EAAS_FAIL(status::invalid_argument, "ibgda: db_batch {} / signal_period {} do not fit sq_size {}",
                     o.db_batch, o.signal_period, o.sq_size);
  return status::ok;
}

status select_gid(const std::vector<gid_entry>& table, int want, gid_entry& out) {
  auto usable = [](const gid_entry& e) {
    return std::any_of(e.gid.begin(), e.gid.end(), [](std::uint8_t b) { return b != 0; });
  };
  if (want >= 0) {
    for (const auto& e : table)
      if (e.index == want && usable(e)) {
        out = e;
        return status::ok;
      }
    return EAAS_FAIL(status::not_found, "ibgda: GID index {} is empty or does not exist", want);
  }
  auto score = [](const gid_entry& e) {
    const auto& g = e.gid;
    int s = e.type == gid_type::roce_v2 ? 300 : e.type == gid_type::roce_v1 ? 200 : 100;
    const bool v4 =
        std::all_of(g.begin(), g.begin() + 10, [](std::uint8_t b) { return b == 0; }) && g[10] == 0xff && g[11] == 0xff;
    const bool link_local = g[0] == 0xfe && (g[1] & 0xc0) == 0x80;
    s += v4 ? 20 : link_local ? 0 : 10;
    return s;
  };
  const gid_entry* best = nullptr;
  for (const auto& e : table) {
    if (!usable(e)) continue;
    if (best == nullptr || score(e) > score(*best) || (score(e) == score(*best) && e.index < best->index)) best = &e;
  }
  if (best == nullptr) return EAAS_FAIL(status::not_found, "ibgda: the port's GID table has no usable entry");
  out = *best;
  return status::ok;
}

int pci_distance(const std::vector<std::uint64_t>& a, const std::vector<std::uint64_t>& b) {
  if (a.empty() || b.empty()) return -1;
  std::size_t p = 0;
  while (p < a.size() && p < b.size() && a[p] == b[p]) ++p;
  return static_cast<int>((a.size() - p) + (b.size() - p));
}

int nearest_nic(const std::vector<std::uint64_t>& gpu, const std::vector<std::vector<std::uint64_t>>& nics) {
  int best = -1, best_d = 0;
  for (std::size_t i = 0; i < nics.size(); ++i) {
    int d = pci_distance(gpu, nics[i]);
    if (d < 0) d = 1 << 20;  // unknown: behind every known one
    if (best < 0 || d < best_d) {
      best = static_cast<int>(i);
      best_d = d;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// nic

status nic::open(verbs_api& v, gpu_api& g, const nic_choice& c, std::unique_ptr<nic>& out) {
  std::vector<nic_info> all;
  if (const int e = v.list_devices(all); e != 0)
    return EAAS_FAIL(status_from_errno(e), "ibgda: ibv_get_device_list failed: {}", err_text(e));
  std::vector<nic_info> mlx5;
  std::string others;
  for (const auto& d : all) {
    if (d.mlx5)
      mlx5.push_back(d);
    else
      others += (others.empty() ? "" : ", ") + d.name;
  }
  if (all.empty())
    return EAAS_FAIL(status::unsupported, "ibgda: no mlx5 device: rdma-core lists no RDMA device on this host");
  if (mlx5.empty())
    return EAAS_FAIL(status::unsupported, "ibgda: no mlx5 device among the {} RDMA device(s) ({})", all.size(), others);
  if (!c.name.empty()) {
    auto it = std::find_if(mlx5.begin(), mlx5.end(), [&](const nic_info& d) { return d.name == c.name; });
    if (it == mlx5.end()) return EAAS_FAIL(status::not_found, "ibgda: no mlx5 device named {} on this host", c.name);
    mlx5 = {*it};
  } else if (!c.gpu_bus_id.empty()) {
    // Nearest first; every one is tried in that order.
    const auto gpu = pci_path(c.gpu_bus_id);
    std::vector<std::pair<int, nic_info>> ranked;
    for (const auto& d : mlx5) {
      const int dist = pci_distance(gpu, pci_path(d.pci_bus_id));
      ranked.emplace_back(dist < 0 ? 1 << 20 : dist, d);
    }
    std::stable_sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    mlx5.clear();
    for (auto& r : ranked) mlx5.push_back(r.second);
  }

  std::string why;  // per device, why it was not used
  for (const auto& d : mlx5) {
    std::unique_ptr<nic> n(new nic(v, g));
    n->name_ = d.name;
    if (const int e = v.open_devx(d.name, n->ctx_); e != 0 || n->ctx_ == nullptr) {
      why += fmt::format("{}{}: mlx5dv_open_device with DEVX failed: {}", why.empty() ? "" : "; ", d.name,
                         err_text(e != 0 ? e : EOPNOTSUPP));
      continue;
    }
    if (const int e = v.query_device(n->ctx_, n->dev_); e != 0)
      return EAAS_FAIL(status_from_errno(e), "ibgda: ibv_query_device on {} failed: {}", d.name, err_text(e));
    const int first = c.port > 0 ? c.port : 1;
    const int last = c.port > 0 ? c.port : n->dev_.ports;
    for (int p = first; p <= last && n->port_ == 0; ++p) {
      port_attr pa;
      if (const int e = v.query_port(n->ctx_, p, pa); e != 0)
        return EAAS_FAIL(status_from_errno(e), "ibgda: ibv_query_port({}, port {}) failed: {}", d.name, p, err_text(e));
      if (pa.active) {
        n->port_ = p;
        n->port_info_ = pa;
      }
    }
    if (n->port_ == 0) {
      why += fmt::format("{}{}: {}", why.empty() ? "" : "; ", d.name,
                         c.port > 0 ? fmt::format("port {} is not ACTIVE", c.port) : std::string("no ACTIVE port"));
      continue;
    }
    if (n->port_info_.active_mtu < 1 || n->port_info_.active_mtu > 5)
      return EAAS_FAIL(status::internal_error, "ibgda: {} port {} reports MTU enum {}", d.name, n->port_,
                       n->port_info_.active_mtu);
    if (n->port_info_.layer == link_layer::ethernet) {
      std::vector<gid_entry> table;
      for (int i = 0; i < n->port_info_.gid_table_len; ++i) {
        gid_entry e;
        if (v.query_gid(n->ctx_, n->port_, i, e) == 0) table.push_back(e);
      }
      if (select_gid(table, c.gid_index, n->gid_) != status::ok)
        return EAAS_FAIL(status::not_found, "ibgda: {} port {} (RoCE): {}", d.name, n->port_, last_error());
    } else {
      if (n->port_info_.lid == 0 || n->port_info_.lid > 0xbfff)
        return EAAS_FAIL(status::unsupported,
                         "ibgda: {} port {} (InfiniBand) has no unicast LID ({:#x}): is a subnet manager running?",
                         d.name, n->port_, n->port_info_.lid);
      if (const int e = v.query_gid(n->ctx_, n->port_, 0, n->gid_); e != 0)
        return EAAS_FAIL(status_from_errno(e), "ibgda: ibv_query_gid({}, port {}, 0) failed: {}", d.name, n->port_,
                         err_text(e));
    }
    if (const int e = v.alloc_pd(n->ctx_, n->pd_, n->pdn_); e != 0)
      return EAAS_FAIL(status_from_errno(e), "ibgda: ibv_alloc_pd on {} failed: {}", d.name, err_text(e));
    if (const int e = v.query_eqn(n->ctx_, n->eqn_); e != 0)
      return EAAS_FAIL(status_from_errno(e), "ibgda: mlx5dv_devx_query_eqn on {} failed: {}", d.name, err_text(e));
    n->dmabuf_ = g.dma_buf_supported();
    log(log_level::debug, "ibgda: using {} port {} ({}, MTU enum {}, GID index {} {}), {} registration", d.name,
        n->port_, layer_name(n->port_info_.layer), n->port_info_.active_mtu, n->gid_.index, gid_text(n->gid_.gid),
        n->dmabuf_ ? "dma-buf" : "peer-memory");
    out = std::move(n);
    return status::ok;
  }
  const bool devx = why.find("DEVX") != std::string::npos && why.find("ACTIVE") == std::string::npos;
  return EAAS_FAIL(devx ? status::unsupported : status::peer_unreachable, "ibgda: no usable mlx5 device{}: {}",
                   devx ? " with DEVX" : "", why);
}

nic::~nic() {
  if (pd_ != nullptr) v_.dealloc_pd(pd_);
  if (ctx_ != nullptr) v_.close_device(ctx_);
}

// ---------------------------------------------------------------------------------------------
// rc_qp

rc_qp::layout rc_qp::layout_for(std::uint32_t sq_size) {
  layout l;
  const std::size_t ring = static_cast<std::size_t>(sq_size) * mlx5::kSendWqeBB;
  l.cq_off = round_up(ring, kPage);
  l.dbr_off = l.cq_off + round_up(static_cast<std::size_t>(sq_size) * sizeof(mlx5::cqe64), kPage);
  l.bytes = l.dbr_off + kPage;
  return l;
}

status rc_qp::create(nic& n, const qp_options& o, std::unique_ptr<rc_qp>& out) {
  EAAS_CHECK(check_options(o));
  std::unique_ptr<rc_qp> q(new rc_qp(n, o));
  verbs_api& v = n.verbs();
  gpu_api& g = n.gpu();
  const char* dev = n.name().c_str();
  q->lay_ = layout_for(o.sq_size);

  if (const int e = g.alloc(q->lay_.bytes, q->mem_); e != 0 || q->mem_ == nullptr) {
    q->mem_ = nullptr;
    return EAAS_FAIL(status::no_resource, "ibgda: allocating {} bytes of GPU memory for the queues failed: {}",
                     q->lay_.bytes, g.error_name(e));
  }
  {
    // Every CQE starts as "never written" (opcode INVALID); the doorbell records start at 0.
    std::vector<mlx5::cqe64> cq(o.sq_size);
    reset_cq(cq.data(), o.sq_size);
    if (const int e =
            g.copy_to_device(static_cast<char*>(q->mem_) + q->lay_.cq_off, cq.data(), cq.size() * sizeof(mlx5::cqe64));
        e != 0)
      return EAAS_FAIL(status::internal_error, "ibgda: initialising the CQ in GPU memory failed: {}", g.error_name(e));
  }

  int fd = -1;
  if (n.dmabuf()) {
    if (const int e = g.dmabuf_fd(q->mem_, q->lay_.bytes, fd); e != 0)
      return EAAS_FAIL(status::unsupported, "ibgda: exporting the queue memory as a dma-buf failed: {}",
                       g.error_name(e));
  }
  const int ue = v.umem_reg(n.ctx(), q->mem_, q->lay_.bytes, fd, q->umem_, q->umem_id_);
  if (fd >= 0) g.close_fd(fd);
  if (ue != 0 || q->umem_ == nullptr) {
    q->umem_ = nullptr;
    return EAAS_FAIL(
        status_from_errno(ue != 0 ? ue : EINVAL), "ibgda: registering the queue memory with {} ({}) failed: {}{}", dev,
        fd >= 0 ? "mlx5dv_devx_umem_reg_ex, dma-buf" : "mlx5dv_devx_umem_reg, peer memory",
        err_text(ue != 0 ? ue : EINVAL), fd >= 0 ? "" : " (GPU memory needs nvidia_peermem loaded for this path)");
  }

  int last = 0;
  for (uar_kind k : {uar_kind::nc_dedicated, uar_kind::bf, uar_kind::nc}) {
    last = v.alloc_uar(n.ctx(), k, q->uar_, q->uar_info_);
    if (last == 0 && q->uar_ != nullptr) break;
    q->uar_ = nullptr;
  }
  if (q->uar_ == nullptr)
    return EAAS_FAIL(status_from_errno(last != 0 ? last : ENOMEM), "ibgda: mlx5dv_devx_alloc_uar on {} failed: {}", dev,
                     err_text(last != 0 ? last : ENOMEM));
  if (q->uar_info_.base_addr == nullptr || q->uar_info_.reg_addr < q->uar_info_.base_addr ||
      static_cast<char*>(q->uar_info_.reg_addr) - static_cast<char*>(q->uar_info_.base_addr) + 8 >
          static_cast<std::ptrdiff_t>(kPage))
    return EAAS_FAIL(status::internal_error, "ibgda: the UAR's doorbell register {} lies outside its page {}",
                     q->uar_info_.reg_addr, q->uar_info_.base_addr);
  if (const int e = g.map_io(q->uar_info_.base_addr, kPage, q->uar_dev_); e != 0 || q->uar_dev_ == nullptr) {
    q->uar_dev_ = nullptr;
    if (e == kCudaErrorNotPermitted)
      return EAAS_FAIL(status::permission_denied,
                       "ibgda: no permission to map the UAR (doorbell page) into the GPU: cudaHostRegister(IoMemory) "
                       "returned {}; run as root or load the NVIDIA driver with "
                       "NVreg_RegistryDwords=\"PeerMappingOverride=1;\"",
                       g.error_name(e));
    return EAAS_FAIL(status::internal_error,
                     "ibgda: mapping the UAR into the GPU (cudaHostRegister IoMemory) failed: {}", g.error_name(e));
  }

  {
    prm::create_cq_in in;
    prm::create_cq_out ans;
    std::span<std::byte> b(in.bytes);
    prm::set(b, prm::cmd::opcode, prm::kCreateCq);
    prm::set(b, prm::create_cq_in::cq_umem_id, q->umem_id_);
    prm::set(b, prm::create_cq_in::cq_umem_valid, 1);
    prm::set(b, prm::create_cq_in::cq_umem_offset, q->lay_.cq_off);
    const std::uint32_t c = prm::create_cq_in::kCqc;
    prm::set(b, prm::at(c, prm::cqc::dbr_umem_valid), 1);
    prm::set(b, prm::at(c, prm::cqc::dbr_umem_id), q->umem_id_);
    prm::set(b, prm::at(c, prm::cqc::dbr_addr), q->lay_.dbr_off + 64);
    prm::set(b, prm::at(c, prm::cqc::cqe_sz), prm::kCqeSize64);
    prm::set(b, prm::at(c, prm::cqc::cc), 1);
    prm::set(b, prm::at(c, prm::cqc::oi), 1);
    prm::set(b, prm::at(c, prm::cqc::log_cq_size), log2_floor(o.sq_size));
    prm::set(b, prm::at(c, prm::cqc::uar_page), q->uar_info_.page_id);
    prm::set(b, prm::at(c, prm::cqc::c_eqn), n.eqn());
    prm::set(b, prm::at(c, prm::cqc::log_page_size), 0);  // 4 KiB pages (the adapter page size)
    prm::set(b, prm::at(c, prm::cqc::page_offset), 0);
    const int e = v.devx_create(n.ctx(), in.bytes, ans.bytes, q->cq_obj_);
    if (e != 0 || q->cq_obj_ == nullptr || prm::get(ans.bytes, prm::cmd::out_status) != 0) {
      if (q->cq_obj_ != nullptr && e == 0) {  // created but the firmware said no: should not happen
        (void)v.devx_destroy(q->cq_obj_);
      }
      q->cq_obj_ = nullptr;
      return EAAS_FAIL(status_from_errno(e != 0 ? e : EIO),
                       "ibgda: CREATE_CQ on {} (mlx5dv_devx_obj_create) failed: {}{}", dev, err_text(e != 0 ? e : EIO),
                       prm_answer(ans.bytes));
    }
    q->cqn_ = static_cast<std::uint32_t>(prm::get(ans.bytes, prm::create_cq_out::cqn));
  }
  {
    prm::create_qp_in in;
    prm::create_qp_out ans;
    std::span<std::byte> b(in.bytes);
    prm::set(b, prm::cmd::opcode, prm::kCreateQp);
    prm::set(b, prm::create_qp_in::wq_umem_id, q->umem_id_);
    prm::set(b, prm::create_qp_in::wq_umem_valid, 1);
    prm::set(b, prm::create_qp_in::wq_umem_offset, 0);
    const std::uint32_t c = prm::create_qp_in::kQpc;
    prm::set(b, prm::at(c, prm::qpc::st), prm::kQpcStRc);
    prm::set(b, prm::at(c, prm::qpc::pm_state), prm::kQpcPmStateMigrated);
    prm::set(b, prm::at(c, prm::qpc::pd), n.pdn());
    prm::set(b, prm::at(c, prm::qpc::uar_page), q->uar_info_.page_id);
    prm::set(b, prm::at(c, prm::qpc::rq_type), prm::kQpcRqTypeZeroSize);
    prm::set(b, prm::at(c, prm::qpc::cqn_snd), q->cqn_);
    prm::set(b, prm::at(c, prm::qpc::cqn_rcv), q->cqn_);
    prm::set(b, prm::at(c, prm::qpc::log_sq_size), log2_floor(o.sq_size));
    prm::set(b, prm::at(c, prm::qpc::log_rq_size), 0);
    prm::set(b, prm::at(c, prm::qpc::no_sq), 0);
    prm::set(b, prm::at(c, prm::qpc::dbr_umem_valid), 1);
    prm::set(b, prm::at(c, prm::qpc::dbr_umem_id), q->umem_id_);
    prm::set(b, prm::at(c, prm::qpc::dbr_addr), q->lay_.dbr_off);
    prm::set(b, prm::at(c, prm::qpc::log_page_size), 0);
    prm::set(b, prm::at(c, prm::qpc::page_offset), 0);
    prm::set(b, prm::at(c, prm::qpc::user_index), 0);
    const int e = v.devx_create(n.ctx(), in.bytes, ans.bytes, q->qp_obj_);
    if (e != 0 || q->qp_obj_ == nullptr || prm::get(ans.bytes, prm::cmd::out_status) != 0) {
      if (q->qp_obj_ != nullptr && e == 0) (void)v.devx_destroy(q->qp_obj_);
      q->qp_obj_ = nullptr;
      return EAAS_FAIL(status_from_errno(e != 0 ? e : EIO),
                       "ibgda: CREATE_QP on {} (mlx5dv_devx_obj_create) failed: {}{}", dev, err_text(e != 0 ? e : EIO),
                       prm_answer(ans.bytes));
    }
    q->qpn_ = static_cast<std::uint32_t>(prm::get(ans.bytes, prm::create_qp_out::qpn));
  }
  q->psn_ = random_psn();
  out = std::move(q);
  return status::ok;
}

rc_qp::~rc_qp() {
  verbs_api& v = n_.verbs();
  gpu_api& g = n_.gpu();
  // The NIC stops using the memory first: QP, then the CQ it completes into, then the rest.
  if (qp_obj_ != nullptr && v.devx_destroy(qp_obj_) != 0)
    log(log_level::warn, "ibgda: destroying QP {:#x} failed", qpn_);
  if (cq_obj_ != nullptr && v.devx_destroy(cq_obj_) != 0)
    log(log_level::warn, "ibgda: destroying CQ {:#x} failed", cqn_);
  if (uar_dev_ != nullptr) g.unmap_io(uar_info_.base_addr);
  if (uar_ != nullptr) v.free_uar(uar_);
  if (umem_ != nullptr && v.umem_dereg(umem_) != 0) log(log_level::warn, "ibgda: deregistering the queue umem failed");
  if (mem_ != nullptr) g.free(mem_);
}

status rc_qp::modify(const char* step, std::uint16_t opcode, std::span<const std::byte> in) {
  prm::modify_qp_out ans;
  const int e = n_.verbs().devx_modify(qp_obj_, in, ans.bytes);
  if (e != 0 || prm::get(ans.bytes, prm::cmd::out_status) != 0)
    return EAAS_FAIL(status_from_errno(e != 0 ? e : EIO), "ibgda: {} (opcode {:#x}) of QP {:#x} on {} failed: {}{}",
                     step, opcode, qpn_, n_.name(), err_text(e != 0 ? e : EIO), prm_answer(ans.bytes));
  return status::ok;
}

status rc_qp::connect(const peer_qp& peer) {
  EAAS_CHECK(check_peer(peer));
  if (connected_)
    return EAAS_FAIL(status::invalid_argument, "ibgda: QP {:#x} is already connected (drop it and make a new one)",
                     qpn_);
  const port_attr& port = n_.port_info();
  if (peer.layer != port.layer)
    return EAAS_FAIL(status::peer_unreachable, "ibgda: our port {} of {} is {}, the peer's is {}", n_.port(), n_.name(),
                     layer_name(port.layer), layer_name(peer.layer));
  const std::uint8_t mtu = std::min({port.active_mtu, peer.mtu, o_.max_mtu});
  std::uint32_t rd_atomic =
      std::min<std::uint32_t>(o_.max_rd_atomic, static_cast<std::uint32_t>(std::max(1, n_.device().max_qp_rd_atom)));
  const std::uint32_t log_rd = log2_floor(rd_atomic);
  const std::uint32_t path = prm::qpc::kPrimaryPath;

  {
    prm::modify_qp_in in;
    std::span<std::byte> b(in.bytes);
    const std::uint32_t c = prm::modify_qp_in::kQpc;
    prm::set(b, prm::cmd::opcode, prm::kRst2InitQp);
    prm::set(b, prm::modify_qp_in::qpn, qpn_);
    prm::set(b, prm::at(c, prm::qpc::rwe), 1);
    prm::set(b, prm::at(c, prm::qpc::rre), 1);
    prm::set(b, prm::at(c, prm::qpc::rae), 1);
    prm::set(b, prm::at(c, prm::qpc::atomic_mode), prm::kQpcAtomicModeUpTo64);
    prm::set(b, prm::at(c, prm::qpc::pm_state), prm::kQpcPmStateMigrated);
    prm::set(b, prm::at(c, prm::qpc::counter_set_id), 0);
    prm::set(b, prm::at(c + path, prm::ads::vhca_port_num), static_cast<std::uint32_t>(n_.port()));
    prm::set(b, prm::at(c + path, prm::ads::pkey_index), 0);
    EAAS_CHECK(modify("RST2INIT", prm::kRst2InitQp, in.bytes));
  }
  {
    prm::modify_qp_in in;
    std::span<std::byte> b(in.bytes);
    const std::uint32_t c = prm::modify_qp_in::kQpc;
    prm::set(b, prm::cmd::opcode, prm::kInit2RtrQp);
    prm::set(b, prm::modify_qp_in::qpn, qpn_);
    prm::set(b, prm::at(c, prm::qpc::mtu), mtu);
    prm::set(b, prm::at(c, prm::qpc::log_msg_max), prm::kLogMsgMax);
    prm::set(b, prm::at(c, prm::qpc::remote_qpn), peer.qpn);
    prm::set(b, prm::at(c, prm::qpc::next_rcv_psn), peer.psn);
    prm::set(b, prm::at(c, prm::qpc::min_rnr_nak), kMinRnrNak);
    prm::set(b, prm::at(c, prm::qpc::log_rra_max), log_rd);
    const std::uint32_t a = c + path;
    if (port.layer == link_layer::infiniband) {
      prm::set(b, prm::at(a, prm::ads::rlid), peer.lid);
      prm::set(b, prm::at(a, prm::ads::mlid), 0);
      prm::set(b, prm::at(a, prm::ads::grh), 0);  // one subnet: no global routing header
      prm::set(b, prm::at(a, prm::ads::sl), o_.service_level);
      prm::set(b, prm::at(a, prm::ads::tclass), o_.traffic_class);
    } else {
      roce_path rp;
      if (const int e = n_.verbs().resolve_roce(n_.pd(), n_.port(), n_.gid().index, peer.gid, o_.traffic_class, rp);
          e != 0)
        return EAAS_FAIL(status::peer_unreachable,
                         "ibgda: resolving the peer's GID {} to a MAC on {} port {} (ibv_create_ah) failed: {}",
                         gid_text(peer.gid), n_.name(), n_.port(), err_text(e));
      prm::set(b, prm::at(a, prm::ads::grh), 1);
      prm::set_bytes(b, a + prm::ads::kRgidBit, peer.gid);
      prm::set_bytes(b, a + prm::ads::kRmacBit, rp.rmac);
      prm::set(b, prm::at(a, prm::ads::src_addr_index), static_cast<std::uint32_t>(n_.gid().index));
      prm::set(b, prm::at(a, prm::ads::hop_limit), o_.hop_limit);
      prm::set(b, prm::at(a, prm::ads::udp_sport), rp.udp_sport);
      prm::set(b, prm::at(a, prm::ads::eth_prio), o_.service_level & 7u);
      prm::set(b, prm::at(a, prm::ads::dscp), o_.traffic_class >> 2);
      prm::set(b, prm::at(a, prm::ads::tclass), o_.traffic_class);
    }
    EAAS_CHECK(modify("INIT2RTR", prm::kInit2RtrQp, in.bytes));
  }
  {
    prm::modify_qp_in in;
    std::span<std::byte> b(in.bytes);
    const std::uint32_t c = prm::modify_qp_in::kQpc;
    prm::set(b, prm::cmd::opcode, prm::kRtr2RtsQp);
    prm::set(b, prm::modify_qp_in::qpn, qpn_);
    prm::set(b, prm::at(c, prm::qpc::log_ack_req_freq), 0);
    prm::set(b, prm::at(c, prm::qpc::log_sra_max), log_rd);
    prm::set(b, prm::at(c, prm::qpc::next_send_psn), psn_);
    prm::set(b, prm::at(c, prm::qpc::retry_count), o_.retry_count);
    prm::set(b, prm::at(c, prm::qpc::rnr_retry), o_.rnr_retry);
    prm::set(b, prm::at(c + path, prm::ads::ack_timeout), o_.ack_timeout);
    EAAS_CHECK(modify("RTR2RTS", prm::kRtr2RtsQp, in.bytes));
  }
  mtu_ = mtu;
  connected_ = true;
  return status::ok;
}

qp_config rc_qp::device_config() const {
  qp_config c;
  auto* base = static_cast<char*>(mem_);
  c.sq = reinterpret_cast<mlx5::send_wqebb*>(base);
  c.sq_size = o_.sq_size;
  c.sq_dbrec = reinterpret_cast<std::uint32_t*>(base + lay_.dbr_off) + mlx5::kSendDbr;
  c.uar_db = reinterpret_cast<std::uint64_t*>(static_cast<char*>(uar_dev_) + (static_cast<char*>(uar_info_.reg_addr) -
                                                                              static_cast<char*>(uar_info_.base_addr)));
  c.cq = reinterpret_cast<mlx5::cqe64*>(base + lay_.cq_off);
  c.cq_size = o_.sq_size;
  c.qpn = qpn_;
  c.db_batch = o_.db_batch;
  c.signal_period = o_.signal_period;
  return c;
}

status rc_qp::post_inline_write(qp_state* live, std::uint64_t raddr, std::uint32_t rkey, const void* data,
                                std::uint32_t bytes, std::uint64_t deadline_ns) {
  gpu_api& g = n_.gpu();
  auto copy_failed = [&](const char* what, int e) {
    return EAAS_FAIL(status::internal_error, "ibgda: QP {:#x}: {} the QP's GPU memory failed: {}", qpn_, what,
                     g.error_name(e));
  };
  if (bytes == 0 || bytes > kMaxInlineBytes)
    return EAAS_FAIL(status::invalid_argument, "ibgda: a host-posted inline write of {} bytes (1 .. {})", bytes,
                     kMaxInlineBytes);
  const qp_config c = device_config();
  const std::uint32_t* tail_p = cq_detail::cqe_word(c.cq, mlx5::kCqeTailOffset);
  // The QP's error, as poll_cq would latch it, from an error CQE whose tail is `tail`.
  auto latch_error = [&](std::uint32_t tail) {
    std::uint32_t w = 0;
    const int e = g.live_read(&w, cq_detail::cqe_word(c.cq, mlx5::kCqeSyndromeWordOffset), sizeof(w));
    const auto op = mlx5::cqe_op(mlx5::tail_op_own(tail));
    status st = status::internal_error;
    if (e == 0 && (op == mlx5::cqe_opcode::req_err || op == mlx5::cqe_opcode::resp_err))
      st = status_from_syndrome(mlx5::word_syndrome(w));
    const auto v = static_cast<std::uint32_t>(st);
    (void)g.live_write(&live->cq.error, &v, sizeof(v));
    return st;
  };
  // Wait until no post is in flight and the ring has room for one WQEBB.
  qp_state s{};
  for (std::uint32_t spins = 0;; ++spins) {
    if (const int e = g.live_read(&s, live, sizeof(s)); e != 0) return copy_failed("reading", e);
    if (s.cq.error != 0)
      return EAAS_FAIL(static_cast<status>(s.cq.error), "ibgda: QP {:#x} has failed ({}): nothing can be posted", qpn_,
                       status_name(static_cast<status>(s.cq.error)));
    if (s.head == s.ready) {
      std::uint64_t completed = s.cq.completed;
      if (s.head + 1 - completed > s.sq_size && s.head != 0) {
        std::uint32_t tail = 0;
        if (const int e = g.live_read(&tail, tail_p, sizeof(tail)); e != 0) return copy_failed("reading", e);
        const auto op = mlx5::cqe_op(mlx5::tail_op_own(tail));
        if (op == mlx5::cqe_opcode::req)
          completed = std::max(completed, widen_wqe_counter(mlx5::tail_wqe_counter(tail), s.head - 1) + 1);
        else if (op != mlx5::cqe_opcode::invalid)
          return EAAS_FAIL(latch_error(tail), "ibgda: QP {:#x} has failed: nothing can be posted", qpn_);
      }
      if (s.head + 1 - completed <= s.sq_size) break;
    }
    if (now_ns() >= deadline_ns)
      return EAAS_FAIL(status::timeout, "ibgda: QP {:#x}: {} (deadline)", qpn_,
                       s.head != s.ready ? "a post is still in flight" : "the ring stays full");
    spin_pause(spins);
  }
  const std::uint64_t index = s.head, next = index + 1;
  mlx5::send_wqebb w{};
  build_rdma_write_inline(&w, static_cast<std::uint16_t>(index), qpn_, ctrl_flags(true), raddr, rkey, data, bytes);
  // The WQE, the counters (as if a poster had reserved, published and rung it), the doorbell
  // record, then the doorbell: the NIC reads the WQE only after the record covers it.
  if (const int e = g.live_write(c.sq + index % c.sq_size, &w, sizeof(w)); e != 0) return copy_failed("writing", e);
  for (std::uint64_t* f : {&live->head, &live->ready, &live->rung})
    if (const int e = g.live_write(f, &next, sizeof(next)); e != 0) return copy_failed("writing", e);
  const std::uint32_t rec = mlx5::to_be32(static_cast<std::uint32_t>(next) & 0xffffu);
  if (const int e = g.live_write(c.sq_dbrec, &rec, sizeof(rec)); e != 0) return copy_failed("writing", e);
  fence_seq_cst();
  std::atomic_ref<std::uint64_t>(*static_cast<std::uint64_t*>(uar_info_.reg_addr))
      .store(doorbell_word(&w), std::memory_order_release);
  fence_seq_cst();  // drains the store (write-combining UAR mappings)
  for (std::uint32_t spins = 0;; ++spins) {
    std::uint32_t tail = 0;
    if (const int e = g.live_read(&tail, tail_p, sizeof(tail)); e != 0) return copy_failed("reading", e);
    const auto op = mlx5::cqe_op(mlx5::tail_op_own(tail));
    if (op == mlx5::cqe_opcode::req && widen_wqe_counter(mlx5::tail_wqe_counter(tail), index) == index) {
      (void)g.live_write(&live->cq.completed, &next, sizeof(next));
      return status::ok;
    }
    if (op != mlx5::cqe_opcode::req && op != mlx5::cqe_opcode::invalid)
      return EAAS_FAIL(latch_error(tail), "ibgda: QP {:#x}: the host-posted write failed", qpn_);
    if (now_ns() >= deadline_ns)
      return EAAS_FAIL(status::timeout, "ibgda: QP {:#x}: the host-posted write did not complete by its deadline",
                       qpn_);
    spin_pause(spins);
  }
}

status rc_qp::to_error() {
  prm::qp_2rst_in in;
  prm::set(in.bytes, prm::cmd::opcode, prm::k2ErrQp);
  prm::set(in.bytes, prm::qp_2rst_in::qpn, qpn_);
  EAAS_CHECK(modify("2ERR", prm::k2ErrQp, in.bytes));
  connected_ = false;
  return status::ok;
}

// ---------------------------------------------------------------------------------------------
// data_region

status data_region::create(nic& n, void* addr, std::size_t bytes, bool relaxed, std::unique_ptr<data_region>& out) {
  return reg(n, addr, bytes, relaxed, true, out);
}

status data_region::create_host(nic& n, void* addr, std::size_t bytes, std::unique_ptr<data_region>& out) {
  return reg(n, addr, bytes, false, false, out);
}

status data_region::reg(nic& n, void* addr, std::size_t bytes, bool relaxed, bool gpu,
                        std::unique_ptr<data_region>& out) {
  if (addr == nullptr || bytes == 0)
    return EAAS_FAIL(status::invalid_argument, "ibgda: registering [{}, +{}): null or empty", addr, bytes);
  std::unique_ptr<data_region> r(new data_region(n));
  r->addr_ = addr;
  r->bytes_ = bytes;
  int fd = -1;
  std::uint64_t offset = 0;
  if (gpu && n.dmabuf()) {
    // dma-buf export works on whole pages of one allocation.
    const auto a = reinterpret_cast<std::uintptr_t>(addr);
    const std::uintptr_t lo = a & ~(kPage - 1);
    const std::size_t span = round_up(a + bytes - lo, kPage);
    if (const int e = n.gpu().dmabuf_fd(reinterpret_cast<void*>(lo), span, fd); e != 0)
      return EAAS_FAIL(status::unsupported, "ibgda: exporting [{}, +{}) as a dma-buf failed: {}", addr, bytes,
                       n.gpu().error_name(e));
    offset = a - lo;
  }
  const int e = n.verbs().reg_mr(n.pd(), addr, bytes, fd, offset, relaxed, r->mr_, r->keys_);
  if (fd >= 0) n.gpu().close_fd(fd);
  if (e != 0 || r->mr_ == nullptr) {
    r->mr_ = nullptr;
    return EAAS_FAIL(status_from_errno(e != 0 ? e : EINVAL), "ibgda: {} of [{}, +{}) on {} failed: {}{}",
                     fd >= 0 ? "ibv_reg_dmabuf_mr" : "ibv_reg_mr", addr, bytes, n.name(), err_text(e != 0 ? e : EINVAL),
                     fd >= 0 || !gpu ? "" : " (GPU memory needs nvidia_peermem loaded for this path)");
  }
  out = std::move(r);
  return status::ok;
}

data_region::~data_region() {
  if (mr_ != nullptr && n_.verbs().dereg_mr(mr_) != 0) log(log_level::warn, "ibgda: ibv_dereg_mr failed");
}

// ---------------------------------------------------------------------------------------------
// peer_set

status peer_set::prepare(std::uint64_t peer_id, const conn_desc& self, conn_desc& for_peer) {
  try {
    if (peer_id == 0) return EAAS_FAIL(status::invalid_argument, "ibgda: peer id 0");
    if (qps_.count(peer_id) != 0)
      return EAAS_FAIL(status::invalid_argument, "ibgda: peer {:016x} already has a QP (drop it first)", peer_id);
    std::unique_ptr<rc_qp> q;
    EAAS_CHECK(rc_qp::create(n_, o_, q));
    if (self.context_id != self_id_)
      return EAAS_FAIL(status::invalid_argument, "ibgda: describing context {:016x} from the QPs of {:016x}",
                       self.context_id, self_id_);
    conn_desc d = self;
    d.target_id = peer_id;
    d.layer = n_.port_info().layer;
    d.mtu = n_.port_info().active_mtu;
    d.lid = n_.port_info().layer == link_layer::infiniband ? n_.port_info().lid : 0;
    d.gid = n_.gid().gid;
    d.qps = {qp_wire{q->qpn(), q->psn(), {}}};
    qps_[peer_id] = std::move(q);
    for_peer = std::move(d);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "ibgda: out of memory");
  }
}

status peer_set::connect(std::uint64_t peer_id, const conn_desc& theirs) {
  auto it = qps_.find(peer_id);
  if (it == qps_.end()) return EAAS_FAIL(status::not_found, "ibgda: no QP prepared for peer {:016x}", peer_id);
  if (theirs.context_id != peer_id)
    return EAAS_FAIL(status::invalid_handle, "ibgda: the description comes from context {:016x}, expected {:016x}",
                     theirs.context_id, peer_id);
  if (theirs.target_id != self_id_)
    return EAAS_FAIL(status::invalid_handle,
                     "ibgda: the description is addressed to context {:016x}, not to us ({:016x})", theirs.target_id,
                     self_id_);
  return it->second->connect(theirs.qp(0));
}

status peer_set::drop(std::uint64_t peer_id) {
  auto it = qps_.find(peer_id);
  if (it == qps_.end()) return EAAS_FAIL(status::not_found, "ibgda: no QP for peer {:016x}", peer_id);
  qps_.erase(it);
  return status::ok;
}

rc_qp* peer_set::find(std::uint64_t peer_id) const {
  auto it = qps_.find(peer_id);
  return it == qps_.end() ? nullptr : it->second.get();
}

}  // namespace eaas::detail::ibgda
