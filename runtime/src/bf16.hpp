#pragma once

// bf16 <-> fp32 on the host, for requests, checkpoints and the GPU experts' weights.

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "eaas/runtime/grouped_gemm.hpp"

namespace eaas::runtime {

inline float bf16_to_f32(std::uint16_t v) {
  const std::uint32_t u = std::uint32_t{v} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

/// Round to nearest, ties to even; NaN stays NaN; overflow carries into inf.
inline std::uint16_t f32_to_bf16(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  return static_cast<std::uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/// A row-major fp32 [rows, cols] weight matrix as bf16 in the grouped GEMM's tiled layout
/// (grouped_swiglu_tiled_index; rows a multiple of 16, cols of 32); dst holds rows * cols values.
inline void f32_to_bf16_tiled(const float* src, std::size_t rows, std::size_t cols, std::uint16_t* dst) {
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c)
      dst[gpu::grouped_swiglu_tiled_index(r, c, cols)] = f32_to_bf16(src[r * cols + c]);
}

}  // namespace eaas::runtime
