#pragma once

// Host launchers of the nvlink test kernels (nvlink_kernels.cu). Every launcher returns the CUDA
// outcome as a status; what the ops returned on the device comes back in `result`.

#include <cstddef>
#include <cstdint>

#include "eaas/common/status.hpp"
#include "eaas/common/views.hpp"

namespace eaas::gputest {

enum class scope { thread, warp, block };
const char* scope_name(scope s);

/// One group (1 thread / 1 warp / 1 block of 256) of device `device` runs the op once.
status launch_put(int device, scope s, const device_endpoint& ep, const remote_view& dst, std::uint64_t off,
                  const void* src, std::size_t n, status& result);
status launch_get(int device, scope s, const device_endpoint& ep, const remote_view& src, std::uint64_t off, void* dst,
                  std::size_t n, status& result);
status launch_put_signal(int device, scope s, const device_endpoint& ep, const remote_view& dst, std::uint64_t off,
                         const void* src, std::size_t n, const remote_view& sig, std::uint64_t sig_off,
                         std::uint64_t value, signal_op op, status& result);

/// `blocks` x `threads` threads each fetch_add 1 on the remote word; fetched[i] = the value thread i saw.
status launch_fetch_add(int device, const device_endpoint& ep, const remote_view& t, std::uint64_t off, int blocks,
                        int threads, std::uint64_t* fetched_dev, status& result);

/// The words peer_pointer_kernel stores (word i).
EAAS_HOST_DEVICE constexpr std::uint64_t peer_word_value(std::uint64_t i) { return 0x9E3779B97F4A7C15ull * (i + 1); }
/// `blocks` x 256 threads of `device` store `words` u64 words (peer_word_value) at `off` of the peer's region
/// through peer_pointer. probes: what it gave for that range, for one word past the region's end, for a
/// forged view, for a view registered by someone else, and for an empty range at the end.
status launch_peer_pointer(int device, const device_endpoint& ep, const remote_view& v, std::uint64_t off,
                           std::uint32_t words, unsigned blocks, std::uint64_t (&probes)[5]);

struct order_result {
  std::uint64_t checks = 0, in_flight = 0, violations = 0, last = 0;
  status sender = status::internal_error, receiver = status::internal_error;
};
/// Payload words of a warp's or block's put in run_ordering (a thread's: 32).
inline constexpr std::uint32_t kOrderMaxWords = 512;
/// A sender kernel of `threads` threads (1: coop_thread, 32: coop_warp, more: coop_block) on
/// `sender_device` streams `iters` put_signals (payload words = i, then signal = i) into the receiver's
/// region while a receiver kernel on `receiver_device` reads signal then payload.
status run_ordering(int sender_device, const device_endpoint& ep, const remote_view& payload, const remote_view& sig,
                    int receiver_device, const std::uint64_t* local_payload, const std::uint64_t* local_sig,
                    std::uint64_t iters, unsigned threads, order_result& out);

struct head_order_result {
  std::uint64_t checks = 0, in_flight = 0, violations = 0, last = 0, signal = 0;
  status sender = status::internal_error, receiver = status::internal_error, bad_head = status::internal_error;
  bool untouched_by_bad_head = false;  ///< the refused put wrote neither a byte nor the signal
};
/// Words of run_head_ordering's head (a 64-byte header whose last word is the commit word).
inline constexpr std::uint32_t kHeadWords = 8;
/// grid_put_signal with a head: transfer i (1..iters) of `words` u64 words from `blocks` blocks of
/// `sender_device` has every word i but the head's last, the commit word, which is `commit` = i (its
/// source word holds a poison that must never arrive), and signals i. Meanwhile a kernel on
/// `receiver_device` reads the commit word with acquire, then every other word: a word below the commit
/// seen (or the poison) is a violation. Then a put with a head of 12 bytes must be refused untouched.
status run_head_ordering(int sender_device, const device_endpoint& ep, const remote_view& dst, const remote_view& sig,
                         int receiver_device, const std::uint64_t* local_dst, const std::uint64_t* local_sig,
                         std::uint64_t iters, std::uint32_t words, unsigned blocks, head_order_result& out);

struct graph_result {
  std::uint64_t replays_done = 0, echo = 0;
  status client = status::internal_error, server = status::internal_error;
};
/// A client kernel (put_signal, then wait for the echo) captured once in a CUDA graph on
/// `client_device` and replayed `replays` times against a server kernel on `server_device`.
status run_graph_pingpong(int client_device, const device_endpoint& to_server, const remote_view& server_region,
                          std::uint64_t* client_sig_local, int server_device, const device_endpoint& to_client,
                          const remote_view& client_region, std::uint64_t* server_sig_local, int replays,
                          graph_result& out);

/// A kernel waits on `sig` through `ep` for `value` (timeout `ns`): what it returned.
status launch_wait(int device, const device_endpoint& ep, const std::uint64_t* sig, std::uint64_t value,
                   std::uint64_t ns, status& result);

}  // namespace eaas::gputest
