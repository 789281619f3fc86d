#pragma once

// What the multi-process test driver and its peer executable agree on. After a bootstrap over
// pipes (connection and region handles as hex lines), every command and answer travels through
// eaas itself: the driver put_signals a command into the peer's region, the peer answers with a
// put_signal into its response block in the driver's region.

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace eaas::mptest {

// Offsets inside each side's region.
inline constexpr std::size_t kCmdSeq = 0;        // peer region: command sequence (signal word)
inline constexpr std::size_t kCmdArgs = 64;      // peer region: u64 cmd, then args
inline constexpr std::size_t kRespBlock = 4096;  // driver region: peer k answers at kRespBlock * (k + 1)
inline constexpr std::size_t kRespSeq = 0;       //   + 0: answer sequence (signal word)
inline constexpr std::size_t kRespValue = 8;     //   + 8: result
inline constexpr std::size_t kMaxPeers = 64;
inline constexpr std::size_t kData = std::size_t{1} << 20;  // data area of every region starts here

enum cmd : std::uint64_t {
  cmd_verify = 1,      // (seed, offset, bytes): count bytes of my data area that differ from the pattern
  cmd_fill = 2,        // (seed, offset, bytes): write the pattern into my own data area
  cmd_put = 3,         // (seed, offset, bytes): put the pattern into the driver's data area
  cmd_add = 4,         // (count, offset): fetch_add 1, count times, on the driver's word at offset
  cmd_order_send = 5,  // (iterations, payload offset, signal offset): put_signal stream for the ordering check
  cmd_exit = 6,
};

inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// The pattern of transfer `seed`: byte j is byte (j % 8) of splitmix64(seed + j / 8).
inline void fill_pattern(std::uint64_t seed, unsigned char* dst, std::size_t bytes) {
  std::size_t j = 0;
  for (; j + 8 <= bytes; j += 8) {
    const std::uint64_t w = splitmix64(seed + j / 8);
    std::memcpy(dst + j, &w, 8);
  }
  if (j < bytes) {
    const std::uint64_t w = splitmix64(seed + j / 8);
    std::memcpy(dst + j, &w, bytes - j);
  }
}

/// Number of bytes of `p` that differ from the pattern.
inline std::uint64_t count_mismatches(std::uint64_t seed, const unsigned char* p, std::size_t bytes) {
  std::uint64_t bad = 0;
  std::size_t j = 0;
  for (; j + 8 <= bytes; j += 8) {
    const std::uint64_t w = splitmix64(seed + j / 8);
    if (std::memcmp(p + j, &w, 8) != 0)
      for (int b = 0; b < 8; ++b) bad += p[j + b] != static_cast<unsigned char>(w >> (8 * b));
  }
  if (j < bytes) {
    const std::uint64_t w = splitmix64(seed + j / 8);
    for (std::size_t b = 0; j + b < bytes; ++b) bad += p[j + b] != static_cast<unsigned char>(w >> (8 * b));
  }
  return bad;
}

}  // namespace eaas::mptest
