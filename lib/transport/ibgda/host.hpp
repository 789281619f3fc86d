#pragma once

// ibgda transport, host side (private): find the NIC, bring up one RC QP per peer with mlx5 DEVX
// (QP, CQ and doorbell records in GPU memory, the doorbell page mapped into the GPU), register data
// regions, move the QP RST -> INIT -> RTR -> RTS against the peer's connection description, tear a
// peer down and bring it back. Everything goes through verbs_api / gpu_api (verbs_api.hpp), so the
// tests drive this code against fakes and check each PRM command it sends.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "eaas/common/status.hpp"
#include "eaas/detail/ibgda/qp.hpp"
#include "transport/ibgda/verbs_api.hpp"
#include "transport/ibgda/wire.hpp"

namespace eaas::detail::ibgda {

/// errno of a failed call → status: ENOMEM/ENOSPC → no_resource, EPERM/EACCES → permission_denied,
/// EOPNOTSUPP/ENOTSUP/ENOSYS/EPROTONOSUPPORT → unsupported, EINVAL → invalid_argument, else internal_error.
status status_from_errno(int err);

/// ack_timeout exponent t → the local ACK timeout of one try, nanoseconds (4.096 µs × 2^t).
constexpr std::uint64_t ack_timeout_ns(std::uint32_t t) { return t == 0 ? 0 : 4096ull << t; }
/// The nominal time until a QP reports a dead peer (TRANSPORT_RETRY_EXC): (retry_count + 1) tries.
/// The InfiniBand spec lets hardware wait up to 4× each try.
constexpr std::uint64_t dead_peer_ns(std::uint32_t t, std::uint32_t retry_count) {
  return ack_timeout_ns(t) * (retry_count + 1ull);
}

/// Connection parameters of the QPs (defaults: see docs/IBGDA.md).
struct qp_options {
  std::uint32_t sq_size = 1024;     ///< send queue depth in WQEBBs (power of two, 2 .. 32768); CQ the same
  std::uint8_t ack_timeout = 14;    ///< local ACK timeout exponent, 4.096 µs × 2^t (14: 67.1 ms); 1 .. 31
  std::uint8_t retry_count = 3;     ///< transport retries before the error CQE (0 .. 7)
  std::uint8_t rnr_retry = 7;       ///< receiver-not-ready retries (7: forever; no SENDs are used)
  std::uint8_t max_rd_atomic = 16;  ///< outstanding READ / atomic per QP (power of two, capped by the device)
  std::uint8_t max_mtu = 5;         ///< ibv_mtu upper bound (5 = 4096); the QP uses min(ours, peer's, this)
  std::uint8_t traffic_class = 0;   ///< RoCE DSCP << 2 / IB traffic class
  std::uint8_t service_level = 0;   ///< IB SL / RoCE priority
  std::uint8_t hop_limit = 64;      ///< RoCE
  bool relaxed_ordering = false;    ///< IBV_ACCESS_RELAXED_ORDERING on data regions
  std::uint32_t db_batch = 1;       ///< qp_config pass-through (device side)
  std::uint32_t signal_period = 1;  ///< qp_config pass-through (device side)
};

/// invalid_argument naming the first bad option.
status check_options(const qp_options& o);

/// Picks the GID index a RoCE port uses: RoCE v2 first, IPv4-mapped (::ffff:a.b.c.d) before other
/// addresses, link-local (fe80::/10) last; zero entries never. `want` >= 0 forces that index (it must
/// exist). not_found when the table has nothing usable.
status select_gid(const std::vector<gid_entry>& table, int want, gid_entry& out);

/// Hops between two PCI devices given their paths from the root (hwloc object ids, root first):
/// steps from each up to the deepest common ancestor, summed. -1 when either path is empty.
int pci_distance(const std::vector<std::uint64_t>& a, const std::vector<std::uint64_t>& b);

/// The index in `nics` of the one nearest to `gpu` (ties: the lower index); -1 when none.
int nearest_nic(const std::vector<std::uint64_t>& gpu, const std::vector<std::vector<std::uint64_t>>& nics);

/// The PCI path (root first) of bus id "dddd:bb:dd.f" in this host's hwloc topology; empty when
/// hwloc does not know it.
std::vector<std::uint64_t> pci_path(const std::string& bus_id);

/// Where and how a NIC is used.
struct nic_choice {
  std::string name;    ///< empty: the nearest mlx5 device to `gpu_bus_id` (or the first when unknown)
  int port = 0;        ///< 0: the first active port
  int gid_index = -1;  ///< RoCE: -1 = select_gid's choice
  std::string gpu_bus_id;
};

/// One opened NIC: DEVX context, protection domain, the port and GID in use.
class nic {
 public:
  /// Opens the device of `c` (or the best one) and queries everything a QP needs. Each failure
  /// names its step: "no mlx5 device", "mlx5dv_open_device(DEVX)", "ibv_query_port", ...
  static status open(verbs_api& v, gpu_api& g, const nic_choice& c, std::unique_ptr<nic>& out);
  ~nic();
  nic(const nic&) = delete;
  nic& operator=(const nic&) = delete;

  verbs_api& verbs() const { return v_; }
  gpu_api& gpu() const { return g_; }
  void* ctx() const { return ctx_; }
  void* pd() const { return pd_; }
  std::uint32_t pdn() const { return pdn_; }
  std::uint32_t eqn() const { return eqn_; }
  const std::string& name() const { return name_; }
  int port() const { return port_; }
  const port_attr& port_info() const { return port_info_; }
  const gid_entry& gid() const { return gid_; }
  const device_attr& device() const { return dev_; }
  /// Whether GPU memory is registered through dma-buf (else through nvidia_peermem).
  bool dmabuf() const { return dmabuf_; }

 private:
  nic(verbs_api& v, gpu_api& g) : v_(v), g_(g) {}
  verbs_api& v_;
  gpu_api& g_;
  std::string name_;
  void* ctx_ = nullptr;
  void* pd_ = nullptr;
  std::uint32_t pdn_ = 0;
  std::uint32_t eqn_ = 0;
  int port_ = 0;
  port_attr port_info_;
  gid_entry gid_;
  device_attr dev_;
  bool dmabuf_ = false;
};

/// One RC QP with its collapsed send CQ, all in one GPU buffer registered as one DEVX umem:
///   [0, sq)           the SQ ring, sq_size × 64 B
///   [cq_off, +cq)     the CQ, sq_size × 64 B CQEs, every one initialised to opcode INVALID
///   [dbr_off, +8)     the QP doorbell record (receive word, send word)
///   [dbr_off + 64, +8)  the CQ doorbell record
/// (each part starts on a 4 KiB page), and its own UAR page mapped into the GPU (the CQ uses the
/// same UAR page; its arm doorbell is never rung).
class rc_qp {
 public:
  /// Created in RESET: memory, umem, UAR + GPU mapping, CREATE_CQ, CREATE_QP (in that order; each
  /// failure undoes what came before and names its step).
  static status create(nic& n, const qp_options& o, std::unique_ptr<rc_qp>& out);
  /// Destroys QP, CQ, UAR mapping, UAR, umem, memory (in that order).
  ~rc_qp();
  rc_qp(const rc_qp&) = delete;
  rc_qp& operator=(const rc_qp&) = delete;

  /// RST2INIT, INIT2RTR (path MTU = min of both ports and max_mtu; the peer's QPN, PSN, LID / GID),
  /// RTR2RTS (our PSN, ack_timeout, retry counts). The peer's description is validated first.
  status connect(const peer_qp& peer);

  std::uint32_t qpn() const { return qpn_; }
  std::uint32_t cqn() const { return cqn_; }
  std::uint32_t psn() const { return psn_; }
  /// The path MTU in use after connect (ibv_mtu), 0 before.
  std::uint8_t mtu() const { return mtu_; }
  bool connected() const { return connected_; }
  /// What the device side needs (pointers as the GPU sees them); lkey / scratch are the caller's.
  qp_config device_config() const;

  /// Posts one inline RDMA WRITE (`bytes` <= kMaxInlineBytes, requesting a CQE) from the host and
  /// waits for its completion until `deadline_ns` (now_ns clock). `live` is the QP's device-side
  /// state (in GPU memory, reached through gpu_api::live_read / live_write); its counters and the
  /// doorbell record move as a device poster would move them, and the doorbell is rung through the
  /// host's mapping of the UAR. No other poster may post on the QP meanwhile: the host waits (up to
  /// the deadline) until no post is in flight, and cannot exclude one that starts later.
  /// ok; timeout; the QP's error (latched in `live`, as a device poller would) when it has failed
  /// or fails now.
  status post_inline_write(qp_state* live, std::uint64_t raddr, std::uint32_t rkey, const void* data,
                           std::uint32_t bytes, std::uint64_t deadline_ns);
  /// 2ERR: the NIC stops executing the QP's WQEs (flushed) and stops answering its peer (whose QP
  /// then fails with retries exceeded). The QP's memory stays valid until it is destroyed.
  status to_error();

  /// Layout of the queue buffer for a queue of `sq_size` WQEBBs.
  struct layout {
    std::size_t cq_off, dbr_off, bytes;
  };
  static layout layout_for(std::uint32_t sq_size);

 private:
  rc_qp(nic& n, const qp_options& o) : n_(n), o_(o) {}
  status modify(const char* step, std::uint16_t opcode, std::span<const std::byte> in);
  nic& n_;
  qp_options o_;
  void* mem_ = nullptr;
  layout lay_{};
  void* umem_ = nullptr;
  std::uint32_t umem_id_ = 0;
  void* uar_ = nullptr;
  uar_info uar_info_;
  void* uar_dev_ = nullptr;  // the UAR page as the GPU sees it
  void* cq_obj_ = nullptr;
  void* qp_obj_ = nullptr;
  std::uint32_t cqn_ = 0, qpn_ = 0, psn_ = 0;
  std::uint8_t mtu_ = 0;
  bool connected_ = false;
};

/// A registered data region.
class data_region {
 public:
  /// ibv_reg_dmabuf_mr when the NIC uses dma-buf, else ibv_reg_mr (nvidia_peermem).
  static status create(nic& n, void* addr, std::size_t bytes, bool relaxed, std::unique_ptr<data_region>& out);
  /// Host memory (pinned or pageable): ibv_reg_mr, never dma-buf.
  static status create_host(nic& n, void* addr, std::size_t bytes, std::unique_ptr<data_region>& out);
  ~data_region();
  data_region(const data_region&) = delete;
  data_region& operator=(const data_region&) = delete;
  std::uint32_t lkey() const { return keys_.lkey; }
  std::uint32_t rkey() const { return keys_.rkey; }
  void* addr() const { return addr_; }
  std::size_t size() const { return bytes_; }

 private:
  static status reg(nic& n, void* addr, std::size_t bytes, bool relaxed, bool gpu, std::unique_ptr<data_region>& out);
  data_region(nic& n) : n_(n) {}
  nic& n_;
  void* mr_ = nullptr;
  void* addr_ = nullptr;
  std::size_t bytes_ = 0;
  mr_keys keys_;
};

/// The QPs of one context, one per peer, each made, connected, torn down and re-made on its own.
/// Not thread-safe: the owner serialises calls. A QP whose connect failed part-way is left in an
/// intermediate state: drop it and prepare a new one (the peer needs the new description).
class peer_set {
 public:
  /// QPs of the context `self_id` on NIC `n`.
  peer_set(nic& n, qp_options o, std::uint64_t self_id) : n_(n), o_(o), self_id_(self_id) {}
  /// Creates (or re-creates, after drop) the QP for `peer_id` and returns what the peer needs.
  status prepare(std::uint64_t peer_id, const conn_desc& self, conn_desc& for_peer);
  /// Connects the QP for `peer_id` to the peer's description (which must come from `peer_id` and be
  /// addressed to this context).
  status connect(std::uint64_t peer_id, const conn_desc& theirs);
  /// Destroys the QP of `peer_id` (no other QP is touched). not_found when there is none.
  status drop(std::uint64_t peer_id);
  rc_qp* find(std::uint64_t peer_id) const;
  std::size_t size() const { return qps_.size(); }

 private:
  nic& n_;
  qp_options o_;
  std::uint64_t self_id_;
  std::map<std::uint64_t, std::unique_ptr<rc_qp>> qps_;
};

}  // namespace eaas::detail::ibgda
