// eaas-grouped-gemm-bench: the expert server's grouped SwiGLU GEMM (eaas/runtime/grouped_gemm.hpp) at
// decode sizes, next to two references measured in the same run on the same GPU:
//   copy     cudaMemcpyAsync device-to-device of --copy-mib MiB, counted as bytes read + bytes written
//            (the usual "copy bandwidth"; about 4.0-4.3 TB/s on an H200)
//   cublas   per-expert cublasGemmEx (bf16 inputs, fp32 compute) over the active experts only:
//            gate and up into fp32, one silu*mul kernel into bf16 h, down into fp32 y; the whole loop is
//            captured in one CUDA graph, so host launch cost is not counted against it
// Our op is captured in a CUDA graph too (its three launches), with the weights in the tiled layout and the
// default tuning, as the expert server and the monolithic baseline run it. Both are validated before they are
// timed: eaas against a CPU double-precision reference on sampled rows (#wrong) and against cuBLAS on
// every row (max_rel_diff). With --sweep every variant of the kernel (grouped_swiglu_tuning) is held to
// the same sampled reference (#wrong) and compared with the default's output on every row before it is
// timed (row-major variants read a row-major copy of the same weights); a variant that fails fails the run.
//
// Bytes moved by the op (the numerator of every GB/s column): the weights of the active experts
// (3 * hidden * inter * 2 bytes each) + x read (bf16) + y written (fp32) + h written and read (bf16).
// Routing: every token picks `topk` distinct experts uniformly at random (seeded), so the counts are
// those of a balanced router.

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "driver.hpp"
#include "eaas/runtime/grouped_gemm.hpp"
#include "gpu_util.cuh"

using namespace eaas;
using namespace eaas::perf;
namespace gg = eaas::runtime::gpu;

namespace {

#define CUBLAS(x)                                                                               \
  do {                                                                                          \
    if (cublasStatus_t s_ = (x); s_ != CUBLAS_STATUS_SUCCESS) {                                 \
      std::fprintf(stderr, "cuBLAS error: %s at %s:%d: %d\n", #x, __FILE__, __LINE__, int(s_)); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

struct model {
  std::string name;
  std::uint32_t hidden, inter, experts, topk;
  std::vector<int> tokens;
};

// ---- deterministic data: the same bits on the device (fill) and the host (reference) ------------------

__host__ __device__ inline std::uint64_t mix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in [-scale, scale): a 24-bit integer (exact in float) times one rounded factor.
__host__ __device__ inline float value_at(std::uint64_t seed, std::uint64_t i, float scale) {
  const auto v = static_cast<std::int32_t>(mix(seed ^ (i * 0xD1B54A32D192ED03ull)) >> 40) - (1 << 23);
  return static_cast<float>(v) * (scale / 8388608.0f);
}

__global__ void fill_bf16(__nv_bfloat16* p, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x)
    p[i] = __float2bfloat16_rn(value_at(seed, i, scale));
}

__global__ void silu_mul(const float* g, const float* u, __nv_bfloat16* h, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x)
    h[i] = __float2bfloat16_rn(g[i] / (1.0f + __expf(-g[i])) * u[i]);
}

float bf16_to_float(std::uint16_t b) {
  const std::uint32_t u = std::uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float round_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

template <class T>
T* dalloc(std::size_t n) {
  T* p = nullptr;
  EAAS_CU(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
  return p;
}

std::vector<float> download_bf16(const __nv_bfloat16* p, std::size_t n) {
  std::vector<std::uint16_t> raw(n);
  EAAS_CU(cudaMemcpy(raw.data(), p, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (std::size_t i = 0; i < n; ++i) f[i] = bf16_to_float(raw[i]);
  return f;
}

// Times `body` (which queues work on `st`) `reps` times after `warm` untimed runs; µs per run.
template <class F>
latency_stats time_it(cudaStream_t st, int warm, int reps, F&& body) {
  for (int i = 0; i < warm; ++i) body();
  std::vector<cudaEvent_t> ev(static_cast<std::size_t>(reps) + 1);
  for (auto& e : ev) EAAS_CU(cudaEventCreate(&e));
  EAAS_CU(cudaEventRecord(ev[0], st));
  for (int i = 0; i < reps; ++i) {
    body();
    EAAS_CU(cudaEventRecord(ev[static_cast<std::size_t>(i) + 1], st));
  }
  EAAS_CU(cudaEventSynchronize(ev.back()));
  std::vector<double> us;
  for (int i = 0; i < reps; ++i) {
    float ms = 0;
    EAAS_CU(cudaEventElapsedTime(&ms, ev[static_cast<std::size_t>(i)], ev[static_cast<std::size_t>(i) + 1]));
    us.push_back(ms * 1e3);
  }
  for (auto& e : ev) EAAS_CU(cudaEventDestroy(e));
  return summarize(us);
}

double copy_bandwidth(cudaStream_t st, std::size_t bytes, int reps) {
  char* a = dalloc<char>(bytes);
  char* b = dalloc<char>(bytes);
  EAAS_CU(cudaMemset(a, 1, bytes));
  const latency_stats s =
      time_it(st, 3, reps, [&] { EAAS_CU(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, st)); });
  EAAS_CU(cudaFree(a));
  EAAS_CU(cudaFree(b));
  return 2.0 * static_cast<double>(bytes) / (s.t_typical * 1e-6) / 1e9;
}

cudaGraphExec_t capture(cudaStream_t st, const std::function<void()>& body) {
  cudaGraph_t g;
  EAAS_CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  body();
  EAAS_CU(cudaStreamEndCapture(st, &g));
  cudaGraphExec_t exec;
  EAAS_CU(cudaGraphInstantiate(&exec, g, 0));
  EAAS_CU(cudaGraphDestroy(g));
  return exec;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> models_sel = {"qwen3-30b-a3b", "deepseek-v3"};
  std::vector<int> tokens_override;
  std::uint32_t experts_override = 0, hidden = 0, inter = 0, experts = 0, topk = 8;
  int reps = 20, warm = 3, copy_mib = 1024;
  std::uint64_t seed = 1;
  bool no_cublas = false, sweep = false;
  std::string json;
  CLI::App app{
      "eaas-grouped-gemm-bench: grouped SwiGLU GEMM (bf16, fp32 accumulate) at decode sizes; achieved GB/s next to "
      "the device-to-device copy bandwidth and a cuBLAS per-expert loop, measured in the same run"};
  app.add_option("--model", models_sel, "qwen3-30b-a3b, deepseek-v3, custom (with --hidden --inter --experts)")
      ->capture_default_str();
  app.add_option("--tokens", tokens_override, "token counts (default per model: 64 128 256 512 / 32 128)");
  app.add_option("--local-experts", experts_override, "override the model's expert count (experts on this server)");
  app.add_option("--hidden", hidden, "custom model: hidden size");
  app.add_option("--inter", inter, "custom model: expert intermediate size");
  app.add_option("--experts", experts, "custom model: experts");
  app.add_option("--topk", topk, "custom model: experts per token")->capture_default_str();
  app.add_option("--reps", reps, "timed graph replays per point")->capture_default_str();
  app.add_option("--warmup", warm, "untimed replays before timing")->capture_default_str();
  app.add_option("--copy-mib", copy_mib, "size of the device-to-device copy that measures copy bandwidth")
      ->capture_default_str();
  app.add_option("--seed", seed, "data and routing seed")->capture_default_str();
  app.add_flag("--no-cublas", no_cublas, "skip the cuBLAS reference");
  app.add_flag("--sweep", sweep,
               "also validate and time the kernel's variants (register / cp.async / staged pipelines, blocks per SM, "
               "the automatic pick)");
  app.add_option("--json", json, "write results as JSON to this file");
  CLI11_PARSE(app, argc, argv);

  std::vector<model> models;
  for (const auto& m : models_sel) {
    if (m == "qwen3-30b-a3b")
      models.push_back({m, 2048, 768, 128, 8, {64, 128, 256, 512}});
    else if (m == "deepseek-v3")
      models.push_back({m, 7168, 2048, 256, 8, {32, 128}});
    else if (m == "custom" && hidden && inter && experts && topk && topk <= experts)
      models.push_back({m, hidden, inter, experts, topk, {64, 128}});
    else
      die("unknown model or incomplete custom shape: " + m, status::invalid_argument);
    if (experts_override) models.back().experts = experts_override;
    if (!tokens_override.empty()) models.back().tokens = tokens_override;
    if (models.back().topk > models.back().experts) die("topk exceeds the experts", status::invalid_argument);
  }

  int count = 0;
  EAAS_CU(cudaGetDeviceCount(&count));
  if (count == 0) die("no CUDA device", status::unsupported);
  cudaDeviceProp prop{};
  EAAS_CU(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t st;
  EAAS_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));

  const double copy_gbps = copy_bandwidth(st, std::size_t(copy_mib) << 20, std::max(reps, 10));
  std::printf("# eaas-grouped-gemm-bench on %s (%d SMs, %.0f MiB L2)\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize / 1048576.0);
  std::printf("# copy bandwidth: %.0f GB/s (cudaMemcpyAsync D2D of %d MiB, (read + written bytes) / median time)\n",
              copy_gbps, copy_mib);
  std::printf(
      "# bytes = active experts' weights (3*hidden*inter*2 each) + x (bf16) + y (fp32) + h (bf16, in and out)\n");
  std::printf(
      "# times: median of %d CUDA-graph replays; GB/s = bytes / median time; %%copy = GB/s / copy bandwidth;\n"
      "#        speedup = cublas_us / eaas_us; #wrong = sampled outputs off the CPU reference by more than\n"
      "#        1e-2*|ref| + 1e-2*norm2(terms); max_rel_diff = max |eaas - cublas| / max |cublas| over all rows\n",
      reps);
  nlohmann::json out = {{"tool", "eaas-grouped-gemm-bench"},
                        {"date", today_utc()},
                        {"gpu", prop.name},
                        {"sms", prop.multiProcessorCount},
                        {"copy_gbps", copy_gbps},
                        {"copy_bytes", std::size_t(copy_mib) << 20},
                        {"reps", reps}};
  nlohmann::json points = nlohmann::json::array();

  cublasHandle_t blas = nullptr;
  void* blas_ws = nullptr;
  constexpr std::size_t kBlasWs = 64u << 20;
  if (!no_cublas) {
    CUBLAS(cublasCreate(&blas));
    CUBLAS(cublasSetStream(blas, st));
    blas_ws = dalloc<char>(kBlasWs);
    CUBLAS(cublasSetWorkspace(blas, blas_ws, kBlasWs));
  }

  std::printf("%-14s %6s %6s %6s %7s %9s %9s %6s %9s %9s %8s %7s %12s\n", "#model", "tokens", "rows", "active", "MB",
              "eaas_us", "eaas_GB/s", "%copy", "cublas_us", "cublasGB/s", "speedup", "#wrong", "max_rel_diff");
  bool all_ok = true;
  for (const model& m : models) {
    const std::size_t H = m.hidden, I = m.inter, E = m.experts, per = H * I;
    int max_tokens = *std::max_element(m.tokens.begin(), m.tokens.end());
    const std::size_t max_rows = std::size_t(max_tokens) * m.topk;
    // Weights as three stacked tensors [E, ...]; the op gets per-expert pointer arrays into them.
    auto* wg = dalloc<__nv_bfloat16>(E * per);
    auto* wu = dalloc<__nv_bfloat16>(E * per);
    auto* wd = dalloc<__nv_bfloat16>(E * per);
    auto* x = dalloc<__nv_bfloat16>(max_rows * H);
    const float sg = 2.0f / std::sqrt(float(H)), sd = 2.0f / std::sqrt(float(I));
    fill_bf16<<<4096, 256, 0, st>>>(wg, E * per, seed * 16 + 0, sg);
    fill_bf16<<<4096, 256, 0, st>>>(wu, E * per, seed * 16 + 1, sg);
    fill_bf16<<<4096, 256, 0, st>>>(wd, E * per, seed * 16 + 2, sd);
    fill_bf16<<<4096, 256, 0, st>>>(x, max_rows * H, seed * 16 + 3, 1.0f);
    EAAS_CU(cudaGetLastError());
    const void **pg = dalloc<const void*>(E), **pu = dalloc<const void*>(E), **pd = dalloc<const void*>(E);
    EAAS_PERF_CHECK(gg::grouped_swiglu_expert_pointers(wg, per * 2, m.experts, pg, st));
    EAAS_PERF_CHECK(gg::grouped_swiglu_expert_pointers(wu, per * 2, m.experts, pu, st));
    EAAS_PERF_CHECK(gg::grouped_swiglu_expert_pointers(wd, per * 2, m.experts, pd, st));
    // The same weights in the tiled layout (grouped_swiglu_layout::tiled), which the expert server and the
    // monolithic baseline use; the row-major ones for the row-major variants of --sweep and for cuBLAS.
    __nv_bfloat16 *tg = nullptr, *tu = nullptr, *td = nullptr;
    const void **ptg = nullptr, **ptu = nullptr, **ptd = nullptr;
    {
      tg = dalloc<__nv_bfloat16>(E * per);
      tu = dalloc<__nv_bfloat16>(E * per);
      td = dalloc<__nv_bfloat16>(E * per);
      for (std::size_t e = 0; e < E; ++e) {
        EAAS_PERF_CHECK(gg::grouped_swiglu_tile(wg + e * per, tg + e * per, m.inter, m.hidden, st));
        EAAS_PERF_CHECK(gg::grouped_swiglu_tile(wu + e * per, tu + e * per, m.inter, m.hidden, st));
        EAAS_PERF_CHECK(gg::grouped_swiglu_tile(wd + e * per, td + e * per, m.hidden, m.inter, st));
      }
      ptg = dalloc<const void*>(E), ptu = dalloc<const void*>(E), ptd = dalloc<const void*>(E);
      EAAS_PERF_CHECK(gg::grouped_swiglu_expert_pointers(tg, per * 2, m.experts, ptg, st));
      EAAS_PERF_CHECK(gg::grouped_swiglu_expert_pointers(tu, per * 2, m.experts, ptu, st));
      EAAS_PERF_CHECK(gg::grouped_swiglu_expert_pointers(td, per * 2, m.experts, ptd, st));
    }
    auto* offsets = dalloc<std::int32_t>(E + 1);
    auto* rw = dalloc<float>(max_rows);
    auto* y = dalloc<float>(max_rows * H);
    auto* err = dalloc<std::uint32_t>(1);
    EAAS_CU(cudaMemsetAsync(err, 0, 4, st));
    const gg::grouped_swiglu_shape shape{m.experts, m.hidden, m.inter, static_cast<std::uint32_t>(max_rows)};
    const std::size_t ws_bytes = gg::grouped_swiglu_workspace_bytes(shape);
    void* ws = dalloc<char>(ws_bytes);
    // cuBLAS path buffers.
    float *bg = nullptr, *bu = nullptr, *by = nullptr;
    __nv_bfloat16* bh = nullptr;
    if (!no_cublas) {
      bg = dalloc<float>(max_rows * I);
      bu = dalloc<float>(max_rows * I);
      bh = dalloc<__nv_bfloat16>(max_rows * I);
      by = dalloc<float>(max_rows * H);
    }
    EAAS_CU(cudaStreamSynchronize(st));

    for (int tokens : m.tokens) {
      // Routing: topk distinct experts per token, uniform; rows regrouped by expert.
      std::mt19937_64 rng(seed * 1000003 + tokens);
      std::vector<int> counts(E, 0), perm(E);
      for (std::size_t e = 0; e < E; ++e) perm[e] = static_cast<int>(e);
      for (int t = 0; t < tokens; ++t)
        for (std::uint32_t k = 0; k < m.topk; ++k) {
          std::uniform_int_distribution<std::size_t> d(k, E - 1);
          std::swap(perm[k], perm[d(rng)]);
          ++counts[static_cast<std::size_t>(perm[k])];
        }
      std::vector<std::int32_t> off(E + 1, 0);
      for (std::size_t e = 0; e < E; ++e) off[e + 1] = off[e] + counts[e];
      const std::size_t rows = static_cast<std::size_t>(off[E]);
      std::vector<float> w(rows);
      std::uniform_real_distribution<float> wdist(0.05f, 1.0f);
      for (auto& v : w) v = wdist(rng);
      EAAS_CU(cudaMemcpyAsync(offsets, off.data(), (E + 1) * 4, cudaMemcpyHostToDevice, st));
      EAAS_CU(cudaMemcpyAsync(rw, w.data(), rows * 4, cudaMemcpyHostToDevice, st));
      std::vector<int> active;
      for (std::size_t e = 0; e < E; ++e)
        if (counts[e] > 0) active.push_back(static_cast<int>(e));
      const double bytes = double(active.size()) * 3.0 * double(per) * 2.0 + double(rows) * H * (2.0 + 4.0) +
                           double(rows) * I * 2.0 * 2.0;

      gg::grouped_swiglu_args a;
      a.x = x;
      a.offsets = offsets;
      a.row_weight = rw;
      a.gate = pg;
      a.up = pu;
      a.down = pd;
      a.y = y;
      a.workspace = ws;
      a.error = err;
      gg::grouped_swiglu_args a_tiled = a;
      a_tiled.gate = ptg;
      a_tiled.up = ptu;
      a_tiled.down = ptd;
      a_tiled.layout = gg::grouped_swiglu_layout::tiled;
      auto run_ours = [&](const gg::grouped_swiglu_tuning& t, bool tiled) {
        return capture(st, [&] { EAAS_PERF_CHECK(gg::grouped_swiglu(shape, tiled ? a_tiled : a, ws_bytes, st, t)); });
      };

      // --- validate: eaas vs the CPU reference on sampled rows --------------------------------------
      EAAS_CU(cudaMemsetAsync(y, 0xFF, max_rows * H * 4, st));
      cudaGraphExec_t ours = run_ours({}, true);  // the servers' choice: tiled weights, default tuning
      EAAS_CU(cudaGraphLaunch(ours, st));
      EAAS_CU(cudaStreamSynchronize(st));
      std::uint32_t err_bits = 0;
      EAAS_CU(cudaMemcpy(&err_bits, err, 4, cudaMemcpyDeviceToHost));
      if (err_bits != 0) die("the op reported error bits " + std::to_string(err_bits), status::internal_error);
      std::vector<float> y_ours(rows * H);
      EAAS_CU(cudaMemcpy(y_ours.data(), y, rows * H * 4, cudaMemcpyDeviceToHost));
      // Sampled outputs: (index into y, reference, tolerance); every variant of the sweep is held to them.
      struct sampled {
        std::size_t at;
        double want, tol;
      };
      std::vector<sampled> samples;
      auto count_wrong = [&](const std::vector<float>& got) {
        std::size_t n = 0;
        for (const sampled& q : samples)
          if (!(std::fabs(got[q.at] - q.want) <= q.tol)) ++n;
        return n;
      };
      {
        // The most loaded expert and one other: up to 3 rows each.
        std::vector<int> sample = {
            *std::max_element(active.begin(), active.end(), [&](int p, int q) { return counts[p] < counts[q]; }),
            active[rng() % active.size()]};
        for (int e : sample) {
          const auto g = download_bf16(wg + e * per, per), u = download_bf16(wu + e * per, per),
                     d = download_bf16(wd + e * per, per);
          for (int r = off[e]; r < off[e + 1] && r < off[e] + 3; ++r) {
            const auto xr = download_bf16(x + std::size_t(r) * H, H);
            std::vector<double> h(I);
            for (std::size_t j = 0; j < I; ++j) {
              double gs = 0, us = 0;
              for (std::size_t k = 0; k < H; ++k) {
                gs += double(g[j * H + k]) * xr[k];
                us += double(u[j * H + k]) * xr[k];
              }
              h[j] = round_bf16(static_cast<float>(gs / (1.0 + std::exp(-gs)) * us));
            }
            for (std::size_t i = 0; i < H; ++i) {
              double s = 0, sq = 0;
              for (std::size_t j = 0; j < I; ++j) {
                const double term = double(d[i * I + j]) * h[j];
                s += term;
                sq += term * term;
              }
              const double want = s * w[std::size_t(r)];
              const double tol = 1e-2 * std::fabs(want) + 1e-2 * std::sqrt(sq) * w[std::size_t(r)];
              samples.push_back({std::size_t(r) * H + i, want, tol});
            }
          }
        }
      }
      const std::size_t wrong = count_wrong(y_ours);

      // --- cuBLAS per-expert loop (active experts only), one graph ------------------------------------
      latency_stats sb{};
      double max_rel = 0;
      if (!no_cublas) {
        const float one = 1.0f, zero = 0.0f;
        cudaGraphExec_t blas_graph = capture(st, [&] {
          for (int e : active) {
            const int mrows = counts[std::size_t(e)];
            const std::size_t r0 = std::size_t(off[std::size_t(e)]);
            for (int which = 0; which < 2; ++which)
              CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(I), mrows, int(H), &one,
                                  (which == 0 ? wg : wu) + std::size_t(e) * per, CUDA_R_16BF, int(H), x + r0 * H,
                                  CUDA_R_16BF, int(H), &zero, (which == 0 ? bg : bu) + r0 * I, CUDA_R_32F, int(I),
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
          }
          silu_mul<<<1024, 256, 0, st>>>(bg, bu, bh, rows * I);
          EAAS_CU(cudaGetLastError());
          for (int e : active) {
            const int mrows = counts[std::size_t(e)];
            const std::size_t r0 = std::size_t(off[std::size_t(e)]);
            CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(H), mrows, int(I), &one, wd + std::size_t(e) * per,
                                CUDA_R_16BF, int(I), bh + r0 * I, CUDA_R_16BF, int(I), &zero, by + r0 * H, CUDA_R_32F,
                                int(H), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
          }
        });
        EAAS_CU(cudaGraphLaunch(blas_graph, st));
        EAAS_CU(cudaStreamSynchronize(st));
        std::vector<float> y_blas(rows * H);
        EAAS_CU(cudaMemcpy(y_blas.data(), by, rows * H * 4, cudaMemcpyDeviceToHost));
        double max_abs = 0, max_diff = 0;
        for (std::size_t r = 0; r < rows; ++r)
          for (std::size_t i = 0; i < H; ++i) {
            const double ref = double(y_blas[r * H + i]) * w[r];
            max_abs = std::max(max_abs, std::fabs(ref));
            const double diff = std::fabs(double(y_ours[r * H + i]) - ref);
            max_diff = std::isnan(diff) ? INFINITY : std::max(max_diff, diff);
          }
        max_rel = max_abs > 0 ? max_diff / max_abs : max_diff;
        sb = time_it(st, warm, reps, [&] { EAAS_CU(cudaGraphLaunch(blas_graph, st)); });
        EAAS_CU(cudaGraphExecDestroy(blas_graph));
      }

      // --- time ours ------------------------------------------------------------------------------------
      const latency_stats so = time_it(st, warm, reps, [&] { EAAS_CU(cudaGraphLaunch(ours, st)); });
      EAAS_CU(cudaGraphExecDestroy(ours));
      const double gbps = bytes / (so.t_typical * 1e-6) / 1e9;
      const double bgbps = no_cublas ? 0 : bytes / (sb.t_typical * 1e-6) / 1e9;
      std::printf("%-14s %6d %6zu %6zu %7.1f %9.1f %9.0f %5.0f%% %9.1f %10.0f %7.2fx %7zu %12.2e\n", m.name.c_str(),
                  tokens, rows, active.size(), bytes / 1e6, so.t_typical, gbps, 100.0 * gbps / copy_gbps, sb.t_typical,
                  bgbps, no_cublas ? 0.0 : sb.t_typical / so.t_typical, wrong, max_rel);
      std::fflush(stdout);
      const bool ok = wrong == 0 && (no_cublas || max_rel < 2e-2);
      all_ok = all_ok && ok;
      nlohmann::json pj = {{"model", m.name},   {"hidden", m.hidden},
                           {"inter", m.inter},  {"experts", m.experts},
                           {"topk", m.topk},    {"tokens", tokens},
                           {"rows", rows},      {"active_experts", active.size()},
                           {"bytes", bytes},    {"eaas", to_json(std::size_t(bytes), so)},
                           {"eaas_gbps", gbps}, {"eaas_fraction_of_copy", gbps / copy_gbps},
                           {"wrong", wrong},    {"valid", ok}};
      if (!no_cublas) {
        pj["cublas"] = to_json(std::size_t(bytes), sb);
        pj["cublas_gbps"] = bgbps;
        pj["speedup_vs_cublas"] = sb.t_typical / so.t_typical;
        pj["max_rel_diff_vs_cublas"] = max_rel;
      }

      if (sweep) {
        // {blocks per SM (0: the default), stages (1: registers, 3/4/6: cp.async ring), k_unroll, staged
        // (token tiles in shared memory; k_unroll = weight steps in flight), staged_from_rows (auto pick)}
        // ..., then {tiled_steps, tiled_depth, tiled_rows}: the tiled layout (weights by bulk copies into shared
        // memory), fixed rows per item (the default picks 32 or 64 on the device), one kernel for both products;
        // last, the default's pair with gate/up and down as two kernels (tiled_two_kernels).
        const gg::grouped_swiglu_tuning variants[] = {
            {4, 1, 2, 0, 0},           {3, 1, 2, 0, 0},           {2, 1, 2, 0, 0},           {3, 1, 4, 0, 0},
            {0, 3, 0, 0, 0},           {0, 4, 0, 0, 0},           {0, 6, 0, 0, 0},           {2, 3, 0, 0, 0},
            {0, 0, 2, 1, 0},           {3, 0, 2, 1, 0},           {0, 0, 3, 1, 0},           {0, 0, 0, 0, 16},
            {0, 0, 0, 0, 0, 2, 4, 32}, {0, 0, 0, 0, 0, 1, 8, 32}, {0, 0, 0, 0, 0, 2, 3, 32}, {0, 0, 0, 0, 0, 1, 4, 32},
            {0, 0, 0, 0, 0, 2, 3, 64}, {0, 0, 0, 0, 0, 1, 4, 64}, {0, 0, 0, 0, 0, 0, 0, 0, 1}};
        nlohmann::json vj = nlohmann::json::array();
        std::vector<float> y_var(rows * H);
        for (const auto& t : variants) {
          const bool tiled = t.tiled_steps != 0 || t.tiled_depth != 0 || t.tiled_rows != 0 || t.tiled_two_kernels != 0;
          const std::string name = t.tiled_two_kernels != 0 ? "tiled picked, 2 kernels"
                                   : tiled ? "tiled " + std::to_string(t.tiled_steps) + "x" +
                                               std::to_string(t.tiled_depth) + " r" + std::to_string(t.tiled_rows)
                                   : t.staged_from_rows != 0 ? "auto>=" + std::to_string(t.staged_from_rows)
                                   : t.staged != 0           ? "staged x" + std::to_string(t.k_unroll)
                                   : t.stages == 1           ? "registers x" + std::to_string(t.k_unroll)
                                                             : "cp.async x" + std::to_string(t.stages);
          cudaGraphExec_t ge = run_ours(t, tiled);
          // Validated like the default: the sampled CPU reference (#wrong), and every row against the default.
          EAAS_CU(cudaMemsetAsync(y, 0xFF, max_rows * H * 4, st));
          EAAS_CU(cudaGraphLaunch(ge, st));
          EAAS_CU(cudaStreamSynchronize(st));
          EAAS_CU(cudaMemcpy(&err_bits, err, 4, cudaMemcpyDeviceToHost));
          EAAS_CU(cudaMemcpy(y_var.data(), y, rows * H * 4, cudaMemcpyDeviceToHost));
          const std::size_t vwrong = count_wrong(y_var) + (err_bits != 0 ? 1 : 0);
          double vmax = 0, vdiff = 0;
          for (std::size_t i = 0; i < rows * H; ++i) {
            vmax = std::max(vmax, std::fabs(double(y_ours[i])));
            const double d = std::fabs(double(y_var[i]) - double(y_ours[i]));
            vdiff = std::isnan(d) ? INFINITY : std::max(vdiff, d);
          }
          const double vrel = vmax > 0 ? vdiff / vmax : vdiff;
          const latency_stats sv = time_it(st, warm, reps, [&] { EAAS_CU(cudaGraphLaunch(ge, st)); });
          EAAS_CU(cudaGraphExecDestroy(ge));
          const double vg = bytes / (sv.t_typical * 1e-6) / 1e9;
          std::printf(
              "#   variant %-13s blocks/SM=%-3s: %9.1f us %7.0f GB/s %4.0f%% of copy  #wrong %zu  max_rel_diff vs "
              "default %.2e\n",
              name.c_str(), t.ctas_per_sm ? std::to_string(t.ctas_per_sm).c_str() : "def", sv.t_typical, vg,
              100.0 * vg / copy_gbps, vwrong, vrel);
          std::fflush(stdout);
          const bool vok = vwrong == 0 && vrel < 2e-2;
          all_ok = all_ok && vok;
          vj.push_back({{"name", name},
                        {"stages", t.stages},
                        {"k_unroll", t.k_unroll},
                        {"staged", t.staged},
                        {"staged_from_rows", t.staged_from_rows},
                        {"tiled_steps", t.tiled_steps},
                        {"tiled_depth", t.tiled_depth},
                        {"tiled_rows", t.tiled_rows},
                        {"tiled_two_kernels", t.tiled_two_kernels},
                        {"ctas_per_sm", t.ctas_per_sm},
                        {"us", sv.t_typical},
                        {"gbps", vg},
                        {"wrong", vwrong},
                        {"max_rel_diff_vs_default", vrel},
                        {"valid", vok}});
        }
        pj["variants"] = vj;
      }
      points.push_back(pj);
    }
    for (void* p :
         {static_cast<void*>(wg),  static_cast<void*>(wu), static_cast<void*>(wd),  static_cast<void*>(x),
          static_cast<void*>(pg),  static_cast<void*>(pu), static_cast<void*>(pd),  static_cast<void*>(offsets),
          static_cast<void*>(rw),  static_cast<void*>(y),  static_cast<void*>(err), ws,
          static_cast<void*>(bg),  static_cast<void*>(bu), static_cast<void*>(bh),  static_cast<void*>(by),
          static_cast<void*>(tg),  static_cast<void*>(tu), static_cast<void*>(td),  static_cast<void*>(ptg),
          static_cast<void*>(ptu), static_cast<void*>(ptd)})
      EAAS_CU(cudaFree(p));
  }
  const double copy_after = copy_bandwidth(st, std::size_t(copy_mib) << 20, std::max(reps, 10));
  std::printf("# copy bandwidth again after the runs: %.0f GB/s\n", copy_after);
  out["copy_gbps_after"] = copy_after;
  out["points"] = points;
  if (!json.empty()) {
    std::ofstream f(json);
    f << out.dump(2) << "\n";
  }
  if (blas) {
    CUBLAS(cublasDestroy(blas));
    EAAS_CU(cudaFree(blas_ws));
  }
  EAAS_CU(cudaStreamDestroy(st));
  if (!all_ok) die("validation failed (see #wrong / max_rel_diff)", status::internal_error);
  return 0;
}
