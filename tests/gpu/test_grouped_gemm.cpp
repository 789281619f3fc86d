// GPU grouped SwiGLU GEMM (eaas/runtime/grouped_gemm.hpp) against a CPU reference computed from the
// same bf16 values in double precision. The binary exits with 77 (ctest: skipped) without a CUDA device.
//
// Tolerance: |gpu - ref| <= 1e-2 * |ref| + 1e-2 * ||(down[i][j] * h[j] * w)_j||_2, i.e. 1e-2 relative,
// with a floor for outputs that cancel to near zero. h is rounded to bf16 on both sides (the kernel's
// contract), but the GPU's fp32 sums differ from the double ones in the last bits, so now and then an h
// element rounds to the neighbouring bf16 value; that moves y by at most 2^-7 of one term, which the
// floor covers. A K step left out, a wrong row, weight or expert is off by a large part of the norm.

#define DOCTEST_CONFIG_IMPLEMENT
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../common/doctest_main.hpp"
#include "../common/require_ok.hpp"
#include "eaas/runtime/grouped_gemm.hpp"

using namespace eaas;
using namespace eaas::runtime::gpu;

namespace {

#define REQUIRE_CUDA(expr) REQUIRE((expr) == cudaSuccess)

std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                     // round to nearest even
  return static_cast<std::uint16_t>(u >> 16);
}

float from_bf16(std::uint16_t b) {
  const std::uint32_t u = std::uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

constexpr std::uint32_t kPoison = 0xFFFFFFFFu;  // a NaN: any stray write changes it or is caught as NaN

struct dev_buf {
  void* p = nullptr;
  explicit dev_buf(std::size_t bytes) { REQUIRE_CUDA(cudaMalloc(&p, std::max<std::size_t>(bytes, 16))); }
  ~dev_buf() { cudaFree(p); }
  dev_buf(const dev_buf&) = delete;
  dev_buf& operator=(const dev_buf&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

template <class T>
void upload(const dev_buf& d, const std::vector<T>& v) {
  REQUIRE_CUDA(cudaMemcpy(d.p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
}

// One problem on the host: bf16 bit patterns for x and the weights, offsets, router weights.
struct problem {
  grouped_swiglu_shape shape;
  std::vector<std::uint16_t> x;                            // max_rows × hidden
  std::vector<std::vector<std::uint16_t>> gate, up, down;  // per expert
  std::vector<std::int32_t> offsets;                       // E + 1
  std::vector<float> row_weight;                           // max_rows, or empty for none
};

std::vector<std::uint16_t> random_bf16(std::size_t n, float scale, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<std::uint16_t> v(n);
  for (auto& e : v) e = to_bf16(d(rng));
  return v;
}

// Rows of group e start at `lead` + sum of earlier counts; `tail` rows follow the last group.
problem make_problem(std::uint32_t hidden, std::uint32_t inter, const std::vector<int>& counts, int lead, int tail,
                     bool weights, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  problem p;
  p.shape.experts = static_cast<std::uint32_t>(counts.size());
  p.shape.hidden = hidden;
  p.shape.inter = inter;
  p.offsets.push_back(lead);
  for (int c : counts) p.offsets.push_back(p.offsets.back() + c);
  p.shape.max_rows = static_cast<std::uint32_t>(p.offsets.back() + tail);
  p.x = random_bf16(std::size_t{p.shape.max_rows} * hidden, 1.0f, rng);
  const float sg = 1.0f / std::sqrt(static_cast<float>(hidden)), sd = 1.0f / std::sqrt(static_cast<float>(inter));
  for (std::size_t e = 0; e < counts.size(); ++e) {
    p.gate.push_back(random_bf16(std::size_t{inter} * hidden, 2.0f * sg, rng));
    p.up.push_back(random_bf16(std::size_t{inter} * hidden, 2.0f * sg, rng));
    p.down.push_back(random_bf16(std::size_t{hidden} * inter, 2.0f * sd, rng));
  }
  if (weights) {
    std::uniform_real_distribution<float> d(0.05f, 1.0f);
    p.row_weight.resize(p.shape.max_rows);
    for (auto& w : p.row_weight) w = d(rng);
  }
  return p;
}

// ref[r*hidden + i] and the norm of its terms mag[r*hidden + i], for rows inside groups.
void reference(const problem& p, std::vector<double>& ref, std::vector<double>& mag) {
  const std::size_t H = p.shape.hidden, I = p.shape.inter;
  ref.assign(std::size_t{p.shape.max_rows} * H, 0.0);
  mag.assign(ref.size(), 0.0);
  std::vector<float> xf(H), wg(I * H), wu(I * H), wd(H * I);
  std::vector<double> h(I);
  for (std::size_t e = 0; e < p.shape.experts; ++e) {
    if (p.offsets[e + 1] == p.offsets[e]) continue;
    for (std::size_t i = 0; i < I * H; ++i) {
      wg[i] = from_bf16(p.gate[e][i]);
      wu[i] = from_bf16(p.up[e][i]);
      wd[i] = from_bf16(p.down[e][i]);
    }
    for (int r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
      for (std::size_t k = 0; k < H; ++k) xf[k] = from_bf16(p.x[r * H + k]);
      for (std::size_t j = 0; j < I; ++j) {
        double g = 0, u = 0;
        for (std::size_t k = 0; k < H; ++k) {
          g += double{wg[j * H + k]} * xf[k];
          u += double{wu[j * H + k]} * xf[k];
        }
        h[j] = from_bf16(to_bf16(static_cast<float>(g / (1.0 + std::exp(-g)) * u)));
      }
      const double w = p.row_weight.empty() ? 1.0 : p.row_weight[r];
      for (std::size_t i = 0; i < H; ++i) {
        double s = 0, a = 0;
        for (std::size_t j = 0; j < I; ++j) {
          const double term = double{wd[i * I + j]} * h[j];
          s += term;
          a += term * term;
        }
        ref[r * H + i] = s * w;
        mag[r * H + i] = std::sqrt(a) * std::fabs(w);
      }
    }
  }
}

// Device copies of a problem, with per-expert weight allocations (or one stacked tensor each), the weights
// row-major or in the tiled layout (converted on the device by grouped_swiglu_tile).
struct device_problem {
  dev_buf x, offsets, row_weight, y, ws, error;
  dev_buf gate_ptrs, up_ptrs, down_ptrs;
  std::vector<std::unique_ptr<dev_buf>> owned;
  std::size_t ws_bytes;
  bool tiled;

  device_problem(const problem& p, bool stacked, bool tiled_weights = false)
      : x(p.x.size() * 2),
        offsets(p.offsets.size() * 4),
        row_weight(p.row_weight.size() * 4),
        y(std::size_t{p.shape.max_rows} * p.shape.hidden * 4),
        ws(grouped_swiglu_workspace_bytes(p.shape)),
        error(4),
        gate_ptrs(p.shape.experts * sizeof(void*)),
        up_ptrs(p.shape.experts * sizeof(void*)),
        down_ptrs(p.shape.experts * sizeof(void*)),
        ws_bytes(grouped_swiglu_workspace_bytes(p.shape)),
        tiled(tiled_weights) {
    upload(x, p.x);
    upload(offsets, p.offsets);
    if (!p.row_weight.empty()) upload(row_weight, p.row_weight);
    REQUIRE_CUDA(cudaMemset(error.p, 0, 4));
    const std::size_t E = p.shape.experts, n = std::size_t{p.shape.hidden} * p.shape.inter;
    const std::vector<std::vector<std::uint16_t>>* mats[3] = {&p.gate, &p.up, &p.down};
    const dev_buf* ptrs[3] = {&gate_ptrs, &up_ptrs, &down_ptrs};
    // [rows, cols] of gate, up, down
    const std::uint32_t dims[3][2] = {
        {p.shape.inter, p.shape.hidden}, {p.shape.inter, p.shape.hidden}, {p.shape.hidden, p.shape.inter}};
    for (int m = 0; m < 3; ++m) {
      // Tiled: the row-major bytes go to a staging buffer, grouped_swiglu_tile writes them to the weights'.
      const dev_buf staging(tiled ? n * 2 : 0);
      auto put = [&](char* dst, const std::vector<std::uint16_t>& w) {
        REQUIRE_CUDA(cudaMemcpy(tiled ? staging.p : dst, w.data(), n * 2, cudaMemcpyHostToDevice));
        if (tiled) {
          REQUIRE_OK(grouped_swiglu_tile(staging.p, dst, dims[m][0], dims[m][1], nullptr));
          REQUIRE_CUDA(cudaDeviceSynchronize());
        }
      };
      if (stacked) {
        auto& buf = owned.emplace_back(std::make_unique<dev_buf>(E * n * 2));
        for (std::size_t e = 0; e < E; ++e) put(buf->as<char>() + e * n * 2, (*mats[m])[e]);
        REQUIRE_OK(grouped_swiglu_expert_pointers(buf->p, n * 2, static_cast<std::uint32_t>(E),
                                                  ptrs[m]->as<const void*>(), nullptr));
      } else {
        std::vector<const void*> host_ptrs;
        for (std::size_t e = 0; e < E; ++e) {
          auto& buf = owned.emplace_back(std::make_unique<dev_buf>(n * 2));
          put(buf->as<char>(), (*mats[m])[e]);
          host_ptrs.push_back(buf->p);
        }
        upload(*ptrs[m], host_ptrs);
      }
    }
    REQUIRE_CUDA(cudaDeviceSynchronize());
  }

  grouped_swiglu_args args(bool with_weights) const {
    grouped_swiglu_args a;
    a.x = x.p;
    a.offsets = offsets.as<const std::int32_t>();
    a.row_weight = with_weights ? row_weight.as<const float>() : nullptr;
    a.gate = gate_ptrs.as<const void* const>();
    a.up = up_ptrs.as<const void* const>();
    a.down = down_ptrs.as<const void* const>();
    a.y = y.as<float>();
    a.workspace = ws.p;
    a.error = error.as<std::uint32_t>();
    a.layout = tiled ? grouped_swiglu_layout::tiled : grouped_swiglu_layout::row_major;
    return a;
  }

  void poison_y(const problem& p) const {
    REQUIRE_CUDA(cudaMemset(y.p, 0xFF, std::size_t{p.shape.max_rows} * p.shape.hidden * 4));
  }
};

// Counts wrong outputs: rows inside groups against the reference, rows outside must hold the poison.
struct verdict {
  std::size_t wrong = 0, stray = 0, checked = 0;
  std::string first;
};

std::vector<float> download_y(const problem& p, const device_problem& d) {
  std::vector<float> y(std::size_t{p.shape.max_rows} * p.shape.hidden);
  REQUIRE_CUDA(cudaMemcpy(y.data(), d.y.p, y.size() * 4, cudaMemcpyDeviceToHost));
  return y;
}

// y against ref (with the tolerance from mag) inside the groups, the poison outside.
verdict compare(const problem& p, const std::vector<float>& y, const std::vector<double>& ref,
                const std::vector<double>& mag) {
  const std::size_t H = p.shape.hidden;
  verdict v;
  for (std::size_t r = 0; r < p.shape.max_rows; ++r) {
    const bool inside = static_cast<int>(r) >= p.offsets.front() && static_cast<int>(r) < p.offsets.back();
    for (std::size_t i = 0; i < H; ++i) {
      const float got = y[r * H + i];
      if (!inside) {
        std::uint32_t bits;
        std::memcpy(&bits, &got, 4);
        if (bits != kPoison) {
          if (v.first.empty()) v.first = "row " + std::to_string(r) + " outside the groups was written";
          ++v.stray;
        }
        continue;
      }
      ++v.checked;
      const double want = ref[r * H + i], tol = 1e-2 * std::fabs(want) + 1e-2 * mag[r * H + i];
      if (!(std::fabs(got - want) <= tol)) {
        if (v.first.empty())
          v.first = "row " + std::to_string(r) + " col " + std::to_string(i) + ": got " + std::to_string(got) +
                    ", want " + std::to_string(want) + " (tol " + std::to_string(tol) + ")";
        ++v.wrong;
      }
    }
  }
  return v;
}

verdict compare(const problem& p, const device_problem& d) {
  std::vector<double> ref, mag;
  reference(p, ref, mag);
  return compare(p, download_y(p, d), ref, mag);
}

std::uint32_t read_error(const device_problem& d) {
  std::uint32_t e = 0;
  REQUIRE_CUDA(cudaMemcpy(&e, d.error.p, 4, cudaMemcpyDeviceToHost));
  return e;
}

// One call with router weights and `t` over a poisoned y (no error bits expected); y downloaded.
std::vector<float> run_tuned(const problem& p, const device_problem& d, const grouped_swiglu_tuning& t) {
  d.poison_y(p);
  REQUIRE_OK(grouped_swiglu(p.shape, d.args(true), d.ws_bytes, nullptr, t));
  REQUIRE_CUDA(cudaDeviceSynchronize());
  CHECK(read_error(d) == 0);
  return download_y(p, d);
}

void run_and_check(const problem& p, bool stacked, const grouped_swiglu_tuning& tuning = {}) {
  device_problem d(p, stacked);
  d.poison_y(p);
  REQUIRE_OK(grouped_swiglu(p.shape, d.args(!p.row_weight.empty()), d.ws_bytes, nullptr, tuning));
  REQUIRE_CUDA(cudaDeviceSynchronize());
  CHECK(read_error(d) == 0);
  const verdict v = compare(p, d);
  INFO(v.first);
  CHECK(v.checked == std::size_t(p.offsets.back() - p.offsets.front()) * p.shape.hidden);
  CHECK(v.wrong == 0);
  CHECK(v.stray == 0);
}

std::vector<int> random_counts(std::size_t experts, int max_count, double zero_fraction, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> z(0, 1);
  std::uniform_int_distribution<int> c(1, max_count);
  std::vector<int> v(experts);
  for (auto& n : v) n = z(rng) < zero_fraction ? 0 : c(rng);
  return v;
}

}  // namespace

TEST_CASE("grouped_swiglu matches the CPU reference: counts with zeros, partial tiles, several chunks") {
  struct shape_case {
    std::uint32_t hidden, inter;
    std::vector<int> counts;
    std::size_t random_experts;
  };
  // Hand-picked edges (0, 1, 7, 8, 9, 31, 32, 33, 70 rows), then random ones. 160 and 96: K tails (not
  // multiples of 64) and partially filled feature tiles. 2048 x 768: Qwen3-30B-A3B's expert, fewer rows.
  const std::vector<int> edges = {0, 1, 7, 8, 0, 9, 31, 32, 33, 70, 0};
  const shape_case shapes[] = {{1024, 256, edges, 9}, {160, 96, edges, 9}, {2048, 768, {0, 1, 9, 0, 33}, 2}};
  std::mt19937_64 rng(11);
  for (const auto& sc : shapes) {
    std::vector<int> counts = sc.counts;
    const auto more = random_counts(sc.random_experts, 40, 0.3, rng);
    counts.insert(counts.end(), more.begin(), more.end());
    for (bool with_weights : {true, false}) {
      CAPTURE(sc.hidden);
      CAPTURE(sc.inter);
      CAPTURE(with_weights);
      const problem p = make_problem(sc.hidden, sc.inter, counts, 3, 5, with_weights, rng());
      run_and_check(p, false);
    }
  }
}

TEST_CASE("grouped_swiglu: every kernel variant and a one-block-per-SM grid give the reference's results") {
  std::mt19937_64 rng(12);
  // K = 512 and 192: the cp.async rings wrap mid-item, and 192 leaves a tail for 4-step batches.
  const problem p = make_problem(512, 192, random_counts(10, 50, 0.3, rng), 0, 0, true, 99);
  const std::uint32_t variants[][2] = {{1, 2}, {1, 4}, {3, 0}, {4, 0}, {6, 0}};  // stages, k_unroll
  for (const auto& v : variants)
    for (std::uint32_t per_sm : {0u, 1u}) {
      CAPTURE(v[0]);
      CAPTURE(v[1]);
      CAPTURE(per_sm);
      run_and_check(p, false, grouped_swiglu_tuning{per_sm, v[0], v[1]});
    }
}

TEST_CASE(
    "grouped_swiglu: the staged path and its automatic pick give the reference's and the default path's results") {
  // Rows per expert 1, 7, 16, 33 (a full chunk and one row), 64 (two full chunks), inactive experts, and
  // counts that are not multiples of 8, 16 or 32, then random ones. K sizes against the 256-wide token
  // tiles: 2048 x 768 is Qwen3-30B-A3B's expert; 544 = two full tiles and one 32-wide step (and down's
  // last 128-feature tile a quarter full); 96, less than a tile (and gate/up's last 64-feature tile half
  // full: warps with no features still stage tokens); 288 / 320, a last tile of one / two steps; 32, one K
  // step, fewer than the steps kept in flight.
  struct shape_case {
    std::uint32_t hidden, inter;
    std::size_t random_experts;
  };
  const shape_case shapes[] = {{2048, 768, 0}, {544, 96, 6}, {288, 320, 6}, {32, 32, 6}};
  const std::vector<int> edges = {1, 0, 7, 16, 33, 64, 0, 5, 23, 40};
  // {blocks per SM, stages, k_unroll, staged, staged_from_rows}. One block per SM: each block walks many
  // work items, restaging its token tiles for each. staged_from_rows 1: the auto kernels take the staged
  // path; 1 << 20: the register path; 16: the pick the bench sweeps.
  const grouped_swiglu_tuning tunings[] = {{0, 0, 2, 1, 0}, {0, 1, 0, 1, 0}, {1, 0, 2, 1, 0},        {0, 0, 3, 1, 0},
                                           {1, 0, 3, 1, 0}, {0, 0, 0, 0, 1}, {0, 0, 0, 0, 1u << 20}, {1, 0, 2, 0, 16}};
  std::mt19937_64 rng(21);
  for (const auto& sc : shapes) {
    CAPTURE(sc.hidden);
    CAPTURE(sc.inter);
    std::vector<int> counts = edges;
    const auto more = random_counts(sc.random_experts, 70, 0.3, rng);
    counts.insert(counts.end(), more.begin(), more.end());
    const problem p = make_problem(sc.hidden, sc.inter, counts, 3, 5, true, rng());
    std::vector<double> ref, mag;
    reference(p, ref, mag);
    const device_problem d(p, false);
    const std::size_t inside = std::size_t(p.offsets.back() - p.offsets.front()) * p.shape.hidden;

    const std::vector<float> y_default = run_tuned(p, d, {});
    {
      const verdict v = compare(p, y_default, ref, mag);
      INFO(v.first);
      REQUIRE(v.checked == inside);
      REQUIRE(v.wrong == 0);
      REQUIRE(v.stray == 0);
    }
    for (const auto& t : tunings) {
      CAPTURE(t.ctas_per_sm);
      CAPTURE(t.stages);
      CAPTURE(t.k_unroll);
      CAPTURE(t.staged);
      CAPTURE(t.staged_from_rows);
      const std::vector<float> y = run_tuned(p, d, t);
      const verdict v = compare(p, y, ref, mag);
      INFO(v.first);
      CHECK(v.checked == inside);
      CHECK(v.wrong == 0);
      CHECK(v.stray == 0);
      // Against the default path, with the reference's tolerance: the staged path feeds the tensor cores
      // the same fragments in the same order, so only a different rounding of h could move an output.
      std::size_t off_default = 0;
      for (std::size_t i = 0; i < y.size(); ++i) {
        const double tol = 1e-2 * std::fabs(ref[i]) + 1e-2 * mag[i];
        if (std::fabs(double(y[i]) - double(y_default[i])) > tol) ++off_default;
      }
      CHECK(off_default == 0);
    }
  }
}

TEST_CASE("grouped_swiglu_tile: the device writes the host's tiled index; bad arguments are refused") {
  constexpr std::uint32_t rows = 48, cols = 96;
  std::vector<std::uint16_t> src(std::size_t{rows} * cols);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::uint16_t>(i * 2654435761u >> 7);
  const dev_buf d_src(src.size() * 2), d_dst(src.size() * 2);
  REQUIRE_CUDA(cudaMemcpy(d_src.p, src.data(), src.size() * 2, cudaMemcpyHostToDevice));
  REQUIRE_CUDA(cudaMemset(d_dst.p, 0xFF, src.size() * 2));
  REQUIRE_OK(grouped_swiglu_tile(d_src.p, d_dst.p, rows, cols, nullptr));
  std::vector<std::uint16_t> dst(src.size());
  REQUIRE_CUDA(cudaMemcpy(dst.data(), d_dst.p, dst.size() * 2, cudaMemcpyDeviceToHost));
  std::size_t misplaced = 0;
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c)
      misplaced += dst[grouped_swiglu_tiled_index(r, c, cols)] != src[r * cols + c];
  CHECK(misplaced == 0);

  CHECK(grouped_swiglu_tile(d_src.p, d_dst.p, 40, cols, nullptr) == status::invalid_argument);  // rows % 16
  CHECK(grouped_swiglu_tile(d_src.p, d_dst.p, rows, 80, nullptr) == status::invalid_argument);  // cols % 32
  CHECK(grouped_swiglu_tile(d_src.p, d_dst.p, 0, cols, nullptr) == status::invalid_argument);
  CHECK(grouped_swiglu_tile(nullptr, d_dst.p, rows, cols, nullptr) == status::invalid_argument);
  CHECK(grouped_swiglu_tile(d_src.p, d_src.p, rows, cols, nullptr) == status::invalid_argument);
  CHECK(grouped_swiglu_tile(d_src.p, d_src.as<char>() + 1024, rows, cols, nullptr) == status::invalid_argument);
  CHECK(grouped_swiglu_tile(d_dst.as<char>() + 4096, d_dst.p, rows, cols, nullptr) == status::invalid_argument);
  CHECK(grouped_swiglu_tile(d_src.as<char>() + 8, d_dst.p, rows, cols, nullptr) == status::invalid_argument);
}

TEST_CASE("grouped_swiglu: tiled weights give the row-major default's outputs bit for bit, at every copy depth") {
  // The shapes and counts of the staged test (K tails, tiles of one or two steps, a single K step, half-full
  // feature tiles, inactive experts). The tiled path reads the weights through bulk copies into shared memory
  // but feeds the tensor cores the same fragments in the same order as the row-major default (the staged
  // path), so every output must be the same float, and rows outside the groups keep the poison.
  struct shape_case {
    std::uint32_t hidden, inter;
    std::size_t random_experts;
  };
  const shape_case shapes[] = {{2048, 768, 0}, {544, 96, 6}, {288, 320, 6}, {32, 32, 6}};
  const std::vector<int> edges = {1, 0, 7, 16, 33, 64, 0, 5, 23, 40};
  // {blocks per SM, ..., tiled_steps, tiled_depth, tiled_rows}; one block per SM: every block walks many work
  // items and its mbarriers go through many phases. 64-row items: 33, 40 and 64 rows in one item, 70 in two.
  // Rows 0 (and the all-zero default): the device picks 64-row items for the first count set below (about 30
  // rows per active expert) and 32-row items for the second (at most 12).
  std::vector<grouped_swiglu_tuning> tunings;
  // The last field: gate/up and down as two kernels (the others run both in one kernel, through a work queue).
  const std::uint32_t tiled[][4] = {{0, 0, 0, 0},  {0, 0, 0, 1},  {2, 4, 32, 0}, {1, 8, 32, 0},
                                    {2, 3, 32, 0}, {1, 4, 32, 0}, {2, 3, 64, 0}, {1, 4, 64, 0}};
  for (const auto& v : tiled)
    for (std::uint32_t per_sm : {0u, 1u}) tunings.push_back({per_sm, 0, 0, 0, 0, v[0], v[1], v[2], v[3]});
  std::mt19937_64 rng(31);
  for (const auto& sc : shapes)
    for (const bool small : {false, true}) {
      CAPTURE(sc.hidden);
      CAPTURE(sc.inter);
      CAPTURE(small);
      std::vector<int> counts = small ? random_counts(10, 12, 0.2, rng) : edges;
      const auto more = random_counts(sc.random_experts, small ? 12 : 70, 0.3, rng);
      counts.insert(counts.end(), more.begin(), more.end());
      const problem p = make_problem(sc.hidden, sc.inter, counts, 3, 5, true, rng());
      std::vector<double> ref, mag;
      reference(p, ref, mag);
      for (const bool stacked : {false, true}) {
        CAPTURE(stacked);
        const device_problem rm(p, stacked), tl(p, stacked, true);
        const std::vector<float> y_default = run_tuned(p, rm, {});
        const verdict v = compare(p, y_default, ref, mag);
        INFO(v.first);
        REQUIRE(v.wrong == 0);
        REQUIRE(v.stray == 0);
        for (const auto& t : tunings) {
          CAPTURE(t.ctas_per_sm);
          CAPTURE(t.tiled_steps);
          CAPTURE(t.tiled_depth);
          CAPTURE(t.tiled_rows);
          CAPTURE(t.tiled_two_kernels);
          const std::vector<float> y = run_tuned(p, tl, t);
          std::size_t differ = 0;
          for (std::size_t i = 0; i < y.size(); ++i) differ += std::memcmp(&y[i], &y_default[i], 4) != 0;
          CHECK(differ == 0);
        }
        // The same tiled bytes read as row-major are a different matrix, so the sums must change (the layout is
        // honoured, not ignored), except where both K sizes are 32: one K step, where the layout is row-major.
        if (sc.hidden == 32 && sc.inter == 32) continue;
        grouped_swiglu_args wrong = tl.args(true);
        wrong.layout = grouped_swiglu_layout::row_major;
        tl.poison_y(p);
        REQUIRE_OK(grouped_swiglu(p.shape, wrong, tl.ws_bytes, nullptr));
        REQUIRE_CUDA(cudaDeviceSynchronize());
        const verdict w = compare(p, download_y(p, tl), ref, mag);
        CHECK(w.wrong > 0);
      }
    }
}

TEST_CASE("grouped_swiglu: one expert holds every row (a prefill-sized group)") {
  std::vector<int> counts(8, 0);
  counts[5] = 300;
  const problem p = make_problem(256, 128, counts, 2, 2, false, 7);
  run_and_check(p, false);
}

TEST_CASE("grouped_swiglu: more active experts than the shared-memory list holds, stacked weights") {
  std::mt19937_64 rng(13);
  std::vector<int> counts = random_counts(1500, 4, 0.15, rng);
  const problem p = make_problem(64, 32, counts, 0, 1, true, 8);
  int active = 0;
  for (int c : counts) active += c > 0;
  REQUIRE(active > 1024);
  run_and_check(p, true);
}

TEST_CASE("grouped_swiglu: no rows at all leaves y untouched") {
  const problem p = make_problem(128, 64, std::vector<int>(6, 0), 4, 4, true, 9);
  run_and_check(p, false);
}

TEST_CASE("grouped_swiglu: captured once in a CUDA graph, replayed with different device-side counts") {
  constexpr std::uint32_t kExperts = 12, kHidden = 512, kInter = 128, kMaxRows = 256;
  std::mt19937_64 rng(14);
  // Every replay uses the same buffers: new x, new offsets, same weights.
  std::vector<int> first = random_counts(kExperts, 20, 0.3, rng);
  problem p = make_problem(kHidden, kInter, first, 1, 0, true, 15);
  // Pad to the capacity so every later count set fits.
  p.shape.max_rows = kMaxRows;
  p.x.resize(std::size_t{kMaxRows} * kHidden);
  p.row_weight.resize(kMaxRows, 0.5f);
  device_problem d(p, false);

  cudaStream_t stream;
  REQUIRE_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  REQUIRE_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const status captured = grouped_swiglu(p.shape, d.args(true), d.ws_bytes, stream);
  REQUIRE_CUDA(cudaStreamEndCapture(stream, &graph));
  REQUIRE_OK(captured);
  cudaGraphExec_t exec;
  REQUIRE_CUDA(cudaGraphInstantiate(&exec, graph, 0));

  std::vector<std::vector<int>> rounds = {first, random_counts(kExperts, 20, 0.5, rng), std::vector<int>(kExperts, 0),
                                          random_counts(kExperts, 20, 0.0, rng)};
  rounds[2][kExperts - 1] = 200;  // one expert holds everything
  for (std::size_t round = 0; round < rounds.size(); ++round) {
    CAPTURE(round);
    std::vector<std::int32_t> offsets = {static_cast<std::int32_t>(round)};
    for (int c : rounds[round]) offsets.push_back(offsets.back() + c);
    REQUIRE(offsets.back() <= static_cast<std::int32_t>(kMaxRows));
    p.offsets = offsets;
    std::mt19937_64 xr(100 + round);
    p.x = random_bf16(std::size_t{kMaxRows} * kHidden, 1.0f, xr);
    upload(d.offsets, p.offsets);
    upload(d.x, p.x);
    d.poison_y(p);
    REQUIRE_CUDA(cudaGraphLaunch(exec, stream));
    REQUIRE_CUDA(cudaStreamSynchronize(stream));
    CHECK(read_error(d) == 0);
    const verdict v = compare(p, d);
    INFO(v.first);
    CHECK(v.wrong == 0);
    CHECK(v.stray == 0);
  }
  REQUIRE_CUDA(cudaGraphExecDestroy(exec));
  REQUIRE_CUDA(cudaGraphDestroy(graph));
  REQUIRE_CUDA(cudaStreamDestroy(stream));
}

TEST_CASE("grouped_swiglu: the host refuses bad arguments, the device refuses bad offsets and weight pointers") {
  const problem p = make_problem(128, 64, {3, 0, 5}, 2, 2, true, 16);
  device_problem d(p, false);
  const grouped_swiglu_args good = d.args(true);

  SUBCASE("host checks") {
    auto bad_shape = [&](auto edit) {
      grouped_swiglu_shape s = p.shape;
      edit(s);
      return grouped_swiglu(s, good, d.ws_bytes, nullptr);
    };
    CHECK(bad_shape([](auto& s) { s.hidden = 100; }) == status::invalid_argument);
    CHECK(bad_shape([](auto& s) { s.inter = 48; }) == status::invalid_argument);
    CHECK(bad_shape([](auto& s) { s.experts = 0; }) == status::invalid_argument);
    CHECK(bad_shape([](auto& s) { s.max_rows = 0; }) == status::invalid_argument);
    grouped_swiglu_args a = good;
    a.x = nullptr;
    CHECK(grouped_swiglu(p.shape, a, d.ws_bytes, nullptr) == status::invalid_argument);
    a = good;
    a.x = static_cast<const char*>(good.x) + 2;
    CHECK(grouped_swiglu(p.shape, a, d.ws_bytes, nullptr) == status::invalid_argument);
    a = good;
    a.workspace = nullptr;
    CHECK(grouped_swiglu(p.shape, a, d.ws_bytes, nullptr) == status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, good, d.ws_bytes - 1, nullptr) == status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 2, 0}) ==
          status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 1, 3}) ==
          status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 4, 1, 0}) ==
          status::invalid_argument);  // staged: 2 or 3 steps in flight
    CHECK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 3, 0, 1, 0}) ==
          status::invalid_argument);  // staged and a cp.async ring
    CHECK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 2, 0}) ==
          status::invalid_argument);
    // Tiled knobs with row-major weights, row-major knobs or an unknown depth with tiled weights, a bad layout.
    CHECK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 0, 0, 2, 4}) ==
          status::invalid_argument);
    grouped_swiglu_args tiled = good;
    tiled.layout = grouped_swiglu_layout::tiled;
    CHECK(grouped_swiglu(p.shape, tiled, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 1, 0}) ==
          status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, tiled, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 0, 0, 2, 5}) ==
          status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, tiled, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 0, 0, 3, 0}) ==
          status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, tiled, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 0, 0, 2, 6, 64}) ==
          status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, tiled, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 0, 0, 2, 4, 0}) ==
          status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, tiled, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 0, 0, 2, 3, 0}) ==
          status::invalid_argument);  // rows 0 (the device's pick) only as the all-zero default
    CHECK(grouped_swiglu(p.shape, tiled, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 0, 0, 2, 3, 32, 1}) ==
          status::invalid_argument);  // two kernels only for the default pair
    CHECK(grouped_swiglu(p.shape, tiled, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 0, 0, 0, 0, 0, 2}) ==
          status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 0, 0, 0, 0, 0, 1}) ==
          status::invalid_argument);  // a tiled knob with row-major weights
    CHECK(grouped_swiglu(p.shape, tiled, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 0, 0, 2, 4, 48}) ==
          status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 0, 0, 0, 0, 64}) ==
          status::invalid_argument);
    tiled.layout = static_cast<grouped_swiglu_layout>(2);
    CHECK(grouped_swiglu(p.shape, tiled, d.ws_bytes, nullptr) == status::invalid_argument);
    CHECK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr, grouped_swiglu_tuning{0, 0, 0, 1, 16}) ==
          status::invalid_argument);  // the automatic pick is its own kernel
    CHECK(!last_error().empty());
  }

  SUBCASE("decreasing offsets: nothing written, error bit set") {
    upload(d.offsets, std::vector<std::int32_t>{2, 5, 4, 10});
    d.poison_y(p);
    REQUIRE_OK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr));
    REQUIRE_CUDA(cudaDeviceSynchronize());
    CHECK(read_error(d) == kGroupedSwigluBadOffsets);
    problem none = p;
    none.offsets = {0, 0, 0, 0};  // compare() then expects every row poisoned
    CHECK(compare(none, d).stray == 0);
  }

  SUBCASE("offsets past max_rows: nothing written, error bit set") {
    upload(d.offsets, std::vector<std::int32_t>{2, 5, 5, static_cast<std::int32_t>(p.shape.max_rows) + 1});
    d.poison_y(p);
    REQUIRE_OK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr));
    REQUIRE_CUDA(cudaDeviceSynchronize());
    CHECK(read_error(d) == kGroupedSwigluBadOffsets);
    problem none = p;
    none.offsets = {0, 0, 0, 0};
    CHECK(compare(none, d).stray == 0);
  }

  SUBCASE("a null weight pointer matters only for an expert with rows") {
    const void* null_ptr = nullptr;
    // Expert 1 has no rows: its null pointer is fine.
    REQUIRE_CUDA(cudaMemcpy(d.up_ptrs.as<const void*>() + 1, &null_ptr, sizeof(null_ptr), cudaMemcpyHostToDevice));
    d.poison_y(p);
    REQUIRE_OK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr));
    REQUIRE_CUDA(cudaDeviceSynchronize());
    CHECK(read_error(d) == 0);
    const verdict v = compare(p, d);
    INFO(v.first);
    CHECK(v.wrong == 0);
    CHECK(v.stray == 0);
    // Expert 2 has rows: refused.
    REQUIRE_CUDA(cudaMemcpy(d.down_ptrs.as<const void*>() + 2, &null_ptr, sizeof(null_ptr), cudaMemcpyHostToDevice));
    d.poison_y(p);
    REQUIRE_OK(grouped_swiglu(p.shape, good, d.ws_bytes, nullptr));
    REQUIRE_CUDA(cudaDeviceSynchronize());
    CHECK(read_error(d) == kGroupedSwigluBadWeights);
    problem none = p;
    none.offsets = {0, 0, 0, 0};
    CHECK(compare(none, d).stray == 0);
  }
}

int main(int argc, char** argv) {
  return eaas::test::run_tests(argc, argv, [] {
    int n = 0;
    return cudaGetDeviceCount(&n) != cudaSuccess || n == 0 ? "no CUDA device: skipping the grouped GEMM tests"
                                                           : nullptr;
  });
}
