#pragma once

/// The slot protocol between an attention client and an expert server (DESIGN.md §5).
///
/// Each client×server pair has a request slot in the server's memory. The client writes the payload,
/// then the header but for its last word, then that word (`commit`, with release), then signals the
/// slot's sequence word with the header's `seq`: the header is the commit record. The signal only says
/// "look": the word may still hold a value a former holder of the slot signalled, and the server reads the
/// header of a slot whose word moved until a request is committed there (`look_at_slot`). A peer wrote
/// every byte of it, so the server calls `validate_request` — and, for the routing arrays,
/// `validate_routing` — before it reads anything else, and answers anything invalid with an error response
/// instead of touching memory out of bounds.
///
/// Payload layout (all offsets from the end of the header, 16-byte aligned):
///   activations  tokens × hidden × element size (fp32 or bf16)
///   expert ids   tokens × topk × u16   (the server's local expert index; kNoExpert = unused)
///   weights      tokens × topk × f32   (router weights)
///
/// Written once for the host and the device: the checks are EAAS_HOST_DEVICE and use no library.

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "eaas/common/macros.hpp"

namespace eaas::runtime {

inline constexpr std::uint32_t kSlotMagic = 0x4C534145u;  // "EASL"
inline constexpr std::uint16_t kSlotVersion = 2;          // 2: slot_header::commit
inline constexpr std::uint16_t kNoExpert = 0xFFFF;

enum class dtype : std::uint16_t { f32 = 0, bf16 = 1 };

EAAS_HOST_DEVICE constexpr std::uint64_t element_size(dtype t) { return t == dtype::bf16 ? 2 : 4; }

/// The request header, at the start of a slot. 64 bytes.
struct slot_header {
  std::uint32_t magic;          ///< kSlotMagic
  std::uint16_t version;        ///< kSlotVersion
  std::uint16_t type;           ///< dtype of the activations
  std::uint64_t seq;            ///< request sequence; also the value signalled
  std::uint32_t layer;          ///< MoE layer index
  std::uint32_t tokens;         ///< tokens in this request
  std::uint32_t hidden;         ///< hidden size (must match the server's)
  std::uint32_t topk;           ///< routing entries per token in this request
  std::uint64_t payload_bytes;  ///< bytes after the header (must equal what the shape implies)
  std::uint64_t grant;          ///< the grant of the welcome that gave this slot (see server_welcome)
  std::uint8_t reserved[8];
  std::uint64_t commit;  ///< slot_commit(seq, grant); written after every other byte of the request
};
static_assert(std::is_trivially_copyable_v<slot_header>);
static_assert(sizeof(slot_header) == 64 && alignof(slot_header) == 8);
static_assert(offsetof(slot_header, seq) == 8 && offsetof(slot_header, payload_bytes) == 32);
static_assert(offsetof(slot_header, grant) == 40 && offsetof(slot_header, commit) == 56);

/// The commit word of the request `seq` under `grant`. The grant is random per slot assignment, so a
/// request of a former holder (another grant) does not carry the owner's commit even when its seq is
/// the owner's next one: the seq alone could not tell the owner's commit from a stranger's.
EAAS_HOST_DEVICE constexpr std::uint64_t slot_commit(std::uint64_t seq, std::uint64_t grant) { return seq ^ grant; }

/// What the server knows before it reads a request.
struct slot_limits {
  std::uint64_t slot_bytes;     ///< the slot's size, header included
  std::uint32_t hidden;         ///< the model's hidden size
  std::uint32_t layers;         ///< number of MoE layers
  std::uint32_t max_tokens;     ///< most tokens one request may carry
  std::uint32_t max_topk;       ///< most routing entries per token
  std::uint32_t local_experts;  ///< experts this server hosts per layer (local ids 0 .. local_experts-1)
  std::uint64_t expected_seq;   ///< the sequence the server expects next from this client
};

/// Why a request was refused (0 = valid). Travels back in the response header.
enum class slot_error : std::uint32_t {
  none = 0,
  bad_magic,
  bad_version,
  bad_dtype,
  stale_seq,  ///< not the sequence the server expects (a replay, or a skipped request)
  unknown_layer,
  hidden_mismatch,
  too_many_tokens,
  bad_topk,
  size_mismatch,      ///< payload_bytes is not what the shape implies
  exceeds_slot,       ///< header + payload do not fit the slot
  expert_not_hosted,  ///< a routing entry names an expert this server does not host
  bad_weight,         ///< a router weight is not a finite number
  not_owner,          ///< the grant is not the slot's: ignored, never answered (the region is another's)
  duplicate_expert,   ///< a token names the same expert in two of its routing entries
};

EAAS_HOST_DEVICE constexpr const char* slot_error_name(slot_error e) {
  switch (e) {
    case slot_error::none:
      return "none";
    case slot_error::bad_magic:
      return "bad_magic";
    case slot_error::bad_version:
      return "bad_version";
    case slot_error::bad_dtype:
      return "bad_dtype";
    case slot_error::stale_seq:
      return "stale_seq";
    case slot_error::unknown_layer:
      return "unknown_layer";
    case slot_error::hidden_mismatch:
      return "hidden_mismatch";
    case slot_error::too_many_tokens:
      return "too_many_tokens";
    case slot_error::bad_topk:
      return "bad_topk";
    case slot_error::size_mismatch:
      return "size_mismatch";
    case slot_error::exceeds_slot:
      return "exceeds_slot";
    case slot_error::expert_not_hosted:
      return "expert_not_hosted";
    case slot_error::bad_weight:
      return "bad_weight";
    case slot_error::not_owner:
      return "not_owner";
    case slot_error::duplicate_expert:
      return "duplicate_expert";
  }
  return "unknown";
}

/// Byte offsets of the payload arrays (from the start of the slot) for a shape.
struct slot_layout {
  std::uint64_t activations, expert_ids, weights, end;
};

EAAS_HOST_DEVICE constexpr std::uint64_t align16(std::uint64_t n) { return (n + 15) & ~std::uint64_t{15}; }

/// The layout a shape implies. The caller bounds tokens/topk/hidden first (validate_request does), so
/// that nothing here can overflow: every factor is < 2^32 and at most three are multiplied.
EAAS_HOST_DEVICE constexpr slot_layout layout_for(std::uint32_t tokens, std::uint32_t hidden, std::uint32_t topk,
                                                  dtype t) {
  slot_layout l{};
  l.activations = sizeof(slot_header);
  l.expert_ids = l.activations + align16(std::uint64_t{tokens} * hidden * element_size(t));
  l.weights = l.expert_ids + align16(std::uint64_t{tokens} * topk * 2);
  l.end = l.weights + align16(std::uint64_t{tokens} * topk * 4);
  return l;
}

/// Checks every header field against the server's limits, in an order where each check only relies
/// on fields already checked.
EAAS_HOST_DEVICE constexpr slot_error validate_request(const slot_header& h, const slot_limits& lim) {
  if (h.magic != kSlotMagic) return slot_error::bad_magic;
  if (h.version != kSlotVersion) return slot_error::bad_version;
  if (h.type != static_cast<std::uint16_t>(dtype::f32) && h.type != static_cast<std::uint16_t>(dtype::bf16))
    return slot_error::bad_dtype;
  if (h.seq != lim.expected_seq) return slot_error::stale_seq;
  if (h.layer >= lim.layers) return slot_error::unknown_layer;
  if (h.hidden != lim.hidden) return slot_error::hidden_mismatch;
  if (h.tokens == 0 || h.tokens > lim.max_tokens) return slot_error::too_many_tokens;
  if (h.topk == 0 || h.topk > lim.max_topk) return slot_error::bad_topk;
  const slot_layout l = layout_for(h.tokens, h.hidden, h.topk, static_cast<dtype>(h.type));
  if (h.payload_bytes != l.end - sizeof(slot_header)) return slot_error::size_mismatch;
  if (l.end > lim.slot_bytes) return slot_error::exceeds_slot;
  return slot_error::none;
}

/// Checks the routing arrays of a request that passed validate_request: every expert id is hosted
/// (or kNoExpert), no token names one expert twice (a router's top-k is a set; and a server sizes its
/// batch for at most min(top-k, hosted experts) rows per token), and every weight of a used entry is
/// finite. `ids` and `weights` point into the slot at the layout's offsets.
EAAS_HOST_DEVICE slot_error validate_routing(const slot_header& h, const slot_limits& lim, const std::uint16_t* ids,
                                             const float* weights) {
  for (std::uint64_t t = 0; t < h.tokens; ++t) {
    const std::uint16_t* id = ids + t * h.topk;
    const float* wt = weights + t * h.topk;
    for (std::uint32_t k = 0; k < h.topk; ++k) {
      if (id[k] == kNoExpert) continue;
      if (id[k] >= lim.local_experts) return slot_error::expert_not_hosted;
      for (std::uint32_t j = 0; j < k; ++j)
        if (id[j] == id[k]) return slot_error::duplicate_expert;
      const float w = wt[k];
      if (!(w == w) || w > 3.0e38f || w < -3.0e38f) return slot_error::bad_weight;  // NaN or ±inf
    }
  }
  return slot_error::none;
}

/// A server's protocol state for one slot. Each assignment of the slot starts it at {0, 1, 0} (and zeroes
/// the slot's signal word).
struct slot_cursor {
  std::uint64_t last_sig;     ///< a signal value that needs no look: the slot is read while its word differs
  std::uint64_t expected;     ///< the seq the next request must carry; expected - 1 is the last one taken
  std::uint64_t ignored_sig;  ///< the last signal value that no new request of the owner explained
};

/// What the server does with a slot (look_at_slot).
enum class slot_look : std::uint32_t {
  none,     ///< nothing to answer: not committed yet, already taken, or a foreign write seen before
  foreign,  ///< a new write under another grant (a former holder's): ignored, never answered
  take,     ///< validate it (validate_request with expected_seq = the cursor's `expected`) and answer it once
};

/// The server's decision for a slot whose signal word reads `sig` (!= c.last_sig), from its commit word
/// read with acquire (`committed`) and then a private copy of its header (`h`); `grant` is the slot's.
/// A request is there once its commit is: `committed` equal to the copy's commit and to slot_commit of
/// the copy's seq and grant. The acquire then orders every later read of the slot (the copy, the routing,
/// the activations) after all that the owner wrote before the commit, whatever `sig` holds — a former
/// holder may have left any value there, and the word does not change when the owner's doorbell carries
/// the same one. A header of another version (which may predate the commit word) is taken on its doorbell
/// alone (`sig` == its seq), to be refused with bad_version.
///
/// The seq taken last (expected - 1) is never taken again: when its doorbell comes after it was taken
/// (from its commit, the word holding another value), it is not answered twice. A request with a wrong
/// seq is answered (stale_seq) once per signal value. `c` is updated; the caller advances `expected`
/// when a taken request's seq equals it (consumed, whether valid or refused).
EAAS_HOST_DEVICE constexpr slot_look look_at_slot(slot_cursor& c, std::uint64_t sig, std::uint64_t committed,
                                                  const slot_header& h, std::uint64_t grant) {
  if (h.grant != grant) {
    const bool fresh = sig != c.ignored_sig;
    c.ignored_sig = sig;
    return fresh ? slot_look::foreign : slot_look::none;
  }
  if (h.version != kSlotVersion) {
    if (sig != h.seq) return slot_look::none;
  } else if (committed != h.commit || committed != slot_commit(h.seq, h.grant)) {
    return slot_look::none;  // not committed yet, or rewritten while it was copied: looked at again
  }
  if (h.seq + 1 == c.expected) {
    // Taken already. Its own doorbell: nothing more to look at. Another value: the poll need not wake
    // for it (the slot is still read while the word differs from last_sig).
    if (sig == h.seq)
      c.last_sig = sig;
    else
      c.ignored_sig = sig;
    return slot_look::none;
  }
  // The next request, or a wrong seq (answered once per signal value). A next request found before its
  // doorbell leaves last_sig as it is: set to the foreign value the word holds, which may be the owner's
  // next seq (a stranger may signal just that), a poll that missed this request's short-lived doorbell
  // would never look at the next request.
  if (h.seq != c.expected || sig == h.seq) c.last_sig = sig;
  return slot_look::take;
}

/// The response header the server writes into the client's per-server result area (outputs of
/// tokens × hidden follow at +64).
struct response_header {
  std::uint32_t magic;    ///< kSlotMagic
  std::uint16_t version;  ///< kSlotVersion
  std::uint16_t type;     ///< dtype of the outputs
  std::uint64_t seq;      ///< the request's seq
  std::uint32_t error;    ///< slot_error
  std::uint32_t tokens;   ///< tokens answered (0 on error)
  std::uint8_t reserved[40];
};
static_assert(std::is_trivially_copyable_v<response_header>);
static_assert(sizeof(response_header) == 64);

/// The regions a client×server pair uses.
///
/// The server's "slots" region (one per server, published in its record): `max_clients` request
/// signal words, 64 bytes apart, then `max_clients` slots of `slot_stride` bytes from `slots_base`.
/// A client writes its request into its slot and signals its word with the request's seq.
///
/// The client's "result" region (one per server it talks to, handed to that server at link time):
///   kResultSig   the server signals the answered seq here, after the response below
///   kWelcomeSig  the server signals (slot index + 1) here once it assigned the client a slot
///   kWelcome     a server_welcome: where the slot is and what the server accepts
///   kResponse    a response_header, then the outputs (tokens × hidden, fp32) at kOutputs
inline constexpr std::uint64_t kResultSig = 0;
inline constexpr std::uint64_t kWelcomeSig = 64;
inline constexpr std::uint64_t kWelcome = 128;
inline constexpr std::uint64_t kResponse = 192;
inline constexpr std::uint64_t kOutputs = 256;

/// Bytes of a client's result region for requests of up to `max_tokens` tokens.
EAAS_HOST_DEVICE constexpr std::uint64_t result_region_bytes(std::uint32_t max_tokens, std::uint32_t hidden) {
  return kOutputs + std::uint64_t{max_tokens} * hidden * 4;
}

struct slots_geometry {
  std::uint64_t slots_base;   ///< offset of slot 0
  std::uint64_t slot_stride;  ///< bytes per slot (a multiple of 4096)
  std::uint64_t bytes;        ///< the whole region
};

/// The "slots" region of a server with these limits (requests in fp32, the larger element size).
EAAS_HOST_DEVICE constexpr slots_geometry slots_geometry_for(std::uint32_t max_clients, std::uint32_t max_tokens,
                                                             std::uint32_t hidden, std::uint32_t max_topk) {
  slots_geometry g{};
  g.slots_base = (std::uint64_t{max_clients} * 64 + 4095) & ~std::uint64_t{4095};
  g.slot_stride = (layout_for(max_tokens, hidden, max_topk, dtype::f32).end + 4095) & ~std::uint64_t{4095};
  g.bytes = g.slots_base + g.slot_stride * max_clients;
  return g;
}

/// What a server tells a client when it assigns it a slot (written at kWelcome). The client checks it
/// against the server's slots region before it writes anything there. A slot's grant tells its current
/// owner's requests from those of a client that held the slot before (a process that was paused past its
/// lease writes on as if nothing happened): the server ignores a request whose grant is not the slot's.
struct server_welcome {
  std::uint32_t magic;    ///< kSlotMagic
  std::uint16_t version;  ///< kSlotVersion
  std::uint16_t reserved0;
  std::uint32_t slot;           ///< the slot index
  std::uint32_t max_tokens;     ///< most tokens per request
  std::uint64_t sig_offset;     ///< the slot's request signal word in the slots region
  std::uint64_t slot_offset;    ///< the slot (header) in the slots region
  std::uint64_t slot_bytes;     ///< the slot's size
  std::uint32_t hidden;         ///< the server's hidden size
  std::uint32_t layers;         ///< MoE layers it serves
  std::uint32_t max_topk;       ///< most routing entries per token
  std::uint32_t local_experts;  ///< experts it hosts (local ids 0 .. local_experts-1)
  std::uint64_t grant;          ///< random, per assignment: requests must carry it (slot_header::grant)
};

/// Written to kWelcomeSig when the server takes the slot back (the client's lease ended, it linked
/// again, an answer could not be delivered): the client must link again; requests it writes into the old
/// slot carry a grant that no longer matches and are ignored.
inline constexpr std::uint64_t kRevoked = ~std::uint64_t{0};
static_assert(std::is_trivially_copyable_v<server_welcome>);
static_assert(sizeof(server_welcome) == 64);

}  // namespace eaas::runtime
