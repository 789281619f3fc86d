#pragma once

// How a runtime process touches its own regions and its peers' (DESIGN.md §5): the client and the
// server are written once against this, and a wire decides where regions live and who executes an op.
//
//   host wire  regions in host memory (memory_kind::host), ops run by the calling thread (shm bodies)
//   gpu wire   regions in the process's GPU (memory_kind::device), ops run by small kernels on that GPU
//              (nvlink bodies: the bytes go GPU to GPU, never through this host's memory)
//
// Every op of a wire is complete when it returns (a put is quiet), and every wait is bounded.

#include <cstddef>
#include <cstdint>
#include <memory>

#include "eaas/eaas.hpp"

namespace eaas::runtime {

class wire {
 public:
  virtual ~wire() = default;

  /// Where this process's regions are allocated.
  virtual memory_kind kind() const noexcept = 0;
  /// The CUDA device the ops run on; -1 for the host wire.
  virtual int device() const noexcept = 0;
  /// The transport its peers must be reached by (shm or nvlink).
  virtual transport_kind transport() const noexcept = 0;

  /// Copies `bytes` at `offset` of a region of this process into `dst` (host memory): a private copy
  /// that the peer cannot change after it was taken.
  virtual status read(const memory_region& r, std::uint64_t offset, void* dst, std::size_t bytes) = 0;

  /// The 8-byte words at offset, offset + stride, ... (`count` of them) of a region of this process,
  /// into `out`: each read with acquire ordering on the host wire; on the gpu wire one copy-engine read
  /// of the span, which is outside the PTX memory model: it orders nothing. A reader that must see what
  /// a peer published with a release store of a word uses read_after_acquire.
  virtual status load_words(const memory_region& r, std::uint64_t offset, std::uint64_t stride, std::uint32_t count,
                            std::uint64_t* out) = 0;

  /// Loads the 8-byte word at `word_offset` of a region of this process with acquire (system scope) into
  /// `*word`, then copies `bytes` at `offset` into `dst` (host memory), every byte read after that load:
  /// a word found holding a value a peer stored with release shows the copy all that the peer wrote
  /// before that store (or later). A private copy, as with read. On the gpu wire one kernel does both
  /// (a copy engine would be outside the memory model); meant for small spans (a header, routing).
  /// `invalid_argument` (nothing read) when the word is not aligned or either is outside the region.
  virtual status read_after_acquire(const memory_region& r, std::uint64_t word_offset, std::uint64_t offset, void* dst,
                                    std::size_t bytes, std::uint64_t* word) = 0;

  /// Stores `value` (release) into the 8-byte word at `offset` of a region of this process.
  virtual status store_word(memory_region& r, std::uint64_t offset, std::uint64_t value) = 0;

  /// Puts `bytes` from `src` (host memory of this process) at `dst_offset` of `dst`, then sets the
  /// signal word `sig_offset` of `sig` to `value` (the peer that sees the value sees the bytes), then
  /// quiets: both are complete at the peer when it returns ok.
  ///
  /// `head` > 0 makes the leading `head` bytes a commit record (a request's header, slot.hpp): they are
  /// written after all the others, their last word last and with release, so that a peer that reads
  /// that word with acquire and finds its new value sees every byte, whatever the signal word holds.
  /// `head` must be a multiple of 8, at most `bytes`, with `dst_offset` 8-byte aligned
  /// (`invalid_argument` otherwise, nothing written); 0 for a plain put_signal.
  virtual status put_signal(const endpoint& ep, const remote_view& dst, std::uint64_t dst_offset, const void* src,
                            std::size_t bytes, const remote_view& sig, std::uint64_t sig_offset, std::uint64_t value,
                            std::size_t head) = 0;

  /// Sets a peer's signal word and quiets.
  virtual status signal(const endpoint& ep, const remote_view& sig, std::uint64_t sig_offset, std::uint64_t value) = 0;

  /// Waits until the word at `offset` of a region of this process compares `cmp` to `value`, the
  /// endpoint fails (peer_dead, closed) or `until_ns` (eaas::now_ns() clock) passes (timeout). `seen`
  /// gets the last value read.
  virtual status wait(const endpoint& ep, const memory_region& r, std::uint64_t offset, cmp_op cmp, std::uint64_t value,
                      std::uint64_t until_ns, std::uint64_t* seen) = 0;
};

/// Regions in host memory, ops on the calling thread.
std::unique_ptr<wire> make_host_wire();

/// Regions in GPU `cuda_device`, ops as kernels on it. `unsupported` (with a sentence) in a build
/// without CUDA or where the device does not exist. Safe to use from several threads at once.
status make_gpu_wire(int cuda_device, std::unique_ptr<wire>& out);

/// CUDA devices this process sees (0 in a build without CUDA or where the driver reports none).
int cuda_device_count() noexcept;

}  // namespace eaas::runtime
