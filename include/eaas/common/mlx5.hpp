#pragma once

/// Hardware layouts of the mlx5 send queue and completion queue (ConnectX-5 and later), as the NIC
/// reads and writes them. Our own trivially copyable structs: the device code builds work requests
/// with them and the host side sizes rings with them, without including rdma-core. The tests check
/// every size and offset against rdma-core's `infiniband/mlx5dv.h`, the authoritative layout.
///
/// Multi-byte fields that the NIC interprets are big-endian in memory; their names end in `_be` and
/// hold the already swapped value (write `to_be32(x)`, read `from_be32(f)`).

#include <bit>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "eaas/common/macros.hpp"

namespace eaas::mlx5 {

static_assert(std::endian::native == std::endian::little,
              "the big-endian helpers below assume a little-endian host (x86-64, aarch64, and every CUDA GPU)");

// ------------------------------------------------------------------------------------------------
// Byte order. Shifts and masks rather than compiler builtins: the same constexpr code on the host
// and the device (nvcc turns it into one PRMT, g++ into one BSWAP).
// ------------------------------------------------------------------------------------------------

/// Reverses the bytes of a 16-bit value.
EAAS_HOST_DEVICE constexpr std::uint16_t byte_swap16(std::uint16_t v) {
  return static_cast<std::uint16_t>((v >> 8) | (v << 8));
}
/// Reverses the bytes of a 32-bit value.
EAAS_HOST_DEVICE constexpr std::uint32_t byte_swap32(std::uint32_t v) {
  return (v >> 24) | ((v >> 8) & 0x0000ff00u) | ((v << 8) & 0x00ff0000u) | (v << 24);
}
/// Reverses the bytes of a 64-bit value.
EAAS_HOST_DEVICE constexpr std::uint64_t byte_swap64(std::uint64_t v) {
  return (static_cast<std::uint64_t>(byte_swap32(static_cast<std::uint32_t>(v))) << 32) |
         byte_swap32(static_cast<std::uint32_t>(v >> 32));
}
/// Host (little-endian) value → the big-endian representation the NIC expects, and back.
EAAS_HOST_DEVICE constexpr std::uint16_t to_be16(std::uint16_t v) { return byte_swap16(v); }
EAAS_HOST_DEVICE constexpr std::uint32_t to_be32(std::uint32_t v) { return byte_swap32(v); }
EAAS_HOST_DEVICE constexpr std::uint64_t to_be64(std::uint64_t v) { return byte_swap64(v); }
EAAS_HOST_DEVICE constexpr std::uint16_t from_be16(std::uint16_t v) { return byte_swap16(v); }
EAAS_HOST_DEVICE constexpr std::uint32_t from_be32(std::uint32_t v) { return byte_swap32(v); }
EAAS_HOST_DEVICE constexpr std::uint64_t from_be64(std::uint64_t v) { return byte_swap64(v); }

static_assert(byte_swap16(0x1234u) == 0x3412u);
static_assert(byte_swap32(0x11223344u) == 0x44332211u);
static_assert(byte_swap64(0x0102030405060708ull) == 0x0807060504030201ull);

// ------------------------------------------------------------------------------------------------
// Constants.
// ------------------------------------------------------------------------------------------------

/// A send WQE is made of 64-byte basic blocks; the SQ ring is indexed in these units.
inline constexpr std::uint32_t kSendWqeBB = 64;
inline constexpr std::uint32_t kSendWqeShift = 6;
/// One WQE data/address segment is 16 bytes; a ctrl segment's `ds` counts these units.
inline constexpr std::uint32_t kSegUnit = 16;
/// Set in an inline-data header's byte count: the payload follows the header inside the WQE.
inline constexpr std::uint32_t kInlineSeg = 0x80000000u;
/// An lkey that ends a scatter list.
inline constexpr std::uint32_t kInvalidLkey = 0x100;
/// Index of the send-queue word in a QP's two-word doorbell record (word 0 belongs to the receive queue).
inline constexpr std::uint32_t kSendDbr = 1;
/// The largest byte count one data segment may carry (the top bit is the inline flag).
inline constexpr std::uint32_t kMaxSegBytes = 0x7fffffffu;

/// Send opcodes (low byte of the ctrl segment's first word).
enum class opcode : std::uint8_t {
  nop = 0x00,
  rdma_write = 0x08,
  rdma_write_imm = 0x09,
  send = 0x0a,
  send_imm = 0x0b,
  rdma_read = 0x10,
  atomic_cs = 0x11,         ///< 64-bit compare-and-swap
  atomic_fa = 0x12,         ///< 64-bit fetch-and-add
  atomic_masked_cs = 0x14,  ///< extended (masked, 4/8-byte) compare-and-swap
  atomic_masked_fa = 0x15,  ///< extended (masked, 4/8-byte) fetch-and-add
  local_inval = 0x1b,
  umr = 0x25,
};

/// Bits of the ctrl segment's `fm_ce_se` byte.
inline constexpr std::uint8_t kCtrlSolicited = 0x02;   ///< solicited event
inline constexpr std::uint8_t kCtrlCqUpdate = 0x08;    ///< write a CQE when this WQE completes
inline constexpr std::uint8_t kCtrlFenceSmall = 0x20;  ///< initiator small fence (fence mode 1)
inline constexpr std::uint8_t kCtrlFence = 0x80;       ///< fence (mode 4): wait for earlier reads/atomics
inline constexpr std::uint8_t kCtrlFenceModeMask = 0xe0;

/// CQE opcodes (high nibble of `op_own`).
enum class cqe_opcode : std::uint8_t {
  req = 0,  ///< a send-queue WQE completed
  resp_wr_imm = 1,
  resp_send = 2,
  resp_send_imm = 3,
  resp_send_inv = 4,
  resize_cq = 5,
  sig_err = 12,
  req_err = 13,   ///< a send-queue WQE failed (or was flushed): see the syndrome
  resp_err = 14,  ///< a receive failed
  invalid = 15,   ///< never written by the NIC: the initial value software puts in every CQE
};

/// Syndromes of an error CQE.
enum class cqe_syndrome : std::uint8_t {
  local_length = 0x01,
  local_qp_op = 0x02,
  local_prot = 0x04,  ///< bad lkey or local bounds
  wr_flush = 0x05,    ///< flushed: an earlier WQE failed and the QP is in error
  mw_bind = 0x06,
  bad_resp = 0x10,
  local_access = 0x11,
  remote_inval_req = 0x12,
  remote_access = 0x13,  ///< bad rkey, remote bounds or permissions
  remote_op = 0x14,
  transport_retry_exc = 0x15,  ///< no ack after every retry: the peer is dead or unreachable
  rnr_retry_exc = 0x16,
  remote_aborted = 0x22,
};

// ------------------------------------------------------------------------------------------------
// WQE segments.
// ------------------------------------------------------------------------------------------------

/// First segment of every send WQE (16 bytes).
struct wqe_ctrl_seg {
  std::uint32_t opmod_idx_opcode_be;  ///< opmod << 24 | wqe index (16 bits) << 8 | opcode
  std::uint32_t qpn_ds_be;            ///< qp number << 8 | ds (WQE size in 16-byte units, ctrl included)
  std::uint8_t signature;
  std::uint8_t dci_stream_channel_id_be[2];  ///< a big-endian 16-bit field at an odd offset (kept as bytes)
  std::uint8_t fm_ce_se;                     ///< fence mode, completion request, solicited event
  std::uint32_t imm_be;                      ///< immediate data (WRITE_IMM / SEND_IMM), else 0
};

/// Remote address segment of RDMA and atomic WQEs (16 bytes).
struct wqe_raddr_seg {
  std::uint64_t raddr_be;
  std::uint32_t rkey_be;
  std::uint32_t reserved;
};

/// A pointer segment into registered local memory (16 bytes).
struct wqe_data_seg {
  std::uint32_t byte_count_be;
  std::uint32_t lkey_be;
  std::uint64_t addr_be;
};

/// Header of inline data (4 bytes): `byte_count_be` = to_be32(bytes | kInlineSeg); the payload
/// follows, and the segment is padded to a multiple of 16 bytes.
struct wqe_inl_data_seg {
  std::uint32_t byte_count_be;
};

/// Operands of a standard 64-bit atomic (16 bytes): compare-and-swap uses both words, fetch-and-add
/// puts the addend in `swap_add_be`.
struct wqe_atomic_seg {
  std::uint64_t swap_add_be;
  std::uint64_t compare_be;
};

/// One send-queue basic block: the unit of the SQ ring.
struct alignas(64) send_wqebb {
  std::uint8_t bytes[kSendWqeBB];
};

// ------------------------------------------------------------------------------------------------
// CQEs.
// ------------------------------------------------------------------------------------------------

/// A 64-byte completion entry (the fields a requester reads). The last four bytes (`wqe_counter`,
/// `signature`, `op_own`) are written last by the NIC; read them as one 32-bit word (see
/// `kCqeTailOffset`) to get a counter and an opcode that belong together.
struct cqe64 {
  std::uint8_t rsvd0[32];
  std::uint32_t srqn_uidx_be;
  std::uint32_t imm_inval_pkey_be;
  std::uint8_t app;
  std::uint8_t app_op;
  std::uint16_t app_info_be;
  std::uint32_t byte_cnt_be;      ///< bytes transferred (reads, atomics: 8)
  std::uint64_t timestamp_be;     ///< in an error CQE, bytes 6 and 7 hold vendor_err_synd and syndrome
  std::uint32_t sop_drop_qpn_be;  ///< low 24 bits: the QP number
  std::uint16_t wqe_counter_be;   ///< the index (16 bits) of the WQE this CQE reports
  std::uint8_t signature;
  std::uint8_t op_own;  ///< opcode << 4 | format << 2 | solicited << 1 | owner
};

/// The same 64 bytes as the NIC lays them out for `req_err` / `resp_err`.
struct err_cqe64 {
  std::uint8_t rsvd0[32];
  std::uint32_t srqn_be;
  std::uint8_t rsvd1[18];
  std::uint8_t vendor_err_synd;
  std::uint8_t syndrome;              ///< a cqe_syndrome
  std::uint32_t s_wqe_opcode_qpn_be;  ///< failed WQE's opcode << 24 | QP number
  std::uint16_t wqe_counter_be;
  std::uint8_t signature;
  std::uint8_t op_own;
};

/// Byte offset of the 32-bit word { wqe_counter_be, signature, op_own } in a CQE, and of the 32-bit
/// word whose last byte is an error CQE's syndrome.
inline constexpr std::size_t kCqeTailOffset = 60;
inline constexpr std::size_t kCqeSyndromeWordOffset = 52;

EAAS_HOST_DEVICE constexpr cqe_opcode cqe_op(std::uint8_t op_own) { return static_cast<cqe_opcode>(op_own >> 4); }
EAAS_HOST_DEVICE constexpr std::uint8_t cqe_owner(std::uint8_t op_own) { return op_own & 1u; }
EAAS_HOST_DEVICE constexpr std::uint8_t cqe_solicited(std::uint8_t op_own) { return (op_own >> 1) & 1u; }
EAAS_HOST_DEVICE constexpr std::uint8_t cqe_format(std::uint8_t op_own) { return (op_own >> 2) & 3u; }

/// The tail word (as loaded from memory on a little-endian machine) split into its fields.
EAAS_HOST_DEVICE constexpr std::uint16_t tail_wqe_counter(std::uint32_t tail) {
  return from_be16(static_cast<std::uint16_t>(tail & 0xffffu));
}
EAAS_HOST_DEVICE constexpr std::uint8_t tail_op_own(std::uint32_t tail) {
  return static_cast<std::uint8_t>(tail >> 24);
}
/// The syndrome from the word at kCqeSyndromeWordOffset (its highest-addressed byte).
EAAS_HOST_DEVICE constexpr std::uint8_t word_syndrome(std::uint32_t w) { return static_cast<std::uint8_t>(w >> 24); }
/// The vendor syndrome from the same word (the byte before the syndrome).
EAAS_HOST_DEVICE constexpr std::uint8_t word_vendor_syndrome(std::uint32_t w) {
  return static_cast<std::uint8_t>(w >> 16);
}

// ------------------------------------------------------------------------------------------------
// Layout: what the NIC reads is exactly these bytes.
// ------------------------------------------------------------------------------------------------

static_assert(std::is_trivially_copyable_v<wqe_ctrl_seg> && std::is_standard_layout_v<wqe_ctrl_seg>);
static_assert(sizeof(wqe_ctrl_seg) == 16 && alignof(wqe_ctrl_seg) == 4);
static_assert(offsetof(wqe_ctrl_seg, opmod_idx_opcode_be) == 0 && offsetof(wqe_ctrl_seg, qpn_ds_be) == 4);
static_assert(offsetof(wqe_ctrl_seg, signature) == 8 && offsetof(wqe_ctrl_seg, dci_stream_channel_id_be) == 9);
static_assert(offsetof(wqe_ctrl_seg, fm_ce_se) == 11 && offsetof(wqe_ctrl_seg, imm_be) == 12);

static_assert(std::is_trivially_copyable_v<wqe_raddr_seg> && std::is_standard_layout_v<wqe_raddr_seg>);
static_assert(sizeof(wqe_raddr_seg) == 16 && alignof(wqe_raddr_seg) == 8);
static_assert(offsetof(wqe_raddr_seg, raddr_be) == 0 && offsetof(wqe_raddr_seg, rkey_be) == 8);
static_assert(offsetof(wqe_raddr_seg, reserved) == 12);

static_assert(std::is_trivially_copyable_v<wqe_data_seg> && std::is_standard_layout_v<wqe_data_seg>);
static_assert(sizeof(wqe_data_seg) == 16 && alignof(wqe_data_seg) == 8);
static_assert(offsetof(wqe_data_seg, byte_count_be) == 0 && offsetof(wqe_data_seg, lkey_be) == 4);
static_assert(offsetof(wqe_data_seg, addr_be) == 8);

static_assert(std::is_trivially_copyable_v<wqe_inl_data_seg>);
static_assert(sizeof(wqe_inl_data_seg) == 4 && alignof(wqe_inl_data_seg) == 4);

static_assert(std::is_trivially_copyable_v<wqe_atomic_seg> && std::is_standard_layout_v<wqe_atomic_seg>);
static_assert(sizeof(wqe_atomic_seg) == 16 && alignof(wqe_atomic_seg) == 8);
static_assert(offsetof(wqe_atomic_seg, swap_add_be) == 0 && offsetof(wqe_atomic_seg, compare_be) == 8);

static_assert(std::is_trivially_copyable_v<send_wqebb>);
static_assert(sizeof(send_wqebb) == kSendWqeBB && alignof(send_wqebb) == 64);
static_assert((1u << kSendWqeShift) == kSendWqeBB);

static_assert(std::is_trivially_copyable_v<cqe64> && std::is_standard_layout_v<cqe64>);
static_assert(sizeof(cqe64) == 64 && alignof(cqe64) == 8);
static_assert(offsetof(cqe64, srqn_uidx_be) == 32 && offsetof(cqe64, imm_inval_pkey_be) == 36);
static_assert(offsetof(cqe64, app) == 40 && offsetof(cqe64, app_op) == 41 && offsetof(cqe64, app_info_be) == 42);
static_assert(offsetof(cqe64, byte_cnt_be) == 44 && offsetof(cqe64, timestamp_be) == 48);
static_assert(offsetof(cqe64, sop_drop_qpn_be) == 56 && offsetof(cqe64, wqe_counter_be) == 60);
static_assert(offsetof(cqe64, signature) == 62 && offsetof(cqe64, op_own) == 63);
static_assert(offsetof(cqe64, wqe_counter_be) == kCqeTailOffset);

static_assert(std::is_trivially_copyable_v<err_cqe64> && std::is_standard_layout_v<err_cqe64>);
static_assert(sizeof(err_cqe64) == 64 && alignof(err_cqe64) == 4);
static_assert(offsetof(err_cqe64, srqn_be) == 32 && offsetof(err_cqe64, rsvd1) == 36);
static_assert(offsetof(err_cqe64, vendor_err_synd) == 54 && offsetof(err_cqe64, syndrome) == 55);
static_assert(offsetof(err_cqe64, s_wqe_opcode_qpn_be) == 56 && offsetof(err_cqe64, wqe_counter_be) == 60);
static_assert(offsetof(err_cqe64, signature) == 62 && offsetof(err_cqe64, op_own) == 63);
static_assert(offsetof(err_cqe64, syndrome) == kCqeSyndromeWordOffset + 3);

}  // namespace eaas::mlx5
