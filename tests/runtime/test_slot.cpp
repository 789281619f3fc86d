#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "eaas/runtime/slot.hpp"

using namespace eaas::runtime;

namespace {

slot_limits limits() {
  slot_limits l{};
  l.hidden = 7168;
  l.layers = 58;
  l.max_tokens = 256;
  l.max_topk = 8;
  l.local_experts = 32;
  l.expected_seq = 41;
  l.slot_bytes = layout_for(256, 7168, 8, dtype::bf16).end;
  return l;
}

slot_header valid(std::uint32_t tokens = 128, std::uint32_t topk = 8, dtype t = dtype::bf16) {
  slot_header h{};
  h.magic = kSlotMagic;
  h.version = kSlotVersion;
  h.type = static_cast<std::uint16_t>(t);
  h.seq = 41;
  h.layer = 3;
  h.tokens = tokens;
  h.hidden = 7168;
  h.topk = topk;
  h.payload_bytes = layout_for(tokens, 7168, topk, t).end - sizeof(slot_header);
  return h;
}

}  // namespace

TEST_CASE("slot layout: offsets are aligned, ordered and sized by the shape") {
  const slot_layout l = layout_for(128, 7168, 8, dtype::bf16);
  CHECK(l.activations == 64);
  CHECK(l.expert_ids == 64 + 128ull * 7168 * 2);
  CHECK(l.weights == l.expert_ids + 128ull * 8 * 2);
  CHECK(l.end == l.weights + 128ull * 8 * 4);
  const slot_layout odd = layout_for(3, 5, 3, dtype::f32);  // 60 B of activations, 18 B of ids
  CHECK(odd.expert_ids == 64 + 64);
  CHECK(odd.weights == odd.expert_ids + 32);
  CHECK(odd.end == odd.weights + 48);
  CHECK(odd.expert_ids % 16 == 0);
  CHECK(odd.weights % 16 == 0);
}

TEST_CASE("slot header: a valid request passes and each bad field is named") {
  const slot_limits lim = limits();
  CHECK(validate_request(valid(), lim) == slot_error::none);
  CHECK(validate_request(valid(256, 8), lim) == slot_error::none);
  CHECK(validate_request(valid(1, 1, dtype::f32), lim) == slot_error::none);

  struct bad_case {
    const char* what;
    void (*mutate)(slot_header&);
    slot_error expect;
  };
  const bad_case cases[] = {
      {"magic", [](slot_header& h) { h.magic ^= 1; }, slot_error::bad_magic},
      {"version", [](slot_header& h) { h.version = 3; }, slot_error::bad_version},
      {"version 1 (no commit word)", [](slot_header& h) { h.version = 1; }, slot_error::bad_version},
      {"dtype", [](slot_header& h) { h.type = 7; }, slot_error::bad_dtype},
      {"replayed seq", [](slot_header& h) { h.seq = 40; }, slot_error::stale_seq},
      {"skipped seq", [](slot_header& h) { h.seq = 42; }, slot_error::stale_seq},
      {"layer", [](slot_header& h) { h.layer = 58; }, slot_error::unknown_layer},
      {"hidden", [](slot_header& h) { h.hidden = 4096; }, slot_error::hidden_mismatch},
      {"zero tokens", [](slot_header& h) { h.tokens = 0; }, slot_error::too_many_tokens},
      {"tokens over the slot", [](slot_header& h) { h.tokens = 257; }, slot_error::too_many_tokens},
      {"tokens 2^32-1", [](slot_header& h) { h.tokens = 0xffffffffu; }, slot_error::too_many_tokens},
      {"topk 0", [](slot_header& h) { h.topk = 0; }, slot_error::bad_topk},
      {"topk 9", [](slot_header& h) { h.topk = 9; }, slot_error::bad_topk},
      {"payload short", [](slot_header& h) { h.payload_bytes -= 16; }, slot_error::size_mismatch},
      {"payload huge", [](slot_header& h) { h.payload_bytes = ~0ull; }, slot_error::size_mismatch},
  };
  for (const auto& c : cases) {
    slot_header h = valid();
    c.mutate(h);
    CAPTURE(c.what);
    CHECK(validate_request(h, lim) == c.expect);
  }
  // A consistent request that is simply bigger than this slot.
  slot_limits small = lim;
  small.slot_bytes = layout_for(64, 7168, 8, dtype::bf16).end;
  CHECK(validate_request(valid(65, 8), small) == slot_error::exceeds_slot);
  CHECK(validate_request(valid(64, 8), small) == slot_error::none);
}

TEST_CASE("slot header: random headers never pass unless they are exactly consistent") {
  const slot_limits lim = limits();
  std::mt19937_64 rng(3);
  int accepted = 0;
  for (int i = 0; i < 200000; ++i) {
    slot_header h = valid(1 + rng() % 256, 1 + rng() % 8, rng() % 2 ? dtype::f32 : dtype::bf16);
    // Corrupt 1..4 random bytes.
    auto* b = reinterpret_cast<unsigned char*>(&h);
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) b[rng() % sizeof(h)] ^= static_cast<unsigned char>(1 + rng() % 255);
    if (validate_request(h, lim) != slot_error::none) continue;
    ++accepted;
    // Whatever passed must be a request the server can serve without reading past the slot.
    const slot_layout l = layout_for(h.tokens, h.hidden, h.topk, static_cast<dtype>(h.type));
    CHECK(h.magic == kSlotMagic);
    CHECK(h.seq == lim.expected_seq);
    CHECK(h.hidden == lim.hidden);
    CHECK(h.tokens >= 1);
    CHECK(h.tokens <= lim.max_tokens);
    CHECK(h.payload_bytes == l.end - 64);
    CHECK(l.end <= lim.slot_bytes);
  }
  // Corruptions that only hit the unchecked fields (client id, reserved bytes) are accepted.
  CHECK(accepted > 0);
}

TEST_CASE("slot routing: unhosted experts, an expert named twice by one token and non-finite weights are refused") {
  const slot_limits lim = limits();
  const slot_header h = valid(4, 2);
  std::vector<std::uint16_t> ids = {0, 31, kNoExpert, 5, 7, 8, 1, 2};
  std::vector<float> w = {0.5f, 0.5f, 0.0f, 1.0f, 0.25f, 0.75f, -0.1f, 2.0f};
  CHECK(validate_routing(h, lim, ids.data(), w.data()) == slot_error::none);
  ids[3] = 32;
  CHECK(validate_routing(h, lim, ids.data(), w.data()) == slot_error::expert_not_hosted);
  ids[3] = 5;
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    w[6] = bad;
    CHECK(validate_routing(h, lim, ids.data(), w.data()) == slot_error::bad_weight);
  }
  // The same expert in two entries of one token; the same expert in two tokens is fine.
  w[6] = -0.1f;
  ids[5] = 7;
  CHECK(validate_routing(h, lim, ids.data(), w.data()) == slot_error::duplicate_expert);
  ids[5] = 8;
  ids[6] = 7;
  CHECK(validate_routing(h, lim, ids.data(), w.data()) == slot_error::none);
  ids[6] = 1;
  // An unused entry's weight is never read.
  w[6] = -0.1f;
  ids[2] = kNoExpert;
  w[2] = std::numeric_limits<float>::quiet_NaN();
  CHECK(validate_routing(h, lim, ids.data(), w.data()) == slot_error::none);
}

TEST_CASE("slot errors have distinct names") {
  for (std::uint32_t i = 0; i <= static_cast<std::uint32_t>(slot_error::duplicate_expert); ++i)
    for (std::uint32_t j = i + 1; j <= static_cast<std::uint32_t>(slot_error::duplicate_expert); ++j)
      CHECK(std::strcmp(slot_error_name(static_cast<slot_error>(i)), slot_error_name(static_cast<slot_error>(j))) != 0);
  CHECK(std::strcmp(slot_error_name(static_cast<slot_error>(99)), "unknown") == 0);
}

namespace {

constexpr std::uint64_t kOwner = 0x9E3779B97F4A7C15ull, kFormer = 0xC2B2AE3D27D4EB4Full;

// A request header as a client writes it: committed under `grant`.
slot_header committed(std::uint64_t seq, std::uint64_t grant) {
  slot_header h = valid(4, 2);
  h.seq = seq;
  h.grant = grant;
  h.commit = slot_commit(seq, grant);
  return h;
}

// One look by the server at a slot whose header is `h` and whose commit word is `word` (single-threaded:
// what the acquire reads is what the copy holds unless the test says otherwise); on take, the server
// consumes a request of the expected seq, as server.cpp and server_step.cu do.
slot_look look(slot_cursor& c, std::uint64_t sig, const slot_header& h, std::uint64_t word,
               std::uint64_t grant = kOwner) {
  const slot_look k = look_at_slot(c, sig, word, h, grant);
  if (k == slot_look::take && h.seq == c.expected) c.expected++;
  return k;
}
slot_look look(slot_cursor& c, std::uint64_t sig, const slot_header& h) { return look(c, sig, h, h.commit); }

}  // namespace

TEST_CASE("slot commit: a former holder's signal value lets no request be taken before its commit, or twice") {
  slot_cursor c{0, 1, 0};
  // Request 1, committed and signalled.
  const slot_header r1 = committed(1, kOwner);
  CHECK(look(c, 1, r1) == slot_look::take);
  CHECK(c.expected == 2);
  CHECK(c.last_sig == 1);
  // A former holder writes its own request and signals 77: ignored, and counted once.
  const slot_header f = committed(5, kFormer);
  CHECK(look(c, 77, f) == slot_look::foreign);
  CHECK(c.ignored_sig == 77);
  CHECK(look(c, 77, f) == slot_look::none);
  // The owner's request 2: its header (seq 2, its grant) and payload have landed, its commit word not yet:
  // the slot still holds the former holder's. The server reads it every round (the word differs from
  // last_sig) and must not take it, though seq and grant are right.
  slot_header part = committed(2, kOwner);
  part.commit = f.commit;
  for (int round = 0; round < 3; ++round) CHECK(look(c, 77, part) == slot_look::none);
  CHECK(c.expected == 2);
  // A copy of the header that changed after the commit word was read (rewritten meanwhile): not taken.
  const slot_header r2 = committed(2, kOwner);
  CHECK(look(c, 77, r2, f.commit) == slot_look::none);
  CHECK(c.expected == 2);
  // The commit lands, the word still 77: taken, before the owner's doorbell.
  CHECK(look(c, 77, r2) == slot_look::take);
  CHECK(c.expected == 3);
  CHECK(c.last_sig == 1);  // still looked at: the doorbell of request 2 is to come
  CHECK(look(c, 77, r2) == slot_look::none);
  // The owner's doorbell changes the word to 2: request 2 is not answered again (neither served nor
  // refused with stale_seq), and the slot needs no more looks.
  CHECK(look(c, 2, r2) == slot_look::none);
  CHECK(c.last_sig == 2);
  CHECK(c.expected == 3);
}

TEST_CASE("slot commit: a stranger signalling the owner's next seq is ignored, the owner's request taken once") {
  slot_cursor c{2, 3, 0};  // requests 1 and 2 taken, the doorbell of 2 seen
  // The stranger's request carries seq 3 and signals 3, the owner's next.
  const slot_header s3 = committed(3, kFormer);
  CHECK(look(c, 3, s3) == slot_look::foreign);
  // The owner's header lands over it before its commit word: seq 3 alone would look committed (the
  // stranger wrote 3 there), the commit word does not (it was the stranger's grant).
  slot_header part = committed(3, kOwner);
  part.commit = s3.commit;
  CHECK(look(c, 3, part) == slot_look::none);
  // Committed: taken; its doorbell (3 again) leaves the word as it is, and last_sig is 3 now.
  CHECK(look(c, 3, committed(3, kOwner)) == slot_look::take);
  CHECK(c.expected == 4);
  CHECK(c.last_sig == 3);
  // The stranger signals 5 (the owner's seq after next). Request 4 is committed before the poll sees its
  // doorbell, then request 5 is committed and signalled: the poll never saw 4 in the word, so a last_sig
  // of 5 would hide request 5 for good. It must be taken.
  CHECK(look(c, 5, committed(9, kFormer)) == slot_look::foreign);
  CHECK(look(c, 5, committed(4, kOwner)) == slot_look::take);
  CHECK(c.last_sig == 3);
  CHECK(c.last_sig != 5);
  CHECK(look(c, 5, committed(5, kOwner)) == slot_look::take);
  CHECK(c.expected == 6);
  CHECK(c.last_sig == 5);
}

TEST_CASE("slot commit: a wrong seq answered once per value, version 1 on its doorbell, a new grant afresh") {
  slot_cursor c{4, 5, 0};
  // A skipped seq: taken (validate_request refuses it with stale_seq), not consumed, and not again for
  // the same signal value.
  const slot_header skip = committed(12, kOwner);
  CHECK(look(c, 12, skip) == slot_look::take);
  CHECK(c.expected == 5);
  CHECK(c.last_sig == 12);
  slot_limits lim = limits();
  lim.expected_seq = c.expected;
  CHECK(validate_request(skip, lim) == slot_error::stale_seq);
  // A version-1 header has no commit word: taken on its doorbell alone, refused with bad_version.
  slot_header v1 = committed(5, kOwner);
  v1.version = 1;
  v1.commit = 0;
  CHECK(look(c, 7, v1) == slot_look::none);
  CHECK(look(c, 5, v1) == slot_look::take);
  CHECK(c.expected == 6);
  CHECK(validate_request(v1, lim) == slot_error::bad_version);
  // The slot granted anew (cursor reset, word zeroed): the previous owner's committed request is foreign.
  slot_cursor fresh{0, 1, 0};
  const std::uint64_t next_grant = 0x0123456789ABCDEFull;
  CHECK(look(fresh, 6, committed(6, kOwner), slot_commit(6, kOwner), next_grant) == slot_look::foreign);
  CHECK(look(fresh, 1, committed(1, kOwner), slot_commit(1, kOwner), next_grant) == slot_look::foreign);
  CHECK(fresh.expected == 1);
  slot_header first = committed(1, next_grant);
  CHECK(look(fresh, 1, first, first.commit, next_grant) == slot_look::take);
  CHECK(fresh.expected == 2);
  // Commits differ by seq and by grant.
  CHECK(slot_commit(3, kOwner) != slot_commit(4, kOwner));
  CHECK(slot_commit(3, kOwner) != slot_commit(3, kFormer));
}
