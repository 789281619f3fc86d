#pragma once

// Double batching on the client (issue #9): a forward's tokens split into two micro-batches, each served by
// its own inner attention_client (its own links, slots and, on a GPU, its own stream and graph), run at the
// same time on two threads, so that one micro-batch's dense part overlaps the other's expert round trip.
// The servers see two clients. Tokens are independent in the model, so the output equals a one-batch
// forward's, row for row. With host_output false a one-batch forward's answer is the inner client's
// device_output(); a two-batch forward's halves stay in the inner clients' GPU buffers, and the combined
// client returns an empty `out`, no routing and no device_output() (a benchmark setting). A half that fell
// back to the host path is then dropped too: only two host halves make a whole answer.

#include <cstdint>
#include <memory>

#include "client.hpp"

namespace eaas::runtime {

enum class micro_batching : std::uint8_t {
  one = 1,   ///< the whole batch on one inner client (the other is not started)
  two = 2,   ///< always two micro-batches (a one-token forward still goes whole)
  automatic  ///< both ways timed on the first forwards, the faster kept (small batches are faster whole)
};

/// Starts the inner clients ("<id>" and "<id>.b"; the second takes half of max_tokens, rounded up) and
/// returns the combined client. `stats().micro_batches` says the mode in use (0 while `automatic` is
/// still trying both).
status start_micro_batched(const client_options& opts, micro_batching mode, std::unique_ptr<attention_client>& out);

}  // namespace eaas::runtime
