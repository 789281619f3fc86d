// Connection and region descriptions of the ibgda transport (see wire.hpp).

#include "transport/ibgda/wire.hpp"

#include <algorithm>

#include "handle.hpp"
#include "log.hpp"

namespace eaas::detail::ibgda {

namespace {

bool all_zero(const gid_bytes& g) {
  return std::all_of(g.begin(), g.end(), [](std::uint8_t b) { return b == 0; });
}

status check_desc(const conn_desc& d) {
  if (d.context_id == 0) return EAAS_FAIL(status::invalid_handle, "ibgda connection: context id 0");
  if ((d.qps.empty() && d.target_id != 0) || d.qps.size() > kMaxQpsPerPeer)
    return EAAS_FAIL(status::invalid_handle, "ibgda connection: {} QPs (1 .. {} allowed)", d.qps.size(),
                     kMaxQpsPerPeer);
  if (d.target_qpn > 0xffffffu || (d.target_qpn != 0 && d.target_id == 0))
    return EAAS_FAIL(status::invalid_handle, "ibgda connection: target QPN {:#x} {}", d.target_qpn,
                     d.target_qpn > 0xffffffu ? "(1 .. 0xffffff)" : "in a description addressed to no one");
  if (d.qps.empty()) {
    // An advertisement of an exhausted pool still describes the port.
    peer_qp p{d.layer, d.mtu, d.lid, d.gid, 1, 0};
    EAAS_CHECK(check_peer(p));
  }
  for (std::size_t i = 0; i < d.qps.size(); ++i) {
    EAAS_CHECK(check_peer(d.qp(i)));
    EAAS_CHECK(check_notice(d.qps[i].notice));
    for (std::size_t k = 0; k < i; ++k)
      if (d.qps[k].qpn == d.qps[i].qpn)
        return EAAS_FAIL(status::invalid_handle, "ibgda connection: QPN {:#x} appears twice", d.qps[i].qpn);
  }
  return status::ok;
}

}  // namespace

status check_peer(const peer_qp& p) {
  if (p.layer != link_layer::infiniband && p.layer != link_layer::ethernet)
    return EAAS_FAIL(status::invalid_handle, "ibgda connection: link layer {} (1 InfiniBand or 2 Ethernet)",
                     static_cast<unsigned>(p.layer));
  if (p.mtu < 1 || p.mtu > 5)
    return EAAS_FAIL(status::invalid_handle, "ibgda connection: MTU enum {} (1 = 256 .. 5 = 4096)", p.mtu);
  if (p.layer == link_layer::infiniband && (p.lid == 0 || p.lid > 0xbfff))
    return EAAS_FAIL(status::invalid_handle, "ibgda connection: LID {:#x} is not a unicast LID (0x1 .. 0xbfff)", p.lid);
  if (p.layer == link_layer::ethernet) {
    if (all_zero(p.gid)) return EAAS_FAIL(status::invalid_handle, "ibgda connection: RoCE peer with a zero GID");
    if (p.gid[0] == 0xff)
      return EAAS_FAIL(status::invalid_handle, "ibgda connection: RoCE peer GID is a multicast address");
  }
  if (p.qpn == 0 || p.qpn > 0xffffffu)
    return EAAS_FAIL(status::invalid_handle, "ibgda connection: QPN {:#x} (1 .. 0xffffff)", p.qpn);
  if (p.psn > 0xffffffu) return EAAS_FAIL(status::invalid_handle, "ibgda connection: PSN {:#x} (< 2^24)", p.psn);
  return status::ok;
}

status check_notice(const notice_word& w) {
  if (!w.present()) return status::ok;
  if (w.bytes != kNoticeBytes)
    return EAAS_FAIL(status::invalid_handle, "ibgda connection: close-notice word of {} bytes (want {})", w.bytes,
                     kNoticeBytes);
  if (w.addr == 0 || w.addr % kNoticeBytes != 0 || w.addr + w.bytes < w.addr)
    return EAAS_FAIL(status::invalid_handle,
                     "ibgda connection: close-notice address {:#x} (nonzero, {}-byte aligned, no wrap-around)", w.addr,
                     kNoticeBytes);
  if (w.rkey == 0) return EAAS_FAIL(status::invalid_handle, "ibgda connection: close-notice rkey 0");
  return status::ok;
}

status encode(const conn_desc& d, handle_bytes& out) {
  if (check_desc(d) != status::ok)
    return EAAS_FAIL(status::invalid_argument, "ibgda connection: refusing to encode: {}", last_error());
  try {
    handle_writer w;
    w.u32(kConnFormat);
    w.u64(d.context_id);
    w.u64(d.host_id);
    w.u64(d.target_id);
    w.u32(d.target_qpn);
    w.u8(static_cast<std::uint8_t>(d.layer));
    w.u8(d.mtu);
    w.u16(d.lid);
    w.raw(std::as_bytes(std::span(d.gid)));
    w.u8(static_cast<std::uint8_t>(d.qps.size()));
    for (const qp_wire& q : d.qps) {
      w.u32(q.qpn);
      w.u32(q.psn);
      w.u64(q.notice.addr);
      w.u32(q.notice.rkey);
      w.u32(q.notice.bytes);
    }
    out = w.finish(handle_kind::connection, transport_kind::ibgda);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "ibgda connection: out of memory");
  }
}

status decode(std::span<const std::byte> bytes, conn_desc& out) {
  handle_info info{};
  std::span<const std::byte> payload;
  EAAS_CHECK(decode_handle(bytes, handle_kind::connection, transport_kind::ibgda, info, payload));
  handle_reader r(payload);
  const std::uint32_t format = r.u32();
  if (!r.ok()) return EAAS_FAIL(status::invalid_handle, "ibgda connection: truncated header");
  if (format != kConnFormat)
    return EAAS_FAIL(status::invalid_handle,
                     "ibgda connection: description format {:#x}, this build reads format {} (a peer built before "
                     "close notices, or a newer one)",
                     format, kConnFormat);
  conn_desc d;
  d.context_id = r.u64();
  d.host_id = r.u64();
  d.target_id = r.u64();
  d.target_qpn = r.u32();
  d.layer = static_cast<link_layer>(r.u8());
  d.mtu = r.u8();
  d.lid = r.u16();
  const auto gid = r.raw(d.gid.size());
  const std::uint8_t n = r.u8();
  if (!r.ok()) return EAAS_FAIL(status::invalid_handle, "ibgda connection: truncated header");
  std::copy_n(reinterpret_cast<const std::uint8_t*>(gid.data()), d.gid.size(), d.gid.begin());
  if ((n == 0 && d.target_id != 0) || n > kMaxQpsPerPeer)
    return EAAS_FAIL(status::invalid_handle, "ibgda connection: {} QPs (1 .. {} allowed)", n, kMaxQpsPerPeer);
  try {
    d.qps.resize(n);
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "ibgda connection: out of memory");
  }
  for (auto& q : d.qps) {
    q.qpn = r.u32();
    q.psn = r.u32();
    q.notice.addr = r.u64();
    q.notice.rkey = r.u32();
    q.notice.bytes = r.u32();
  }
  if (!r.ok()) return EAAS_FAIL(status::invalid_handle, "ibgda connection: truncated QP list ({} QPs)", n);
  if (!r.done()) return EAAS_FAIL(status::invalid_handle, "ibgda connection: trailing bytes after the QP list");
  EAAS_CHECK(check_desc(d));
  out = std::move(d);
  return status::ok;
}

status encode(const region_wire& rg, handle_bytes& out) {
  if (rg.size == 0 || rg.addr + rg.size < rg.addr || rg.owner_id == 0)
    return EAAS_FAIL(status::invalid_argument, "ibgda region: refusing to encode [{:#x}, +{}) of owner {:016x}",
                     rg.addr, rg.size, rg.owner_id);
  try {
    handle_writer w;
    w.u64(rg.owner_id);
    w.u64(rg.host_id);
    w.u64(rg.addr);
    w.u64(rg.size);
    w.u32(rg.rkey);
    out = w.finish(handle_kind::region, transport_kind::ibgda);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "ibgda region: out of memory");
  }
}

status decode(std::span<const std::byte> bytes, region_wire& out) {
  handle_info info{};
  std::span<const std::byte> payload;
  EAAS_CHECK(decode_handle(bytes, handle_kind::region, transport_kind::ibgda, info, payload));
  handle_reader r(payload);
  region_wire rg;
  rg.owner_id = r.u64();
  rg.host_id = r.u64();
  rg.addr = r.u64();
  rg.size = r.u64();
  rg.rkey = r.u32();
  if (!r.done()) return EAAS_FAIL(status::invalid_handle, "ibgda region: {} payload bytes (want 36)", payload.size());
  if (rg.owner_id == 0) return EAAS_FAIL(status::invalid_handle, "ibgda region: owner context id 0");
  if (rg.size == 0 || rg.addr + rg.size < rg.addr)
    return EAAS_FAIL(status::invalid_handle, "ibgda region: [{:#x}, +{}) is empty or wraps around", rg.addr, rg.size);
  out = rg;
  return status::ok;
}

}  // namespace eaas::detail::ibgda
