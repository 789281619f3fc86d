#include "handle.hpp"

#include <array>

#include "log.hpp"

namespace eaas {
namespace detail {

namespace {

constexpr std::array<std::uint32_t, 256> make_crc32c_table() {
  std::array<std::uint32_t, 256> t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // Castagnoli, reflected
    t[i] = c;
  }
  return t;
}
constexpr auto kCrcTable = make_crc32c_table();

std::uint32_t load_le(std::span<const std::byte> b, std::size_t at, int n) {
  std::uint32_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<std::uint32_t>(b[at + i]) << (8 * i);
  return v;
}

std::uint32_t header_crc(std::span<const std::byte> whole) {
  std::uint32_t c = crc32c(0, whole.subspan(0, 12));
  return crc32c(c, whole.subspan(kHandleHeaderSize));
}

const char* kind_name(handle_kind k) {
  switch (k) {
    case handle_kind::connection:
      return "connection";
    case handle_kind::region:
      return "region";
    case handle_kind::record:
      return "record";
  }
  return "unknown";
}

}  // namespace

std::uint32_t crc32c(std::uint32_t crc, std::span<const std::byte> bytes) noexcept {
  crc = ~crc;
  for (std::byte b : bytes) crc = kCrcTable[(crc ^ static_cast<std::uint8_t>(b)) & 0xffu] ^ (crc >> 8);
  return ~crc;
}

handle_bytes handle_writer::finish(handle_kind kind, transport_kind transport) const {
  handle_writer h;
  h.u32(kHandleMagic);
  h.u16(kHandleVersion);
  h.u8(static_cast<std::uint8_t>(kind));
  h.u8(static_cast<std::uint8_t>(transport));
  h.u32(static_cast<std::uint32_t>(kHandleHeaderSize + bytes_.size()));
  h.u32(0);
  h.raw(bytes_);
  handle_bytes out = std::move(h.bytes_);
  const std::uint32_t c = header_crc(out);
  for (int i = 0; i < 4; ++i) out[12 + i] = static_cast<std::byte>((c >> (8 * i)) & 0xffu);
  return out;
}

std::span<const std::byte> handle_reader::raw(std::size_t n) {
  if (!ok_ || n > p_.size() - pos_) {
    ok_ = false;
    return {};
  }
  auto s = p_.subspan(pos_, n);
  pos_ += n;
  return s;
}

std::uint64_t handle_reader::get(int n) {
  if (!ok_ || static_cast<std::size_t>(n) > p_.size() - pos_) {
    ok_ = false;
    return 0;
  }
  std::uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(p_[pos_ + i]) << (8 * i);
  pos_ += static_cast<std::size_t>(n);
  return v;
}

status decode_handle(std::span<const std::byte> bytes, handle_kind kind, transport_kind transport, handle_info& info,
                     std::span<const std::byte>& payload, std::size_t max_size) {
  if (bytes.size() < kHandleHeaderSize)
    return EAAS_FAIL(status::invalid_handle, "handle: {} bytes is shorter than the {}-byte header", bytes.size(),
                     kHandleHeaderSize);
  if (load_le(bytes, 0, 4) != kHandleMagic)
    return EAAS_FAIL(status::invalid_handle, "handle: bad magic {:#010x} (not an eaas handle)", load_le(bytes, 0, 4));
  const auto version = static_cast<std::uint16_t>(load_le(bytes, 4, 2));
  if (version != kHandleVersion)
    return EAAS_FAIL(status::invalid_handle, "handle: version {} is not supported (this build reads version {})",
                     version, kHandleVersion);
  const std::uint32_t size = load_le(bytes, 8, 4);
  if (size != bytes.size() || size > max_size)
    return EAAS_FAIL(status::invalid_handle, "handle: header says {} bytes, got {} (truncated or padded)", size,
                     bytes.size());
  const std::uint32_t want = load_le(bytes, 12, 4);
  if (const std::uint32_t got = header_crc(bytes); got != want)
    return EAAS_FAIL(status::invalid_handle, "handle: checksum mismatch ({:#010x} != {:#010x}): corrupted", got, want);
  const auto k = static_cast<handle_kind>(static_cast<std::uint8_t>(bytes[6]));
  const auto t = static_cast<transport_kind>(static_cast<std::uint8_t>(bytes[7]));
  if (k != kind)
    return EAAS_FAIL(status::invalid_handle, "handle: a {} handle was given where a {} handle is needed", kind_name(k),
                     kind_name(kind));
  if (transport != transport_kind::none && t != transport)
    return EAAS_FAIL(status::invalid_handle, "handle: made for transport {}, expected {}", transport_name(t),
                     transport_name(transport));
  info = handle_info{k, t, version, size};
  payload = bytes.subspan(kHandleHeaderSize);
  return status::ok;
}

}  // namespace detail

status inspect_handle(std::span<const std::byte> bytes, handle_info& out) {
  if (bytes.size() >= detail::kHandleHeaderSize) {
    const auto k = static_cast<handle_kind>(static_cast<std::uint8_t>(bytes[6]));
    if (k == handle_kind::connection || k == handle_kind::region) {
      std::span<const std::byte> payload;
      return detail::decode_handle(bytes, k, transport_kind::none, out, payload);
    }
  }
  std::span<const std::byte> payload;
  // Reports the first problem (size, magic, version, checksum) in the usual words.
  const status s = detail::decode_handle(bytes, handle_kind::connection, transport_kind::none, out, payload);
  return s == status::ok ? EAAS_FAIL(status::invalid_handle, "handle: unknown kind") : s;
}

std::string handle_to_text(std::span<const std::byte> bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  s.reserve(bytes.size() * 2);
  for (std::byte b : bytes) {
    s.push_back(kHex[static_cast<std::uint8_t>(b) >> 4]);
    s.push_back(kHex[static_cast<std::uint8_t>(b) & 0xf]);
  }
  return s;
}

status handle_from_text(std::string_view text, handle_bytes& out) {
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.remove_suffix(1);
  if (text.size() % 2 != 0 || text.size() > 2 * detail::kHandleMaxSize)
    return EAAS_FAIL(status::invalid_handle, "handle text: {} characters is not a hex handle", text.size());
  handle_bytes b(text.size() / 2);
  for (std::size_t i = 0; i < b.size(); ++i) {
    const int hi = nibble(text[2 * i]), lo = nibble(text[2 * i + 1]);
    if (hi < 0 || lo < 0) return EAAS_FAIL(status::invalid_handle, "handle text: non-hex character at {}", 2 * i);
    b[i] = static_cast<std::byte>(hi << 4 | lo);
  }
  out = std::move(b);
  return status::ok;
}

}  // namespace eaas
