#pragma once

// Wire format of handles (private). All integers little-endian.
//
//   offset size field
//        0    4 magic      "EAAH" (0x48414145)
//        4    2 version    kHandleVersion
//        6    1 kind       handle_kind
//        7    1 transport  transport_kind
//        8    4 size       total bytes, header included
//       12    4 crc32c     over bytes [0,12) and [16,size)
//       16    … payload    kind- and transport-specific, read with handle_reader

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "eaas/host/handle.hpp"

namespace eaas::detail {

inline constexpr std::uint32_t kHandleMagic = 0x48414145u;
inline constexpr std::uint16_t kHandleVersion = 1;
inline constexpr std::size_t kHandleHeaderSize = 16;
/// No handle is larger; a bigger size field is corruption, not a handle.
inline constexpr std::size_t kHandleMaxSize = 4096;

std::uint32_t crc32c(std::uint32_t crc, std::span<const std::byte> bytes) noexcept;

/// Appends little-endian fields to a payload.
class handle_writer {
 public:
  void u8(std::uint8_t v) { bytes_.push_back(static_cast<std::byte>(v)); }
  void u16(std::uint16_t v) { put(v, 2); }
  void u32(std::uint32_t v) { put(v, 4); }
  void u64(std::uint64_t v) { put(v, 8); }
  void raw(std::span<const std::byte> b) { bytes_.insert(bytes_.end(), b.begin(), b.end()); }
  /// Wraps the payload in a header and returns the whole handle.
  handle_bytes finish(handle_kind kind, transport_kind transport) const;
  /// The bytes written so far (for other framings than handles).
  const std::vector<std::byte>& bytes() const noexcept { return bytes_; }

 private:
  void put(std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) bytes_.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xffu));
  }
  std::vector<std::byte> bytes_;
};

/// Reads little-endian fields; every read is bounds-checked and a short read sets `ok() == false`
/// and yields zeros.
class handle_reader {
 public:
  explicit handle_reader(std::span<const std::byte> payload) : p_(payload) {}
  std::uint8_t u8() { return static_cast<std::uint8_t>(get(1)); }
  std::uint16_t u16() { return static_cast<std::uint16_t>(get(2)); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(get(4)); }
  std::uint64_t u64() { return get(8); }
  std::span<const std::byte> raw(std::size_t n);
  bool ok() const noexcept { return ok_; }
  /// True when every byte was consumed and no read was short.
  bool done() const noexcept { return ok_ && pos_ == p_.size(); }

 private:
  std::uint64_t get(int n);
  std::span<const std::byte> p_;
  std::size_t pos_ = 0;
  bool ok_ = true;
};

/// Validates magic, version, size and checksum, and that the kind and transport are the expected
/// ones (`transport_kind::none` accepts any). On ok, `payload` is the bytes after the header.
status decode_handle(std::span<const std::byte> bytes, handle_kind kind, transport_kind transport, handle_info& info,
                     std::span<const std::byte>& payload, std::size_t max_size = kHandleMaxSize);

}  // namespace eaas::detail
