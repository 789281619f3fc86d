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
};

/// Where allocate() places memory.
enum class memory_kind : std::uint8_t {
  host = 0,    ///< host memory that peers on this host map (shm)
  device = 1,  ///< memory of the context's GPU that peer GPUs map (nvlink)
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
