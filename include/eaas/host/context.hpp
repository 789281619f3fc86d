#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "eaas/common/status.hpp"
#include "eaas/common/views.hpp"
#include "eaas/host/endpoint.hpp"
#include "eaas/host/handle.hpp"
#include "eaas/host/memory.hpp"

namespace eaas {

/// Configuration of a context.
struct context_options {
  /// A name for logs.
  std::string name = "eaas";
  /// Offer and accept the shm transport (processes on this host).
  bool enable_shm = true;
  /// Watch connected peer processes and mark their endpoints peer_dead when they exit.
  bool monitor_peers = true;
  /// The CUDA device this context drives (-1: none, host memory only). With a device, the context
  /// allocates GPU memory, offers the nvlink transport, and keeps the words kernels read (endpoint
  /// states, the abort flag) in pinned memory mapped into the GPU.
  int cuda_device = -1;
  /// Bring up the ibgda transport (GPU-initiated RDMA to contexts on other hosts) when this build has
  /// rdma-core and CUDA, `cuda_device` >= 0, and the host has what probe_ibgda checks. When the
  /// bring-up fails the context works without it (the reason is logged at debug level; connect to
  /// another host then says what is missing).
  bool enable_ibgda = true;
  /// ibgda: bytes of GPU memory registered with the NIC once, from which memory_kind::network is
  /// allocated (a multiple of 256).
  std::size_t ibgda_heap_bytes = std::size_t{64} << 20;
  /// ibgda: QPs kept ready for peers that connect to this context (advertised in its connection
  /// handle; each accepted peer takes one, and a new one is made), 1 .. 64.
  std::uint32_t ibgda_qp_pool = 4;
  /// ibgda: peers accepted at once; beyond it the pool is not refilled and the handle advertises no
  /// QP (a peer's connect then returns no_resource).
  std::uint32_t ibgda_max_peers = 256;
};

/// Where allocate() places memory.
enum class memory_kind : std::uint8_t {
  host = 0,    ///< host memory that peers on this host map (shm)
  device = 1,  ///< memory of the context's GPU that peer GPUs map (nvlink)
  /// memory of the context's GPU in its NIC-registered heap, which peers on other hosts reach
  /// (ibgda). The local buffers of ibgda ops (put's source, get's destination, fetched words) must lie
  /// in such memory.
  network = 2,
};

/// One per process (and per device once GPUs are used). Owns transports, the abort flag and the
/// liveness monitor. Thread-safe. Endpoints and regions keep what they need alive, so they may
/// outlive the context object.
class context {
 public:
  /// Creates a context; `out` is set only on ok.
  static status create(const context_options& options, std::unique_ptr<context>& out);

  virtual ~context() = default;
  context(const context&) = delete;
  context& operator=(const context&) = delete;

  /// A random 64-bit id, unique per context; peers see it in handles.
  virtual std::uint64_t id() const noexcept = 0;

  /// Allocates `bytes` of host memory that peers on this host can map (shm), zero-filled, 4 KiB
  /// aligned, registered.
  status allocate(std::size_t bytes, std::unique_ptr<memory_region>& out) {
    return allocate(bytes, memory_kind::host, out);
  }

  /// Allocates `bytes` of `kind` memory, zero-filled and registered. `device` needs a context made
  /// with `cuda_device` >= 0 (else unsupported).
  virtual status allocate(std::size_t bytes, memory_kind kind, std::unique_ptr<memory_region>& out) = 0;

  /// Registers [ptr, ptr+bytes) for remote access. The shm transport can share only memory that
  /// lies inside a region from allocate(); anything else returns unsupported with the reason.
  virtual status register_memory(void* ptr, std::size_t bytes, std::unique_ptr<memory_region>& out) = 0;

  /// This context's connection handle: what a peer needs to connect to it.
  virtual status connection_handle(handle_bytes& out) const = 0;

  /// Connects to the peer that exported `handle` (a context may connect to itself). Picks the
  /// transport: both sides drive GPUs of this host with a peer path between them → nvlink; same
  /// host → shm. Returns peer_unreachable with the reason when no transport fits or the peer is gone.
  virtual status connect(std::span<const std::byte> handle, std::unique_ptr<endpoint>& out) = 0;

  /// connect() for transports whose connection needs a message back. ibgda (another host): RC QPs
  /// are per pair, so the endpoint made here is paired with one QP the peer advertised, and `reply`
  /// is a handle the peer must pass to its own connect() before ops through this endpoint can reach
  /// it (its connect then returns its endpoint to us, and no reply). `reply` is emptied for the other
  /// transports and when `handle` is itself a reply. The plain connect() refuses a handle that needs
  /// a reply (invalid_argument), so no half-made connection goes unnoticed.
  virtual status connect(std::span<const std::byte> handle, std::unique_ptr<endpoint>& out, handle_bytes& reply) {
    reply.clear();
    return connect(handle, out);
  }

  /// The CUDA device of this context, or -1.
  virtual int cuda_device() const noexcept = 0;

  /// The view kernels and host threads pass to wait_signal.
  virtual device_context view() const noexcept = 0;

  /// Raises the abort flag: every wait of this context ends with `aborted` until clear_abort().
  virtual void abort() noexcept = 0;
  virtual void clear_abort() noexcept = 0;

 protected:
  context() = default;
};

}  // namespace eaas
