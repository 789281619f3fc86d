#pragma once

// What two ibgda peers exchange (private). Both travel as eaas handles (lib/handle.hpp: magic,
// version, kind, transport = ibgda, size, CRC-32C), so truncation, corruption and version skew are
// refused before a field is read; then every field is range-checked before use.
//
// Connection description (handle_kind::connection), payload, little-endian:
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
//   per QP: u32 qpn (1 .. 2^24-1, distinct), u32 psn (< 2^24)
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

/// Encodes `d` (which must pass the checks decode applies; invalid_argument otherwise).
status encode(const conn_desc& d, handle_bytes& out);
/// Decodes and validates a connection description: invalid_handle with the reason.
status decode(std::span<const std::byte> bytes, conn_desc& out);

status encode(const region_wire& r, handle_bytes& out);
status decode(std::span<const std::byte> bytes, region_wire& out);

}  // namespace eaas::detail::ibgda
