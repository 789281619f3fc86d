#pragma once

// Fakes of the ibgda host side's seam (lib/transport/ibgda/verbs_api.hpp), for tests only:
// fake_verbs records every call (with the PRM command bytes) and plays a ConnectX that enforces
// the QP state order; fake_gpu hands out host memory in place of GPU memory and maps a "UAR" page
// by returning its host address. With both, a QP's rings, doorbell record, doorbell word and CQ are
// ordinary host memory that the software NIC model (soft_nic.hpp) can serve.

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "transport/ibgda/prm.hpp"
#include "transport/ibgda/verbs_api.hpp"

namespace eaas::test {

namespace ib = eaas::detail::ibgda;

struct fake_call {
  std::string name;           ///< "list_devices", "devx_create", ...
  std::uintptr_t obj = 0;     ///< the object it acted on / created
  std::uint16_t opcode = 0;   ///< devx_create / devx_modify: the PRM opcode
  std::vector<std::byte> in;  ///< devx_create / devx_modify: the command bytes
};

class fake_verbs final : public ib::verbs_api {
 public:
  // What the "hardware" looks like.
  std::vector<ib::nic_info> devices{{"mlx5_0", true, ""}};
  std::set<std::string> no_devx;  ///< devices that refuse DEVX
  ib::device_attr dev{1, 16, true};
  std::map<int, ib::port_attr> ports{{1, ib::port_attr{true, ib::link_layer::infiniband, 5, 0x12, 1}}};
  std::vector<ib::gid_entry> gids{
      ib::gid_entry{0, ib::gid_type::ib, {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8}}};
  std::uint32_t pdn = 0x77, eqn = 9;
  std::set<ib::uar_kind> uar_unsupported{ib::uar_kind::nc_dedicated};
  ib::roce_path roce{{0x02, 0x11, 0x22, 0x33, 0x44, 0x55}, 0xc123};
  /// Data registrations are forwarded here when set (e.g. to the software NIC's key table), and so
  /// are deregistrations.
  std::function<ib::mr_keys(void*, std::size_t)> on_reg_mr;
  std::function<void(const ib::mr_keys&)> on_dereg_mr;

  // Failure injection: the named call fails with this errno ("devx_create:0x500" for one opcode).
  std::map<std::string, int> fail;
  // The firmware answers this PRM status / syndrome to an opcode (the call itself "succeeds" at the
  // errno level as far as the fake goes: like the kernel, it reports EIO with the status in `out`).
  std::map<std::uint16_t, std::pair<std::uint8_t, std::uint32_t>> prm_fail;

  std::vector<fake_call> calls;
  std::map<std::uintptr_t, std::string> live;  ///< objects that exist now: id → kind
  std::map<std::uintptr_t, int> qp_state;      ///< DEVX QP object → 0 RST, 1 INIT, 2 RTR, 3 RTS, 4 ERR
  std::map<std::uintptr_t, ib::mr_keys> mrs;   ///< live MRs → their keys
  std::map<std::uintptr_t, std::pair<void*, std::size_t>> mr_range;  ///< live MRs → [addr, +bytes)
  std::map<std::uintptr_t, std::uint32_t> qpn_of;

  ~fake_verbs() override {
    for (void* p : uar_pages_) std::free(p);
  }

  std::vector<fake_call> calls_named(const std::string& name) const {
    std::vector<fake_call> r;
    for (const auto& c : calls)
      if (c.name == name) r.push_back(c);
    return r;
  }

  int list_devices(std::vector<ib::nic_info>& out) override {
    if (int e = record("list_devices"); e != 0) return e;
    out = devices;
    return 0;
  }
  int open_devx(const std::string& name, void*& ctx) override {
    if (int e = record("open_devx"); e != 0) return e;
    if (no_devx.count(name) != 0) return EOPNOTSUPP;
    ctx = make("ctx:" + name);
    return 0;
  }
  void close_device(void* ctx) override {
    record("close_device", id(ctx));
    kill(ctx);
  }
  int query_device(void*, ib::device_attr& out) override {
    if (int e = record("query_device"); e != 0) return e;
    out = dev;
    return 0;
  }
  int query_port(void*, int port, ib::port_attr& out) override {
    if (int e = record("query_port"); e != 0) return e;
    auto it = ports.find(port);
    if (it == ports.end()) return EINVAL;
    out = it->second;
    return 0;
  }
  int query_gid(void*, int, int index, ib::gid_entry& out) override {
    if (int e = record("query_gid"); e != 0) return e;
    for (const auto& g : gids)
      if (g.index == index) {
        out = g;
        return 0;
      }
    return ENODATA;
  }
  int alloc_pd(void*, void*& pd, std::uint32_t& n) override {
    if (int e = record("alloc_pd"); e != 0) return e;
    pd = make("pd");
    n = pdn;
    return 0;
  }
  void dealloc_pd(void* pd) override {
    record("dealloc_pd", id(pd));
    kill(pd);
  }
  int query_eqn(void*, std::uint32_t& out) override {
    if (int e = record("query_eqn"); e != 0) return e;
    out = eqn;
    return 0;
  }
  int alloc_uar(void*, ib::uar_kind kind, void*& uar, ib::uar_info& out) override {
    if (int e = record("alloc_uar"); e != 0) return e;
    if (uar_unsupported.count(kind) != 0) return EOPNOTSUPP;
    void* page = std::aligned_alloc(4096, 4096);
    std::memset(page, 0, 4096);
    uar_pages_.push_back(page);
    uar = make("uar");
    out.page_id = next_page_++;
    out.base_addr = page;
    out.reg_addr = static_cast<char*>(page) + 0x800;
    last_uar_kind = kind;
    return 0;
  }
  void free_uar(void* uar) override {
    record("free_uar", id(uar));
    kill(uar);
  }
  int umem_reg(void*, void* addr, std::size_t size, int dmabuf_fd, void*& umem, std::uint32_t& uid) override {
    if (int e = record("umem_reg"); e != 0) return e;
    umem = make("umem");
    uid = next_umem_++;
    last_umem_fd = dmabuf_fd;
    last_umem_addr = addr;
    last_umem_size = size;
    return 0;
  }
  int umem_dereg(void* umem) override {
    record("umem_dereg", id(umem));
    kill(umem);
    return 0;
  }
  int devx_create(void*, std::span<const std::byte> in, std::span<std::byte> out, void*& obj) override {
    const auto op = static_cast<std::uint16_t>(ib::prm::get(in, ib::prm::cmd::opcode));
    fake_call c{"devx_create", 0, op, {in.begin(), in.end()}};
    if (int e = failure("devx_create", op); e != 0) {
      calls.push_back(c);
      return e;
    }
    if (auto it = prm_fail.find(op); it != prm_fail.end()) {
      ib::prm::set(out, ib::prm::cmd::out_status, it->second.first);
      ib::prm::set(out, ib::prm::cmd::out_syndrome, it->second.second);
      calls.push_back(c);
      return EIO;
    }
    if (op == ib::prm::kCreateCq) {
      obj = make("cq");
      ib::prm::set(out, ib::prm::create_cq_out::cqn, next_cqn_++);
    } else if (op == ib::prm::kCreateQp) {
      obj = make("qp");
      qp_state[id(obj)] = 0;
      qpn_of[id(obj)] = next_qpn_;
      ib::prm::set(out, ib::prm::create_qp_out::qpn, next_qpn_++);
    } else {
      calls.push_back(c);
      return EINVAL;
    }
    c.obj = id(obj);
    calls.push_back(c);
    return 0;
  }
  int devx_modify(void* obj, std::span<const std::byte> in, std::span<std::byte> out) override {
    const auto op = static_cast<std::uint16_t>(ib::prm::get(in, ib::prm::cmd::opcode));
    calls.push_back(fake_call{"devx_modify", id(obj), op, {in.begin(), in.end()}});
    if (int e = failure("devx_modify", op); e != 0) return e;
    auto bad = [&](std::uint32_t syndrome) {
      ib::prm::set(out, ib::prm::cmd::out_status, 0x10);  // bad state
      ib::prm::set(out, ib::prm::cmd::out_syndrome, syndrome);
      return EIO;
    };
    if (auto it = prm_fail.find(op); it != prm_fail.end()) {
      ib::prm::set(out, ib::prm::cmd::out_status, it->second.first);
      ib::prm::set(out, ib::prm::cmd::out_syndrome, it->second.second);
      return EIO;
    }
    auto st = qp_state.find(id(obj));
    if (st == qp_state.end() || live.count(id(obj)) == 0) return EINVAL;
    if (ib::prm::get(in, ib::prm::modify_qp_in::qpn) != qpn_of[id(obj)]) return bad(0xbad0);
    if (op == ib::prm::k2ErrQp) {  // from any state
      st->second = 4;
      return 0;
    }
    const int want = op == ib::prm::kRst2InitQp   ? 0
                     : op == ib::prm::kInit2RtrQp ? 1
                     : op == ib::prm::kRtr2RtsQp  ? 2
                                                  : -1;
    if (want < 0 || st->second != want) return bad(0xbad1);
    st->second = want + 1;
    return 0;
  }
  int devx_destroy(void* obj) override {
    const std::uintptr_t i = id(obj);
    calls.push_back(fake_call{"devx_destroy", i, 0, {}});
    if (live.count(i) == 0) return EINVAL;
    kill(obj);
    qp_state.erase(i);
    return 0;
  }
  int resolve_roce(void*, int, int sgid, const ib::gid_bytes& dgid, std::uint8_t, ib::roce_path& out) override {
    if (int e = record("resolve_roce"); e != 0) return e;
    last_sgid = sgid;
    last_dgid = dgid;
    out = roce;
    return 0;
  }
  int reg_mr(void*, void* addr, std::size_t size, int dmabuf_fd, std::uint64_t offset, bool, void*& mr,
             ib::mr_keys& out) override {
    if (int e = record("reg_mr"); e != 0) return e;
    mr = make("mr");
    last_mr_fd = dmabuf_fd;
    last_mr_offset = offset;
    out = on_reg_mr ? on_reg_mr(addr, size) : ib::mr_keys{next_key_, next_key_ + 1};
    next_key_ += 2;
    mrs[id(mr)] = out;
    mr_range[id(mr)] = {addr, size};
    return 0;
  }
  int dereg_mr(void* mr) override {
    record("dereg_mr", id(mr));
    if (auto it = mrs.find(id(mr)); it != mrs.end()) {
      if (on_dereg_mr) on_dereg_mr(it->second);
      mrs.erase(it);
      mr_range.erase(id(mr));
    }
    kill(mr);
    return 0;
  }

  ib::uar_kind last_uar_kind = ib::uar_kind::nc;
  int last_umem_fd = -2, last_mr_fd = -2;
  std::uint64_t last_mr_offset = 0;
  void* last_umem_addr = nullptr;
  std::size_t last_umem_size = 0;
  int last_sgid = -1;
  ib::gid_bytes last_dgid{};

 private:
  static std::uintptr_t id(void* p) { return reinterpret_cast<std::uintptr_t>(p); }
  int failure(const std::string& name, std::uint16_t op) {
    char key[64];
    std::snprintf(key, sizeof key, "%s:%#x", name.c_str(), op);
    if (auto it = fail.find(key); it != fail.end()) return it->second;
    if (auto it = fail.find(name); it != fail.end()) return it->second;
    return 0;
  }
  int record(const std::string& name, std::uintptr_t obj = 0) {
    calls.push_back(fake_call{name, obj, 0, {}});
    auto it = fail.find(name);
    return it == fail.end() ? 0 : it->second;
  }
  void* make(const std::string& kind) {
    void* p = reinterpret_cast<void*>(next_obj_++ * 16);
    live[id(p)] = kind;
    return p;
  }
  void kill(void* p) { live.erase(id(p)); }

  std::uintptr_t next_obj_ = 0x100;
  std::uint32_t next_umem_ = 0x1001, next_cqn_ = 0x2001, next_qpn_ = 0x3001, next_page_ = 0x41, next_key_ = 0x5000;
  std::vector<void*> uar_pages_;
};

class fake_gpu final : public ib::gpu_api {
 public:
  bool dma_buf = true;
  int map_error = 0;  ///< e.g. kCudaErrorNotPermitted
  int alloc_error = 0;
  int live_error = 0;  ///< live_write / live_read fail with this
  std::map<void*, std::size_t> allocations;
  std::set<int> open_fds;
  std::set<void*> mapped;
  std::vector<std::string> calls;

  ~fake_gpu() override {
    for (auto& a : allocations) std::free(a.first);
  }
  int alloc(std::size_t bytes, void*& ptr) override {
    calls.push_back("alloc");
    if (alloc_error != 0) return alloc_error;
    ptr = std::aligned_alloc(1 << 16, (bytes + 0xffff) & ~std::size_t{0xffff});
    std::memset(ptr, 0, bytes);
    allocations[ptr] = bytes;
    return 0;
  }
  void free(void* ptr) override {
    calls.push_back("free");
    allocations.erase(ptr);
    std::free(ptr);
  }
  int copy_to_device(void* dst, const void* src, std::size_t bytes) override {
    calls.push_back("copy");
    std::memcpy(dst, src, bytes);
    return 0;
  }
  // Like a DMA engine: one aligned 4- or 8-byte word moves as one access (the model thread reads
  // and writes such words with atomics), anything else byte-wise.
  int live_write(void* dst, const void* src, std::size_t bytes) override {
    calls.push_back("live_write");
    if (live_error != 0) return live_error;
    word_copy(dst, src, bytes);
    return 0;
  }
  int live_read(void* dst, const void* src, std::size_t bytes) override {
    calls.push_back("live_read");
    if (live_error != 0) return live_error;
    word_copy(dst, src, bytes);
    return 0;
  }
  bool dma_buf_supported() override { return dma_buf; }
  int dmabuf_fd(void*, std::size_t, int& fd) override {
    calls.push_back("dmabuf_fd");
    if (!dma_buf) return 801;
    fd = next_fd_++;
    open_fds.insert(fd);
    return 0;
  }
  void close_fd(int fd) override {
    calls.push_back("close_fd");
    open_fds.erase(fd);
  }
  int map_io(void* host, std::size_t, void*& dev) override {
    calls.push_back("map_io");
    if (map_error != 0) return map_error;
    mapped.insert(host);
    dev = host;
    return 0;
  }
  void unmap_io(void* host) override {
    calls.push_back("unmap_io");
    mapped.erase(host);
  }
  std::string error_name(int code) override {
    return code == ib::kCudaErrorNotPermitted ? "cudaErrorNotPermitted (800)" : "cudaError " + std::to_string(code);
  }

 private:
  static void word_copy(void* dst, const void* src, std::size_t bytes) {
    const auto d = reinterpret_cast<std::uintptr_t>(dst), s = reinterpret_cast<std::uintptr_t>(src);
    if (bytes == 8 && d % 8 == 0 && s % 8 == 0) {
      std::atomic_ref<std::uint64_t>(*static_cast<std::uint64_t*>(dst))
          .store(std::atomic_ref<std::uint64_t>(*static_cast<std::uint64_t*>(const_cast<void*>(src)))
                     .load(std::memory_order_acquire),
                 std::memory_order_release);
    } else if (bytes == 4 && d % 4 == 0 && s % 4 == 0) {
      std::atomic_ref<std::uint32_t>(*static_cast<std::uint32_t*>(dst))
          .store(std::atomic_ref<std::uint32_t>(*static_cast<std::uint32_t*>(const_cast<void*>(src)))
                     .load(std::memory_order_acquire),
                 std::memory_order_release);
    } else {
      std::memcpy(dst, src, bytes);
    }
  }
  int next_fd_ = 100;
};

}  // namespace eaas::test
