#pragma once

/// A put of many bytes split over the blocks of a grid, then one signal once every block's bytes are
/// at the peer: the shape of a large transfer (a bandwidth stream, a request, an answer). Every block
/// moves its share with `coop_block`; only the last block to arrive signals and reads the endpoint
/// state (one PCIe round trip per transfer, not one per block). CUDA only.
///
/// Transports: nvlink only (its puts are the calling threads' stores, complete at a system-scope
/// fence). Any other endpoint gets `unsupported` in `*result` and nothing is moved.
///
/// Why the peer that sees the signal sees every block's bytes (PTX memory model): the block barrier
/// orders the block's stores before thread 0's fence.acq_rel.sys, which is cumulative; the arrivals are
/// acq_rel read-modify-writes on one device word, so the last arriver has acquired every block's
/// release; its signal is st.release.sys, again cumulative.
///
/// With a head (`grid_put::head` > 0) the leading bytes are a commit record, for a peer that may look
/// at them before the signal (a request slot's header, runtime/slot.hpp): the blocks move every byte
/// after the head; the last block then writes the head but for its last word, then that word (the
/// `commit` value, st.release.sys: cumulative over every block's bytes and the rest of the head, as the
/// signal is), then the signal. A peer that reads the head's last word with acquire and finds `commit`
/// sees every byte of the transfer.

#if defined(__CUDACC__)

#include <cstdint>
#include <cuda/atomic>

#include "eaas/device/ops.hpp"

namespace eaas {

struct grid_put {
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
  /// 0, or the leading bytes written after all the others, their last word last (a multiple of 8, at
  /// most `bytes`; `dst_offset` 8-byte aligned): else `invalid_argument` and nothing is moved.
  std::uint64_t head = 0;
  std::uint64_t commit = 0;  ///< with a head: the value of its last word (src's bytes there are not read)
};

/// Block `block`'s byte range [begin, begin + n) of a `bytes`-long transfer split over `blocks` blocks:
/// 16-byte-aligned shares, the last one shorter, some empty when there are more blocks than shares.
__device__ __forceinline__ void grid_share(std::uint64_t bytes, unsigned block, unsigned blocks, std::uint64_t& begin,
                                           std::uint64_t& n) {
  const std::uint64_t chunk = ((bytes + blocks - 1) / blocks + 15) & ~std::uint64_t{15};
  begin = chunk * block < bytes ? chunk * block : bytes;
  n = bytes - begin < chunk ? bytes - begin : chunk;
}

/// Called by every thread of `blocks` blocks (this one is `block`): puts this block's share of the bytes
/// after the head; the last block to arrive writes the head (if any), sets the signal and quiets.
/// Failures land in `*j.result` (first one wins); after one, neither the head's last word nor the
/// signal is written.
__device__ inline void grid_put_signal(const grid_put& j, unsigned block, unsigned blocks) {
  status s = j.ep.transport == transport_kind::nvlink ? status::ok : status::unsupported;
  const bool head_ok = j.head == 0 || (j.head % 8 == 0 && j.head <= j.bytes && j.dst_offset % 8 == 0);
  if (s == status::ok && !head_ok) s = status::invalid_argument;
  std::uint64_t begin = 0, n = 0;
  if (s == status::ok) grid_share(j.bytes - j.head, block, blocks, begin, n);
  begin += j.head;
  if (s == status::ok && n != 0) s = put(coop_block{}, j.ep, j.dst, j.dst_offset + begin, j.src + begin, n);
  __syncthreads();
  if (threadIdx.x + threadIdx.y + threadIdx.z != 0) return;
  if (s != status::ok) atomicCAS(j.result, 0, static_cast<int>(s));
  detail::fence_release();
  cuda::atomic_ref<unsigned int, cuda::thread_scope_device> arrivals(*j.arrivals);
  if (arrivals.fetch_add(1, cuda::std::memory_order_acq_rel) + 1 != blocks) return;
  arrivals.store(0, cuda::std::memory_order_relaxed);  // ready for the next launch (stream-ordered)
  if (cuda::atomic_ref<int, cuda::thread_scope_device>(*j.result).load(cuda::std::memory_order_relaxed) != 0) return;
  if (j.head != 0)  // the head's last word is the signal of a put_signal of the rest of the head
    s = put_signal(coop_thread{}, j.ep, j.dst, j.dst_offset, j.src, j.head - 8, j.dst, j.dst_offset + j.head - 8,
                   j.commit, signal_op::set);
  if (s == status::ok) s = signal(coop_thread{}, j.ep, j.sig, j.sig_offset, j.value, signal_op::set);
  if (s == status::ok) s = quiet(coop_thread{}, j.ep);
  if (s != status::ok) atomicCAS(j.result, 0, static_cast<int>(s));
}

/// Blocks for a put of `bytes`: one per `per_block` bytes (64 KiB by default), at most `most`.
__host__ __device__ inline unsigned grid_put_blocks(std::uint64_t bytes, unsigned most,
                                                    std::uint64_t per_block = 64u << 10) {
  const std::uint64_t b = (bytes + per_block - 1) / per_block;
  return b == 0 ? 1u : (b > most ? most : static_cast<unsigned>(b));
}

}  // namespace eaas

#endif  // __CUDACC__
