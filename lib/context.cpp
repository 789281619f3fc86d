// context, endpoint and region objects of the host library.

#include "eaas/host/context.hpp"

#include <unistd.h>

#include <array>
#include <cstring>
#include <map>
#include <mutex>

#include "eaas/config.hpp"
#include "eaas/detail/atomic.hpp"
#include "eaas/host/ibgda.hpp"
#include "handle.hpp"
#include "log.hpp"
#include "monitor.hpp"
#include "process.hpp"
#include "transport/ibgda/station.hpp"
#include "transport/ibgda/wire.hpp"
#include "transport/shm/shm.hpp"
#if EAAS_WITH_CUDA
#include "transport/nvlink/nvlink.hpp"
#endif

namespace eaas {
namespace detail {
namespace {

// Words that ops and waits read (endpoint states, the abort flag). Addresses stay stable for the
// life of the pool. A GPU context keeps them in pinned memory mapped into the GPU, so that kernels
// see a peer's death or an abort. ibgda endpoints take theirs through the station (the word is also
// where the peer's close notice lands, registered with the NIC).
class word_pool final : public ibgda::word_source {
 public:
  explicit word_pool(bool mapped) : mapped_(mapped) {}
  ~word_pool() {
    for (void* c : chunks_) release(c);
  }
  word_pool(const word_pool&) = delete;
  word_pool& operator=(const word_pool&) = delete;

  /// A word set to `initial`, or null when no memory could be had.
  std::uint32_t* take(std::uint32_t initial) override {
    std::lock_guard lock(mu_);
    if (free_.empty()) {
      void* c = acquire();
      if (c == nullptr) return nullptr;
      chunks_.push_back(c);
      auto* words = static_cast<std::uint32_t*>(c);
      for (std::size_t i = 0; i < kChunk; ++i) free_.push_back(&words[kChunk - 1 - i]);
    }
    std::uint32_t* w = free_.back();
    free_.pop_back();
    store_release(w, initial);
    return w;
  }
  void give(std::uint32_t* w) override {
    std::lock_guard lock(mu_);
    free_.push_back(w);
  }

 private:
  static constexpr std::size_t kChunk = 1024;
  void* acquire() {
#if EAAS_WITH_CUDA
    if (mapped_) {
      void* p = nullptr;
      return nvlink::host_alloc_mapped(kChunk * sizeof(std::uint32_t), p) == status::ok ? p : nullptr;
    }
#endif
    return new (std::nothrow) std::uint32_t[kChunk];
  }
  void release(void* c) {
#if EAAS_WITH_CUDA
    if (mapped_) return nvlink::host_free(c);
#endif
    delete[] static_cast<std::uint32_t*>(c);
  }
  bool mapped_;
  std::mutex mu_;
  std::vector<void*> chunks_;
  std::vector<std::uint32_t*> free_;
};

// State shared by a context and everything made from it.
struct context_core {
  explicit context_core(const context_options& o) : options(o), words(o.cuda_device >= 0) {}
  context_options options;
  std::uint64_t id = random_u64();
  std::uint64_t host = host_id();
  pid_t pid = ::getpid();
  std::uint64_t start_time = process_start_time(::getpid());
  word_pool words;
  std::uint32_t* abort_flag = nullptr;
  std::unique_ptr<peer_monitor> monitor;  // null when options.monitor_peers is off
  std::array<std::uint8_t, 16> gpu{};     // UUID of options.cuda_device
  std::shared_ptr<ibgda::station> ib;     // null when the context has no ibgda transport
  std::string ib_why;                     // why not, when it was asked for
};

// Connection handle payload:
//   u64 context id, u64 host id, u32 pid, u32 0, u64 process start time,
//   u8 transport count, then per transport: u8 kind, u16 section length, section bytes
//   (shm: empty; nvlink: the 16-byte UUID of the context's GPU; ibgda: an ibgda connection
//   description handle addressed to no one — the port and the QPs waiting in the pool, see
//   transport/ibgda/station.hpp — whose context and host must be the handle's own).
struct peer_desc {
  std::uint64_t context_id = 0;
  std::uint64_t host_id = 0;
  std::uint32_t pid = 0;
  std::uint64_t start_time = 0;
  bool offers_shm = false;
  bool offers_nvlink = false;
  std::array<std::uint8_t, 16> gpu{};
  bool offers_ibgda = false;
  ibgda::conn_desc ib;  // the advertisement, validated
};

constexpr std::size_t kMaxTransportSections = 8;

status decode_connection(std::span<const std::byte> bytes, peer_desc& out) {
  handle_info info{};
  std::span<const std::byte> payload;
  EAAS_CHECK(decode_handle(bytes, handle_kind::connection, transport_kind::none, info, payload));
  handle_reader r(payload);
  peer_desc d;
  d.context_id = r.u64();
  d.host_id = r.u64();
  d.pid = r.u32();
  const std::uint32_t zero = r.u32();
  d.start_time = r.u64();
  const std::uint8_t n = r.u8();
  if (!r.ok() || zero != 0 || n > kMaxTransportSections || d.pid == 0 || d.pid > 0x7fffffffu)
    return EAAS_FAIL(status::invalid_handle, "connection handle: malformed identity (pid {}, {} transports)", d.pid, n);
  for (std::uint8_t i = 0; i < n; ++i) {
    const auto kind = static_cast<transport_kind>(r.u8());
    const std::uint16_t len = r.u16();
    const auto section = r.raw(len);
    if (!r.ok()) return EAAS_FAIL(status::invalid_handle, "connection handle: transport section {} is truncated", i);
    if (kind == transport_kind::shm) {
      if (len != 0) return EAAS_FAIL(status::invalid_handle, "connection handle: shm section must be empty");
      d.offers_shm = true;
    } else if (kind == transport_kind::nvlink) {
      if (len != d.gpu.size())
        return EAAS_FAIL(status::invalid_handle, "connection handle: nvlink section of {} bytes (want 16)", len);
      std::memcpy(d.gpu.data(), section.data(), d.gpu.size());
      d.offers_nvlink = true;
    } else if (kind == transport_kind::ibgda) {
      ibgda::conn_desc ad;
      EAAS_CHECK(ibgda::decode(section, ad));
      if (ad.target_id != 0)
        return EAAS_FAIL(status::invalid_handle, "connection handle: the ibgda section is addressed to context {:016x}",
                         ad.target_id);
      if (ad.context_id != d.context_id || ad.host_id != d.host_id)
        return EAAS_FAIL(status::invalid_handle,
                         "connection handle: the ibgda section describes context {:016x} on host {:016x}, the handle "
                         "is context {:016x} on host {:016x}",
                         ad.context_id, ad.host_id, d.context_id, d.host_id);
      d.ib = std::move(ad);
      d.offers_ibgda = true;
    }
    // Sections of transports this build does not know are skipped: a newer peer may offer more.
  }
  if (!r.done()) return EAAS_FAIL(status::invalid_handle, "connection handle: trailing bytes after the sections");
  out = d;
  return status::ok;
}

class shm_memory_region final : public memory_region {
 public:
  shm_memory_region(std::shared_ptr<context_core> core, std::shared_ptr<shm::segment> seg, std::size_t offset,
                    std::size_t size)
      : core_(std::move(core)), seg_(std::move(seg)), offset_(offset), size_(size) {}

  void* data() const noexcept override { return static_cast<unsigned char*>(seg_->base) + offset_; }
  std::size_t size() const noexcept override { return size_; }
  transport_kind transport() const noexcept override { return transport_kind::shm; }
  status export_handle(handle_bytes& out) const override {
    try {
      shm::region_desc d;
      d.owner_id = core_->id;
      d.host_id = core_->host;
      d.pid = static_cast<std::uint32_t>(core_->pid);
      d.fd = static_cast<std::uint32_t>(seg_->fd);
      d.start_time = core_->start_time;
      d.token = seg_->token;
      d.offset = offset_;
      d.size = size_;
      d.map_size = seg_->map_size;
      handle_writer w;
      shm::encode(d, w);
      out = w.finish(handle_kind::region, transport_kind::shm);
      return status::ok;
    } catch (const std::bad_alloc&) {
      return EAAS_FAIL(status::no_resource, "export_handle: out of memory");
    }
  }
  const std::shared_ptr<shm::segment>& segment() const { return seg_; }
  std::size_t offset() const { return offset_; }

 private:
  std::shared_ptr<context_core> core_;
  std::shared_ptr<shm::segment> seg_;
  std::size_t offset_, size_;
};

// A peer's region mapped into this process; `keep` holds the mapping (shm or nvlink) alive.
class mapped_remote_region final : public remote_region {
 public:
  mapped_remote_region(std::shared_ptr<void> keep, transport_kind t, void* base, std::uint64_t offset,
                       std::uint64_t size, std::uint64_t owner)
      : keep_(std::move(keep)) {
    view_ = remote_view{};
    view_.magic = kRemoteViewMagic;
    view_.transport = t;
    view_.addr = reinterpret_cast<std::uintptr_t>(base) + offset;
    view_.size = size;
    view_.owner_id = owner;
  }
  remote_view view() const noexcept override { return view_; }

 private:
  std::shared_ptr<void> keep_;
  remote_view view_;
};

#if EAAS_WITH_CUDA
class nvlink_memory_region final : public memory_region {
 public:
  nvlink_memory_region(std::shared_ptr<context_core> core, std::shared_ptr<nvlink::allocation> a)
      : core_(std::move(core)), a_(std::move(a)) {}
  void* data() const noexcept override { return a_->ptr; }
  std::size_t size() const noexcept override { return a_->size; }
  transport_kind transport() const noexcept override { return transport_kind::nvlink; }
  status export_handle(handle_bytes& out) const override {
    try {
      nvlink::region_desc d;
      d.owner_id = core_->id;
      d.host_id = core_->host;
      d.pid = static_cast<std::uint32_t>(core_->pid);
      d.start_time = core_->start_time;
      d.token = a_->token;
      d.gpu = core_->gpu;
      d.ipc = a_->ipc;
      d.offset = 0;
      d.size = a_->size;
      d.alloc_size = a_->size;
      handle_writer w;
      nvlink::encode(d, w);
      out = w.finish(handle_kind::region, transport_kind::nvlink);
      return status::ok;
    } catch (const std::bad_alloc&) {
      return EAAS_FAIL(status::no_resource, "export_handle: out of memory");
    }
  }

 private:
  std::shared_ptr<context_core> core_;
  std::shared_ptr<nvlink::allocation> a_;
};
#endif

// memory_kind::network: a block of the context's NIC-registered heap, with its own rkey.
class ibgda_memory_region final : public memory_region {
 public:
  ibgda_memory_region(std::shared_ptr<context_core> core, std::unique_ptr<ibgda::heap_block> b)
      : core_(std::move(core)), b_(std::move(b)) {}
  void* data() const noexcept override { return b_->data(); }
  std::size_t size() const noexcept override { return b_->size(); }
  transport_kind transport() const noexcept override { return transport_kind::ibgda; }
  status export_handle(handle_bytes& out) const override {
    ibgda::region_wire r;
    r.owner_id = core_->id;
    r.host_id = core_->host;
    r.addr = reinterpret_cast<std::uint64_t>(b_->data());
    r.size = b_->size();
    r.rkey = b_->rkey();
    return ibgda::encode(r, out);
  }

 private:
  std::shared_ptr<context_core> core_;
  std::unique_ptr<ibgda::heap_block> b_;
};

// A peer's ibgda region: its address and rkey; nothing is mapped here.
class ibgda_remote_region final : public remote_region {
 public:
  explicit ibgda_remote_region(const ibgda::region_wire& r) {
    view_ = remote_view{};
    view_.magic = kRemoteViewMagic;
    view_.transport = transport_kind::ibgda;
    view_.addr = r.addr;
    view_.size = r.size;
    view_.owner_id = r.owner_id;
    view_.rkey = r.rkey;
  }
  remote_view view() const noexcept override { return view_; }

 private:
  remote_view view_;
};

class endpoint_impl final : public endpoint {
 public:
  endpoint_impl(std::shared_ptr<context_core> core, const peer_desc& peer, transport_kind t, std::uint32_t* state,
                std::unique_ptr<ibgda::link> link = nullptr)
      : core_(std::move(core)), peer_(peer), transport_(t), state_(state), link_(std::move(link)) {}

  ~endpoint_impl() override {
    close();
    const bool own_word = !link_;  // an ibgda endpoint's word belongs to its link
    link_.reset();                 // the QP goes with the endpoint, not at close(): kernels may still hold the view
    if (own_word) core_->words.give(state_);
  }

  device_endpoint view() const noexcept override {
    device_endpoint v{};
    v.magic = kEndpointViewMagic;
    v.transport = transport_;
    v.state = state_;
    v.abort = core_->abort_flag;
    v.transport_state = link_ ? static_cast<void*>(link_->state()) : nullptr;
    v.peer_id = peer_.context_id;
    return v;
  }
  transport_kind transport() const noexcept override { return transport_; }
  std::uint64_t peer_id() const noexcept override { return peer_.context_id; }
  endpoint_state state() const noexcept override { return static_cast<endpoint_state>(load_acquire(state_)); }

  status import_region(std::span<const std::byte> handle, std::unique_ptr<remote_region>& out) override {
    try {
      if (state() == endpoint_state::closed)
        return EAAS_FAIL(status::not_connected, "import_region: the endpoint is closed");
      if (transport_ == transport_kind::ibgda) return import_ibgda(handle, out);
      handle_info info{};
      std::span<const std::byte> payload;
      EAAS_CHECK(decode_handle(handle, handle_kind::region, transport_, info, payload));
      if (transport_ == transport_kind::shm) return import_shm(payload, out);
#if EAAS_WITH_CUDA
      if (transport_ == transport_kind::nvlink) return import_nvlink(payload, out);
#endif
      return EAAS_FAIL(status::unsupported, "import_region: transport {} is not built", transport_name(transport_));
    } catch (const std::bad_alloc&) {
      return EAAS_FAIL(status::no_resource, "import_region: out of memory");
    }
  }

  void close() noexcept override {
    std::lock_guard lock(mu_);
    if (closed_) return;
    closed_ = true;
    if (link_)
      (void)link_->close(static_cast<std::uint32_t>(endpoint_state::closed));  // also tells the peer (bounded)
    else
      store_release(state_, static_cast<std::uint32_t>(endpoint_state::closed));
    if (watched_) core_->monitor->unwatch(static_cast<pid_t>(peer_.pid), state_);
    mappings_.clear();
  }

  void set_watched() { watched_ = true; }

 private:
  // Checks that a region handle's owner is this endpoint's peer.
  status check_owner(std::uint64_t owner, std::uint64_t host, std::uint32_t pid, std::uint64_t start) const {
    if (owner != peer_.context_id)
      return EAAS_FAIL(status::invalid_argument,
                       "import_region: the region belongs to context {:016x}, this endpoint connects to {:016x}", owner,
                       peer_.context_id);
    if (host != peer_.host_id || pid != peer_.pid || start != peer_.start_time)
      return EAAS_FAIL(status::invalid_handle,
                       "import_region: the handle names process {} on host {:016x}, the peer is process {} on host "
                       "{:016x}",
                       pid, host, peer_.pid, peer_.host_id);
    if (state() == endpoint_state::peer_dead)
      return EAAS_FAIL(status::peer_unreachable, "import_region: peer process {} is dead", peer_.pid);
    return status::ok;
  }

  // One mapping per exported buffer (token), shared by every region imported from it.
  template <class Mapping, class MapFn>
  status cached_mapping(std::uint64_t token, MapFn&& map_fn, std::shared_ptr<Mapping>& out) {
    std::lock_guard lock(mu_);
    auto it = mappings_.find(token);
    if (it != mappings_.end()) {
      if (auto m = std::static_pointer_cast<Mapping>(it->second.lock())) {
        out = std::move(m);
        return status::ok;
      }
    }
    std::shared_ptr<Mapping> m;
    EAAS_CHECK(map_fn(m));
    mappings_[token] = m;
    out = std::move(m);
    return status::ok;
  }

  status import_ibgda(std::span<const std::byte> handle, std::unique_ptr<remote_region>& out) {
    ibgda::region_wire r;
    EAAS_CHECK(ibgda::decode(handle, r));
    if (r.owner_id != peer_.context_id)
      return EAAS_FAIL(status::invalid_argument,
                       "import_region: the region belongs to context {:016x}, this endpoint connects to {:016x}",
                       r.owner_id, peer_.context_id);
    if (r.host_id != peer_.host_id)
      return EAAS_FAIL(status::invalid_handle,
                       "import_region: the handle names host {:016x}, the peer is on host {:016x}", r.host_id,
                       peer_.host_id);
    if (state() == endpoint_state::peer_dead)
      return EAAS_FAIL(status::peer_unreachable, "import_region: the peer is dead");
    out = std::make_unique<ibgda_remote_region>(r);
    return status::ok;
  }

  status import_shm(std::span<const std::byte> payload, std::unique_ptr<remote_region>& out) {
    shm::region_desc d;
    EAAS_CHECK(shm::decode(payload, d));
    EAAS_CHECK(check_owner(d.owner_id, d.host_id, d.pid, d.start_time));
    std::shared_ptr<shm::mapping> map;
    EAAS_CHECK(cached_mapping<shm::mapping>(
        d.token, [&](auto& m) { return shm::map_peer(d, m); }, map));
    void* base = map->base;
    out =
        std::make_unique<mapped_remote_region>(std::move(map), transport_kind::shm, base, d.offset, d.size, d.owner_id);
    return status::ok;
  }

#if EAAS_WITH_CUDA
  status import_nvlink(std::span<const std::byte> payload, std::unique_ptr<remote_region>& out) {
    nvlink::region_desc d;
    EAAS_CHECK(nvlink::decode(payload, d));
    EAAS_CHECK(check_owner(d.owner_id, d.host_id, d.pid, d.start_time));
    if (d.gpu != peer_.gpu)
      return EAAS_FAIL(status::invalid_handle, "import_region: the region lives on {}, the peer drives {}",
                       nvlink::uuid_text(d.gpu), nvlink::uuid_text(peer_.gpu));
    const bool same_process = static_cast<pid_t>(d.pid) == core_->pid;
    std::shared_ptr<nvlink::mapping> map;
    EAAS_CHECK(cached_mapping<nvlink::mapping>(
        d.token, [&](auto& m) { return nvlink::map_peer(d, core_->options.cuda_device, same_process, m); }, map));
    void* base = map->base;
    out = std::make_unique<mapped_remote_region>(std::move(map), transport_kind::nvlink, base, d.offset, d.size,
                                                 d.owner_id);
    return status::ok;
  }
#endif

  std::shared_ptr<context_core> core_;
  peer_desc peer_;
  transport_kind transport_;
  std::uint32_t* state_;
  std::mutex mu_;
  bool closed_ = false;
  bool watched_ = false;
  std::map<std::uint64_t, std::weak_ptr<void>> mappings_;
  std::unique_ptr<ibgda::link> link_;
};

class context_impl final : public context {
 public:
  explicit context_impl(std::shared_ptr<context_core> core) : core_(std::move(core)) {}

  std::uint64_t id() const noexcept override { return core_->id; }

  status allocate(std::size_t bytes, memory_kind kind, std::unique_ptr<memory_region>& out) override {
    try {
      if (kind == memory_kind::device) return allocate_device(bytes, out);
      if (kind == memory_kind::network) return allocate_network(bytes, out);
      if (kind != memory_kind::host) return EAAS_FAIL(status::invalid_argument, "allocate: unknown memory kind");
      if (!core_->options.enable_shm)
        return EAAS_FAIL(status::unsupported, "allocate: no host-memory transport is enabled (enable_shm is off)");
      std::shared_ptr<shm::segment> seg;
      EAAS_CHECK(shm::allocate(bytes, seg));
      auto region = std::make_unique<shm_memory_region>(core_, seg, 0, bytes);
      {
        std::lock_guard lock(mu_);
        std::erase_if(segments_, [](const auto& w) { return w.expired(); });
        segments_.push_back(region->segment());
      }
      out = std::move(region);
      return status::ok;
    } catch (const std::bad_alloc&) {
      return EAAS_FAIL(status::no_resource, "allocate: out of memory");
    }
  }

  status allocate_device(std::size_t bytes, std::unique_ptr<memory_region>& out) {
    if (core_->options.cuda_device < 0)
      return EAAS_FAIL(status::unsupported, "allocate: device memory needs a context made with cuda_device >= 0");
#if EAAS_WITH_CUDA
    std::shared_ptr<nvlink::allocation> a;
    EAAS_CHECK(nvlink::allocate(core_->options.cuda_device, bytes, a));
    out = std::make_unique<nvlink_memory_region>(core_, std::move(a));
    return status::ok;
#else
    (void)bytes;
    (void)out;
    return EAAS_FAIL(status::unsupported, "allocate: this build has no CUDA");
#endif
  }

  status allocate_network(std::size_t bytes, std::unique_ptr<memory_region>& out) {
    if (!core_->ib)
      return EAAS_FAIL(status::unsupported,
                       "allocate: network memory needs the ibgda transport; this context has none{}{}",
                       core_->ib_why.empty() ? "" : ": ", core_->ib_why);
    std::unique_ptr<ibgda::heap_block> b;
    EAAS_CHECK(core_->ib->allocate(bytes, b));
    out = std::make_unique<ibgda_memory_region>(core_, std::move(b));
    return status::ok;
  }

  status register_memory(void* ptr, std::size_t bytes, std::unique_ptr<memory_region>& out) override {
    try {
      if (ptr == nullptr || bytes == 0)
        return EAAS_FAIL(status::invalid_argument, "register_memory: null pointer or zero size");
      const auto p = reinterpret_cast<std::uintptr_t>(ptr);
      std::lock_guard lock(mu_);
      for (const auto& weak : segments_) {
        auto seg = weak.lock();
        if (!seg) continue;
        const auto base = reinterpret_cast<std::uintptr_t>(seg->base);
        if (p >= base && p - base <= seg->map_size && bytes <= seg->map_size - (p - base)) {
          out = std::make_unique<shm_memory_region>(core_, seg, p - base, bytes);
          return status::ok;
        }
      }
      return EAAS_FAIL(status::unsupported,
                       "register_memory: [{}, +{}) is not inside memory from context::allocate; the shm transport can "
                       "share only memfd-backed memory with another process",
                       ptr, bytes);
    } catch (const std::bad_alloc&) {
      return EAAS_FAIL(status::no_resource, "register_memory: out of memory");
    }
  }

  status connection_handle(handle_bytes& out) const override {
    try {
      handle_writer w;
      w.u64(core_->id);
      w.u64(core_->host);
      w.u32(static_cast<std::uint32_t>(core_->pid));
      w.u32(0);
      w.u64(core_->start_time);
      const bool shm = core_->options.enable_shm;
      const bool gpu = core_->options.cuda_device >= 0;
      handle_bytes ib;
      if (core_->ib) {
        ibgda::conn_desc ad;
        EAAS_CHECK(core_->ib->advertise(ad));
        EAAS_CHECK(ibgda::encode(ad, ib));
      }
      w.u8(static_cast<std::uint8_t>((shm ? 1 : 0) + (gpu ? 1 : 0) + (core_->ib ? 1 : 0)));
      if (shm) {
        w.u8(static_cast<std::uint8_t>(transport_kind::shm));
        w.u16(0);
      }
      if (gpu) {
        w.u8(static_cast<std::uint8_t>(transport_kind::nvlink));
        w.u16(static_cast<std::uint16_t>(core_->gpu.size()));
        w.raw(std::as_bytes(std::span(core_->gpu)));
      }
      if (core_->ib) {
        w.u8(static_cast<std::uint8_t>(transport_kind::ibgda));
        w.u16(static_cast<std::uint16_t>(ib.size()));
        w.raw(ib);
      }
      out = w.finish(handle_kind::connection, transport_kind::none);
      return status::ok;
    } catch (const std::bad_alloc&) {
      return EAAS_FAIL(status::no_resource, "connection_handle: out of memory");
    }
  }

  status connect(std::span<const std::byte> handle, std::unique_ptr<endpoint>& out) override {
    return connect_impl(handle, out, nullptr);
  }

  status connect(std::span<const std::byte> handle, std::unique_ptr<endpoint>& out, handle_bytes& reply) override {
    reply.clear();
    return connect_impl(handle, out, &reply);
  }

  // The second half of an ibgda connection: a peer on another host dialed one of our pool's QPs.
  status accept_ibgda(std::span<const std::byte> handle, std::unique_ptr<endpoint>& out) {
    if (!core_->ib)
      return EAAS_FAIL(status::unsupported, "connect: the handle is an ibgda reply, and this context has no ibgda{}{}",
                       core_->ib_why.empty() ? "" : ": ", core_->ib_why);
    ibgda::conn_desc r;
    EAAS_CHECK(ibgda::decode(handle, r));
    if (r.host_id == core_->host)
      return EAAS_FAIL(status::invalid_handle,
                       "connect: an ibgda reply from context {:016x} on this host ({:016x}); contexts of one host "
                       "connect over shm or nvlink, never ibgda",
                       r.context_id, r.host_id);
    std::unique_ptr<ibgda::link> l;
    EAAS_CHECK(core_->ib->accept(r, l));
    std::uint32_t* state = l->state_word();
    peer_desc peer;
    peer.context_id = r.context_id;
    peer.host_id = r.host_id;
    out = std::make_unique<endpoint_impl>(core_, peer, transport_kind::ibgda, state, std::move(l));
    log(log_level::debug, "{}: accepted context {:016x} on host {:016x} over ibgda", core_->options.name, r.context_id,
        r.host_id);
    return status::ok;
  }

  // The first half: pair a new QP with one the peer advertised; the reply goes back to the peer.
  status dial_ibgda(const peer_desc& peer, std::unique_ptr<endpoint>& out, handle_bytes* reply) {
    if (reply == nullptr)
      return EAAS_FAIL(status::invalid_argument,
                       "connect: context {:016x} is on another host, and an ibgda connection needs a message back: "
                       "use connect(handle, endpoint, reply) and pass the reply to the peer's connect",
                       peer.context_id);
    std::unique_ptr<ibgda::link> l;
    ibgda::conn_desc r;
    EAAS_CHECK(core_->ib->dial(peer.ib, l, r));
    handle_bytes bytes;
    EAAS_CHECK(ibgda::encode(r, bytes));
    std::uint32_t* state = l->state_word();
    out = std::make_unique<endpoint_impl>(core_, peer, transport_kind::ibgda, state, std::move(l));
    *reply = std::move(bytes);
    log(log_level::debug, "{}: dialed context {:016x} on host {:016x} over ibgda", core_->options.name, peer.context_id,
        peer.host_id);
    return status::ok;
  }

  status connect_impl(std::span<const std::byte> handle, std::unique_ptr<endpoint>& out, handle_bytes* reply) {
    try {
      handle_info info{};
      EAAS_CHECK(inspect_handle(handle, info));
      if (info.kind == handle_kind::connection && info.transport == transport_kind::ibgda)
        return accept_ibgda(handle, out);
      peer_desc peer;
      EAAS_CHECK(decode_connection(handle, peer));
      const bool same_host = peer.host_id == core_->host;
      transport_kind t = transport_kind::none;
      EAAS_CHECK(choose_transport(peer, same_host, t));
      if (t == transport_kind::ibgda) return dial_ibgda(peer, out, reply);
      const auto pid = static_cast<pid_t>(peer.pid);
      const bool self = pid == core_->pid;
      if (self && peer.start_time != core_->start_time)
        return EAAS_FAIL(status::peer_unreachable, "connect: the handle is from an earlier process with this pid");
      std::uint32_t* state = core_->words.take(0);
      if (state == nullptr) return EAAS_FAIL(status::no_resource, "connect: no memory for the endpoint state");
      auto ep = std::make_unique<endpoint_impl>(core_, peer, t, state);
      if (!self) {
        if (core_->monitor) {
          if (!core_->monitor->watch(pid, peer.start_time, const_cast<std::uint32_t*>(ep->view().state)))
            return EAAS_FAIL(status::peer_unreachable, "connect: peer process {} is gone", pid);
          ep->set_watched();
        } else if (!process_alive(pid, peer.start_time)) {
          return EAAS_FAIL(status::peer_unreachable, "connect: peer process {} is gone", pid);
        }
      }
      log(log_level::debug, "{}: connected to context {:016x} (pid {}) over {}", core_->options.name, peer.context_id,
          pid, transport_name(t));
      out = std::move(ep);
      return status::ok;
    } catch (const std::bad_alloc&) {
      return EAAS_FAIL(status::no_resource, "connect: out of memory");
    } catch (const std::system_error& e) {
      return EAAS_FAIL(status::internal_error, "connect: {}", e.what());
    }
  }

  // nvlink when both sides drive GPUs of this host that reach each other; else shm on one host.
  status choose_transport(const peer_desc& peer, bool same_host, transport_kind& out) {
    if (same_host && core_->options.cuda_device >= 0 && peer.offers_nvlink) {
#if EAAS_WITH_CUDA
      int theirs = -1;
      EAAS_CHECK(nvlink::find_device(peer.gpu, theirs));
      EAAS_CHECK(nvlink::enable_peer_access(core_->options.cuda_device, theirs));
      out = transport_kind::nvlink;
      return status::ok;
#endif
    }
    if (same_host && core_->options.enable_shm && peer.offers_shm) {
      out = transport_kind::shm;
      return status::ok;
    }
    if (!same_host && core_->ib) {
      if (!peer.offers_ibgda)
        return EAAS_FAIL(status::peer_unreachable,
                         "connect: context {:016x} is on another host and offers no ibgda transport (made without a "
                         "GPU, with enable_ibgda off, or its ibgda bring-up failed)",
                         peer.context_id);
      out = transport_kind::ibgda;
      return status::ok;
    }
    if (!same_host) {
      // Another host: only a network transport reaches it. Say exactly what is missing.
      ibgda_support ib;
      if (probe_ibgda(ib, core_->options.cuda_device) != status::ok)
        return EAAS_FAIL(status::peer_unreachable, "connect: context {:016x} is on another host; ibgda: {}",
                         peer.context_id, ib.missing);
      return EAAS_FAIL(status::unsupported,
                       "connect: context {:016x} is on another host; this host has what ibgda needs, but this context "
                       "did not bring it up{}{}",
                       peer.context_id, core_->ib_why.empty() ? " (enable_ibgda off, or no cuda_device)" : ": ",
                       core_->ib_why);
    }
    return EAAS_FAIL(status::peer_unreachable,
                     "connect: no transport reaches context {:016x}: shm needs both sides to enable it ({} here, {} "
                     "there) and one host (peer host {:016x}, this host {:016x}); nvlink needs GPUs on both sides; "
                     "no network transport is built",
                     peer.context_id, core_->options.enable_shm ? "on" : "off", peer.offers_shm ? "on" : "off",
                     peer.host_id, core_->host);
  }

  int cuda_device() const noexcept override { return core_->options.cuda_device; }
  device_context view() const noexcept override { return device_context{core_->abort_flag}; }
  void abort() noexcept override { store_release(core_->abort_flag, 1u); }
  void clear_abort() noexcept override { store_release(core_->abort_flag, 0u); }

 private:
  std::shared_ptr<context_core> core_;
  std::mutex mu_;
  std::vector<std::weak_ptr<shm::segment>> segments_;
};

status create_impl(const context_options& options, const ibgda::context_setup* setup, std::unique_ptr<context>& out) {
  try {
    if (options.cuda_device >= 0) {
#if EAAS_WITH_CUDA
      std::array<std::uint8_t, 16> uuid{};
      EAAS_CHECK(detail::nvlink::use_device(options.cuda_device));
      EAAS_CHECK(detail::nvlink::device_uuid(options.cuda_device, uuid));
#else
      return EAAS_FAIL(status::unsupported, "context: cuda_device {} asked for, but this build has no CUDA",
                       options.cuda_device);
#endif
    }
    auto core = std::make_shared<context_core>(options);
#if EAAS_WITH_CUDA
    if (options.cuda_device >= 0) EAAS_CHECK(detail::nvlink::device_uuid(options.cuda_device, core->gpu));
#endif
    if (core->start_time == 0)
      return EAAS_FAIL(status::internal_error, "context: cannot read /proc/self/stat (is /proc mounted?)");
    core->abort_flag = core->words.take(0);
    if (core->abort_flag == nullptr) return EAAS_FAIL(status::no_resource, "context: no memory for the abort flag");
    if (options.monitor_peers) core->monitor = std::make_unique<peer_monitor>();
    ibgda::station_options so = setup != nullptr ? setup->station : ibgda::station_options{};
    so.heap_bytes = options.ibgda_heap_bytes;
    so.pool = options.ibgda_qp_pool;
    so.max_peers = options.ibgda_max_peers;
    if (setup != nullptr) {
      if (setup->host_id != 0) core->host = setup->host_id;
      if (setup->verbs == nullptr || setup->gpu == nullptr)
        return EAAS_FAIL(status::invalid_argument, "context: a context setup needs both tables");
      EAAS_CHECK(ibgda::station::open(nullptr, nullptr, *setup->verbs, *setup->gpu, so, core->id, core->host,
                                      core->words, core->ib));
    } else if (options.enable_ibgda && options.cuda_device >= 0) {
      auto v = ibgda::make_real_verbs();
      auto g = ibgda::make_real_gpu(options.cuda_device);
      if (v && g) {
        ibgda::verbs_api& vr = *v;
        ibgda::gpu_api& gr = *g;
        if (ibgda::station::open(std::move(v), std::move(g), vr, gr, so, core->id, core->host, core->words, core->ib) !=
            status::ok) {
          core->ib_why = std::string(last_error());
          core->ib.reset();
          log(log_level::debug, "{}: no ibgda transport: {}", options.name, core->ib_why);
        }
      } else {
        core->ib_why = "this build lacks rdma-core or CUDA";
      }
    }
    out = std::make_unique<context_impl>(std::move(core));
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "context: out of memory");
  } catch (const std::system_error& e) {
    return EAAS_FAIL(status::internal_error, "context: {}", e.what());
  }
}

}  // namespace

status ibgda::create_context(const context_options& options, const context_setup& setup,
                             std::unique_ptr<context>& out) {
  return create_impl(options, &setup, out);
}

}  // namespace detail

status context::create(const context_options& options, std::unique_ptr<context>& out) {
  return detail::create_impl(options, nullptr, out);
}

}  // namespace eaas
