#pragma once

// Host launchers of the kernels that run the production ibgda posting and polling code on a GPU
// against the software NIC (soft_nic_gpu_kernels.cu). Each returns a status: CUDA failures come back
// as internal_error with the CUDA error printed. Every device wait takes a deadline; a kernel that
// outlives its host-side bound ends the process (mapped_qp.hpp, wait_stream_or_exit).

#include <cstdint>
#include <type_traits>
#include <vector>

#include "eaas/common/status.hpp"
#include "eaas/detail/ibgda/qp.hpp"

namespace eaas::test {

class mapped_qp;

/// What one op of `run_ops` does.
enum class gpu_op_kind : std::uint8_t { write, write_inline, read, fetch_add, compare_swap };

/// One op posted from a kernel. Addresses are device addresses of mapped host memory (== host
/// addresses): `laddr` in the QP's lkey region, `raddr` in the rkey region of the launch.
struct gpu_op {
  gpu_op_kind kind = gpu_op_kind::write;
  std::uint8_t reserved0[3] = {};
  std::uint32_t bytes = 0;  ///< write / write_inline / read
  std::uint64_t raddr = 0;
  std::uint64_t laddr = 0;            ///< write / read: the local buffer; atomics: where the old value lands
  std::uint64_t operand = 0;          ///< fetch_add: the addend; compare_swap: the new value
  std::uint64_t compare = 0;          ///< compare_swap: the expected value
  std::uint8_t inline_data[32] = {};  ///< write_inline: the payload (copied to the kernel's stack first)
};

/// What a kernel saw for one op.
struct gpu_op_result {
  std::uint32_t post = ~0u;    ///< status of the post (~0: never posted)
  std::uint32_t quiet = ~0u;   ///< status of the quiet that followed it
  std::uint64_t fetched = 0;   ///< atomics: the old value, read by the kernel after that quiet
  std::uint64_t quiet_ns = 0;  ///< how long that quiet took (%globaltimer)
};

static_assert(std::is_trivially_copyable_v<gpu_op> && sizeof(gpu_op) == 72);
static_assert(std::is_trivially_copyable_v<gpu_op_result> && sizeof(gpu_op_result) == 24);

/// How `run_ops` posts.
struct ops_launch {
  std::uint32_t blocks = 1;
  std::uint32_t threads = 1;  ///< per block; every thread posts
  bool exclusive = false;     ///< poster::exclusive (needs blocks == threads == 1)
  std::uint32_t rkey = 0;
  std::uint64_t timeout_ns = 5'000'000'000ull;  ///< deadline of each post and each quiet
  std::uint32_t quiet_every = 0;                ///< a thread quiets after this many of its ops (0: once, at the end)
  double host_limit_s = 60;                     ///< the kernel must end within this
};

/// Thread g of the grid (T threads) posts ops g, g + T, ... in that order, quiets as `l` says, then
/// reads back its atomics' old values. `out` gets one result per op.
status run_ops(const mapped_qp& qp, const std::vector<gpu_op>& ops, const ops_launch& l,
               std::vector<gpu_op_result>& out);

/// What `run_batched` saw.
struct batch_result {
  std::uint32_t post_errors = 0;  ///< posts that did not return ok
  std::uint32_t rings = 0;        ///< doorbells the posts rang (changes of the QP's `rung`)
  std::uint32_t quiet = ~0u;      ///< status of the final quiet
  std::uint64_t early_word = 0;   ///< first 8 bytes at the last op's destination, `wait_ns` after it was posted
  std::uint64_t late_word = 0;    ///< the same after the quiet
  std::uint64_t rung_before_quiet = 0;
  std::uint64_t ready_before_quiet = 0;
};

static_assert(std::is_trivially_copyable_v<batch_result>);

/// One exclusive poster posts `ops` (writes only) one by one, counting the doorbells it rings;
/// waits `wait_ns`, reads the last op's destination, quiets, reads it again.
status run_batched(const mapped_qp& qp, const std::vector<gpu_op>& ops, std::uint32_t rkey, std::uint64_t wait_ns,
                   batch_result& out);

}  // namespace eaas::test
