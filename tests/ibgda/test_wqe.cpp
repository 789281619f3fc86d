// The WQE / CQE encoders against rdma-core's own definitions (infiniband/mlx5dv.h): every layout
// checked at compile time, every builder checked byte for byte on random inputs against a WQE made
// with rdma-core's helpers (mlx5dv_set_ctrl_seg, mlx5dv_set_data_seg) and its structs for the
// segments it has no helper for (raddr, atomic, inline), filled the way its mlx5 provider does.

#include <doctest/doctest.h>
#include <infiniband/mlx5dv.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>

#include "eaas/common/mlx5.hpp"
#include "eaas/detail/ibgda/cq.hpp"
#include "eaas/detail/ibgda/wqe.hpp"

namespace m5 = eaas::mlx5;
namespace ib = eaas::detail::ibgda;

// ---------------------------------------------------------------------------------------------------
// Layouts and constants.
// ---------------------------------------------------------------------------------------------------

#define SAME_FIELD(ours, theirs, of, tf) \
  static_assert(offsetof(ours, of) == offsetof(theirs, tf) && sizeof(ours::of) == sizeof(theirs::tf), #of)

static_assert(sizeof(m5::wqe_ctrl_seg) == sizeof(mlx5_wqe_ctrl_seg));
static_assert(alignof(m5::wqe_ctrl_seg) == alignof(mlx5_wqe_ctrl_seg));
SAME_FIELD(m5::wqe_ctrl_seg, mlx5_wqe_ctrl_seg, opmod_idx_opcode_be, opmod_idx_opcode);
SAME_FIELD(m5::wqe_ctrl_seg, mlx5_wqe_ctrl_seg, qpn_ds_be, qpn_ds);
SAME_FIELD(m5::wqe_ctrl_seg, mlx5_wqe_ctrl_seg, signature, signature);
SAME_FIELD(m5::wqe_ctrl_seg, mlx5_wqe_ctrl_seg, dci_stream_channel_id_be, dci_stream_channel_id);
SAME_FIELD(m5::wqe_ctrl_seg, mlx5_wqe_ctrl_seg, fm_ce_se, fm_ce_se);
SAME_FIELD(m5::wqe_ctrl_seg, mlx5_wqe_ctrl_seg, imm_be, imm);

static_assert(sizeof(m5::wqe_raddr_seg) == sizeof(mlx5_wqe_raddr_seg));
SAME_FIELD(m5::wqe_raddr_seg, mlx5_wqe_raddr_seg, raddr_be, raddr);
SAME_FIELD(m5::wqe_raddr_seg, mlx5_wqe_raddr_seg, rkey_be, rkey);
SAME_FIELD(m5::wqe_raddr_seg, mlx5_wqe_raddr_seg, reserved, reserved);

static_assert(sizeof(m5::wqe_data_seg) == sizeof(mlx5_wqe_data_seg));
SAME_FIELD(m5::wqe_data_seg, mlx5_wqe_data_seg, byte_count_be, byte_count);
SAME_FIELD(m5::wqe_data_seg, mlx5_wqe_data_seg, lkey_be, lkey);
SAME_FIELD(m5::wqe_data_seg, mlx5_wqe_data_seg, addr_be, addr);

static_assert(sizeof(m5::wqe_inl_data_seg) == sizeof(mlx5_wqe_inl_data_seg));
SAME_FIELD(m5::wqe_inl_data_seg, mlx5_wqe_inl_data_seg, byte_count_be, byte_count);

static_assert(sizeof(m5::wqe_atomic_seg) == sizeof(mlx5_wqe_atomic_seg));
SAME_FIELD(m5::wqe_atomic_seg, mlx5_wqe_atomic_seg, swap_add_be, swap_add);
SAME_FIELD(m5::wqe_atomic_seg, mlx5_wqe_atomic_seg, compare_be, compare);

static_assert(sizeof(m5::cqe64) == sizeof(mlx5_cqe64));
SAME_FIELD(m5::cqe64, mlx5_cqe64, srqn_uidx_be, srqn_uidx);
SAME_FIELD(m5::cqe64, mlx5_cqe64, imm_inval_pkey_be, imm_inval_pkey);
SAME_FIELD(m5::cqe64, mlx5_cqe64, app, app);
SAME_FIELD(m5::cqe64, mlx5_cqe64, app_op, app_op);
SAME_FIELD(m5::cqe64, mlx5_cqe64, app_info_be, app_info);
SAME_FIELD(m5::cqe64, mlx5_cqe64, byte_cnt_be, byte_cnt);
SAME_FIELD(m5::cqe64, mlx5_cqe64, timestamp_be, timestamp);
SAME_FIELD(m5::cqe64, mlx5_cqe64, sop_drop_qpn_be, sop_drop_qpn);
SAME_FIELD(m5::cqe64, mlx5_cqe64, wqe_counter_be, wqe_counter);
SAME_FIELD(m5::cqe64, mlx5_cqe64, signature, signature);
SAME_FIELD(m5::cqe64, mlx5_cqe64, op_own, op_own);

static_assert(sizeof(m5::err_cqe64) == sizeof(mlx5_err_cqe));
SAME_FIELD(m5::err_cqe64, mlx5_err_cqe, rsvd0, rsvd0);
SAME_FIELD(m5::err_cqe64, mlx5_err_cqe, srqn_be, srqn);
SAME_FIELD(m5::err_cqe64, mlx5_err_cqe, rsvd1, rsvd1);
SAME_FIELD(m5::err_cqe64, mlx5_err_cqe, vendor_err_synd, vendor_err_synd);
SAME_FIELD(m5::err_cqe64, mlx5_err_cqe, syndrome, syndrome);
SAME_FIELD(m5::err_cqe64, mlx5_err_cqe, s_wqe_opcode_qpn_be, s_wqe_opcode_qpn);
SAME_FIELD(m5::err_cqe64, mlx5_err_cqe, wqe_counter_be, wqe_counter);
SAME_FIELD(m5::err_cqe64, mlx5_err_cqe, signature, signature);
SAME_FIELD(m5::err_cqe64, mlx5_err_cqe, op_own, op_own);

static_assert(m5::kSendWqeBB == MLX5_SEND_WQE_BB && m5::kSendWqeShift == MLX5_SEND_WQE_SHIFT);
static_assert(m5::kInlineSeg == MLX5_INLINE_SEG && m5::kInvalidLkey == MLX5_INVALID_LKEY);
static_assert(m5::kSendDbr == MLX5_SND_DBR);
static_assert(m5::kCtrlCqUpdate == MLX5_WQE_CTRL_CQ_UPDATE && m5::kCtrlSolicited == MLX5_WQE_CTRL_SOLICITED);
static_assert(m5::kCtrlFence == MLX5_WQE_CTRL_FENCE && m5::kCtrlFenceSmall == MLX5_WQE_CTRL_INITIATOR_SMALL_FENCE);

#define SAME_OPCODE(ours, theirs) static_assert(static_cast<int>(m5::opcode::ours) == (theirs), #ours)
SAME_OPCODE(nop, MLX5_OPCODE_NOP);
SAME_OPCODE(rdma_write, MLX5_OPCODE_RDMA_WRITE);
SAME_OPCODE(rdma_write_imm, MLX5_OPCODE_RDMA_WRITE_IMM);
SAME_OPCODE(send, MLX5_OPCODE_SEND);
SAME_OPCODE(send_imm, MLX5_OPCODE_SEND_IMM);
SAME_OPCODE(rdma_read, MLX5_OPCODE_RDMA_READ);
SAME_OPCODE(atomic_cs, MLX5_OPCODE_ATOMIC_CS);
SAME_OPCODE(atomic_fa, MLX5_OPCODE_ATOMIC_FA);
SAME_OPCODE(atomic_masked_cs, MLX5_OPCODE_ATOMIC_MASKED_CS);
SAME_OPCODE(atomic_masked_fa, MLX5_OPCODE_ATOMIC_MASKED_FA);
SAME_OPCODE(local_inval, MLX5_OPCODE_LOCAL_INVAL);
SAME_OPCODE(umr, MLX5_OPCODE_UMR);

#define SAME_CQE_OPCODE(ours, theirs) static_assert(static_cast<int>(m5::cqe_opcode::ours) == (theirs), #ours)
SAME_CQE_OPCODE(req, MLX5_CQE_REQ);
SAME_CQE_OPCODE(resp_wr_imm, MLX5_CQE_RESP_WR_IMM);
SAME_CQE_OPCODE(resp_send, MLX5_CQE_RESP_SEND);
SAME_CQE_OPCODE(resp_send_imm, MLX5_CQE_RESP_SEND_IMM);
SAME_CQE_OPCODE(resp_send_inv, MLX5_CQE_RESP_SEND_INV);
SAME_CQE_OPCODE(resize_cq, MLX5_CQE_RESIZE_CQ);
SAME_CQE_OPCODE(sig_err, MLX5_CQE_SIG_ERR);
SAME_CQE_OPCODE(req_err, MLX5_CQE_REQ_ERR);
SAME_CQE_OPCODE(resp_err, MLX5_CQE_RESP_ERR);
SAME_CQE_OPCODE(invalid, MLX5_CQE_INVALID);

#define SAME_SYNDROME(ours, theirs) static_assert(static_cast<int>(m5::cqe_syndrome::ours) == (theirs), #ours)
SAME_SYNDROME(local_length, MLX5_CQE_SYNDROME_LOCAL_LENGTH_ERR);
SAME_SYNDROME(local_qp_op, MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR);
SAME_SYNDROME(local_prot, MLX5_CQE_SYNDROME_LOCAL_PROT_ERR);
SAME_SYNDROME(wr_flush, MLX5_CQE_SYNDROME_WR_FLUSH_ERR);
SAME_SYNDROME(mw_bind, MLX5_CQE_SYNDROME_MW_BIND_ERR);
SAME_SYNDROME(bad_resp, MLX5_CQE_SYNDROME_BAD_RESP_ERR);
SAME_SYNDROME(local_access, MLX5_CQE_SYNDROME_LOCAL_ACCESS_ERR);
SAME_SYNDROME(remote_inval_req, MLX5_CQE_SYNDROME_REMOTE_INVAL_REQ_ERR);
SAME_SYNDROME(remote_access, MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR);
SAME_SYNDROME(remote_op, MLX5_CQE_SYNDROME_REMOTE_OP_ERR);
SAME_SYNDROME(transport_retry_exc, MLX5_CQE_SYNDROME_TRANSPORT_RETRY_EXC_ERR);
SAME_SYNDROME(rnr_retry_exc, MLX5_CQE_SYNDROME_RNR_RETRY_EXC_ERR);
SAME_SYNDROME(remote_aborted, MLX5_CQE_SYNDROME_REMOTE_ABORTED_ERR);

// ---------------------------------------------------------------------------------------------------
// Reference WQEs, built with rdma-core.
// ---------------------------------------------------------------------------------------------------

namespace {

constexpr int kIterations = 20000;

struct slot_pair {
  m5::send_wqebb ours;
  m5::send_wqebb ref;
};

// Both blocks get the same random garbage first: bytes a builder must not touch stay equal, bytes it
// forgets to write differ.
void poison(slot_pair& s, std::mt19937_64& rng) {
  for (auto& b : s.ours.bytes) b = static_cast<std::uint8_t>(rng());
  std::memcpy(s.ref.bytes, s.ours.bytes, sizeof s.ref.bytes);
}

// rdma-core's mlx5 post path clears the signature / dci / fm_ce_se word before mlx5dv_set_ctrl_seg,
// which does not write dci_stream_channel_id.
void ref_ctrl(m5::send_wqebb& w, std::uint16_t pi, std::uint8_t op, std::uint32_t qpn, std::uint8_t fm_ce_se,
              std::uint8_t ds) {
  auto* c = reinterpret_cast<mlx5_wqe_ctrl_seg*>(w.bytes);
  std::memset(w.bytes + 8, 0, 4);
  mlx5dv_set_ctrl_seg(c, pi, op, 0, qpn, fm_ce_se, ds, 0, 0);
}

// As the mlx5 provider's set_raddr_seg: BE address, BE rkey, reserved zero.
void ref_raddr(m5::send_wqebb& w, std::uint64_t raddr, std::uint32_t rkey) {
  auto* r = reinterpret_cast<mlx5_wqe_raddr_seg*>(w.bytes + 16);
  r->raddr = htobe64(raddr);
  r->rkey = htobe32(rkey);
  r->reserved = 0;
}

struct rand_in {
  std::uint16_t pi;
  std::uint32_t qpn;
  std::uint8_t fm_ce_se;
  std::uint64_t raddr, laddr, a, b;
  std::uint32_t rkey, lkey, bytes;
};

rand_in draw(std::mt19937_64& rng) {
  rand_in in{};
  in.pi = static_cast<std::uint16_t>(rng());
  in.qpn = static_cast<std::uint32_t>(rng()) & 0xffffffu;
  // Every combination of the flags our builders may set.
  static constexpr std::uint8_t kFlags[] = {0,
                                            m5::kCtrlCqUpdate,
                                            m5::kCtrlFence,
                                            m5::kCtrlFenceSmall,
                                            m5::kCtrlCqUpdate | m5::kCtrlFence,
                                            m5::kCtrlCqUpdate | m5::kCtrlFenceSmall};
  in.fm_ce_se = kFlags[rng() % std::size(kFlags)];
  in.raddr = rng();
  in.laddr = rng();
  in.a = rng();
  in.b = rng();
  in.rkey = static_cast<std::uint32_t>(rng());
  in.lkey = static_cast<std::uint32_t>(rng());
  in.bytes = rng() % 4 == 0 ? static_cast<std::uint32_t>(rng()) & m5::kMaxSegBytes
                            : 1 + static_cast<std::uint32_t>(rng() % 65536);
  return in;
}

bool same(const slot_pair& s) { return std::memcmp(s.ours.bytes, s.ref.bytes, 64) == 0; }

}  // namespace

TEST_CASE("ctrl and data segments equal rdma-core's mlx5dv_set_ctrl_seg / mlx5dv_set_data_seg") {
  std::mt19937_64 rng(0x5eed0001);
  int mismatches = 0;
  for (int i = 0; i < kIterations; ++i) {
    const rand_in in = draw(rng);
    const auto op = static_cast<std::uint8_t>(rng());
    const auto ds = static_cast<std::uint8_t>(rng() % 64);
    const auto opmod = static_cast<std::uint8_t>(rng());
    const auto imm = static_cast<std::uint32_t>(rng());
    m5::wqe_ctrl_seg ours;
    mlx5_wqe_ctrl_seg ref;
    std::memset(&ours, 0xCD, sizeof ours);
    std::memset(&ref, 0, sizeof ref);
    ib::set_ctrl(&ours, in.pi, static_cast<m5::opcode>(op), opmod, in.qpn, in.fm_ce_se, ds, imm);
    mlx5dv_set_ctrl_seg(&ref, in.pi, op, opmod, in.qpn, in.fm_ce_se, ds, 0, imm);
    mismatches += std::memcmp(&ours, &ref, 16) != 0;

    m5::wqe_data_seg dours;
    mlx5_wqe_data_seg dref;
    std::memset(&dours, 0xCD, sizeof dours);
    std::memset(&dref, 0x3C, sizeof dref);
    ib::set_data(&dours, in.bytes, in.lkey, in.laddr);
    mlx5dv_set_data_seg(&dref, in.bytes, in.lkey, static_cast<uintptr_t>(in.laddr));
    mismatches += std::memcmp(&dours, &dref, 16) != 0;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("RDMA WRITE and READ WQEs equal rdma-core's, byte for byte") {
  std::mt19937_64 rng(0x5eed0002);
  int mismatches = 0, empty = 0;
  for (int i = 0; i < kIterations; ++i) {
    rand_in in = draw(rng);
    if (i % 50 == 0) in.bytes = 0;  // no data segment, ds 2
    empty += in.bytes == 0;
    const bool read = (i & 1) != 0;
    slot_pair s;
    poison(s, rng);
    if (read)
      ib::build_rdma_read(&s.ours, in.pi, in.qpn, in.fm_ce_se, in.raddr, in.rkey, in.laddr, in.lkey, in.bytes);
    else
      ib::build_rdma_write(&s.ours, in.pi, in.qpn, in.fm_ce_se, in.raddr, in.rkey, in.laddr, in.lkey, in.bytes);
    const std::uint8_t ds = in.bytes != 0 ? 3 : 2;
    ref_ctrl(s.ref, in.pi, read ? MLX5_OPCODE_RDMA_READ : MLX5_OPCODE_RDMA_WRITE, in.qpn, in.fm_ce_se, ds);
    ref_raddr(s.ref, in.raddr, in.rkey);
    if (in.bytes != 0)
      mlx5dv_set_data_seg(reinterpret_cast<mlx5_wqe_data_seg*>(s.ref.bytes + 32), in.bytes, in.lkey,
                          static_cast<uintptr_t>(in.laddr));
    mismatches += !same(s);
    // The doorbell carries exactly the ctrl segment's first 8 bytes.
    std::uint64_t first8;
    std::memcpy(&first8, s.ref.bytes, 8);
    mismatches += ib::doorbell_word(&s.ours) != first8;
  }
  CHECK(empty > 0);
  CHECK(mismatches == 0);
}

TEST_CASE("inline WRITE WQEs equal rdma-core's layout: flagged byte count, payload, zero padding to 16 bytes") {
  std::mt19937_64 rng(0x5eed0003);
  int mismatches = 0;
  int seen_ds[5] = {};
  for (int i = 0; i < kIterations; ++i) {
    const rand_in in = draw(rng);
    const auto bytes = static_cast<std::uint32_t>(rng() % (ib::kMaxInlineBytes + 1));
    std::uint8_t payload[ib::kMaxInlineBytes];
    for (auto& b : payload) b = static_cast<std::uint8_t>(rng());
    slot_pair s;
    poison(s, rng);
    ib::build_rdma_write_inline(&s.ours, in.pi, in.qpn, in.fm_ce_se, in.raddr, in.rkey, payload, bytes);
    const std::uint32_t used =
        sizeof(mlx5_wqe_ctrl_seg) + sizeof(mlx5_wqe_raddr_seg) + sizeof(mlx5_wqe_inl_data_seg) + bytes;
    const auto ds = static_cast<std::uint8_t>((used + 15) / 16);
    ++seen_ds[ds];
    ref_ctrl(s.ref, in.pi, MLX5_OPCODE_RDMA_WRITE, in.qpn, in.fm_ce_se, ds);
    ref_raddr(s.ref, in.raddr, in.rkey);
    auto* inl = reinterpret_cast<mlx5_wqe_inl_data_seg*>(s.ref.bytes + 32);
    inl->byte_count = htobe32(bytes | MLX5_INLINE_SEG);
    std::memcpy(inl + 1, payload, bytes);
    std::memset(s.ref.bytes + used, 0, ds * 16u - used);  // rdma-core leaves these bytes as they were; we zero them
    mismatches += !same(s);
  }
  CHECK(seen_ds[3] > 0);  // up to 12 bytes
  CHECK(seen_ds[4] > 0);  // 13 .. 28 bytes
  CHECK(mismatches == 0);
}

TEST_CASE("atomic fetch-add and compare-swap WQEs equal rdma-core's provider layout") {
  std::mt19937_64 rng(0x5eed0004);
  int mismatches = 0;
  for (int i = 0; i < kIterations; ++i) {
    const rand_in in = draw(rng);
    const bool cs = (i & 1) != 0;
    slot_pair s;
    poison(s, rng);
    if (cs)
      ib::build_atomic_compare_swap(&s.ours, in.pi, in.qpn, in.fm_ce_se, in.raddr, in.rkey, /*compare=*/in.a,
                                    /*swap=*/in.b, in.laddr, in.lkey);
    else
      ib::build_atomic_fetch_add(&s.ours, in.pi, in.qpn, in.fm_ce_se, in.raddr, in.rkey, in.a, in.laddr, in.lkey);
    ref_ctrl(s.ref, in.pi, cs ? MLX5_OPCODE_ATOMIC_CS : MLX5_OPCODE_ATOMIC_FA, in.qpn, in.fm_ce_se, 4);
    ref_raddr(s.ref, in.raddr, in.rkey);
    // As the provider's set_atomic_seg: compare-swap puts swap then compare; fetch-add the addend
    // (the compare word is unused; we write zero).
    auto* a = reinterpret_cast<mlx5_wqe_atomic_seg*>(s.ref.bytes + 32);
    a->swap_add = htobe64(cs ? in.b : in.a);
    a->compare = cs ? htobe64(in.a) : 0;
    mlx5dv_set_data_seg(reinterpret_cast<mlx5_wqe_data_seg*>(s.ref.bytes + 48), 8, in.lkey,
                        static_cast<uintptr_t>(in.laddr));
    mismatches += !same(s);
  }
  CHECK(mismatches == 0);
}

TEST_CASE("NOP WQEs are a lone ctrl segment; the rest of the block is untouched") {
  std::mt19937_64 rng(0x5eed0005);
  int mismatches = 0;
  for (int i = 0; i < kIterations; ++i) {
    const rand_in in = draw(rng);
    slot_pair s;
    poison(s, rng);
    ib::build_nop(&s.ours, in.pi, in.qpn, in.fm_ce_se);
    ref_ctrl(s.ref, in.pi, MLX5_OPCODE_NOP, in.qpn, in.fm_ce_se, 1);
    mismatches += !same(s);
  }
  CHECK(mismatches == 0);
}

TEST_CASE("ctrl_flags produces rdma-core's fm_ce_se values") {
  CHECK(ib::ctrl_flags(false) == 0);
  CHECK(ib::ctrl_flags(true) == MLX5_WQE_CTRL_CQ_UPDATE);
  CHECK(ib::ctrl_flags(true, ib::fence_mode::full) == (MLX5_WQE_CTRL_CQ_UPDATE | MLX5_WQE_CTRL_FENCE));
  CHECK(ib::ctrl_flags(false, ib::fence_mode::small) == MLX5_WQE_CTRL_INITIATOR_SMALL_FENCE);
}

TEST_CASE("CQE fields decode as rdma-core's accessors read them") {
  std::mt19937_64 rng(0x5eed0006);
  int mismatches = 0;
  for (int i = 0; i < kIterations; ++i) {
    alignas(64) std::uint8_t raw[64];
    for (auto& b : raw) b = static_cast<std::uint8_t>(rng());
    mlx5_cqe64 ref;
    std::memcpy(&ref, raw, 64);
    m5::cqe64 ours;
    std::memcpy(&ours, raw, 64);
    std::uint32_t tail, synd_word;
    std::memcpy(&tail, raw + m5::kCqeTailOffset, 4);
    std::memcpy(&synd_word, raw + m5::kCqeSyndromeWordOffset, 4);
    mismatches += m5::tail_wqe_counter(tail) != be16toh(ref.wqe_counter);
    mismatches += m5::tail_op_own(tail) != ref.op_own;
    mismatches += static_cast<int>(m5::cqe_op(ours.op_own)) != mlx5dv_get_cqe_opcode(&ref);
    mismatches += m5::cqe_owner(ours.op_own) != mlx5dv_get_cqe_owner(&ref);
    mismatches += m5::cqe_solicited(ours.op_own) != mlx5dv_get_cqe_se(&ref);
    mismatches += m5::cqe_format(ours.op_own) != mlx5dv_get_cqe_format(&ref);
    mismatches += m5::from_be32(ours.byte_cnt_be) != be32toh(ref.byte_cnt);
    mismatches += (m5::from_be32(ours.sop_drop_qpn_be) & 0xffffff) != (be32toh(ref.sop_drop_qpn) & 0xffffff);
    mismatches += m5::from_be16(ours.wqe_counter_be) != be16toh(ref.wqe_counter);
    mlx5_err_cqe err;
    std::memcpy(&err, raw, 64);
    mismatches += m5::word_syndrome(synd_word) != err.syndrome;
    mismatches += m5::word_vendor_syndrome(synd_word) != err.vendor_err_synd;
    m5::err_cqe64 oerr;
    std::memcpy(&oerr, raw, 64);
    mismatches +=
        oerr.syndrome != err.syndrome || m5::from_be32(oerr.s_wqe_opcode_qpn_be) != be32toh(err.s_wqe_opcode_qpn);
  }
  CHECK(mismatches == 0);
}

TEST_CASE("byte swaps equal the C library's on random values") {
  std::mt19937_64 rng(0x5eed0007);
  int mismatches = 0;
  for (int i = 0; i < kIterations; ++i) {
    const std::uint64_t v = rng();
    mismatches += m5::to_be64(v) != htobe64(v);
    mismatches += m5::to_be32(static_cast<std::uint32_t>(v)) != htobe32(static_cast<std::uint32_t>(v));
    mismatches += m5::to_be16(static_cast<std::uint16_t>(v)) != htobe16(static_cast<std::uint16_t>(v));
    mismatches += m5::from_be64(htobe64(v)) != v;
  }
  CHECK(mismatches == 0);
}
