#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "eaas/common/status.hpp"
#include "eaas/common/types.hpp"

namespace eaas {

/// What a handle describes.
enum class handle_kind : std::uint8_t {
  connection = 1,  ///< a context's connection handle: who it is and how to reach it
  region = 2,      ///< a registered memory region
  record = 3,      ///< a peer record published in a registry (see directory.hpp)
};

/// Handles are opaque, self-describing bytes: a header (magic, version, kind, transport, total size,
/// CRC-32C) and a payload. Every import validates all of it; a truncated, corrupted, wrong-version or
/// wrong-kind handle is rejected with `invalid_handle` and a reason in `last_error()`.
using handle_bytes = std::vector<std::byte>;

/// What the header of a well-formed handle says (checked: magic, version, size, checksum).
struct handle_info {
  handle_kind kind;
  transport_kind transport;
  std::uint16_t version;
  std::uint32_t size;
};

/// Validates the header and checksum of `bytes` and describes them.
status inspect_handle(std::span<const std::byte> bytes, handle_info& out);

/// Printable form of a handle (lower-case hex), for command lines, files and registries.
std::string handle_to_text(std::span<const std::byte> bytes);

/// Inverse of handle_to_text; `invalid_handle` on anything that is not even-length hex.
status handle_from_text(std::string_view text, handle_bytes& out);

}  // namespace eaas
