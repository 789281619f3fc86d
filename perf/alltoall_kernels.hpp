#pragma once

// The kernels of `eaas-alltoall --transport nvlink`, behind host launchers: one round of one rank
// (dispatch + combine wait on a sender, wait + answers on a receiver) and a gate that holds queued
// rounds until the host releases them.

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "eaas/common/status.hpp"
#include "eaas/common/views.hpp"

/// Host code: exits with 2 and the CUDA error when `x` fails (the perf tools fail loudly).
#define EAAS_A2A_CUDA(x)                                                                                    \
  do {                                                                                                      \
    if (const cudaError_t a2a_e_ = (x); a2a_e_ != cudaSuccess) {                                            \
      std::fprintf(stderr, "error: %s at %s:%d: %s\n", #x, __FILE__, __LINE__, cudaGetErrorString(a2a_e_)); \
      std::exit(2);                                                                                         \
    }                                                                                                       \
  } while (0)

namespace eaas::perf::a2a {

/// One peer of a rank as the round kernel sees it (an array of them lives in device memory).
struct peer_desc {
  device_endpoint ep;
  remote_view region;              ///< the peer's region
  std::uint64_t sig_offset;        ///< our signal word in the peer's region
  std::uint64_t hdr_offset;        ///< where our header lands in it (when hdr != nullptr)
  std::uint64_t rows_offset;       ///< where our row 0 lands in it (row i at rows_offset + i * row)
  const std::uint64_t* local_sig;  ///< the word of our region this peer signals
  const unsigned char* hdr;        ///< put before the rows (dispatch: count + indices); nullptr: none
  std::uint32_t hdr_bytes;
  std::uint32_t rows;        ///< rows to this peer
  std::uint32_t first_item;  ///< this peer's first item (its header item) in the rank's flat item list
  std::uint32_t items;       ///< this peer's items a round: 1 + ceil(rows / round_args::rows_per_item)
};
static_assert(std::is_trivially_copyable_v<peer_desc>);
static_assert(sizeof(peer_desc) == 136 && alignof(peer_desc) == 8);

/// Arguments of one round. A rank's work is a flat list of items, peer by peer: per peer one header
/// item (the header put, or nothing) and then one item per `rows_per_item` rows (the last one may be
/// shorter; more than one row per item needs rows that are contiguous in `src` as at the peer). Each
/// peer gets `items` items a round, so `arrivals[p]` reaches `seq * items` exactly when round `seq` is
/// complete for it.
inline constexpr std::size_t kRoundStamps = 4;  ///< %globaltimer stamps per round, see round_args::stamps
struct round_args {
  const peer_desc* peers;
  const std::uint64_t* src_offset;  ///< per item: the row's byte offset in `src` (header items: unused)
  const unsigned char* src;         ///< the rows this rank sends (local device memory)
  unsigned long long* arrivals;     ///< per peer: items done, cumulative over rounds (device memory)
  /// this round's %globaltimer stamps (kRoundStamps): [0] first block's start (min), [1] when block 0's
  /// waits ended (wait_before, or wait_after), [2] the last signal issued (max), [3] when the last waiting
  /// thread's waits ended (max; with wait_before the last block to start its puts). The host sets
  /// [0] = ~0 and the others 0 before the round.
  unsigned long long* stamps;
  int* failure;  ///< the first failing status of this rank (0: none); later rounds then do nothing
  std::uint64_t row, seq, timeout_ns;
  std::uint32_t npeers, items;
  std::uint32_t rows_per_item;  ///< >= 1
  /// thread 0 of each block (of block 0 only when !send) waits for every peer's signal >= seq first
  std::uint32_t wait_before;
  std::uint32_t send;        ///< put the items; each peer is signalled (seq) once all of its items are in
  std::uint32_t wait_after;  ///< then warp 0 waits for every peer's signal >= seq
};
static_assert(std::is_trivially_copyable_v<round_args>);

/// Threads per block of the round kernel (one row per warp at a time).
inline constexpr unsigned kRoundThreads = 256;

/// Queues one round on `stream` with `blocks` blocks.
status launch_round(const round_args& args, unsigned blocks, cudaStream_t stream);

/// The start of a batch of queued rounds, on every rank at once: a one-thread kernel waits until the
/// host has queued the batch (`*flag >= value`, mapped host memory), then meets the peers: senders
/// signal every receiver's gate word and wait for theirs; receivers wait for every sender's, then
/// signal back. A sender passes once every rank has released its batch; a receiver once every sender
/// has. All waits are bounded; a failure lands in `*failure`.
struct gate_args {
  device_context ctx;
  const std::uint64_t* flag;       ///< host word, mapped
  const peer_desc* peers;          ///< as in round_args
  const std::uint64_t* my_gate;    ///< our region's gate words: peer q signals word q
  std::uint64_t peer_gate_offset;  ///< our gate word in each peer's region
  std::uint64_t value, timeout_ns;
  int* failure;
  std::uint32_t npeers;
  std::uint32_t signal_first;  ///< senders: 1, receivers: 0
};
static_assert(std::is_trivially_copyable_v<gate_args>);

status launch_gate(const gate_args& args, cudaStream_t stream);

/// The host side of the gate: queue() before a batch, release() once the batch is queued.
struct batch_gate {
  gate_args args;            ///< all but value, which counts the batches
  std::uint64_t* flag_host;  ///< the host address of args.flag

  status queue(cudaStream_t stream) {
    ++args.value;
    return launch_gate(args, stream);
  }
  void release() { std::atomic_ref<std::uint64_t>(*flag_host).store(args.value, std::memory_order_release); }
};

}  // namespace eaas::perf::a2a
