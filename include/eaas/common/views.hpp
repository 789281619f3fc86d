#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "eaas/common/types.hpp"

namespace eaas {

/// State of an endpoint, kept in one 32-bit word that the host side writes (connect, close, the
/// liveness monitor) and every op reads. It lives in memory the executing side can read (pinned,
/// mapped host memory once GPUs use it).
enum class endpoint_state : std::uint32_t {
  connected = 0,
  peer_dead = 1,  ///< the peer process exited or was declared dead; ops return peer_unreachable
  closed = 2,     ///< endpoint::close() was called; ops return not_connected
};

inline constexpr std::uint32_t kEndpointViewMagic = 0xEAA5E1D0u;
inline constexpr std::uint32_t kRemoteViewMagic = 0xEAA5BE61u;

/// What a kernel (or a host thread) needs to abort its waits: a view of the context.
/// Trivially copyable; pass it by value.
struct device_context {
  const std::uint32_t* abort;  ///< nonzero = abort every wait of this context
};

/// A pairwise connection as seen by the code that issues ops. Trivially copyable, holds no pointer to
/// host-only objects, so it is passed by value into kernels and captured by CUDA graphs. Valid while
/// the `endpoint` it came from lives.
struct device_endpoint {
  std::uint32_t magic;       ///< kEndpointViewMagic; anything else is a garbage view
  transport_kind transport;  ///< which op bodies run
  std::uint8_t reserved0[3];
  const std::uint32_t* state;  ///< endpoint_state word
  const std::uint32_t* abort;  ///< the context's abort flag
  void* transport_state;       ///< per-transport state (null for shm)
  std::uint64_t peer_id;       ///< the peer context's id; remote views must belong to it
};

/// A peer's registered region as seen by the code that issues ops. Trivially copyable.
struct remote_view {
  std::uint32_t magic;  ///< kRemoteViewMagic
  transport_kind transport;
  std::uint8_t reserved0[3];
  std::uint64_t addr;      ///< shm / nvlink: the region mapped in this process; ibgda: remote VA
  std::uint64_t size;      ///< bytes
  std::uint64_t owner_id;  ///< the context id of the peer that registered it
  std::uint32_t rkey;      ///< ibgda remote key (0 elsewhere)
  std::uint32_t reserved1;
};

static_assert(std::is_trivially_copyable_v<device_context>);
static_assert(std::is_trivially_copyable_v<device_endpoint>);
static_assert(std::is_trivially_copyable_v<remote_view>);
static_assert(sizeof(device_endpoint) == 40 && alignof(device_endpoint) == 8);
static_assert(sizeof(remote_view) == 40 && alignof(remote_view) == 8);
static_assert(offsetof(remote_view, addr) == 8 && offsetof(remote_view, rkey) == 32);

}  // namespace eaas
