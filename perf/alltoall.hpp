#pragma once

// What every eaas-alltoall transport shares: the options, the plan (routing and region layout,
// identical in every rank), and the row patterns the checks compare against.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "eaas/eaas.hpp"
#include "pattern.hpp"

namespace eaas::perf::a2a {

struct options {
  std::string role = "launch", rendezvous, dtype = "bf16", json, transport = "shm";
  int rank = -1;
  std::uint32_t senders = 1, receivers = 1, tokens = 128, hidden = 7168, topk = 8, experts = 256;
  std::uint32_t iters = 50, warmup = 5;
  std::uint64_t seed = 1;
  bool inject_error = false;  // tests: receiver 0 flips one byte of its first answer in the checked rounds
  // nvlink only
  std::uint32_t blocks = 0;           // kernel blocks per rank (0: enough for one row per warp, at most the SM count)
  std::uint32_t combine_blocks = 0;   // receivers' kernel blocks (0: as `blocks`; both 0: 16, 8 from 3 receivers)
  std::uint32_t combine_rows = 1;     // rows per put in the combine (a receiver's answers to a sender are contiguous)
  bool nccl = true;                   // run the NCCL baseline in the same processes (when built with NCCL)
  std::uint64_t timeout_ms = 10'000;  // every device wait ends by then
};

inline std::uint64_t mix(std::uint64_t x) { return splitmix64(x); }

/// One rank's context, region, and its peers (receivers for a sender, senders for a receiver).
struct rank_state {
  std::unique_ptr<context> ctx;
  std::unique_ptr<memory_region> mine;
  std::vector<std::unique_ptr<endpoint>> eps;         // per peer
  std::vector<std::unique_ptr<remote_region>> peers;  // their regions
  unsigned char* base() const { return static_cast<unsigned char*>(mine->data()); }
};

/// With st.ctx and st.mine made: publishes this rank's handles in the rendezvous directory, then
/// connects to every peer and imports its region. Exits (die) when a connection does not use
/// `want`, or on any failure.
void connect_peers(const options& o, transport_kind want, rank_state& st);

/// Rank i < M is sender i, else receiver i - M; the name it publishes under in the rendezvous directory.
inline std::string name_of(const options& o, int rank) {
  const bool sender = rank < static_cast<int>(o.senders);
  std::string name(1, sender ? 's' : 'r');  // (not "s" + to_string: GCC 12 warns -Wrestrict on that when inlined)
  name += std::to_string(sender ? rank : rank - static_cast<int>(o.senders));
  return name;
}

/// The shape of the exchange, identical in every rank.
struct plan {
  options o;
  std::size_t row = 0;  // bytes per token row
  // route[s][t]: the receivers token t of sender s goes to (distinct, ascending).
  std::vector<std::vector<std::vector<std::uint32_t>>> route;
  // Region layout. Receiver: per sender a block [signal 64][count 64][indices T×4, 64-aligned][rows T×row].
  // Sender: per receiver a block [signal 64][rows T×row].
  std::size_t recv_block = 0, send_block = 0, idx_bytes = 0;

  explicit plan(const options& opt) : o(opt) {
    row = std::size_t{o.hidden} * (o.dtype == "bf16" ? 2 : 4);
    idx_bytes = (std::size_t{o.tokens} * 4 + 63) / 64 * 64;
    recv_block = 128 + idx_bytes + std::size_t{o.tokens} * row;
    send_block = 64 + std::size_t{o.tokens} * row;
    route.resize(o.senders);
    for (std::uint32_t s = 0; s < o.senders; ++s) {
      route[s].resize(o.tokens);
      for (std::uint32_t t = 0; t < o.tokens; ++t) {
        std::vector<std::uint32_t> picked;
        for (std::uint64_t k = 0; picked.size() < o.topk; ++k) {
          const auto e = static_cast<std::uint32_t>(
              mix(o.seed ^ (std::uint64_t{s} << 48) ^ (std::uint64_t{t} << 24) ^ k) % o.experts);
          if (std::find(picked.begin(), picked.end(), e) == picked.end()) picked.push_back(e);
        }
        auto& rs = route[s][t];
        for (auto e : picked) rs.push_back(e % o.receivers);
        std::sort(rs.begin(), rs.end());
        rs.erase(std::unique(rs.begin(), rs.end()), rs.end());
      }
    }
  }
  /// Tokens of sender s that go to receiver r, in order.
  std::vector<std::uint32_t> tokens_for(std::uint32_t s, std::uint32_t r) const {
    std::vector<std::uint32_t> v;
    for (std::uint32_t t = 0; t < o.tokens; ++t)
      if (std::binary_search(route[s][t].begin(), route[s][t].end(), r)) v.push_back(t);
    return v;
  }
  std::size_t dispatch_bytes(std::uint32_t s) const {
    std::size_t n = 0;
    for (const auto& rs : route[s]) n += rs.size();
    return n * row;
  }
  /// Bytes of the header (count + indices) that travel in front of the rows of one dispatch message.
  std::size_t header_bytes() const { return 64 + idx_bytes; }
};

/// Row patterns: dispatch rows depend on (sender, token), combine rows on (sender, token, receiver).
inline void fill(unsigned char* p, std::size_t n, std::uint64_t key) {
  for (std::size_t i = 0; i < n; i += 8) {
    const std::uint64_t w = mix(key + i);
    std::memcpy(p + i, &w, std::min<std::size_t>(8, n - i));
  }
}
inline bool same(const unsigned char* p, std::size_t n, std::uint64_t key) {
  for (std::size_t i = 0; i < n; i += 8) {
    const std::uint64_t w = mix(key + i);
    if (std::memcmp(p + i, &w, std::min<std::size_t>(8, n - i)) != 0) return false;
  }
  return true;
}
inline std::uint64_t dkey(std::uint32_t s, std::uint32_t t) { return mix(0xD15Aull ^ (std::uint64_t{s} << 32) ^ t); }
inline std::uint64_t ckey(std::uint32_t s, std::uint32_t t, std::uint32_t r) {
  return mix(0xC0Bull ^ (std::uint64_t{s} << 40) ^ (std::uint64_t{r} << 20) ^ t);
}

/// The dispatch message of sender s to receiver r as the shm sender stages it: [count 64][indices][rows].
inline std::vector<unsigned char> dispatch_message(const plan& p, std::uint32_t s, std::uint32_t r) {
  const auto toks = p.tokens_for(s, r);
  std::vector<unsigned char> m(p.header_bytes() + toks.size() * p.row, 0);
  const auto count = static_cast<std::uint32_t>(toks.size());
  std::memcpy(m.data(), &count, 4);
  if (count != 0) std::memcpy(m.data() + 64, toks.data(), count * 4);
  for (std::uint32_t i = 0; i < count; ++i) fill(m.data() + p.header_bytes() + i * p.row, p.row, dkey(s, toks[i]));
  return m;
}

/// The answers of receiver r to sender s, compacted in the order of tokens_for(s, r).
inline std::vector<unsigned char> combine_message(const plan& p, std::uint32_t s, std::uint32_t r) {
  const auto toks = p.tokens_for(s, r);
  std::vector<unsigned char> m(toks.size() * p.row);
  for (std::size_t i = 0; i < toks.size(); ++i) fill(m.data() + i * p.row, p.row, ckey(s, toks[i], r));
  return m;
}

/// Wrong rows in a received dispatch message [count 64][indices][rows] from sender s (count mismatch:
/// max(count, expected) as in the shm check; then each row up to the smaller of the two).
inline std::uint64_t wrong_in_dispatch(const plan& p, std::uint32_t s, const std::vector<std::uint32_t>& want,
                                       const unsigned char* msg) {
  std::uint64_t wrong = 0;
  std::uint32_t count;
  std::memcpy(&count, msg, 4);
  if (count != want.size()) wrong += std::max<std::size_t>(count, want.size());
  for (std::uint32_t i = 0; i < std::min<std::size_t>(count, want.size()); ++i) {
    std::uint32_t t;
    std::memcpy(&t, msg + 64 + i * 4, 4);
    wrong += t != want[i] || !same(msg + p.header_bytes() + i * p.row, p.row, dkey(s, want[i]));
  }
  return wrong;
}

/// Wrong rows among the answers of receiver r to sender s.
inline std::uint64_t wrong_in_combine(const plan& p, std::uint32_t s, std::uint32_t r,
                                      const std::vector<std::uint32_t>& toks, const unsigned char* rows) {
  std::uint64_t wrong = 0;
  for (std::size_t i = 0; i < toks.size(); ++i) wrong += !same(rows + i * p.row, p.row, ckey(s, toks[i], r));
  return wrong;
}

}  // namespace eaas::perf::a2a
