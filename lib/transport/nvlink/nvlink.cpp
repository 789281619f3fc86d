#include "transport/nvlink/nvlink.hpp"

#include <cuda_runtime_api.h>

#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <utility>

#include "log.hpp"
#include "process.hpp"

namespace eaas::detail::nvlink {

namespace {

#define EAAS_CUDA_TRY(call, what)                                                                         \
  do {                                                                                                    \
    if (const cudaError_t e_ = (call); e_ != cudaSuccess)                                                 \
      return EAAS_FAIL(e_ == cudaErrorMemoryAllocation ? status::no_resource : status::internal_error,    \
                       "nvlink: {} failed: {} ({})", what, cudaGetErrorName(e_), cudaGetErrorString(e_)); \
  } while (0)

// Live allocations of this process by token: an import from a context of this same process uses
// the pointer (IPC cannot open a handle in the process that made it).
std::mutex g_mu;
std::map<std::uint64_t, std::weak_ptr<allocation>>& live() {
  static std::map<std::uint64_t, std::weak_ptr<allocation>> m;
  return m;
}

constexpr std::uint64_t kMaxAlloc = std::uint64_t{1} << 42;

}  // namespace

std::string uuid_text(const uuid& u) {
  std::string s;
  for (std::size_t i = 0; i < u.size(); ++i) {
    s += fmt::format("{:02x}", u[i]);
    if (i == 3 || i == 5 || i == 7 || i == 9) s += '-';
  }
  return "GPU-" + s;
}

status device_uuid(int ordinal, uuid& out) {
  cudaDeviceProp prop{};
  EAAS_CUDA_TRY(cudaGetDeviceProperties(&prop, ordinal), fmt::format("cudaGetDeviceProperties({})", ordinal));
  std::memcpy(out.data(), prop.uuid.bytes, out.size());
  return status::ok;
}

status find_device(const uuid& u, int& ordinal) {
  int n = 0;
  EAAS_CUDA_TRY(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
  for (int i = 0; i < n; ++i) {
    uuid v{};
    EAAS_CHECK(device_uuid(i, v));
    if (v == u) {
      ordinal = i;
      return status::ok;
    }
  }
  return EAAS_FAIL(status::peer_unreachable,
                   "nvlink: the peer's GPU {} is not visible to this process ({} visible; check CUDA_VISIBLE_DEVICES)",
                   uuid_text(u), n);
}

status use_device(int ordinal) {
  EAAS_CUDA_TRY(cudaSetDevice(ordinal), fmt::format("cudaSetDevice({})", ordinal));
  return status::ok;
}

status enable_peer_access(int mine, int theirs) {
  if (mine == theirs) return status::ok;
  int can = 0;
  EAAS_CUDA_TRY(cudaDeviceCanAccessPeer(&can, mine, theirs), "cudaDeviceCanAccessPeer");
  if (!can)
    return EAAS_FAIL(status::peer_unreachable,
                     "nvlink: GPU {} cannot access GPU {} (no peer-to-peer path between them)", mine, theirs);
  // Enabled once per pair and process: a second enable is an error the runtime would record.
  static std::mutex mu;
  static std::set<std::pair<int, int>> enabled;
  std::lock_guard lock(mu);
  if (enabled.contains({mine, theirs})) return status::ok;
  EAAS_CHECK(use_device(mine));
  const cudaError_t e = cudaDeviceEnablePeerAccess(theirs, 0);
  if (e == cudaErrorPeerAccessAlreadyEnabled) {
    (void)cudaGetLastError();  // enabled by the application before us: fine
  } else {
    EAAS_CUDA_TRY(e, fmt::format("cudaDeviceEnablePeerAccess({} -> {})", mine, theirs));
  }
  enabled.insert({mine, theirs});
  return status::ok;
}

status host_alloc_mapped(std::size_t bytes, void*& out) {
  void* p = nullptr;
  EAAS_CUDA_TRY(cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable), "cudaHostAlloc");
  void* d = nullptr;
  if (cudaHostGetDevicePointer(&d, p, 0) != cudaSuccess || d != p) {
    cudaFreeHost(p);
    return EAAS_FAIL(status::unsupported, "nvlink: mapped host memory has a different device address (no UVA)");
  }
  out = p;
  return status::ok;
}

void host_free(void* p) noexcept {
  if (p != nullptr) cudaFreeHost(p);
}

allocation::~allocation() {
  {
    std::lock_guard lock(g_mu);
    live().erase(token);
  }
  if (ptr != nullptr) {
    cudaSetDevice(device);
    cudaFree(ptr);
  }
}

status allocate(int device, std::size_t bytes, std::shared_ptr<allocation>& out) {
  if (bytes == 0 || bytes > kMaxAlloc)
    return EAAS_FAIL(status::invalid_argument, "nvlink: cannot allocate {} bytes of GPU memory", bytes);
  EAAS_CHECK(use_device(device));
  auto a = std::make_shared<allocation>();
  a->device = device;
  a->token = random_u64();
  EAAS_CUDA_TRY(cudaMalloc(&a->ptr, bytes), fmt::format("cudaMalloc({} bytes on GPU {})", bytes, device));
  a->size = bytes;
  EAAS_CUDA_TRY(cudaMemset(a->ptr, 0, bytes), "cudaMemset");
  cudaIpcMemHandle_t h{};
  EAAS_CUDA_TRY(cudaIpcGetMemHandle(&h, a->ptr), "cudaIpcGetMemHandle");
  static_assert(sizeof(h) == 64);
  std::memcpy(a->ipc.data(), &h, sizeof(h));
  EAAS_CUDA_TRY(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  {
    std::lock_guard lock(g_mu);
    live()[a->token] = a;
  }
  out = std::move(a);
  return status::ok;
}

void encode(const region_desc& d, handle_writer& w) {
  w.u64(d.owner_id);
  w.u64(d.host_id);
  w.u32(d.pid);
  w.u32(0);
  w.u64(d.start_time);
  w.u64(d.token);
  w.raw(std::as_bytes(std::span(d.gpu)));
  w.raw(d.ipc);
  w.u64(d.offset);
  w.u64(d.size);
  w.u64(d.alloc_size);
}

status decode(std::span<const std::byte> payload, region_desc& out) {
  handle_reader r(payload);
  region_desc d;
  d.owner_id = r.u64();
  d.host_id = r.u64();
  d.pid = r.u32();
  const std::uint32_t zero = r.u32();
  d.start_time = r.u64();
  d.token = r.u64();
  const auto g = r.raw(16);
  const auto ipc = r.raw(64);
  d.offset = r.u64();
  d.size = r.u64();
  d.alloc_size = r.u64();
  if (!r.done() || zero != 0)
    return EAAS_FAIL(status::invalid_handle, "nvlink region handle: payload of {} bytes is malformed", payload.size());
  std::memcpy(d.gpu.data(), g.data(), 16);
  std::memcpy(d.ipc.data(), ipc.data(), 64);
  if (d.pid == 0 || d.pid > 0x7fffffffu)
    return EAAS_FAIL(status::invalid_handle, "nvlink region handle: pid {} out of range", d.pid);
  if (d.alloc_size == 0 || d.alloc_size > kMaxAlloc || d.offset > d.alloc_size || d.size > d.alloc_size - d.offset)
    return EAAS_FAIL(status::invalid_handle, "nvlink region handle: [{}, +{}) lies outside the {}-byte allocation",
                     d.offset, d.size, d.alloc_size);
  out = d;
  return status::ok;
}

mapping::~mapping() {
  if (opened && base != nullptr) {
    cudaSetDevice(device);
    cudaIpcCloseMemHandle(base);
  }
}

status map_peer(const region_desc& d, int my_device, bool same_process, std::shared_ptr<mapping>& out) {
  auto m = std::make_shared<mapping>();
  m->device = my_device;
  if (same_process) {
    std::lock_guard lock(g_mu);
    auto it = live().find(d.token);
    auto a = it == live().end() ? nullptr : it->second.lock();
    if (!a || a->size != d.alloc_size || std::memcmp(a->ipc.data(), d.ipc.data(), 64) != 0)
      return EAAS_FAIL(status::invalid_handle, "nvlink: the region's GPU buffer was freed (or never existed)");
    m->base = a->ptr;
  } else {
    EAAS_CHECK(use_device(my_device));
    cudaIpcMemHandle_t h{};
    std::memcpy(&h, d.ipc.data(), sizeof(h));
    void* p = nullptr;
    const cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      if (!process_alive(static_cast<pid_t>(d.pid), d.start_time))
        return EAAS_FAIL(status::peer_unreachable, "nvlink: the process {} that exported the region is gone", d.pid);
      return EAAS_FAIL(status::invalid_handle, "nvlink: cudaIpcOpenMemHandle failed: {} (freed, or not shareable)",
                       cudaGetErrorString(e));
    }
    m->base = p;
    m->opened = true;
  }
  out = std::move(m);
  return status::ok;
}

}  // namespace eaas::detail::nvlink
