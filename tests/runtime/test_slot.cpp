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
      {"version", [](slot_header& h) { h.version = 2; }, slot_error::bad_version},
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
