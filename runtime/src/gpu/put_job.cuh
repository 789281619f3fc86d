#pragma once

// A put of many bytes split over the blocks of a grid, and one signal once every block's bytes are at
// the peer: the shape of every large transfer of the GPU runtime (requests, answers).

#include <cstdint>
#include <cuda/atomic>

#include "eaas/device/ops.hpp"

namespace eaas::runtime::gpu {

struct put_job {
  device_endpoint ep;
  remote_view dst;
  std::uint64_t dst_offset;
  const unsigned char* src;  ///< device memory of this GPU
  std::uint64_t bytes;
  remote_view sig;
  std::uint64_t sig_offset;
  std::uint64_t value;     ///< set into the signal word after the bytes
  unsigned int* arrivals;  ///< device word, 0 before the launch; 0 again after it
  int* result;             ///< device word: the first failing status (0: all ok)
};

/// Called by every thread of `blocks` blocks (block index `block`). Each block puts its 16-byte-aligned
/// share with coop_block; the last block to arrive signals. Why the peer that sees the signal sees every
/// block's bytes (as in perf/alltoall_kernels.cu): the block barrier orders the block's stores before
/// thread 0's fence.acq_rel.sys, which is cumulative; the arrivals are acq_rel read-modify-writes on
/// one word, so the last arriver has acquired every block's release; its signal is st.release.sys.
__device__ inline void put_share_then_signal(const put_job& j, unsigned block, unsigned blocks) {
  const std::uint64_t chunk = ((j.bytes + blocks - 1) / blocks + 15) & ~std::uint64_t{15};
  const std::uint64_t begin = chunk * block < j.bytes ? chunk * block : j.bytes;
  const std::uint64_t n = j.bytes - begin < chunk ? j.bytes - begin : chunk;
  status s = status::ok;
  if (n != 0) s = put(coop_block{}, j.ep, j.dst, j.dst_offset + begin, j.src + begin, n);
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (s != status::ok) atomicCAS(j.result, 0, static_cast<int>(s));
  detail::fence_release();
  cuda::atomic_ref<unsigned int, cuda::thread_scope_device> arrivals(*j.arrivals);
  if (arrivals.fetch_add(1, cuda::std::memory_order_acq_rel) + 1 != blocks) return;
  arrivals.store(0, cuda::std::memory_order_relaxed);  // ready for the next launch (stream-ordered)
  if (cuda::atomic_ref<int, cuda::thread_scope_device>(*j.result).load(cuda::std::memory_order_relaxed) != 0) return;
  s = signal(coop_thread{}, j.ep, j.sig, j.sig_offset, j.value, signal_op::set);
  if (s == status::ok) s = quiet(coop_thread{}, j.ep);
  if (s != status::ok) atomicCAS(j.result, 0, static_cast<int>(s));
}

/// Blocks for a put of `bytes`: one per 64 KiB, at most `most`.
inline unsigned put_blocks(std::uint64_t bytes, unsigned most) {
  const std::uint64_t b = (bytes + (64u << 10) - 1) / (64u << 10);
  return b == 0 ? 1u : (b > most ? most : static_cast<unsigned>(b));
}

}  // namespace eaas::runtime::gpu
