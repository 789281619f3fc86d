#pragma once

// shm transport, host side (private). Memory that peers map is a memfd: it never appears in
// /dev/shm, so nothing is left behind when any process dies, however it dies. A peer opens it
// through /proc/<pid>/fd/<fd> (same pid namespace, same user or root); the memfd's name carries a
// random token that the importer checks, so a reused fd number is never mistaken for the region.

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "eaas/common/status.hpp"
#include "handle.hpp"

namespace eaas::detail::shm {

/// A memfd of this process, mapped.
struct segment {
  int fd = -1;
  void* base = nullptr;
  std::size_t map_size = 0;
  std::uint64_t token = 0;
  ~segment();
};

/// A peer's memfd mapped into this process.
struct mapping {
  void* base = nullptr;
  std::size_t map_size = 0;
  std::uint64_t token = 0;
  ~mapping();
};

/// What a region handle says (payload of a region handle with transport shm).
struct region_desc {
  std::uint64_t owner_id = 0;
  std::uint64_t host_id = 0;
  std::uint32_t pid = 0;
  std::uint32_t fd = 0;
  std::uint64_t start_time = 0;
  std::uint64_t token = 0;
  std::uint64_t offset = 0;
  std::uint64_t size = 0;
  std::uint64_t map_size = 0;
};

/// Largest region the shm transport accepts (a handle claiming more is corrupt).
inline constexpr std::uint64_t kMaxMapSize = std::uint64_t{1} << 40;

status allocate(std::size_t bytes, std::shared_ptr<segment>& out);

void encode(const region_desc& d, handle_writer& w);
/// Reads and checks field consistency (sizes, bounds); says what is wrong.
status decode(std::span<const std::byte> payload, region_desc& out);

/// Opens and maps the peer's memfd named by `d`, checking that it is the right one.
status map_peer(const region_desc& d, std::shared_ptr<mapping>& out);

}  // namespace eaas::detail::shm
