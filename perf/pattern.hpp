#pragma once

// Deterministic data patterns: what the perf tools send and check before they time, and what the
// multi-process tests verify byte for byte.

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "eaas/common/macros.hpp"

namespace eaas::perf {

EAAS_HOST_DEVICE std::uint64_t splitmix64(std::uint64_t x) {
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

}  // namespace eaas::perf
