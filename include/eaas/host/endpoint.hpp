#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "eaas/common/status.hpp"
#include "eaas/common/views.hpp"
#include "eaas/host/handle.hpp"
#include "eaas/host/memory.hpp"

namespace eaas {

/// A pairwise connection to one peer context, made on demand from the peer's connection handle and
/// torn down independently of every other endpoint. Thread-safe.
class endpoint {
 public:
  virtual ~endpoint() = default;
  endpoint(const endpoint&) = delete;
  endpoint& operator=(const endpoint&) = delete;

  /// The view ops take (by value). Valid while this endpoint lives; after close() or the peer's
  /// death, ops through it return not_connected / peer_unreachable instead of touching memory.
  virtual device_endpoint view() const noexcept = 0;
  /// The transport chosen for this peer.
  virtual transport_kind transport() const noexcept = 0;
  /// The peer context's id.
  virtual std::uint64_t peer_id() const noexcept = 0;
  /// connected, peer_dead or closed.
  virtual endpoint_state state() const noexcept = 0;

  /// Imports a region handle exported by this endpoint's peer. A handle of another peer, another
  /// transport, another host, or one that is malformed is rejected with a status, never trusted.
  virtual status import_region(std::span<const std::byte> handle, std::unique_ptr<remote_region>& out) = 0;

  /// Stops this endpoint: later ops through its views return not_connected. Other endpoints are
  /// untouched. Remote regions imported through it stay mapped until destroyed. Idempotent.
  virtual void close() noexcept = 0;

 protected:
  endpoint() = default;
};

}  // namespace eaas
