#pragma once

// The mlx5 PRM (programmer's reference manual) command layouts the ibgda host side sends through
// DEVX (mlx5dv_devx_obj_create / _modify). rdma-core installs no mlx5_ifc.h, so these are our own:
// each command is a fixed-size byte block, and each field we use is a (bit offset, width) pair in
// the PRM's convention — bit 0 is the most significant bit of the first big-endian 32-bit word, so
// a field at bit `b` of width `w` (w <= 32, not crossing a word) occupies bits
// [31 - (b % 32) - w + 1, 31 - (b % 32)] of big-endian word b / 32. 64-bit fields are two whole
// words (high first); byte arrays (GIDs, MACs) are copied as bytes at b / 8.
//
// Offsets were read from the public PRM-derived headers (Linux / rdma-core mlx5_ifc.h and the
// layouts NVSHMEM / DOCA use) and cross-checked between them; they are restated here as numbers.
// The static_asserts below pin: every field inside its block, 32-bit fields not crossing a word,
// sub-structures (QP context, CQ context, address path) at their place inside the commands, and the
// fields each command sets pairwise disjoint.

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>

namespace eaas::detail::ibgda::prm {

/// A field of a PRM block: bit offset (PRM convention, see above) and width in bits.
struct field {
  std::uint32_t bit;
  std::uint32_t width;
};

/// `f` of a sub-structure that starts at bit `base` of the enclosing block.
constexpr field at(std::uint32_t base, field f) { return field{base + f.bit, f.width}; }

/// True when `f` lies inside a block of `bytes` bytes and is encodable: 1..32 bits within one
/// 32-bit word, or 64 bits starting on a word.
constexpr bool valid(field f, std::size_t bytes) {
  if (f.width == 0 || f.bit + f.width > bytes * 8) return false;
  if (f.width == 64) return f.bit % 32 == 0;
  return f.width <= 32 && f.bit % 32 + f.width <= 32;
}

/// True when no two fields of the list share a bit.
constexpr bool disjoint(std::initializer_list<field> fs) {
  for (const field* a = fs.begin(); a != fs.end(); ++a)
    for (const field* b = a + 1; b != fs.end(); ++b)
      if (a->bit < b->bit + b->width && b->bit < a->bit + a->width) return false;
  return true;
}

/// Writes `v` into `f` of `block` (bits of `v` above the width are dropped).
inline void set(std::span<std::byte> block, field f, std::uint64_t v) {
  auto put_word_bits = [&](std::uint32_t bit, std::uint32_t width, std::uint32_t value) {
    const std::size_t w = bit / 32;
    const std::uint32_t shift = 32 - bit % 32 - width;
    const std::uint32_t mask = (width == 32 ? ~0u : ((1u << width) - 1u)) << shift;
    std::uint32_t word = 0;
    for (int i = 0; i < 4; ++i) word = word << 8 | static_cast<std::uint8_t>(block[w * 4 + i]);
    word = (word & ~mask) | ((value << shift) & mask);
    for (int i = 0; i < 4; ++i) block[w * 4 + i] = static_cast<std::byte>(word >> (24 - 8 * i));
  };
  if (f.width == 64) {
    put_word_bits(f.bit, 32, static_cast<std::uint32_t>(v >> 32));
    put_word_bits(f.bit + 32, 32, static_cast<std::uint32_t>(v));
  } else {
    put_word_bits(f.bit, f.width, static_cast<std::uint32_t>(v));
  }
}

/// Reads `f` of `block`.
inline std::uint64_t get(std::span<const std::byte> block, field f) {
  auto word_bits = [&](std::uint32_t bit, std::uint32_t width) -> std::uint32_t {
    const std::size_t w = bit / 32;
    std::uint32_t word = 0;
    for (int i = 0; i < 4; ++i) word = word << 8 | static_cast<std::uint8_t>(block[w * 4 + i]);
    const std::uint32_t shift = 32 - bit % 32 - width;
    return width == 32 ? word : (word >> shift) & ((1u << width) - 1u);
  };
  if (f.width == 64) return static_cast<std::uint64_t>(word_bits(f.bit, 32)) << 32 | word_bits(f.bit + 32, 32);
  return word_bits(f.bit, f.width);
}

/// Copies `bytes` to the byte-aligned field starting at bit `bit`.
inline void set_bytes(std::span<std::byte> block, std::uint32_t bit, std::span<const std::uint8_t> bytes) {
  for (std::size_t i = 0; i < bytes.size(); ++i) block[bit / 8 + i] = static_cast<std::byte>(bytes[i]);
}

// ---------------------------------------------------------------------------------------------
// Command opcodes and values.

inline constexpr std::uint16_t kCreateCq = 0x400;
inline constexpr std::uint16_t kCreateQp = 0x500;
inline constexpr std::uint16_t kRst2InitQp = 0x502;
inline constexpr std::uint16_t kInit2RtrQp = 0x503;
inline constexpr std::uint16_t kRtr2RtsQp = 0x504;
inline constexpr std::uint16_t k2ErrQp = 0x507;
inline constexpr std::uint16_t k2RstQp = 0x50a;

inline constexpr std::uint32_t kQpcStRc = 0x0;              ///< qpc.st: reliable connected
inline constexpr std::uint32_t kQpcPmStateMigrated = 0x3;   ///< qpc.pm_state: no path migration
inline constexpr std::uint32_t kQpcRqTypeZeroSize = 0x3;    ///< qpc.rq_type: no receive queue
inline constexpr std::uint32_t kQpcAtomicModeUpTo64 = 0x3;  ///< qpc.atomic_mode: 8-byte atomics
inline constexpr std::uint32_t kCqeSize64 = 0x0;            ///< cqc.cqe_sz: 64-byte CQEs
inline constexpr std::uint32_t kLogMsgMax = 30;             ///< qpc.log_msg_max: 1 GiB, the RC limit

// ---------------------------------------------------------------------------------------------
// Every command: a 16-bit opcode first; every answer: an 8-bit status and a 32-bit syndrome.

namespace cmd {
inline constexpr field opcode{0x00, 16};
inline constexpr field uid{0x10, 16};
inline constexpr field op_mod{0x30, 16};
inline constexpr field out_status{0x00, 8};
inline constexpr field out_syndrome{0x20, 32};
}  // namespace cmd

// ---------------------------------------------------------------------------------------------
// Address path (ads), 0x160 bits; offsets relative to its start.

namespace ads {
inline constexpr std::uint32_t kBits = 0x160;
inline constexpr field fl{0x00, 1};
inline constexpr field pkey_index{0x10, 16};
inline constexpr field grh{0x28, 1};
inline constexpr field mlid{0x29, 7};
inline constexpr field rlid{0x30, 16};
inline constexpr field ack_timeout{0x40, 5};
inline constexpr field src_addr_index{0x48, 8};
inline constexpr field stat_rate{0x54, 4};
inline constexpr field hop_limit{0x58, 8};
inline constexpr field tclass{0x64, 8};
inline constexpr field flow_label{0x6c, 20};
inline constexpr std::uint32_t kRgidBit = 0x80;  ///< rgid_rip: 16 bytes
inline constexpr field dscp{0x10a, 6};
inline constexpr field udp_sport{0x110, 16};
inline constexpr field eth_prio{0x121, 3};
inline constexpr field sl{0x124, 4};
inline constexpr field vhca_port_num{0x128, 8};
inline constexpr std::uint32_t kRmacBit = 0x130;  ///< rmac_47_32 then rmac_31_0: 6 bytes
}  // namespace ads

// ---------------------------------------------------------------------------------------------
// QP context (qpc), 0x740 bits; offsets relative to its start.

namespace qpc {
inline constexpr std::uint32_t kBits = 0x740;
inline constexpr field state{0x00, 4};
inline constexpr field st{0x08, 8};
inline constexpr field pm_state{0x13, 2};
inline constexpr field pd{0x28, 24};
inline constexpr field mtu{0x40, 3};
inline constexpr field log_msg_max{0x43, 5};
inline constexpr field log_rq_size{0x49, 4};
inline constexpr field log_rq_stride{0x4d, 3};
inline constexpr field no_sq{0x50, 1};
inline constexpr field log_sq_size{0x51, 4};
inline constexpr field counter_set_id{0x60, 8};
inline constexpr field uar_page{0x68, 24};
inline constexpr field user_index{0x88, 24};
inline constexpr field log_page_size{0xa3, 5};
inline constexpr field remote_qpn{0xa8, 24};
inline constexpr std::uint32_t kPrimaryPath = 0xc0;     ///< primary_address_path (ads)
inline constexpr std::uint32_t kSecondaryPath = 0x220;  ///< secondary_address_path (ads), unused
inline constexpr field log_ack_req_freq{0x380, 4};
inline constexpr field log_sra_max{0x388, 3};
inline constexpr field retry_count{0x38d, 3};
inline constexpr field rnr_retry{0x390, 3};
inline constexpr field next_send_psn{0x3c8, 24};
inline constexpr field cqn_snd{0x3e8, 24};
inline constexpr field log_rra_max{0x488, 3};
inline constexpr field atomic_mode{0x48c, 4};
inline constexpr field rre{0x490, 1};
inline constexpr field rwe{0x491, 1};
inline constexpr field rae{0x492, 1};
inline constexpr field page_offset{0x494, 6};
inline constexpr field min_rnr_nak{0x4a3, 5};
inline constexpr field next_rcv_psn{0x4a8, 24};
inline constexpr field cqn_rcv{0x4e8, 24};
inline constexpr field dbr_addr{0x500, 64};  ///< with dbr_umem_valid: byte offset into dbr_umem_id
inline constexpr field rq_type{0x565, 3};
inline constexpr field srqn_rmpn_xrqn{0x568, 24};
inline constexpr field dbr_umem_valid{0x683, 1};
inline constexpr field dbr_umem_id{0x720, 32};
}  // namespace qpc

// ---------------------------------------------------------------------------------------------
// CQ context (cqc), 0x200 bits; offsets relative to its start.

namespace cqc {
inline constexpr std::uint32_t kBits = 0x200;
inline constexpr field dbr_umem_valid{0x06, 1};
inline constexpr field cqe_sz{0x08, 3};
inline constexpr field cc{0x0b, 1};  ///< collapsed: the NIC writes every CQE into entry 0
inline constexpr field oi{0x0e, 1};  ///< overrun ignore
inline constexpr field dbr_umem_id{0x20, 32};
inline constexpr field page_offset{0x54, 6};
inline constexpr field log_cq_size{0x63, 5};
inline constexpr field uar_page{0x68, 24};
inline constexpr field c_eqn{0xb8, 8};
inline constexpr field log_page_size{0xc3, 5};
inline constexpr field dbr_addr{0x1c0, 64};  ///< with dbr_umem_valid: byte offset into dbr_umem_id
}  // namespace cqc

// ---------------------------------------------------------------------------------------------
// The commands. Each is a fixed-size block; its fields are absolute bit offsets in it.

/// CREATE_CQ input: header, reserved, CQ context at 0x80, the CQ buffer's umem at 0x280.
struct create_cq_in {
  static constexpr std::uint32_t kCqc = 0x80;
  static constexpr field cq_umem_offset{0x280, 64};
  static constexpr field cq_umem_id{0x2c0, 32};
  static constexpr field cq_umem_valid{0x2e0, 1};
  std::array<std::byte, 0x880 / 8> bytes{};
};
/// CREATE_CQ output: status, syndrome, the CQ number.
struct create_cq_out {
  static constexpr field cqn{0x48, 24};
  std::array<std::byte, 0x80 / 8> bytes{};
};

/// CREATE_QP input: header, opt_param_mask, QP context at 0xc0, the WQ buffer's umem at 0x800.
struct create_qp_in {
  static constexpr field opt_param_mask{0x80, 32};
  static constexpr std::uint32_t kQpc = 0xc0;
  static constexpr field wq_umem_offset{0x800, 64};
  static constexpr field wq_umem_id{0x840, 32};
  static constexpr field wq_umem_valid{0x860, 1};
  std::array<std::byte, 0x880 / 8> bytes{};
};
/// CREATE_QP output: status, syndrome, the QP number.
struct create_qp_out {
  static constexpr field qpn{0x48, 24};
  std::array<std::byte, 0x80 / 8> bytes{};
};

/// RST2INIT / INIT2RTR / RTR2RTS input (one layout): header, the QP number, opt_param_mask, QP
/// context at 0xc0.
struct modify_qp_in {
  static constexpr field qpn{0x48, 24};
  static constexpr field opt_param_mask{0x80, 32};
  static constexpr std::uint32_t kQpc = 0xc0;
  std::array<std::byte, 0x880 / 8> bytes{};
};
/// The answer to a QP state change: status, syndrome.
struct modify_qp_out {
  std::array<std::byte, 0x80 / 8> bytes{};
};

/// 2RST / 2ERR input: header and the QP number.
struct qp_2rst_in {
  static constexpr field qpn{0x48, 24};
  std::array<std::byte, 0x80 / 8> bytes{};
};

static_assert(sizeof(create_cq_in) == 272 && sizeof(create_qp_in) == 272 && sizeof(modify_qp_in) == 272);
static_assert(sizeof(create_cq_out) == 16 && sizeof(create_qp_out) == 16 && sizeof(modify_qp_out) == 16 &&
              sizeof(qp_2rst_in) == 16);
// Sub-structures sit where the commands say and end where the next field begins.
static_assert(create_cq_in::kCqc + cqc::kBits == create_cq_in::cq_umem_offset.bit);
static_assert(create_qp_in::kQpc + qpc::kBits == create_qp_in::wq_umem_offset.bit);
static_assert(modify_qp_in::kQpc + qpc::kBits == 0x800 && 0x800 + 0x80 == sizeof(modify_qp_in) * 8);
static_assert(qpc::kPrimaryPath + ads::kBits == qpc::kSecondaryPath &&
              qpc::kSecondaryPath + ads::kBits == qpc::log_ack_req_freq.bit);
static_assert(ads::kRmacBit + 48 == ads::kBits && ads::kRgidBit % 8 == 0 && ads::kRmacBit % 8 == 0);

// Every field is encodable and inside its block.
static_assert(valid(cmd::opcode, 16) && valid(cmd::uid, 16) && valid(cmd::op_mod, 16) && valid(cmd::out_status, 16) &&
              valid(cmd::out_syndrome, 16));
static_assert(valid(create_cq_out::cqn, sizeof(create_cq_out)) && valid(create_qp_out::qpn, sizeof(create_qp_out)) &&
              valid(modify_qp_in::qpn, sizeof(modify_qp_in)) && valid(qp_2rst_in::qpn, sizeof(qp_2rst_in)));
static_assert(valid(create_cq_in::cq_umem_offset, 272) && valid(create_cq_in::cq_umem_id, 272) &&
              valid(create_cq_in::cq_umem_valid, 272));
static_assert(valid(create_qp_in::wq_umem_offset, 272) && valid(create_qp_in::wq_umem_id, 272) &&
              valid(create_qp_in::wq_umem_valid, 272) && valid(create_qp_in::opt_param_mask, 272));
constexpr bool all_valid(std::uint32_t bits, std::initializer_list<field> fs) {
  for (field f : fs)
    if (!valid(f, bits / 8)) return false;
  return true;
}
static_assert(all_valid(cqc::kBits,
                        {cqc::dbr_umem_valid, cqc::cqe_sz, cqc::cc, cqc::oi, cqc::dbr_umem_id, cqc::page_offset,
                         cqc::log_cq_size, cqc::uar_page, cqc::c_eqn, cqc::log_page_size, cqc::dbr_addr}));
static_assert(all_valid(qpc::kBits, {qpc::state,
                                     qpc::st,
                                     qpc::pm_state,
                                     qpc::pd,
                                     qpc::mtu,
                                     qpc::log_msg_max,
                                     qpc::log_rq_size,
                                     qpc::log_rq_stride,
                                     qpc::no_sq,
                                     qpc::log_sq_size,
                                     qpc::counter_set_id,
                                     qpc::uar_page,
                                     qpc::user_index,
                                     qpc::log_page_size,
                                     qpc::remote_qpn,
                                     qpc::log_ack_req_freq,
                                     qpc::log_sra_max,
                                     qpc::retry_count,
                                     qpc::rnr_retry,
                                     qpc::next_send_psn,
                                     qpc::cqn_snd,
                                     qpc::log_rra_max,
                                     qpc::atomic_mode,
                                     qpc::rre,
                                     qpc::rwe,
                                     qpc::rae,
                                     qpc::page_offset,
                                     qpc::min_rnr_nak,
                                     qpc::next_rcv_psn,
                                     qpc::cqn_rcv,
                                     qpc::dbr_addr,
                                     qpc::rq_type,
                                     qpc::srqn_rmpn_xrqn,
                                     qpc::dbr_umem_valid,
                                     qpc::dbr_umem_id}));
static_assert(all_valid(ads::kBits, {ads::fl, ads::pkey_index, ads::grh, ads::mlid, ads::rlid, ads::ack_timeout,
                                     ads::src_addr_index, ads::stat_rate, ads::hop_limit, ads::tclass, ads::flow_label,
                                     ads::dscp, ads::udp_sport, ads::eth_prio, ads::sl, ads::vhca_port_num}));

// The fields each command sets never overlap (a typo in an offset would make two of them share bits).
static_assert(disjoint({cqc::dbr_umem_valid, cqc::cqe_sz, cqc::cc, cqc::oi, cqc::dbr_umem_id, cqc::page_offset,
                        cqc::log_cq_size, cqc::uar_page, cqc::c_eqn, cqc::log_page_size, cqc::dbr_addr}));
static_assert(disjoint({qpc::st, qpc::pm_state, qpc::pd, qpc::log_rq_size, qpc::no_sq, qpc::log_sq_size, qpc::uar_page,
                        qpc::user_index, qpc::log_page_size, qpc::cqn_snd, qpc::cqn_rcv, qpc::page_offset,
                        qpc::dbr_addr, qpc::rq_type, qpc::dbr_umem_valid, qpc::dbr_umem_id}));
static_assert(disjoint({qpc::rre, qpc::rwe, qpc::rae, qpc::atomic_mode, qpc::pm_state, qpc::counter_set_id,
                        at(qpc::kPrimaryPath, ads::vhca_port_num), at(qpc::kPrimaryPath, ads::pkey_index)}));
static_assert(disjoint({qpc::mtu, qpc::log_msg_max, qpc::remote_qpn, qpc::next_rcv_psn, qpc::min_rnr_nak,
                        qpc::log_rra_max, at(qpc::kPrimaryPath, ads::rlid), at(qpc::kPrimaryPath, ads::grh),
                        at(qpc::kPrimaryPath, ads::sl), at(qpc::kPrimaryPath, ads::src_addr_index),
                        at(qpc::kPrimaryPath, ads::hop_limit), at(qpc::kPrimaryPath, ads::tclass),
                        at(qpc::kPrimaryPath, ads::dscp), at(qpc::kPrimaryPath, ads::eth_prio),
                        at(qpc::kPrimaryPath, ads::udp_sport), field{qpc::kPrimaryPath + ads::kRgidBit, 128},
                        field{qpc::kPrimaryPath + ads::kRmacBit, 48}}));
static_assert(disjoint({qpc::log_ack_req_freq, qpc::log_sra_max, qpc::retry_count, qpc::rnr_retry, qpc::next_send_psn,
                        at(qpc::kPrimaryPath, ads::ack_timeout)}));

}  // namespace eaas::detail::ibgda::prm
