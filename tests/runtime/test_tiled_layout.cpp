// The grouped GEMM's tiled weight layout (eaas/runtime/grouped_gemm.hpp), on the host: the index is a
// permutation of the matrix, and it puts each thread's fragment where the kernel reads it. The device's
// grouped_swiglu_tile is held to this index in the GPU tests.

#include <doctest/doctest.h>

#include <cstddef>
#include <vector>

#include "eaas/runtime/grouped_gemm.hpp"

using eaas::runtime::gpu::grouped_swiglu_tiled_index;

TEST_CASE("tiled layout: a permutation of every element, for several shapes") {
  for (const auto& [rows, cols] : {std::pair<std::size_t, std::size_t>{16, 32}, {48, 96}, {32, 544}, {768, 64}}) {
    CAPTURE(rows);
    CAPTURE(cols);
    std::vector<int> hits(rows * cols, 0);
    std::size_t out_of_range = 0;
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t c = 0; c < cols; ++c) {
        const std::size_t i = grouped_swiglu_tiled_index(r, c, cols);
        if (i >= rows * cols)
          ++out_of_range;
        else
          ++hits[i];
      }
    CHECK(out_of_range == 0);
    std::size_t not_once = 0;
    for (const int h : hits) not_once += h != 1;
    CHECK(not_once == 0);
  }
}

TEST_CASE(
    "tiled layout: one 1 KiB block per 16 rows x 32 columns, a lane's 8 elements of rows g and g + 8 at 16 l "
    "and 512 + 16 l bytes") {
  constexpr std::size_t cols = 96, steps = cols / 32;
  for (std::size_t tile = 0; tile < 3; ++tile)
    for (std::size_t step = 0; step < steps; ++step)
      for (std::size_t lane = 0; lane < 32; ++lane) {
        const std::size_t g = lane / 4, t = lane % 4, block = (tile * steps + step) * 512;  // elements
        for (std::size_t e = 0; e < 8; ++e) {
          const std::size_t col = step * 32 + 8 * t + e;
          CHECK(grouped_swiglu_tiled_index(tile * 16 + g, col, cols) == block + lane * 8 + e);
          CHECK(grouped_swiglu_tiled_index(tile * 16 + 8 + g, col, cols) == block + 256 + lane * 8 + e);
        }
      }
  // A 16-row tile is contiguous and starts where row-major row 16 * tile starts.
  CHECK(grouped_swiglu_tiled_index(32, 0, cols) == 32 * cols);
  CHECK(grouped_swiglu_tiled_index(47, cols - 1, cols) == 48 * cols - 1);
}
