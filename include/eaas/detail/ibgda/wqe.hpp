#pragma once

// WQE builders for the ibgda transport: each writes one send WQE into one 64-byte basic block of
// the SQ ring, in the byte layout rdma-core's mlx5 provider produces (tests/ibgda/test_wqe.cpp
// compares them byte for byte with mlx5dv.h's helpers). Every WQE built here fits one WQEBB, so a
// ring slot is a WQE. A builder writes only the 16-byte segments its `ds` counts (and, for inline
// data, zeroes the padding up to the next 16 bytes); the rest of the block is left as it was.

#include <cstdint>

#include "eaas/common/macros.hpp"
#include "eaas/common/mlx5.hpp"

namespace eaas::detail::ibgda {

/// Payload bytes an inline WRITE can carry in one WQEBB: 64 - ctrl (16) - raddr (16) - header (4).
inline constexpr std::uint32_t kMaxInlineBytes =
    mlx5::kSendWqeBB - sizeof(mlx5::wqe_ctrl_seg) - sizeof(mlx5::wqe_raddr_seg) - sizeof(mlx5::wqe_inl_data_seg);
static_assert(kMaxInlineBytes == 28);

/// Fence requested on a WQE (the NIC waits before executing it).
enum class fence_mode : std::uint8_t {
  none = 0,
  small = mlx5::kCtrlFenceSmall,  ///< initiator small fence
  full = mlx5::kCtrlFence,        ///< wait until every earlier RDMA READ / atomic has completed
};

/// The ctrl segment's fm_ce_se byte for a WQE that requests a CQE (or not) with a fence mode.
EAAS_HOST_DEVICE constexpr std::uint8_t ctrl_flags(bool completion, fence_mode f = fence_mode::none) {
  return static_cast<std::uint8_t>((completion ? mlx5::kCtrlCqUpdate : 0u) | static_cast<std::uint8_t>(f));
}

EAAS_HOST_DEVICE void set_ctrl(mlx5::wqe_ctrl_seg* c, std::uint16_t wqe_index, mlx5::opcode op, std::uint8_t opmod,
                               std::uint32_t qpn, std::uint8_t fm_ce_se, std::uint8_t ds, std::uint32_t imm_be = 0) {
  c->opmod_idx_opcode_be = mlx5::to_be32(static_cast<std::uint32_t>(opmod) << 24 |
                                         static_cast<std::uint32_t>(wqe_index) << 8 | static_cast<std::uint8_t>(op));
  c->qpn_ds_be = mlx5::to_be32(qpn << 8 | ds);
  c->signature = 0;
  c->dci_stream_channel_id_be[0] = 0;
  c->dci_stream_channel_id_be[1] = 0;
  c->fm_ce_se = fm_ce_se;
  c->imm_be = imm_be;
}

EAAS_HOST_DEVICE void set_raddr(mlx5::wqe_raddr_seg* r, std::uint64_t raddr, std::uint32_t rkey) {
  r->raddr_be = mlx5::to_be64(raddr);
  r->rkey_be = mlx5::to_be32(rkey);
  r->reserved = 0;
}

EAAS_HOST_DEVICE void set_data(mlx5::wqe_data_seg* d, std::uint32_t bytes, std::uint32_t lkey, std::uint64_t addr) {
  d->byte_count_be = mlx5::to_be32(bytes);
  d->lkey_be = mlx5::to_be32(lkey);
  d->addr_be = mlx5::to_be64(addr);
}

EAAS_HOST_DEVICE void set_atomic(mlx5::wqe_atomic_seg* a, std::uint64_t swap_add, std::uint64_t compare) {
  a->swap_add_be = mlx5::to_be64(swap_add);
  a->compare_be = mlx5::to_be64(compare);
}

namespace wqe_detail {
template <class Seg>
EAAS_HOST_DEVICE Seg* seg_at(mlx5::send_wqebb* slot, unsigned offset) {
  return reinterpret_cast<Seg*>(slot->bytes + offset);
}
}  // namespace wqe_detail

/// RDMA WRITE of `bytes` from local [laddr, lkey] to remote [raddr, rkey]: ctrl + raddr + data (ds 3);
/// a zero-byte write carries no data segment (ds 2), as rdma-core skips empty scatter entries.
EAAS_HOST_DEVICE void build_rdma_write(mlx5::send_wqebb* slot, std::uint16_t wqe_index, std::uint32_t qpn,
                                       std::uint8_t fm_ce_se, std::uint64_t raddr, std::uint32_t rkey,
                                       std::uint64_t laddr, std::uint32_t lkey, std::uint32_t bytes) {
  using namespace wqe_detail;
  set_ctrl(seg_at<mlx5::wqe_ctrl_seg>(slot, 0), wqe_index, mlx5::opcode::rdma_write, 0, qpn, fm_ce_se,
           bytes != 0 ? 3 : 2);
  set_raddr(seg_at<mlx5::wqe_raddr_seg>(slot, 16), raddr, rkey);
  if (bytes != 0) set_data(seg_at<mlx5::wqe_data_seg>(slot, 32), bytes, lkey, laddr);
}

/// RDMA READ of `bytes` from remote [raddr, rkey] into local [laddr, lkey] (ds 3; 2 when empty).
EAAS_HOST_DEVICE void build_rdma_read(mlx5::send_wqebb* slot, std::uint16_t wqe_index, std::uint32_t qpn,
                                      std::uint8_t fm_ce_se, std::uint64_t raddr, std::uint32_t rkey,
                                      std::uint64_t laddr, std::uint32_t lkey, std::uint32_t bytes) {
  using namespace wqe_detail;
  set_ctrl(seg_at<mlx5::wqe_ctrl_seg>(slot, 0), wqe_index, mlx5::opcode::rdma_read, 0, qpn, fm_ce_se,
           bytes != 0 ? 3 : 2);
  set_raddr(seg_at<mlx5::wqe_raddr_seg>(slot, 16), raddr, rkey);
  if (bytes != 0) set_data(seg_at<mlx5::wqe_data_seg>(slot, 32), bytes, lkey, laddr);
}

/// RDMA WRITE whose payload (`bytes` <= kMaxInlineBytes, from `src`) travels inside the WQE: the
/// source may be reused at once and needs no lkey. ds = 3 for up to 12 bytes, else 4.
EAAS_HOST_DEVICE void build_rdma_write_inline(mlx5::send_wqebb* slot, std::uint16_t wqe_index, std::uint32_t qpn,
                                              std::uint8_t fm_ce_se, std::uint64_t raddr, std::uint32_t rkey,
                                              const void* src, std::uint32_t bytes) {
  using namespace wqe_detail;
  const std::uint32_t used = 32 + sizeof(mlx5::wqe_inl_data_seg) + bytes;
  const std::uint32_t ds = (used + mlx5::kSegUnit - 1) / mlx5::kSegUnit;
  set_ctrl(seg_at<mlx5::wqe_ctrl_seg>(slot, 0), wqe_index, mlx5::opcode::rdma_write, 0, qpn, fm_ce_se,
           static_cast<std::uint8_t>(ds));
  set_raddr(seg_at<mlx5::wqe_raddr_seg>(slot, 16), raddr, rkey);
  seg_at<mlx5::wqe_inl_data_seg>(slot, 32)->byte_count_be = mlx5::to_be32(bytes | mlx5::kInlineSeg);
  const auto* s = static_cast<const std::uint8_t*>(src);
  std::uint8_t* d = slot->bytes + 36;
  for (std::uint32_t i = 0; i < bytes; ++i) d[i] = s[i];
  for (std::uint32_t i = used; i < ds * mlx5::kSegUnit; ++i) slot->bytes[i] = 0;  // padding: deterministic bytes
}

/// 64-bit fetch-and-add of `add` on the remote word [raddr, rkey] (8-byte aligned); the previous value
/// lands at local [laddr, lkey] (8 bytes). ctrl + raddr + atomic + data (ds 4).
EAAS_HOST_DEVICE void build_atomic_fetch_add(mlx5::send_wqebb* slot, std::uint16_t wqe_index, std::uint32_t qpn,
                                             std::uint8_t fm_ce_se, std::uint64_t raddr, std::uint32_t rkey,
                                             std::uint64_t add, std::uint64_t laddr, std::uint32_t lkey) {
  using namespace wqe_detail;
  set_ctrl(seg_at<mlx5::wqe_ctrl_seg>(slot, 0), wqe_index, mlx5::opcode::atomic_fa, 0, qpn, fm_ce_se, 4);
  set_raddr(seg_at<mlx5::wqe_raddr_seg>(slot, 16), raddr, rkey);
  set_atomic(seg_at<mlx5::wqe_atomic_seg>(slot, 32), add, 0);
  set_data(seg_at<mlx5::wqe_data_seg>(slot, 48), 8, lkey, laddr);
}

/// 64-bit compare-and-swap on the remote word: if it equals `compare` it becomes `swap`; the previous
/// value lands at local [laddr, lkey]. ctrl + raddr + atomic + data (ds 4).
EAAS_HOST_DEVICE void build_atomic_compare_swap(mlx5::send_wqebb* slot, std::uint16_t wqe_index, std::uint32_t qpn,
                                                std::uint8_t fm_ce_se, std::uint64_t raddr, std::uint32_t rkey,
                                                std::uint64_t compare, std::uint64_t swap, std::uint64_t laddr,
                                                std::uint32_t lkey) {
  using namespace wqe_detail;
  set_ctrl(seg_at<mlx5::wqe_ctrl_seg>(slot, 0), wqe_index, mlx5::opcode::atomic_cs, 0, qpn, fm_ce_se, 4);
  set_raddr(seg_at<mlx5::wqe_raddr_seg>(slot, 16), raddr, rkey);
  set_atomic(seg_at<mlx5::wqe_atomic_seg>(slot, 32), swap, compare);
  set_data(seg_at<mlx5::wqe_data_seg>(slot, 48), 8, lkey, laddr);
}

/// A WQE that does nothing but complete (ds 1): carries a completion request or a fence.
EAAS_HOST_DEVICE void build_nop(mlx5::send_wqebb* slot, std::uint16_t wqe_index, std::uint32_t qpn,
                                std::uint8_t fm_ce_se) {
  set_ctrl(wqe_detail::seg_at<mlx5::wqe_ctrl_seg>(slot, 0), wqe_index, mlx5::opcode::nop, 0, qpn, fm_ce_se, 1);
}

/// The 8 bytes that ring the doorbell for a WQE: the first 8 bytes of its ctrl segment, as one word
/// (in memory order, so an 8-byte store of this value writes exactly those bytes).
EAAS_HOST_DEVICE std::uint64_t doorbell_word(const mlx5::send_wqebb* slot) {
  const auto* c = reinterpret_cast<const mlx5::wqe_ctrl_seg*>(slot->bytes);
  return static_cast<std::uint64_t>(c->opmod_idx_opcode_be) | static_cast<std::uint64_t>(c->qpn_ds_be) << 32;
}

}  // namespace eaas::detail::ibgda
