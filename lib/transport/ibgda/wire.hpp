#pragma once

// What two ibgda peers exchange (private). Both travel as eaas handles (lib/handle.hpp: magic,
// version, kind, transport = ibgda, size, CRC-32C), so truncation, corruption and version skew are
// refused before a field is read; then every field is range-checked before use.
//
// Connection description (handle_kind::connection), payload, little-endian:
//   u32 format          kConnFormat (2); anything else is refused by name (format 1, before the
//                       close-notice words, had no such field: its first bytes are a context id)
//   u64 context id      the context that made the QPs
//   u64 host id         its host
//   u64 target id       the context the QPs are for (0: an advertisement, addressed to no one)
//   u32 target qpn      the addressee's QP that QP 0 pairs with (1 .. 2^24-1), or 0 when not
//                       chosen yet (peer_set's exchange) and always 0 in an advertisement
//   u8  link layer      1 InfiniBand, 2 Ethernet (RoCE)
//   u8  mtu             ibv_mtu of the port, 1 (256) .. 5 (4096)
//   u16 lid             InfiniBand: 0x0001 .. 0xbfff (unicast); RoCE: 0
//   u8[16] gid          the port GID (RoCE: the selected entry; never zero or multicast)
//   u8  qp count        1 .. kMaxQpsPerPeer; 0 only in an advertisement (a context whose pool of
//                       waiting QPs is empty)
//   per QP: u32 qpn (1 .. 2^24-1, distinct), u32 psn (< 2^24),
//           u64 notice address, u32 notice rkey, u32 notice bytes: where the peer's close notice
//           lands (the endpoint state word of the endpoint this QP will serve, registered for remote
//           write on its own). Either all three are 0 (no word: the peer is not told of a close) or
//           the address is nonzero, 4-byte aligned and does not wrap, the rkey is nonzero and the
//           bytes are exactly kNoticeBytes.
//
// Region description (handle_kind::region), payload:
//   u64 owner context id, u64 host id, u64 address, u64 size (> 0, address + size no overflow),
//   u32 rkey

#include <cstdint>
#include <span>
#include <vector>

#include "eaas/common/status.hpp"
#include "eaas/host/handle.hpp"
#include "transport/ibgda/verbs_api.hpp"

namespace eaas::detail::ibgda {

inline constexpr std::size_t kMaxQpsPerPeer = 64;
/// The connection description's format (its first payload field).
inline constexpr std::uint32_t kConnFormat = 2;
/// The size of a close-notice word: one endpoint_state word.
inline constexpr std::uint32_t kNoticeBytes = 4;

/// Where a close notice lands: a peer's endpoint state word, registered for remote write alone
/// (its own MR: the rkey reaches nothing else). All zero: none.
struct notice_word {
  std::uint64_t addr = 0;
  std::uint32_t rkey = 0;
  std::uint32_t bytes = 0;
  bool present() const { return addr != 0 || rkey != 0 || bytes != 0; }
};

/// One remote QP as a local QP's INIT2RTR needs it.
struct peer_qp {
  link_layer layer = link_layer::infiniband;
  std::uint8_t mtu = 0;
  std::uint16_t lid = 0;
  gid_bytes gid{};
  std::uint32_t qpn = 0;
  std::uint32_t psn = 0;
};

struct qp_wire {
  std::uint32_t qpn = 0;
  std::uint32_t psn = 0;
  notice_word notice;  ///< the state word of the endpoint this QP serves
};

struct conn_desc {
  std::uint64_t context_id = 0;
  std::uint64_t host_id = 0;
  std::uint64_t target_id = 0;
  std::uint32_t target_qpn = 0;
  link_layer layer = link_layer::infiniband;
  std::uint8_t mtu = 0;
  std::uint16_t lid = 0;
  gid_bytes gid{};
  std::vector<qp_wire> qps;

  /// QP `i` as the peer's INIT2RTR needs it.
  peer_qp qp(std::size_t i) const { return peer_qp{layer, mtu, lid, gid, qps[i].qpn, qps[i].psn}; }
};

struct region_wire {
  std::uint64_t owner_id = 0;
  std::uint64_t host_id = 0;
  std::uint64_t addr = 0;
  std::uint64_t size = 0;
  std::uint32_t rkey = 0;
};

/// invalid_handle naming the first field out of range (link layer, MTU enum, LID, GID, QPN, PSN).
status check_peer(const peer_qp& p);
/// invalid_handle unless `w` is absent (all zero) or well formed (see the format above).
status check_notice(const notice_word& w);

/// Encodes `d` (which must pass the checks decode applies; invalid_argument otherwise).
status encode(const conn_desc& d, handle_bytes& out);
/// Decodes and validates a connection description: invalid_handle with the reason.
status decode(std::span<const std::byte> bytes, conn_desc& out);

status encode(const region_wire& r, handle_bytes& out);
status decode(std::span<const std::byte> bytes, region_wire& out);

}  // namespace eaas::detail::ibgda
