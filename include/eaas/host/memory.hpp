#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "eaas/common/status.hpp"
#include "eaas/common/views.hpp"
#include "eaas/host/handle.hpp"

namespace eaas {

class context;

/// A local buffer registered for remote access. Registration is local and non-collective: any
/// process registers any buffer at any time. Peers reach it through the handle it exports.
/// Destroying the region revokes nothing a peer already mapped (shm/nvlink keep the memory alive
/// until the peer unmaps it); it only stops new imports.
class memory_region {
 public:
  virtual ~memory_region() = default;
  memory_region(const memory_region&) = delete;
  memory_region& operator=(const memory_region&) = delete;

  /// Start of the buffer in this process.
  virtual void* data() const noexcept = 0;
  /// Size in bytes.
  virtual std::size_t size() const noexcept = 0;
  /// The transport whose peers can import it.
  virtual transport_kind transport() const noexcept = 0;
  /// A versioned, checksummed handle a peer imports with `endpoint::import_region`.
  virtual status export_handle(handle_bytes& out) const = 0;

 protected:
  memory_region() = default;
};

/// A peer's region imported through an endpoint. Keep it alive as long as views of it are used.
class remote_region {
 public:
  virtual ~remote_region() = default;
  remote_region(const remote_region&) = delete;
  remote_region& operator=(const remote_region&) = delete;

  /// The trivially copyable view that ops take.
  virtual remote_view view() const noexcept = 0;
  /// Size in bytes.
  std::size_t size() const noexcept { return static_cast<std::size_t>(view().size); }

 protected:
  remote_region() = default;
};

}  // namespace eaas
