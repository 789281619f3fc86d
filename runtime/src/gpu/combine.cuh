#pragma once

// The combine of a MoE layer, shared by every GPU path that sums expert rows back into tokens: the same
// order of additions everywhere, so that their outputs are bit-comparable.

#include <cstddef>
#include <cstdint>

namespace eaas::runtime::gpu {

/// x_row += Σ over i = 0 .. n-1, in order, of the row row_at(i) (a `const float*` to `hidden` floats, or null:
/// none), by the threads of one block, four floats at a time (hidden a multiple of 4, rows 16-byte aligned). The
/// rows are read from L2 (__ldcg): an earlier kernel or a peer wrote them, and this SM's L1 may hold older copies.
template <class RowAt>
__device__ inline void add_rows(RowAt row_at, std::uint32_t n, std::uint32_t hidden, float* x_row) {
  float4* xr = reinterpret_cast<float4*>(x_row);
  for (std::uint32_t j = threadIdx.x; j < hidden / 4; j += blockDim.x) {
    float4 m = make_float4(0.f, 0.f, 0.f, 0.f);
    for (std::uint32_t i = 0; i < n; ++i) {
      const float* row = row_at(i);
      if (row == nullptr) continue;
      const float4 v = __ldcg(reinterpret_cast<const float4*>(row) + j);
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

/// x_row += Σ_k y[rows[k]] (k = 0 .. topk-1 in order; rows[k] < 0: no row), as add_rows.
__device__ inline void add_topk_rows(const std::int32_t* rows, std::uint32_t topk, const float* y, std::uint32_t hidden,
                                     float* x_row) {
  add_rows(
      [&](std::uint32_t k) -> const float* {
        const std::int32_t r = rows[k];
        return r < 0 ? nullptr : y + std::size_t(r) * hidden;
      },
      topk, hidden, x_row);
}

}  // namespace eaas::runtime::gpu
