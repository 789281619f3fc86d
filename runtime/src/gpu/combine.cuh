#pragma once

// The combine of a MoE layer, shared by every GPU path that sums expert rows back into tokens: the same
// order of additions everywhere, so that their outputs are bit-comparable.

#include <cstdint>

namespace eaas::runtime::gpu {

/// x_row += Σ_k y[rows[k]] (k = 0 .. topk-1 in order; rows[k] < 0: no row), by the threads of one
/// block, four floats at a time (hidden a multiple of 4, rows 16-byte aligned).
__device__ inline void add_topk_rows(const std::int32_t* rows, std::uint32_t topk, const float* y, std::uint32_t hidden,
                                     float* x_row) {
  float4* xr = reinterpret_cast<float4*>(x_row);
  for (std::uint32_t j = threadIdx.x; j < hidden / 4; j += blockDim.x) {
    float4 m = make_float4(0.f, 0.f, 0.f, 0.f);
    for (std::uint32_t k = 0; k < topk; ++k) {
      const std::int32_t r = rows[k];
      if (r < 0) continue;
      const float4 v = reinterpret_cast<const float4*>(y + std::size_t(r) * hidden)[j];
      m.x += v.x;
      m.y += v.y;
      m.z += v.z;
      m.w += v.w;
    }
    float4 o = xr[j];
    o.x += m.x;
    o.y += m.y;
    o.z += m.z;
    o.w += m.w;
    xr[j] = o;
  }
}

}  // namespace eaas::runtime::gpu
