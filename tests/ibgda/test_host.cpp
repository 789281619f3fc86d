// The ibgda host side (lib/transport/ibgda) driven against fake rdma-core / CUDA tables: the exact
// PRM commands of a QP bring-up, the state order, failures at every step (status, message naming
// the step, nothing leaked), teardown and re-connect of one peer, NIC / port / GID choice, the
// prerequisite verdicts, and the real rdma-core path on this machine.

#include <doctest/doctest.h>

#include <bit>
#include <cerrno>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "eaas/host/error.hpp"
#include "fake_verbs.hpp"
#include "transport/ibgda/host.hpp"
#include "transport/ibgda/prm.hpp"
#include "transport/ibgda/probe.hpp"

using eaas::status;
using eaas::test::fake_call;
using eaas::test::fake_gpu;
using eaas::test::fake_verbs;
namespace ib = eaas::detail::ibgda;
namespace prm = eaas::detail::ibgda::prm;

namespace {

std::string why() { return std::string(eaas::last_error()); }

std::uint64_t qpc_get(const fake_call& c, prm::field f) { return prm::get(c.in, prm::at(prm::modify_qp_in::kQpc, f)); }
std::uint64_t path_get(const fake_call& c, prm::field f) {
  return prm::get(c.in, prm::at(prm::modify_qp_in::kQpc + prm::qpc::kPrimaryPath, f));
}

// Bits set in a command block: compared with the bits of the values the test expects, so that a
// stray bit anywhere (a field written twice at different offsets, say) fails.
int popcount(const std::vector<std::byte>& b) {
  int n = 0;
  for (std::byte x : b) n += std::popcount(static_cast<unsigned>(x));
  return n;
}
int bits(std::initializer_list<std::uint64_t> vs) {
  int n = 0;
  for (auto v : vs) n += std::popcount(v);
  return n;
}

ib::peer_qp ib_peer() {
  ib::peer_qp p;
  p.layer = ib::link_layer::infiniband;
  p.mtu = 4;
  p.lid = 0x34;
  p.qpn = 0xabcde;
  p.psn = 0x123456;
  return p;
}

struct rig {
  fake_verbs v;
  fake_gpu g;
  std::unique_ptr<ib::nic> nic;
  void open(ib::nic_choice c = {}) { REQUIRE(ib::nic::open(v, g, c, nic) == status::ok); }
};

}  // namespace

TEST_CASE("ibgda host: QP bring-up on InfiniBand sends exactly these PRM commands, in this order") {
  rig r;
  r.open();
  CHECK(r.nic->name() == "mlx5_0");
  CHECK(r.nic->port() == 1);
  CHECK(r.nic->dmabuf());
  ib::qp_options o;
  o.sq_size = 256;
  std::unique_ptr<ib::rc_qp> q;
  REQUIRE(ib::rc_qp::create(*r.nic, o, q) == status::ok);
  const auto lay = ib::rc_qp::layout_for(256);
  CHECK(lay.cq_off == 256 * 64);
  CHECK(lay.dbr_off == lay.cq_off + 256 * 64);
  CHECK(lay.bytes == lay.dbr_off + 4096);

  // Order of the calls that make the QP (after the NIC was opened).
  std::vector<std::string> names;
  for (const auto& c : r.v.calls) names.push_back(c.name);
  const std::vector<std::string> want{"list_devices", "open_devx", "query_device", "query_port",
                                      "query_gid",    "alloc_pd",  "query_eqn",    "umem_reg",
                                      "alloc_uar",    "alloc_uar", "devx_create",  "devx_create"};
  CHECK(names == want);
  CHECK(r.g.calls == std::vector<std::string>{"alloc", "copy", "dmabuf_fd", "close_fd", "map_io"});
  CHECK(r.v.last_umem_fd == 100);  // the dma-buf fd went to umem_reg_ex ...
  CHECK(r.g.open_fds.empty());     // ... and was closed after
  CHECK(r.v.last_umem_size == lay.bytes);
  CHECK(r.v.last_uar_kind == ib::uar_kind::bf);  // NC_DEDICATED refused, BF next

  // The CQ lives in GPU memory: every CQE starts as opcode INVALID.
  auto* mem = static_cast<std::uint8_t*>(r.v.last_umem_addr);
  for (int i = 0; i < 256; ++i) CHECK(mem[lay.cq_off + i * 64 + 63] == 0xf0);

  const auto creates = r.v.calls_named("devx_create");
  REQUIRE(creates.size() == 2);
  const auto& cq = creates[0].in;
  const std::uint32_t umem = 0x1001, page = 0x41, c = prm::create_cq_in::kCqc;
  CHECK(creates[0].opcode == 0x400);
  CHECK(prm::get(cq, prm::create_cq_in::cq_umem_id) == umem);
  CHECK(prm::get(cq, prm::create_cq_in::cq_umem_valid) == 1);
  CHECK(prm::get(cq, prm::create_cq_in::cq_umem_offset) == lay.cq_off);
  CHECK(prm::get(cq, prm::at(c, prm::cqc::dbr_umem_valid)) == 1);
  CHECK(prm::get(cq, prm::at(c, prm::cqc::dbr_umem_id)) == umem);
  CHECK(prm::get(cq, prm::at(c, prm::cqc::dbr_addr)) == lay.dbr_off + 64);
  CHECK(prm::get(cq, prm::at(c, prm::cqc::cqe_sz)) == 0);
  CHECK(prm::get(cq, prm::at(c, prm::cqc::cc)) == 1);
  CHECK(prm::get(cq, prm::at(c, prm::cqc::oi)) == 1);
  CHECK(prm::get(cq, prm::at(c, prm::cqc::log_cq_size)) == 8);
  CHECK(prm::get(cq, prm::at(c, prm::cqc::uar_page)) == page);
  CHECK(prm::get(cq, prm::at(c, prm::cqc::c_eqn)) == 9);
  CHECK(prm::get(cq, prm::at(c, prm::cqc::log_page_size)) == 0);
  CHECK(popcount(cq) == bits({0x400, umem, 1, lay.cq_off, 1, umem, lay.dbr_off + 64, 1, 1, 8, page, 9}));
  // Hand-decoded bytes (PRM bit 0 = MSB of byte 0): opcode 0x0400 in bytes 0-1; cqc.cc is bit
  // 0x80 + 0x0b = 139 → byte 17, mask 0x10; cqc.oi bit 0x80 + 0x0e = 142 → byte 17, mask 0x02.
  CHECK(cq[0] == std::byte{0x04});
  CHECK(cq[1] == std::byte{0x00});
  CHECK(cq[17] == std::byte{0x12});

  const auto& qp = creates[1].in;
  const std::uint32_t cqn = 0x2001, q0 = prm::create_qp_in::kQpc;
  CHECK(creates[1].opcode == 0x500);
  CHECK(prm::get(qp, prm::create_qp_in::wq_umem_id) == umem);
  CHECK(prm::get(qp, prm::create_qp_in::wq_umem_valid) == 1);
  CHECK(prm::get(qp, prm::create_qp_in::wq_umem_offset) == 0);
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::st)) == 0);  // RC
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::pm_state)) == 3);
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::pd)) == 0x77);
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::uar_page)) == page);
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::rq_type)) == 3);  // zero-size RQ
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::cqn_snd)) == cqn);
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::cqn_rcv)) == cqn);
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::log_sq_size)) == 8);
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::log_rq_size)) == 0);
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::no_sq)) == 0);
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::dbr_umem_valid)) == 1);
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::dbr_umem_id)) == umem);
  CHECK(prm::get(qp, prm::at(q0, prm::qpc::dbr_addr)) == lay.dbr_off);
  CHECK(popcount(qp) == bits({0x500, umem, 1, 3, 0x77, page, 3, cqn, cqn, 8, 1, umem, lay.dbr_off}));
  CHECK(q->qpn() == 0x3001);
  CHECK(q->cqn() == cqn);
  CHECK(q->psn() <= 0xffffff);

  // Connect: RST2INIT, INIT2RTR, RTR2RTS, each with exactly the fields below.
  r.v.calls.clear();
  const ib::peer_qp peer = ib_peer();
  REQUIRE(q->connect(peer) == status::ok);
  CHECK(q->mtu() == 4);  // min(ours 5, theirs 4, max 5)
  const auto mods = r.v.calls_named("devx_modify");
  REQUIRE(mods.size() == 3);
  CHECK(r.v.calls.size() == 3);  // InfiniBand: nothing but the three modifies
  CHECK(mods[0].opcode == 0x502);
  CHECK(mods[1].opcode == 0x503);
  CHECK(mods[2].opcode == 0x504);
  for (const auto& m : mods) CHECK(prm::get(m.in, prm::modify_qp_in::qpn) == 0x3001);

  const auto& a = mods[0];
  CHECK(qpc_get(a, prm::qpc::rwe) == 1);
  CHECK(qpc_get(a, prm::qpc::rre) == 1);
  CHECK(qpc_get(a, prm::qpc::rae) == 1);
  CHECK(qpc_get(a, prm::qpc::atomic_mode) == 3);
  CHECK(qpc_get(a, prm::qpc::pm_state) == 3);
  CHECK(path_get(a, prm::ads::vhca_port_num) == 1);
  CHECK(popcount(a.in) == bits({0x502, 0x3001, 1, 1, 1, 3, 3, 1}));

  const auto& b = mods[1];
  CHECK(qpc_get(b, prm::qpc::mtu) == 4);
  CHECK(qpc_get(b, prm::qpc::log_msg_max) == 30);
  CHECK(qpc_get(b, prm::qpc::remote_qpn) == 0xabcde);
  CHECK(qpc_get(b, prm::qpc::next_rcv_psn) == 0x123456);
  CHECK(qpc_get(b, prm::qpc::min_rnr_nak) == 12);
  CHECK(qpc_get(b, prm::qpc::log_rra_max) == 4);  // 16 outstanding reads
  CHECK(path_get(b, prm::ads::rlid) == 0x34);
  CHECK(path_get(b, prm::ads::grh) == 0);
  CHECK(path_get(b, prm::ads::sl) == 0);
  CHECK(popcount(b.in) == bits({0x503, 0x3001, 4, 30, 0xabcde, 0x123456, 12, 4, 0x34}));

  const auto& d = mods[2];
  CHECK(qpc_get(d, prm::qpc::next_send_psn) == q->psn());
  CHECK(qpc_get(d, prm::qpc::retry_count) == 3);
  CHECK(qpc_get(d, prm::qpc::rnr_retry) == 7);
  CHECK(qpc_get(d, prm::qpc::log_sra_max) == 4);
  CHECK(qpc_get(d, prm::qpc::log_ack_req_freq) == 0);
  CHECK(path_get(d, prm::ads::ack_timeout) == 14);
  CHECK(popcount(d.in) == bits({0x504, 0x3001, q->psn(), 3, 7, 4, 14}));
  CHECK(r.v.qp_state.begin()->second == 3);  // the fake's QP reached RTS

  // What the device side gets: pointers into the one queue buffer and the mapped UAR.
  const ib::qp_config dc = q->device_config();
  CHECK(reinterpret_cast<std::uint8_t*>(dc.sq) == mem);
  CHECK(reinterpret_cast<std::uint8_t*>(dc.cq) == mem + lay.cq_off);
  CHECK(reinterpret_cast<std::uint8_t*>(dc.sq_dbrec) == mem + lay.dbr_off + 4);  // the send word
  CHECK(dc.sq_size == 256);
  CHECK(dc.cq_size == 256);
  CHECK(dc.qpn == 0x3001);
  REQUIRE(r.g.mapped.size() == 1);
  CHECK(reinterpret_cast<char*>(dc.uar_db) == static_cast<char*>(*r.g.mapped.begin()) + 0x800);

  // Connecting twice is refused; a second QP gets its own objects and numbers.
  CHECK(q->connect(peer) == status::invalid_argument);
  std::unique_ptr<ib::rc_qp> q2;
  REQUIRE(ib::rc_qp::create(*r.nic, o, q2) == status::ok);
  CHECK(q2->qpn() == 0x3002);
  CHECK(q2->cqn() == 0x2002);

  // Teardown: QP, CQ, then the UAR mapping, the UAR, the umem, the memory.
  r.v.calls.clear();
  r.g.calls.clear();
  const auto qp_obj = creates[1].obj, cq_obj = creates[0].obj;
  q.reset();
  names.clear();
  for (const auto& c : r.v.calls) names.push_back(c.name);
  CHECK(names == std::vector<std::string>{"devx_destroy", "devx_destroy", "free_uar", "umem_dereg"});
  CHECK(r.v.calls[0].obj == qp_obj);
  CHECK(r.v.calls[1].obj == cq_obj);
  CHECK(r.g.calls == std::vector<std::string>{"unmap_io", "free"});
  q2.reset();
  r.nic.reset();
  CHECK(r.v.live.empty());
  CHECK(r.g.allocations.empty());
  CHECK(r.g.mapped.empty());
}

TEST_CASE("ibgda host: RoCE picks a RoCE v2 GID and puts the resolved MAC, GID and UDP port in INIT2RTR") {
  rig r;
  r.v.ports[1] = ib::port_attr{true, ib::link_layer::ethernet, 3, 0, 4};
  r.v.gids = {
      {0, ib::gid_type::roce_v1, {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0xff, 0xfe, 0, 0, 1}},
      {1, ib::gid_type::roce_v2, {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0xff, 0xfe, 0, 0, 1}},
      {2, ib::gid_type::roce_v1, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 7}},
      {3, ib::gid_type::roce_v2, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 7}},
  };
  r.open();
  CHECK(r.nic->gid().index == 3);
  ib::qp_options o;
  o.traffic_class = 106;  // DSCP 26
  o.service_level = 3;
  std::unique_ptr<ib::rc_qp> q;
  REQUIRE(ib::rc_qp::create(*r.nic, o, q) == status::ok);
  ib::peer_qp p;
  p.layer = ib::link_layer::ethernet;
  p.mtu = 5;
  p.gid = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 9};
  p.qpn = 0x77;
  p.psn = 5;
  r.v.calls.clear();
  REQUIRE(q->connect(p) == status::ok);
  CHECK(q->mtu() == 3);  // our port's 1024 bounds it
  CHECK(r.v.last_sgid == 3);
  CHECK(r.v.last_dgid == p.gid);
  const auto mods = r.v.calls_named("devx_modify");
  REQUIRE(mods.size() == 3);
  const auto& b = mods[1];
  const std::uint32_t path = prm::modify_qp_in::kQpc + prm::qpc::kPrimaryPath;
  for (int i = 0; i < 16; ++i) CHECK(static_cast<std::uint8_t>(b.in[(path + prm::ads::kRgidBit) / 8 + i]) == p.gid[i]);
  for (int i = 0; i < 6; ++i)
    CHECK(static_cast<std::uint8_t>(b.in[(path + prm::ads::kRmacBit) / 8 + i]) == r.v.roce.rmac[i]);
  CHECK(path_get(b, prm::ads::grh) == 1);
  CHECK(path_get(b, prm::ads::src_addr_index) == 3);
  CHECK(path_get(b, prm::ads::udp_sport) == 0xc123);
  CHECK(path_get(b, prm::ads::hop_limit) == 64);
  CHECK(path_get(b, prm::ads::dscp) == 26);
  CHECK(path_get(b, prm::ads::tclass) == 106);
  CHECK(path_get(b, prm::ads::eth_prio) == 3);
  CHECK(path_get(b, prm::ads::rlid) == 0);
  CHECK(qpc_get(b, prm::qpc::mtu) == 3);
  // A peer on the other link layer is refused before any command.
  std::unique_ptr<ib::rc_qp> q2;
  REQUIRE(ib::rc_qp::create(*r.nic, o, q2) == status::ok);
  r.v.calls.clear();
  CHECK(q2->connect(ib_peer()) == status::peer_unreachable);
  CHECK(why().find("InfiniBand") != std::string::npos);
  CHECK(r.v.calls.empty());
}

TEST_CASE("ibgda host: the peer-memory path when the GPU has no dma-buf") {
  rig r;
  r.g.dma_buf = false;
  r.open();
  CHECK_FALSE(r.nic->dmabuf());
  std::unique_ptr<ib::rc_qp> q;
  REQUIRE(ib::rc_qp::create(*r.nic, {}, q) == status::ok);
  CHECK(r.v.last_umem_fd == -1);  // plain mlx5dv_devx_umem_reg
  std::vector<char> buf(10000);
  std::unique_ptr<ib::data_region> mr;
  REQUIRE(ib::data_region::create(*r.nic, buf.data() + 3, 9000, false, mr) == status::ok);
  CHECK(r.v.last_mr_fd == -1);
  CHECK(mr->lkey() == 0x5000);
  CHECK(mr->rkey() == 0x5001);

  mr.reset();

  rig d;
  d.open();
  std::unique_ptr<ib::data_region> mr2;
  REQUIRE(ib::data_region::create(*d.nic, buf.data() + 3, 9000, false, mr2) == status::ok);
  CHECK(d.v.last_mr_fd == 100);  // ibv_reg_dmabuf_mr, offset within the exported pages
  CHECK(d.v.last_mr_offset == (reinterpret_cast<std::uintptr_t>(buf.data() + 3) & 4095));
  CHECK(d.g.open_fds.empty());
  CHECK(ib::data_region::create(*d.nic, nullptr, 8, false, mr2) == status::invalid_argument);
  mr2.reset();
  CHECK(d.v.calls_named("dereg_mr").size() == 1);
}

TEST_CASE("ibgda host: every failing step gives its status, a message naming it, and leaks nothing") {
  struct step {
    const char* what;
    std::function<void(fake_verbs&, fake_gpu&)> inject;
    bool at_open;  // fails in nic::open rather than rc_qp::create / connect
    status want;
    const char* says;
  };
  const std::vector<step> steps{
      {"no device", [](fake_verbs& v, fake_gpu&) { v.devices.clear(); }, true, status::unsupported,
       "no mlx5 device: rdma-core lists no RDMA device"},
      {"not mlx5",
       [](fake_verbs& v, fake_gpu&) {
         v.devices = {{"efa0", false, ""}};
       },
       true, status::unsupported, "no mlx5 device among the 1 RDMA device(s) (efa0)"},
      {"list fails", [](fake_verbs& v, fake_gpu&) { v.fail["list_devices"] = EACCES; }, true, status::permission_denied,
       "ibv_get_device_list"},
      {"no DEVX", [](fake_verbs& v, fake_gpu&) { v.no_devx = {"mlx5_0"}; }, true, status::unsupported,
       "mlx5_0: mlx5dv_open_device with DEVX failed"},
      {"port down", [](fake_verbs& v, fake_gpu&) { v.ports[1].active = false; }, true, status::peer_unreachable,
       "no ACTIVE port"},
      {"no LID", [](fake_verbs& v, fake_gpu&) { v.ports[1].lid = 0; }, true, status::unsupported, "subnet manager"},
      {"RoCE without GIDs",
       [](fake_verbs& v, fake_gpu&) {
         v.ports[1] = ib::port_attr{true, ib::link_layer::ethernet, 3, 0, 2};
         v.gids.clear();
       },
       true, status::not_found, "GID table"},
      {"PD", [](fake_verbs& v, fake_gpu&) { v.fail["alloc_pd"] = ENOMEM; }, true, status::no_resource, "ibv_alloc_pd"},
      {"EQ", [](fake_verbs& v, fake_gpu&) { v.fail["query_eqn"] = EINVAL; }, true, status::invalid_argument,
       "mlx5dv_devx_query_eqn"},
      {"GPU memory", [](fake_verbs&, fake_gpu& g) { g.alloc_error = 2; }, false, status::no_resource,
       "GPU memory for the queues"},
      {"umem", [](fake_verbs& v, fake_gpu&) { v.fail["umem_reg"] = EFAULT; }, false, status::internal_error,
       "registering the queue memory with mlx5_0 (mlx5dv_devx_umem_reg_ex, dma-buf) failed: errno 14"},
      {"umem, peer memory",
       [](fake_verbs& v, fake_gpu& g) {
         g.dma_buf = false;
         v.fail["umem_reg"] = EFAULT;
       },
       false, status::internal_error, "nvidia_peermem"},
      {"UAR", [](fake_verbs& v, fake_gpu&) { v.fail["alloc_uar"] = ENOMEM; }, false, status::no_resource,
       "mlx5dv_devx_alloc_uar"},
      {"UAR mapping not permitted", [](fake_verbs&, fake_gpu& g) { g.map_error = ib::kCudaErrorNotPermitted; }, false,
       status::permission_denied, "no permission to map the UAR"},
      {"UAR mapping", [](fake_verbs&, fake_gpu& g) { g.map_error = 1; }, false, status::internal_error,
       "mapping the UAR into the GPU"},
      {"CREATE_CQ errno", [](fake_verbs& v, fake_gpu&) { v.fail["devx_create:0x400"] = ENOMEM; }, false,
       status::no_resource, "CREATE_CQ on mlx5_0 (mlx5dv_devx_obj_create) failed: errno 12"},
      {"CREATE_CQ firmware",
       [](fake_verbs& v, fake_gpu&) {
         v.prm_fail[0x400] = {0x3, 0xabc};
       },
       false, status::internal_error, "firmware status 0x3 syndrome 0xabc"},
      {"CREATE_QP", [](fake_verbs& v, fake_gpu&) { v.fail["devx_create:0x500"] = EINVAL; }, false,
       status::invalid_argument, "CREATE_QP on mlx5_0"},
      {"RST2INIT", [](fake_verbs& v, fake_gpu&) { v.fail["devx_modify:0x502"] = EINVAL; }, false,
       status::invalid_argument, "RST2INIT (opcode 0x502)"},
      {"INIT2RTR",
       [](fake_verbs& v, fake_gpu&) {
         v.prm_fail[0x503] = {0x10, 0x77};
       },
       false, status::internal_error, "INIT2RTR (opcode 0x503) of QP 0x3001 on mlx5_0 failed: errno 5"},
      {"RTR2RTS", [](fake_verbs& v, fake_gpu&) { v.fail["devx_modify:0x504"] = EPERM; }, false,
       status::permission_denied, "RTR2RTS"},
  };
  for (const auto& s : steps) {
    CAPTURE(s.what);
    fake_verbs v;
    fake_gpu g;
    s.inject(v, g);
    std::unique_ptr<ib::nic> n;
    status st = ib::nic::open(v, g, {}, n);
    if (!s.at_open) {
      REQUIRE(st == status::ok);
      std::unique_ptr<ib::rc_qp> q;
      st = ib::rc_qp::create(*n, {}, q);
      if (st == status::ok) st = q->connect(ib_peer());
    }
    CHECK(st == s.want);
    CHECK(why().find(s.says) != std::string::npos);
    if (why().find(s.says) == std::string::npos) MESSAGE(why());
    n.reset();
    CHECK(v.live.empty());  // every object made before the failure was destroyed
    CHECK(g.allocations.empty());
    CHECK(g.mapped.empty());
    CHECK(g.open_fds.empty());
  }
}

TEST_CASE("ibgda host: a second device is used when the first refuses DEVX; a named device must exist") {
  fake_verbs v;
  fake_gpu g;
  v.devices = {{"mlx5_0", true, ""}, {"mlx5_1", true, ""}};
  v.no_devx = {"mlx5_0"};
  std::unique_ptr<ib::nic> n;
  REQUIRE(ib::nic::open(v, g, {}, n) == status::ok);
  CHECK(n->name() == "mlx5_1");
  n.reset();
  ib::nic_choice c;
  c.name = "mlx5_7";
  CHECK(ib::nic::open(v, g, c, n) == status::not_found);
  c.name = "mlx5_1";
  c.port = 2;
  CHECK(ib::nic::open(v, g, c, n) == status::invalid_argument);  // the fake has no port 2
  CHECK(why().find("ibv_query_port(mlx5_1, port 2)") != std::string::npos);
}

TEST_CASE("ibgda host: one peer torn down and re-connected; the others' QPs see no command") {
  rig r;
  r.open();
  const std::uint64_t self = 0x5e1f, peers[3] = {0xa1, 0xb2, 0xc3};
  ib::peer_set set(*r.nic, {}, self);
  ib::conn_desc me;
  me.context_id = self;
  me.host_id = 0x40;
  std::map<std::uint64_t, ib::conn_desc> mine;
  for (auto p : peers) REQUIRE(set.prepare(p, me, mine[p]) == status::ok);
  CHECK(set.size() == 3);
  for (auto p : peers) {
    CHECK(mine[p].target_id == p);
    CHECK(mine[p].qps.size() == 1);
    CHECK(mine[p].lid == 0x12);
    ib::conn_desc theirs;
    theirs.context_id = p;
    theirs.target_id = self;
    theirs.layer = ib::link_layer::infiniband;
    theirs.mtu = 5;
    theirs.lid = static_cast<std::uint16_t>(p);
    theirs.qps = {{static_cast<std::uint32_t>(0x900 + p), 1, {}}};
    REQUIRE(set.connect(p, theirs) == status::ok);
  }
  CHECK(set.prepare(peers[0], me, mine[peers[0]]) == status::invalid_argument);  // exists already
  // A description from another peer, or addressed to someone else, is refused.
  ib::conn_desc stray;
  stray.context_id = 0xdd;
  stray.target_id = self;
  stray.mtu = 5;
  stray.lid = 1;
  stray.qps = {{5, 5, {}}};
  CHECK(set.connect(peers[0], stray) == status::invalid_handle);
  stray.context_id = peers[0];
  stray.target_id = 0x999;
  CHECK(set.connect(peers[0], stray) == status::invalid_handle);

  std::map<std::uint64_t, std::uint32_t> qpn;
  for (auto p : peers) qpn[p] = set.find(p)->qpn();
  const auto live_before = r.v.live;
  r.v.calls.clear();
  REQUIRE(set.drop(peers[1]) == status::ok);
  CHECK(set.find(peers[1]) == nullptr);
  CHECK(set.drop(peers[1]) == status::not_found);
  // Only peer 1's objects were destroyed: its QP, its CQ, its UAR, its umem.
  std::set<std::uintptr_t> gone;
  for (const auto& [id, kind] : live_before)
    if (r.v.live.count(id) == 0) gone.insert(id);
  CHECK(gone.size() == 4);
  for (const auto& c : r.v.calls) CHECK(gone.count(c.obj) == 1);
  for (auto p : {peers[0], peers[2]}) {
    CHECK(set.find(p)->connected());
    CHECK(set.find(p)->qpn() == qpn[p]);
  }
  int rts = 0;
  for (const auto& [obj, st] : r.v.qp_state) rts += st == 3;
  CHECK(rts == 2);

  // Re-connect peer 1: a new QP (new number, new PSN), connected again; nothing else is touched.
  r.v.calls.clear();
  ib::conn_desc again;
  REQUIRE(set.prepare(peers[1], me, again) == status::ok);
  CHECK(again.qps[0].qpn != qpn[peers[1]]);
  ib::conn_desc theirs;
  theirs.context_id = peers[1];
  theirs.target_id = self;
  theirs.mtu = 5;
  theirs.lid = 9;
  theirs.qps = {{0x1234, 7, {}}};
  REQUIRE(set.connect(peers[1], theirs) == status::ok);
  const std::uintptr_t new_qp = r.v.calls_named("devx_create")[1].obj;
  for (const auto& c : r.v.calls_named("devx_modify")) CHECK(c.obj == new_qp);
  CHECK(r.v.qp_state[new_qp] == 3);
  CHECK(set.size() == 3);
}

TEST_CASE("ibgda host: options are checked, and the default dead-peer time is well under a second") {
  ib::qp_options o;
  CHECK(ib::check_options(o) == status::ok);
  CHECK(ib::ack_timeout_ns(14) == 67'108'864);                                 // 4.096 µs × 2^14
  CHECK(ib::dead_peer_ns(o.ack_timeout, o.retry_count) == 4 * 67'108'864ull);  // ≈ 268 ms nominal
  CHECK(ib::dead_peer_ns(20, 7) > 34'000'000'000ull);                          // the common default: ≈ 34 s
  auto bad = [](auto mutate, const char* says) {
    ib::qp_options x;
    mutate(x);
    CHECK(ib::check_options(x) == status::invalid_argument);
    CHECK(why().find(says) != std::string::npos);
  };
  bad([](ib::qp_options& x) { x.sq_size = 100; }, "sq_size");
  bad([](ib::qp_options& x) { x.sq_size = 1u << 16; }, "sq_size");
  bad([](ib::qp_options& x) { x.ack_timeout = 0; }, "ack_timeout");
  bad([](ib::qp_options& x) { x.ack_timeout = 32; }, "ack_timeout");
  bad([](ib::qp_options& x) { x.retry_count = 8; }, "retry_count");
  bad([](ib::qp_options& x) { x.rnr_retry = 8; }, "rnr_retry");
  bad([](ib::qp_options& x) { x.max_rd_atomic = 12; }, "max_rd_atomic");
  bad([](ib::qp_options& x) { x.max_mtu = 6; }, "max_mtu");
  bad([](ib::qp_options& x) { x.service_level = 16; }, "service_level");
  bad([](ib::qp_options& x) { x.db_batch = 1024, x.signal_period = 2; }, "db_batch");
  // And the options reach the RTR2RTS command.
  rig r;
  r.open();
  o.ack_timeout = 9;
  o.retry_count = 1;
  o.rnr_retry = 2;
  o.max_rd_atomic = 64;  // more than the device's 16: capped
  o.max_mtu = 2;
  std::unique_ptr<ib::rc_qp> q;
  REQUIRE(ib::rc_qp::create(*r.nic, o, q) == status::ok);
  REQUIRE(q->connect(ib_peer()) == status::ok);
  const auto mods = r.v.calls_named("devx_modify");
  CHECK(qpc_get(mods[1], prm::qpc::mtu) == 2);
  CHECK(qpc_get(mods[1], prm::qpc::log_rra_max) == 4);
  CHECK(path_get(mods[2], prm::ads::ack_timeout) == 9);
  CHECK(qpc_get(mods[2], prm::qpc::retry_count) == 1);
  CHECK(qpc_get(mods[2], prm::qpc::rnr_retry) == 2);
  CHECK(qpc_get(mods[2], prm::qpc::log_sra_max) == 4);
}

TEST_CASE("ibgda host: GID selection") {
  using G = ib::gid_entry;
  const ib::gid_bytes link_local{0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8};
  const ib::gid_bytes v4{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 0, 1};
  const ib::gid_bytes v6{0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  const ib::gid_bytes zero{};
  G out;
  CHECK(ib::select_gid({G{0, ib::gid_type::roce_v1, v4}, G{1, ib::gid_type::roce_v2, link_local}}, -1, out) ==
        status::ok);
  CHECK(out.index == 1);  // v2 beats v1 whatever the address
  CHECK(ib::select_gid(
            {G{0, ib::gid_type::roce_v2, link_local}, G{1, ib::gid_type::roce_v2, v6}, G{2, ib::gid_type::roce_v2, v4}},
            -1, out) == status::ok);
  CHECK(out.index == 2);  // IPv4-mapped, then global IPv6, then link-local
  CHECK(ib::select_gid({G{0, ib::gid_type::roce_v2, link_local}, G{1, ib::gid_type::roce_v2, v6}}, -1, out) ==
        status::ok);
  CHECK(out.index == 1);
  CHECK(ib::select_gid({G{4, ib::gid_type::roce_v2, v4}, G{3, ib::gid_type::roce_v2, v4}}, -1, out) == status::ok);
  CHECK(out.index == 3);  // ties: the lower index
  CHECK(ib::select_gid({G{0, ib::gid_type::roce_v2, zero}}, -1, out) == status::not_found);
  CHECK(ib::select_gid({}, -1, out) == status::not_found);
  CHECK(ib::select_gid({G{0, ib::gid_type::roce_v2, v4}, G{1, ib::gid_type::roce_v1, v6}}, 1, out) == status::ok);
  CHECK(out.index == 1);  // forced
  CHECK(ib::select_gid({G{0, ib::gid_type::roce_v2, v4}, G{1, ib::gid_type::roce_v1, zero}}, 1, out) ==
        status::not_found);
  CHECK(ib::select_gid({G{0, ib::gid_type::roce_v2, v4}}, 5, out) == status::not_found);
}

TEST_CASE("ibgda host: the NIC nearest to a GPU by PCIe hops") {
  // root 1 - host bridge 2 - switch 3 - {GPU 10, NIC 11}; root 1 - host bridge 4 - switch 5 - NIC 12;
  // NIC 13 under host bridge 2 directly.
  const std::vector<std::uint64_t> gpu{1, 2, 3, 10}, same_switch{1, 2, 3, 11}, other_socket{1, 4, 5, 12},
      same_bridge{1, 2, 13};
  CHECK(ib::pci_distance(gpu, same_switch) == 2);
  CHECK(ib::pci_distance(gpu, same_bridge) == 3);
  CHECK(ib::pci_distance(gpu, other_socket) == 6);
  CHECK(ib::pci_distance(gpu, gpu) == 0);
  CHECK(ib::pci_distance(gpu, {}) == -1);
  CHECK(ib::nearest_nic(gpu, {other_socket, same_bridge, same_switch}) == 2);
  CHECK(ib::nearest_nic(gpu, {other_socket, same_bridge}) == 1);
  CHECK(ib::nearest_nic(gpu, {{}, other_socket}) == 1);  // unknown paths go last
  CHECK(ib::nearest_nic(gpu, {{}, {}}) == 0);
  CHECK(ib::nearest_nic(gpu, {}) == -1);
  // Bus ids hwloc does not know give no path (and so rank last).
  CHECK(ib::pci_path("").empty());
  CHECK(ib::pci_path("ffff:ff:1f.7").empty());
}

TEST_CASE("ibgda probe: each missing prerequisite is named, first one first") {
  ib::host_facts f;
  f.built = true;
  f.devices = {{"mlx5_0", true, ""}};
  f.devx_ok = {"mlx5_0"};
  f.nvidia_peermem = true;
  f.peer_mapping_override = true;
  CHECK(ib::evaluate(f).missing.empty());
  CHECK(ib::evaluate(f).gpudirect_path == "nvidia_peermem");

  auto says = [](const ib::host_facts& x, const char* what) {
    const auto s = ib::evaluate(x);
    CHECK(s.missing.find(what) != std::string::npos);
    if (s.missing.find(what) == std::string::npos) MESSAGE(s.missing);
  };
  auto g = f;
  g.built = false;
  says(g, "rdma-core");
  g = f;
  g.devices.clear();
  g.devx_ok.clear();
  says(g, "no mlx5 device: no RDMA device on this host");
  g = f;
  g.devices = {{"efa0", false, ""}};
  g.devx_ok.clear();
  says(g, "no mlx5 device with DEVX among the 1 RDMA device(s) (efa0): not mlx5: efa0");
  g = f;
  g.devx_ok.clear();
  g.devx_failed = {"mlx5_0 (errno 95: Operation not supported)"};
  says(g, "mlx5dv_open_device(DEVX) failed on mlx5_0 (errno 95");
  g = f;
  g.nvidia_peermem = false;
  says(g, "no GPUDirect RDMA path: nvidia_peermem is not loaded");
  says(g, "Linux is older than 5.12");
  g.kernel_dmabuf = true;
  says(g, "no NVIDIA driver");
  g.nvidia_driver = true;
  g.gpu_dma_buf = 0;
  says(g, "DMA_BUF_SUPPORTED = 0");
  g.gpu_dma_buf = -1;  // no GPU named: the kernel and driver suffice
  CHECK(ib::evaluate(g).missing.empty());
  CHECK(ib::evaluate(g).gpudirect_path == "dma-buf");
  g = f;
  g.peer_mapping_override = false;
  says(g, "doorbell page (UAR)");
  says(g, "PeerMappingOverride=1");
  g.root = true;
  CHECK(ib::evaluate(g).missing.empty());
  // Order: with everything missing, the first one is reported.
  ib::host_facts none;
  none.built = true;
  says(none, "no mlx5 device");
}

TEST_CASE("ibgda host: on this machine the real rdma-core path fails with the precise 'no mlx5 device'") {
  auto verbs = ib::make_real_verbs();
  if (!verbs) {
    MESSAGE("built without rdma-core: nothing to run");
    return;
  }
  std::vector<ib::nic_info> devs;
  REQUIRE(verbs->list_devices(devs) == 0);
  bool any_mlx5 = false;
  for (const auto& d : devs) any_mlx5 = any_mlx5 || d.mlx5;
  if (any_mlx5) {
    MESSAGE("this host has an mlx5 device: the negative check does not apply");
    return;
  }
  fake_gpu g;
  std::unique_ptr<ib::nic> n;
  CHECK(ib::nic::open(*verbs, g, {}, n) == status::unsupported);
  CHECK(n == nullptr);
  CHECK(why().find("ibgda: no mlx5 device") != std::string::npos);
  eaas::ibgda_support s;
  CHECK(eaas::probe_ibgda(s) == status::unsupported);
  CHECK(s.missing.find("no mlx5 device") != std::string::npos);
  CHECK(why().find("no mlx5 device") != std::string::npos);
}

TEST_CASE("ibgda prm: the named offsets equal the running sums of the layouts' field widths") {
  // Each layout restated as its sequence of (field, width in bits), reserved gaps included, in PRM
  // order; the offsets prm.hpp states as numbers must equal the running sums.
  struct f {
    const char* name;
    std::uint32_t width;
  };
  auto offsets = [](std::initializer_list<f> seq, std::uint32_t& total) {
    std::map<std::string, std::uint32_t> at;
    std::uint32_t bit = 0;
    for (const auto& x : seq) {
      if (x.name[0] != '-') at[x.name] = bit;
      bit += x.width;
    }
    total = bit;
    return at;
  };
  std::uint32_t ads_bits = 0, qpc_bits = 0, cqc_bits = 0;
  const auto ads = offsets({{"fl", 1},
                            {"free_ar", 1},
                            {"-", 14},
                            {"pkey_index", 16},
                            {"-", 8},
                            {"grh", 1},
                            {"mlid", 7},
                            {"rlid", 16},
                            {"ack_timeout", 5},
                            {"-", 3},
                            {"src_addr_index", 8},
                            {"-", 4},
                            {"stat_rate", 4},
                            {"hop_limit", 8},
                            {"-", 4},
                            {"tclass", 8},
                            {"flow_label", 20},
                            {"rgid", 128},
                            {"-", 4},
                            {"f_dscp", 1},
                            {"f_ecn", 1},
                            {"-", 1},
                            {"f_eth_prio", 1},
                            {"ecn", 2},
                            {"dscp", 6},
                            {"udp_sport", 16},
                            {"dei_cfi", 1},
                            {"eth_prio", 3},
                            {"sl", 4},
                            {"vhca_port_num", 8},
                            {"rmac", 48}},
                           ads_bits);
  CHECK(ads_bits == prm::ads::kBits);
  CHECK(ads.at("pkey_index") == prm::ads::pkey_index.bit);
  CHECK(ads.at("grh") == prm::ads::grh.bit);
  CHECK(ads.at("mlid") == prm::ads::mlid.bit);
  CHECK(ads.at("rlid") == prm::ads::rlid.bit);
  CHECK(ads.at("ack_timeout") == prm::ads::ack_timeout.bit);
  CHECK(ads.at("src_addr_index") == prm::ads::src_addr_index.bit);
  CHECK(ads.at("stat_rate") == prm::ads::stat_rate.bit);
  CHECK(ads.at("hop_limit") == prm::ads::hop_limit.bit);
  CHECK(ads.at("tclass") == prm::ads::tclass.bit);
  CHECK(ads.at("flow_label") == prm::ads::flow_label.bit);
  CHECK(ads.at("rgid") == prm::ads::kRgidBit);
  CHECK(ads.at("dscp") == prm::ads::dscp.bit);
  CHECK(ads.at("udp_sport") == prm::ads::udp_sport.bit);
  CHECK(ads.at("eth_prio") == prm::ads::eth_prio.bit);
  CHECK(ads.at("sl") == prm::ads::sl.bit);
  CHECK(ads.at("vhca_port_num") == prm::ads::vhca_port_num.bit);
  CHECK(ads.at("rmac") == prm::ads::kRmacBit);

  const auto qpc = offsets({{"state", 4},
                            {"lag_tx_port_affinity", 4},
                            {"st", 8},
                            {"-", 3},
                            {"pm_state", 2},
                            {"-", 1},
                            {"req_e2e_credit_mode", 2},
                            {"offload_type", 4},
                            {"end_padding_mode", 2},
                            {"-", 2},
                            {"wq_signature", 1},
                            {"block_lb_mc", 1},
                            {"atomic_like_write_en", 1},
                            {"latency_sensitive", 1},
                            {"-", 1},
                            {"drain_sigerr", 1},
                            {"-", 2},
                            {"pd", 24},
                            {"mtu", 3},
                            {"log_msg_max", 5},
                            {"-", 1},
                            {"log_rq_size", 4},
                            {"log_rq_stride", 3},
                            {"no_sq", 1},
                            {"log_sq_size", 4},
                            {"-", 6},
                            {"rlky", 1},
                            {"ulp_stateless_offload_mode", 4},
                            {"counter_set_id", 8},
                            {"uar_page", 24},
                            {"-", 8},
                            {"user_index", 24},
                            {"-", 3},
                            {"log_page_size", 5},
                            {"remote_qpn", 24},
                            {"primary_address_path", 0x160},
                            {"secondary_address_path", 0x160},
                            {"log_ack_req_freq", 4},
                            {"-", 4},
                            {"log_sra_max", 3},
                            {"-", 2},
                            {"retry_count", 3},
                            {"rnr_retry", 3},
                            {"-", 1},
                            {"fre", 1},
                            {"cur_rnr_retry", 3},
                            {"cur_retry_count", 3},
                            {"-", 5},
                            {"-", 32},
                            {"-", 8},
                            {"next_send_psn", 24},
                            {"-", 8},
                            {"cqn_snd", 24},
                            {"-", 8},
                            {"deth_sqpn", 24},
                            {"-", 32},
                            {"-", 8},
                            {"last_acked_psn", 24},
                            {"-", 8},
                            {"ssn", 24},
                            {"-", 8},
                            {"log_rra_max", 3},
                            {"-", 1},
                            {"atomic_mode", 4},
                            {"rre", 1},
                            {"rwe", 1},
                            {"rae", 1},
                            {"-", 1},
                            {"page_offset", 6},
                            {"-", 3},
                            {"cd_slave_receive", 1},
                            {"cd_slave_send", 1},
                            {"cd_master", 1},
                            {"-", 3},
                            {"min_rnr_nak", 5},
                            {"next_rcv_psn", 24},
                            {"-", 8},
                            {"xrcd", 24},
                            {"-", 8},
                            {"cqn_rcv", 24},
                            {"dbr_addr", 64},
                            {"q_key", 32},
                            {"-", 5},
                            {"rq_type", 3},
                            {"srqn_rmpn_xrqn", 24},
                            {"-", 8},
                            {"rmsn", 24},
                            {"hw_sq_wqebb_counter", 16},
                            {"sw_sq_wqebb_counter", 16},
                            {"hw_rq_counter", 32},
                            {"sw_rq_counter", 32},
                            {"-", 32},
                            {"-", 15},
                            {"cgs", 1},
                            {"cs_req", 8},
                            {"cs_res", 8},
                            {"dc_access_key", 64},
                            {"-", 3},
                            {"dbr_umem_valid", 1},
                            {"-", 0x9c},
                            {"dbr_umem_id", 32}},
                           qpc_bits);
  CHECK(qpc_bits == prm::qpc::kBits);
  for (auto [name, fld] :
       std::initializer_list<std::pair<const char*, prm::field>>{{"state", prm::qpc::state},
                                                                 {"st", prm::qpc::st},
                                                                 {"pm_state", prm::qpc::pm_state},
                                                                 {"pd", prm::qpc::pd},
                                                                 {"mtu", prm::qpc::mtu},
                                                                 {"log_msg_max", prm::qpc::log_msg_max},
                                                                 {"log_rq_size", prm::qpc::log_rq_size},
                                                                 {"log_rq_stride", prm::qpc::log_rq_stride},
                                                                 {"no_sq", prm::qpc::no_sq},
                                                                 {"log_sq_size", prm::qpc::log_sq_size},
                                                                 {"counter_set_id", prm::qpc::counter_set_id},
                                                                 {"uar_page", prm::qpc::uar_page},
                                                                 {"user_index", prm::qpc::user_index},
                                                                 {"log_page_size", prm::qpc::log_page_size},
                                                                 {"remote_qpn", prm::qpc::remote_qpn},
                                                                 {"log_ack_req_freq", prm::qpc::log_ack_req_freq},
                                                                 {"log_sra_max", prm::qpc::log_sra_max},
                                                                 {"retry_count", prm::qpc::retry_count},
                                                                 {"rnr_retry", prm::qpc::rnr_retry},
                                                                 {"next_send_psn", prm::qpc::next_send_psn},
                                                                 {"cqn_snd", prm::qpc::cqn_snd},
                                                                 {"log_rra_max", prm::qpc::log_rra_max},
                                                                 {"atomic_mode", prm::qpc::atomic_mode},
                                                                 {"rre", prm::qpc::rre},
                                                                 {"rwe", prm::qpc::rwe},
                                                                 {"rae", prm::qpc::rae},
                                                                 {"page_offset", prm::qpc::page_offset},
                                                                 {"min_rnr_nak", prm::qpc::min_rnr_nak},
                                                                 {"next_rcv_psn", prm::qpc::next_rcv_psn},
                                                                 {"cqn_rcv", prm::qpc::cqn_rcv},
                                                                 {"dbr_addr", prm::qpc::dbr_addr},
                                                                 {"rq_type", prm::qpc::rq_type},
                                                                 {"srqn_rmpn_xrqn", prm::qpc::srqn_rmpn_xrqn},
                                                                 {"dbr_umem_valid", prm::qpc::dbr_umem_valid},
                                                                 {"dbr_umem_id", prm::qpc::dbr_umem_id}}) {
    CAPTURE(name);
    CHECK(qpc.at(name) == fld.bit);
  }
  CHECK(qpc.at("primary_address_path") == prm::qpc::kPrimaryPath);
  CHECK(qpc.at("secondary_address_path") == prm::qpc::kSecondaryPath);

  const auto cqc = offsets({{"status", 4},
                            {"as_notify", 1},
                            {"initiator_src_dct", 1},
                            {"dbr_umem_valid", 1},
                            {"-", 1},
                            {"cqe_sz", 3},
                            {"cc", 1},
                            {"-", 1},
                            {"scqe_break_moderation_en", 1},
                            {"oi", 1},
                            {"cq_period_mode", 2},
                            {"cqe_comp_en", 1},
                            {"mini_cqe_res_format", 2},
                            {"st", 4},
                            {"-", 1},
                            {"cqe_comp_layout", 7},
                            {"dbr_umem_id", 32},
                            {"-", 20},
                            {"page_offset", 6},
                            {"-", 6},
                            {"-", 3},
                            {"log_cq_size", 5},
                            {"uar_page", 24},
                            {"-", 4},
                            {"cq_period", 12},
                            {"cq_max_count", 16},
                            {"-", 24},
                            {"c_eqn", 8},
                            {"-", 3},
                            {"log_page_size", 5},
                            {"-", 24},
                            {"-", 32},
                            {"-", 8},
                            {"last_notified_index", 24},
                            {"-", 8},
                            {"last_solicit_index", 24},
                            {"-", 8},
                            {"consumer_counter", 24},
                            {"-", 8},
                            {"producer_counter", 24},
                            {"local_partition_id", 12},
                            {"process_id", 20},
                            {"-", 32},
                            {"dbr_addr", 64}},
                           cqc_bits);
  CHECK(cqc_bits == prm::cqc::kBits);
  for (auto [name, fld] :
       std::initializer_list<std::pair<const char*, prm::field>>{{"dbr_umem_valid", prm::cqc::dbr_umem_valid},
                                                                 {"cqe_sz", prm::cqc::cqe_sz},
                                                                 {"cc", prm::cqc::cc},
                                                                 {"oi", prm::cqc::oi},
                                                                 {"dbr_umem_id", prm::cqc::dbr_umem_id},
                                                                 {"page_offset", prm::cqc::page_offset},
                                                                 {"log_cq_size", prm::cqc::log_cq_size},
                                                                 {"uar_page", prm::cqc::uar_page},
                                                                 {"c_eqn", prm::cqc::c_eqn},
                                                                 {"log_page_size", prm::cqc::log_page_size},
                                                                 {"dbr_addr", prm::cqc::dbr_addr}}) {
    CAPTURE(name);
    CHECK(cqc.at(name) == fld.bit);
  }
}
