// Compile check only: the ibgda posting and polling code instantiated in __global__ kernels, for both
// poster modes, so that nvcc (-std=c++20, sm_90) sees every device path. Nothing here is launched;
// the kernels that run this code on a GPU against the software NIC are in soft_nic_gpu_kernels.cu.

#include <cstdint>

#include "eaas/common/mlx5.hpp"
#include "eaas/detail/clock.hpp"
#include "eaas/detail/ibgda/cq.hpp"
#include "eaas/detail/ibgda/qp.hpp"
#include "eaas/detail/ibgda/wqe.hpp"

namespace ib = eaas::detail::ibgda;

template <ib::poster P>
__device__ unsigned exercise(ib::qp_state* q, std::uint64_t raddr, std::uint32_t rkey, std::uint64_t laddr,
                             std::uint64_t* fetched, std::uint64_t timeout_ns) {
  const eaas::deadline dl{eaas::detail::now_ns() + timeout_ns};
  unsigned bad = 0;
  const std::uint64_t inl = 0x0123456789abcdefull;
  bad += ib::put<P>(q, raddr, rkey, laddr, 4096, dl) != eaas::status::ok;
  bad += ib::put_inline<P>(q, raddr, rkey, &inl, sizeof inl, dl) != eaas::status::ok;
  bad +=
      ib::get<P>(q, raddr, rkey, laddr, 256, dl, ib::post_opts{ib::fence_mode::full, false, true}) != eaas::status::ok;
  bad += ib::fetch_add<P>(q, raddr, rkey, 1, fetched, dl) != eaas::status::ok;
  bad += ib::compare_swap<P>(q, raddr, rkey, 1, 2, fetched, dl) != eaas::status::ok;
  bad += ib::signal<P>(q, raddr, rkey, 7, eaas::signal_op::set, dl) != eaas::status::ok;
  bad +=
      ib::put_signal<P>(q, raddr, rkey, laddr, 64, raddr + 64, rkey, 1, eaas::signal_op::add, dl) != eaas::status::ok;
  ib::wqe_desc nop;
  bad += ib::post<P>(q, &nop, 1, true, dl) != eaas::status::ok;
  bad += ib::poll_cq<P>(&q->cq, &q->head) != eaas::status::ok;
  bad += ib::quiet<P>(q, dl) != eaas::status::ok;
  return bad;
}

__global__ void ibgda_shared_posters(ib::qp_state* q, std::uint64_t raddr, std::uint32_t rkey, std::uint64_t laddr,
                                     std::uint64_t* fetched, unsigned* failures) {
  const unsigned bad = exercise<ib::poster::shared>(q, raddr, rkey, laddr, fetched + threadIdx.x, 1'000'000'000ull);
  if (bad != 0) atomicAdd(failures, bad);
}

__global__ void ibgda_exclusive_poster(ib::qp_state* q, std::uint64_t raddr, std::uint32_t rkey, std::uint64_t laddr,
                                       std::uint64_t* fetched, unsigned* failures) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  *failures = exercise<ib::poster::exclusive>(q, raddr, rkey, laddr, fetched, 1'000'000'000ull);
}

__global__ void ibgda_builders(eaas::mlx5::send_wqebb* ring, std::uint64_t* doorbells) {
  const auto i = static_cast<std::uint16_t>(threadIdx.x);
  eaas::mlx5::send_wqebb* s = ring + threadIdx.x;
  switch (threadIdx.x % 6) {
    case 0:
      ib::build_rdma_write(s, i, 7, ib::ctrl_flags(true), 0x1000, 1, 0x2000, 2, 64);
      break;
    case 1:
      ib::build_rdma_read(s, i, 7, ib::ctrl_flags(false, ib::fence_mode::full), 0x1000, 1, 0x2000, 2, 64);
      break;
    case 2:
      ib::build_rdma_write_inline(s, i, 7, ib::ctrl_flags(true), 0x1000, 1, doorbells, 20);
      break;
    case 3:
      ib::build_atomic_fetch_add(s, i, 7, ib::ctrl_flags(true), 0x1000, 1, 5, 0x2000, 2);
      break;
    case 4:
      ib::build_atomic_compare_swap(s, i, 7, ib::ctrl_flags(true), 0x1000, 1, 5, 6, 0x2000, 2);
      break;
    default:
      ib::build_nop(s, i, 7, ib::ctrl_flags(true));
      break;
  }
  doorbells[threadIdx.x] = ib::doorbell_word(s) ^ eaas::mlx5::to_be64(threadIdx.x);
}

// The op vocabulary on an ibgda endpoint (ops_impl.hpp → ibgda/ops.hpp), at every cooperation
// scope: one thread of the group posts, the group gets the status.
#include "eaas/device/ops.hpp"

template <class Coop>
__device__ unsigned ops_at_scope(const eaas::device_endpoint& ep, const eaas::remote_view& r, void* local,
                                 std::uint64_t* fetched) {
  const Coop c{};
  unsigned bad = 0;
  bad += eaas::put(c, ep, r, 0, local, 256) != eaas::status::ok;
  bad += eaas::get(c, ep, r, 256, local, 256) != eaas::status::ok;
  bad += eaas::signal(c, ep, r, 512, 1, eaas::signal_op::add) != eaas::status::ok;
  bad += eaas::put_signal(c, ep, r, 0, local, 64, r, 520, 3, eaas::signal_op::set) != eaas::status::ok;
  bad += eaas::fetch_add(c, ep, r, 528, 1, fetched) != eaas::status::ok;
  bad += eaas::compare_swap(c, ep, r, 536, 0, 1, fetched) != eaas::status::ok;
  bad += eaas::fence(c, ep) != eaas::status::ok;
  bad += eaas::quiet(c, ep) != eaas::status::ok;
  return bad;
}

__global__ void ibgda_endpoint_ops(eaas::device_endpoint ep, eaas::remote_view r, void* local, std::uint64_t* fetched,
                                   unsigned* failures) {
  unsigned bad = ops_at_scope<eaas::coop_block>(ep, r, local, fetched);
  bad += ops_at_scope<eaas::coop_warp>(ep, r, local, fetched + 1 + threadIdx.x / 32);
  if ((threadIdx.x & 31) == 0) bad += ops_at_scope<eaas::coop_thread>(ep, r, local, fetched + 64 + threadIdx.x / 32);
  if (bad != 0) atomicAdd(failures, bad);
}
