#pragma once

// Wire protocol of the embedded registry (private): length-prefixed binary frames on a TCP stream.
//
//   frame   := u32 length (of what follows, ≤ kMaxFrame) | u8 type | body
//   request := type (op_*) | u64 request id | op fields
//   reply   := type reply  | u64 request id | u32 status | op-specific fields
//   event   := type event  | u64 watch id   | u8 watch_event_type | record
//   string  := u32 length | bytes          record := key, value (strings), i64 lease, i64 create, i64 mod
//
// Everything is little-endian and read with the bounds-checked handle_reader: a malformed frame is
// a protocol error that closes the connection, never an out-of-bounds read.

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "eaas/host/registry.hpp"
#include "handle.hpp"

namespace eaas::detail::regproto {

inline constexpr std::uint16_t kVersion = 1;
inline constexpr std::uint32_t kMaxFrame = 2 * (kMaxKeyBytes + kMaxValueBytes) + 4096;
/// A list reply may carry many records: it is the one frame allowed to be large.
inline constexpr std::uint32_t kMaxListFrame = 64u << 20;

enum msg : std::uint8_t {
  op_hello = 1,      // u16 version, string token
  op_grant = 2,      // u32 ttl                          -> i64 lease
  op_keepalive = 3,  // i64 lease
  op_revoke = 4,     // i64 lease
  op_put = 5,        // string key, string value, i64 lease -> i64 revision
  op_get = 6,        // string key                       -> record
  op_list = 7,       // string prefix                    -> i64 revision, u32 n, n records
  op_remove = 8,     // string key
  op_cas = 9,        // string key, i64 expected, string value, i64 lease -> u8 swapped
  op_watch = 10,     // u64 watch id, string prefix, i64 after_revision
  op_cancel = 11,    // u64 watch id
  reply = 64,
  event = 65,
};

void put_string(handle_writer& w, std::string_view s);
bool get_string(handle_reader& r, std::size_t max, std::string& out);
void put_record(handle_writer& w, const kv_record& rec);
bool get_record(handle_reader& r, kv_record& out);

/// Wraps a body (type first) into a frame.
std::vector<std::byte> frame(const handle_writer& body);

/// Incremental frame splitter for a byte stream.
class frame_reader {
 public:
  /// Appends received bytes.
  void feed(const std::byte* data, std::size_t n) { buf_.insert(buf_.end(), data, data + n); }
  /// Next complete frame body (type first) in `out`: 1 = got one, 0 = need more bytes,
  /// -1 = the stream is corrupt (length over the limit).
  int next(std::vector<std::byte>& out, std::uint32_t max = kMaxListFrame);

 private:
  std::vector<std::byte> buf_;
  std::size_t pos_ = 0;
};

}  // namespace eaas::detail::regproto
