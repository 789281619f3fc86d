#pragma once

// nvlink transport, host side (private; built only with CUDA). GPU memory is allocated with
// cudaMalloc and exported as a CUDA IPC handle; a peer process opens it with peer access enabled, so
// its kernels store straight into this GPU's memory over NVLink (or into the same GPU, when two
// processes share one). Within one process the pointer itself is used (unified addressing).

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "eaas/common/status.hpp"
#include "handle.hpp"

namespace eaas::detail::nvlink {

using uuid = std::array<std::uint8_t, 16>;

std::string uuid_text(const uuid& u);

/// The UUID of CUDA device `ordinal`.
status device_uuid(int ordinal, uuid& out);
/// The ordinal of the visible device with this UUID; peer_unreachable when it is not visible here.
status find_device(const uuid& u, int& ordinal);
/// Makes `mine` able to load/store/atomic into `theirs` (same device: nothing to do).
status enable_peer_access(int mine, int theirs);
/// Makes `ordinal` current for the calling thread.
status use_device(int ordinal);

/// Pinned host memory that kernels can read and write (mapped, portable), for state words.
status host_alloc_mapped(std::size_t bytes, void*& out);
void host_free(void* p) noexcept;

/// A cudaMalloc'd buffer of this process, exportable.
struct allocation {
  void* ptr = nullptr;
  std::size_t size = 0;
  std::uint64_t token = 0;
  int device = -1;
  std::array<std::byte, 64> ipc{};  // cudaIpcMemHandle_t
  ~allocation();
};

status allocate(int device, std::size_t bytes, std::shared_ptr<allocation>& out);

/// What a region handle with transport nvlink says.
struct region_desc {
  std::uint64_t owner_id = 0;
  std::uint64_t host_id = 0;
  std::uint32_t pid = 0;
  std::uint64_t start_time = 0;
  std::uint64_t token = 0;
  uuid gpu{};
  std::array<std::byte, 64> ipc{};
  std::uint64_t offset = 0;
  std::uint64_t size = 0;
  std::uint64_t alloc_size = 0;
};

void encode(const region_desc& d, handle_writer& w);
status decode(std::span<const std::byte> payload, region_desc& out);

/// A peer's (or this process's) GPU buffer, usable by kernels on `device`.
struct mapping {
  void* base = nullptr;
  bool opened = false;  // opened through IPC (closed on destruction)
  int device = -1;
  ~mapping();
};

/// Opens the buffer of `d` for kernels on `my_device` (`same_process`: use the pointer itself).
status map_peer(const region_desc& d, int my_device, bool same_process, std::shared_ptr<mapping>& out);

}  // namespace eaas::detail::nvlink
