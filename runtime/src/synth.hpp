#pragma once

// Deterministic pseudo-random fills (splitmix64): the same numbers on every machine and compiler.

#include <cstddef>
#include <cstdint>

namespace eaas::runtime::detail {

constexpr std::uint64_t splitmix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

constexpr std::uint64_t mix(std::uint64_t a, std::uint64_t b) {
  return splitmix(a ^ splitmix(b + 0x632BE59BD9B4E019ull));
}
template <class... R>
constexpr std::uint64_t mix(std::uint64_t a, std::uint64_t b, R... rest) {
  return mix(mix(a, b), rest...);
}

/// Uniform in [-scale, scale): element i depends only on (key, i).
inline void fill_uniform(float* out, std::size_t n, std::uint64_t key, float scale) {
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t r = splitmix(key + i * 0x9E3779B97F4A7C15ull);
    out[i] = (static_cast<float>(r >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * scale;
  }
}

}  // namespace eaas::runtime::detail
