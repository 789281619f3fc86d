#include "registry/protocol.hpp"

#include <cstring>

namespace eaas::detail::regproto {

void put_string(handle_writer& w, std::string_view s) {
  w.u32(static_cast<std::uint32_t>(s.size()));
  w.raw(std::as_bytes(std::span(s.data(), s.size())));
}

bool get_string(handle_reader& r, std::size_t max, std::string& out) {
  const std::uint32_t n = r.u32();
  if (!r.ok() || n > max) return false;
  const auto b = r.raw(n);
  if (!r.ok()) return false;
  out.assign(reinterpret_cast<const char*>(b.data()), b.size());
  return true;
}

void put_record(handle_writer& w, const kv_record& rec) {
  put_string(w, rec.key);
  put_string(w, rec.value);
  w.u64(static_cast<std::uint64_t>(rec.lease));
  w.u64(static_cast<std::uint64_t>(rec.create_revision));
  w.u64(static_cast<std::uint64_t>(rec.mod_revision));
}

bool get_record(handle_reader& r, kv_record& out) {
  kv_record rec;
  if (!get_string(r, kMaxKeyBytes, rec.key) || !get_string(r, kMaxValueBytes, rec.value)) return false;
  rec.lease = static_cast<std::int64_t>(r.u64());
  rec.create_revision = static_cast<std::int64_t>(r.u64());
  rec.mod_revision = static_cast<std::int64_t>(r.u64());
  if (!r.ok() || rec.key.empty() || rec.lease < 0 || rec.create_revision < 0 || rec.mod_revision < 0) return false;
  out = std::move(rec);
  return true;
}

std::vector<std::byte> frame(const handle_writer& body) {
  const auto& b = body.bytes();
  const std::size_t n = b.size();
  std::vector<std::byte> out(4 + n);
  for (int i = 0; i < 4; ++i) out[i] = static_cast<std::byte>((n >> (8 * i)) & 0xffu);
  std::memcpy(out.data() + 4, b.data(), n);
  return out;
}

int frame_reader::next(std::vector<std::byte>& out, std::uint32_t max) {
  if (buf_.size() - pos_ < 4) return 0;
  std::uint32_t n = 0;
  for (int i = 0; i < 4; ++i) n |= static_cast<std::uint32_t>(buf_[pos_ + i]) << (8 * i);
  if (n == 0 || n > max) return -1;
  if (buf_.size() - pos_ - 4 < n) return 0;
  out.assign(buf_.begin() + static_cast<std::ptrdiff_t>(pos_ + 4),
             buf_.begin() + static_cast<std::ptrdiff_t>(pos_ + 4 + n));
  pos_ += 4 + n;
  if (pos_ > (1u << 16) && pos_ * 2 > buf_.size()) {
    buf_.erase(buf_.begin(), buf_.begin() + static_cast<std::ptrdiff_t>(pos_));
    pos_ = 0;
  }
  return 1;
}

}  // namespace eaas::detail::regproto
