#pragma once

// The expert server's whole poll round on its GPU (issue #9, DESIGN.md §5 "Speed"): from the slots'
// signal words to the answers in the clients' result regions with no host round trip in between, so that
// a round is one CUDA graph, captured once and replayed.
//
// One round, as kernels on one stream (front, place, the grouped GEMM's, combine, and answer unless the answers
// are direct):
//   front     block 0 polls: acquire loads of every used slot's signal word until one differs from last_sig
//             (and from ignored_sig: slot_cursor), or a short deadline passes (poll_ns): the host reads a
//             summary often enough for its bookkeeping (links, leaves, revocations, dead clients; what it
//             changes takes effect from the next round launched). Then, for up to batch_window_ns, it waits for
//             the other slots served in the last two rounds that served a request to send too, so that clients
//             in step are answered in one round (one read of the experts' weights for all of them) instead of
//             taking turns. The other blocks wait for it at a gate. Then each block takes its slots (the slots
//             walked with the grid's stride), one whose word differs from last_sig as follows: the header's
//             commit word read with acquire, the header copied out of the slot (a private copy: the peer can
//             still write there), look_at_slot (slot.hpp: another grant's write is ignored, never answered; a
//             request is taken once committed, whatever the word holds, and the seq taken last never again),
//             validate_request against the slot's limits and expected seq (consumed exactly as the host path
//             does), the routing arrays copied, validate_routing per token (the first failing token's error, as
//             the host's sequential check reports), the response header staged; an accepted request's rows
//             counted per (layer, local expert) group (a shared-memory histogram, then one atomic per group:
//             each entry's rank in its group). The last block to finish scans: the accepted requests' token
//             bases (slot order) and the groups' offsets; the grouped GEMM compacts the active groups from them
//             (kernel shrinking), on the device (without shrinking, the ablation: each empty group of a layer
//             with a served request gets one padding row, zeros with weight 0 that no token uses, so the GEMM
//             visits all of that layer's local experts and reads their weights; answers are the same bits
//             either way)
//   place     a warp per (token, k) pair: its row = offsets[group] + rank, that row's router weight, and its
//             activation row copied into x (bf16)
//   grouped_swiglu (counts read on the device)
//   combine   each token's answer row (k order, fp32). With direct_answers it writes straight into the client's
//             result region, and its last block to finish answers every slot (response header, then the
//             request's seq; a refused request gets its error header alone) and writes the summary
//   answer    (staged answers only) grid_put_signal per answered slot: response header and outputs, then the
//             request's seq; the last block to finish writes the summary
//   summary   (by the round's last block, above) the round's last stamp, then its head, pair counts and slot
//             states into the host's pinned buffer for this launch (two, alternating)
//
// Same answers as the host path (expert_step::run): the same bf16 rounding of the rows, the same
// per-row GEMM, the same combine order. Rows of a group may sit in another order (atomics), which does
// not change any row's result: the grouped GEMM computes every row on its own (see moe_local.hpp).
//
// The tables live in device memory: the per-slot configuration (endpoint, result region, grant, token
// limit), written by the host when a client links or leaves; the per-slot state (last signal handled,
// expected seq, last ignored signal), owned by the device during a round; the round's last kernel writes it,
// with the round's verdicts, stamps and counts, into pinned host memory (server_round_summary), so that no
// copy sits between one round and the next on the stream. Nothing in the graph depends on which slots
// are used: clients come and go without a new capture.
//
// Pipelined rounds (the default): round() queues the next round behind the one running before it waits for
// that one, so the GPU goes from one round's answers straight into the next round's poll instead of waiting
// for the host to read the summary back and launch again (20-26 us per round in docs/PERF.md, on the
// critical path whenever the next request is already there). A summary then describes the round launched
// one call earlier. The slots the host sets while a round is in flight take effect from the next round
// launched; the in-flight round's summary reports such a slot as untouched, with the state it was set to
// (what that round did with the slot's previous configuration is not reported: the host gave the slot
// away or took it back in between). The kernels of a round are launched with programmatic dependent launch
// (pdl.cuh): each one's launch overlaps the kernel before it.
//
// Plain C++ header; implemented in server_step.cu.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <type_traits>

#include "eaas/common/status.hpp"
#include "eaas/common/views.hpp"
#include "eaas/runtime/model.hpp"
#include "eaas/runtime/slot.hpp"
#include "expert_step.hpp"

namespace eaas::runtime::gpu {

/// One slot as the host configures it (device memory; uploaded between rounds when it changed).
struct server_slot_config {
  device_endpoint ep;        ///< to the slot's client
  remote_view result;        ///< the client's result region
  std::uint64_t grant;       ///< what the slot's requests must carry
  std::uint32_t used;        ///< 0: free (its word is not polled)
  std::uint32_t max_tokens;  ///< most tokens per request (what the client's result region holds)
};
static_assert(std::is_trivially_copyable_v<server_slot_config>);
static_assert(sizeof(server_slot_config) == 96 && alignof(server_slot_config) == 8);

/// What a round did with a slot.
enum class slot_verdict : std::uint32_t {
  none = 0,  ///< nothing new
  served,    ///< a valid request, computed and answered
  refused,   ///< an invalid request, answered with its error
  ignored,   ///< a write by a client that does not own the slot: not answered
};

/// One slot's state: the first three words are the protocol state, a slot_cursor (the host writes them
/// when it assigns the slot, the device advances them); the rest is what the last round did.
struct server_slot_state {
  std::uint64_t last_sig;     ///< slot_cursor::last_sig
  std::uint64_t expected;     ///< slot_cursor::expected
  std::uint64_t ignored_sig;  ///< slot_cursor::ignored_sig
  std::uint64_t seq;          ///< the answered request's seq (served, refused)
  std::uint32_t verdict;      ///< slot_verdict
  std::uint32_t error;        ///< slot_error (refused)
  std::uint32_t tokens;       ///< tokens computed (served)
  std::uint32_t layer;        ///< the request's layer (served)
  int put_result;             ///< the answer's put: 0 (ok) or the status that failed it
  std::uint32_t served_round;  ///< the round that last served this slot (0: none since it was assigned)
  std::uint32_t direct;        ///< served: 1 when the combine wrote the outputs straight into the client
  std::uint32_t reserved;
};
static_assert(std::is_trivially_copyable_v<server_slot_state>);
static_assert(sizeof(server_slot_state) == 64 && offsetof(server_slot_state, put_result) == 48);

/// What a round left for the host, besides the slots' states.
struct server_round_head {
  std::uint32_t tokens;         ///< tokens computed
  std::uint32_t rows;           ///< (token, expert) pairs computed
  std::uint32_t active_groups;  ///< (layer, local expert) groups with rows
  std::uint32_t gemm_error;     ///< grouped_swiglu_error bits (0: the GEMM ran)
  std::uint32_t padded_rows;    ///< padding rows computed (0 with shrinking)
  std::uint32_t window_ns;      ///< how long the poll then waited for other clients (batch_window_ns)
  // Where the round's time went, on the device's clock (%globaltimer, ns): each stamp is taken by the first
  // thread of the step named, stamp_done by the last block of the round's last kernel (stamp_seen: 0 when the
  // poll's deadline passed with no request).
  std::uint64_t stamp_poll;     ///< the poll began
  std::uint64_t stamp_seen;     ///< the poll saw a request
  std::uint64_t stamp_place;    ///< the placement began (validation, counts and the scan are done)
  std::uint64_t stamp_combine;  ///< the combine began (the grouped GEMM is done)
  std::uint64_t stamp_done;     ///< every answer was put and signalled
};
static_assert(std::is_trivially_copyable_v<server_round_head> && sizeof(server_round_head) == 64);

/// A round's summary (views into the step's pinned host buffer, valid until the next round() or drain()).
struct server_round_summary {
  const server_round_head* head = nullptr;
  std::span<const std::uint32_t> pairs;      ///< per local expert: pairs computed this round
  std::span<const server_slot_state> slots;  ///< slots 0 .. the `read_slots` given to round()
};

struct server_step_config {
  int device = 0;
  model_shape shape;
  std::uint32_t local_experts = 0;  ///< experts hosted per layer
  std::uint32_t max_clients = 0;    ///< slots
  std::uint32_t max_tokens = 0;     ///< most tokens per request (any slot's max_tokens is at most this)
  const void* slots = nullptr;      ///< the slots region (device memory of `device`)
  std::uint64_t slots_bytes = 0;    ///< its size (slots_geometry_for(max_clients, max_tokens, hidden, topk))
  std::uint64_t poll_ns = 30'000;   ///< a round's longest wait for a request
  bool graph = true;                ///< capture the round once and replay it
  /// Kernel shrinking: the grouped GEMM walks only the groups with rows. false: the ablation (see above).
  bool shrink = true;
  /// Most blocks one answer is put with (1 .. 1024; at most one per 64 KiB). Several servers answering one
  /// client write into one GPU at once; fewer writers each can be faster there (see docs/PERF.md).
  std::uint32_t put_blocks = 32;
  /// Batching across clients: once a request is seen, the poll waits up to this long for every other slot
  /// served in the last two rounds that served a request to send as well (0: off, each round takes what is
  /// there). Clients that run in step then share one round, and the experts' weights are read once for all
  /// of them; a client that has stopped delays at most the next two rounds by this much (a slot that is
  /// given back or reassigned starts with no history).
  std::uint64_t batch_window_ns = 30'000;
  /// The combine writes each answer straight into the client's result region (nvlink: peer_pointer) and the
  /// answer's put moves the header alone. Off (the default): the combine writes a local staging copy that at
  /// most put_blocks blocks put. On saves a copy and overlaps the NVLink writes with the combine's reads, but
  /// every combine block then writes into the client's GPU: with several servers answering one client at once
  /// that is many writers into one GPU, the pattern that slows every transfer into it (docs/PERF.md).
  bool direct_answers = false;
  /// Queue the next round before waiting for the current one (see above). false: round() launches one
  /// round and returns its own summary (the ablation, and for callers that need a round's summary at once).
  bool pipeline = true;
  /// Programmatic dependent launch between the round's kernels (compute capability 9.0+; ignored before).
  bool pdl = true;
};

class server_step {
 public:
  /// Allocates the tables and buffers on cfg.device for max_clients requests of max_tokens tokens; the
  /// experts' weights are `experts`' (which must outlive this object, and be uploaded before a round).
  static status create(const server_step_config& cfg, const expert_step& experts, std::unique_ptr<server_step>& out);
  virtual ~server_step() = default;

  /// Host side of the tables: slot i's configuration and protocol state (last_sig, expected,
  /// ignored_sig; the rest is ignored), uploaded before the next round launched (with pipeline, the round in
  /// flight keeps the previous configuration: see launched()). Call between round() / drain() calls.
  virtual void set_slot(std::uint32_t i, const server_slot_config& c, const server_slot_state& s) = 0;

  /// One round (see above); returns when it has finished, with slots 0 .. read_slots - 1 (at most
  /// max_clients) in the summary. With pipeline, the round launched by the previous call is the one that
  /// finished and is reported, and this call's round stays in flight. An error means CUDA failed: the object
  /// is then unusable.
  virtual status round(std::uint32_t read_slots, server_round_summary& out) = 0;

  /// Whether a round is in flight (pipeline: after any round() until drain()).
  virtual bool in_flight() const = 0;
  /// Rounds launched so far, and how many of them were reported (by round() or drain()). A round launched
  /// before a set_slot() may still use the slot's previous endpoint and result region until it is reported:
  /// the caller keeps them alive until collected() reaches the launched() it saw when it set the slot.
  virtual std::uint64_t launched() const = 0;
  virtual std::uint64_t collected() const = 0;

  /// Waits for the round in flight and reports it as round() does (slots 0 .. read_slots - 1), launching
  /// none: before the host stops polling (no client left, or leaving). Without a round in flight it reports
  /// nothing (`out` empty, head null).
  virtual status drain(std::uint32_t read_slots, server_round_summary& out) = 0;

  /// Graph captures so far (1 with graph after the first round, 0 without).
  virtual std::uint32_t captures() const = 0;
};

}  // namespace eaas::runtime::gpu
