// eaas-monolithic: decode throughput of the monolithic baseline of issue #9 on one GPU: the whole
// forward (embedding, then per layer the attention stand-in, router and a local MoE layer whose experts
// live on the same GPU) for realistic layer shapes, next to its ablations:
//   graph    the forward captured in one CUDA graph and replayed (1), or launched eagerly (0)
//   shrink   the grouped GEMM walks only the active experts (1), or visits every expert (0: each empty
//            expert gets one padding row, so all weights are read)
// Times: back-to-back forwards on one stream, one cudaEvent between consecutive ones (so host launch
// gaps of the eager mode count); tokens/s = tokens / median time. Weights: the dense part is
// dense_model's synthetic weights, the experts pseudo-random bf16 generated on the GPU.
//
// Validated before timing: the eager forward with shrinking on, the same without shrinking, and the
// graph replay must agree bit for bit (they compute every row the same way), every output must be
// finite and the grouped GEMM must report no error; #wrong counts the elements that break this.
// Correctness against the CPU reference is the job of eaas-monolithic-gpu-tests (at small shapes).
//
// --gpus N (builds with NCCL): expert parallel over N GPUs of this process, --tokens per GPU; see
// run_ep below. Its rows print all GPUs' tokens and are checked bit for bit against one GPU's forward.

#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "driver.hpp"
#include "gpu/combine.cuh"
#include "gpu/dense_gpu.hpp"
#include "gpu/graph_capture.cuh"
#include "gpu/moe_local.hpp"
#include "gpu_util.cuh"

#if EAAS_MONO_WITH_NCCL
#include <cuda_bf16.h>
#include <nccl.h>
#endif

using namespace eaas;
using namespace eaas::perf;
namespace rt = eaas::runtime;

namespace {

struct model {
  std::string name;
  std::uint32_t hidden, inter, experts, topk;
  std::uint32_t depth;  // MoE layers of the real model, for the full-depth extrapolation
};

// One measured point: per-layer time and tokens/s (also scaled to the real model's depth), and the JSON
// fields every point has.
struct point {
  double layer_us, tps, tps_depth;
  nlohmann::json json;
};
point point_of(const model& md, std::uint32_t layers, std::uint64_t tokens, bool graph, bool shrink,
               const latency_stats& s, std::size_t wrong) {
  point p;
  p.layer_us = s.t_typical / layers;
  p.tps = static_cast<double>(tokens) / (s.t_typical * 1e-6);
  p.tps_depth = static_cast<double>(tokens) / (p.layer_us * md.depth * 1e-6);
  p.json = {{"model", md.name},
            {"hidden", md.hidden},
            {"inter", md.inter},
            {"experts", md.experts},
            {"topk", md.topk},
            {"layers", layers},
            {"model_moe_layers", md.depth},
            {"tokens", tokens},
            {"graph", graph},
            {"shrink", shrink},
            {"time", to_json(0, s)},
            {"layer_us", p.layer_us},
            {"tokens_per_s", p.tps},
            {"tokens_per_s_full_depth", p.tps_depth},
            {"wrong", wrong}};
  return p;
}

// Per-iteration times (µs) of `reps` back-to-back calls of `body` on `st`, after `warm` untimed ones.
std::vector<double> time_loop(cudaStream_t st, int warm, int reps, const std::function<void()>& body) {
  for (int i = 0; i < warm; ++i) body();
  std::vector<cudaEvent_t> ev(static_cast<std::size_t>(reps) + 1);
  for (auto& e : ev) EAAS_CU(cudaEventCreate(&e));
  EAAS_CU(cudaStreamSynchronize(st));
  EAAS_CU(cudaEventRecord(ev[0], st));
  for (int i = 0; i < reps; ++i) {
    body();
    EAAS_CU(cudaEventRecord(ev[static_cast<std::size_t>(i) + 1], st));
  }
  EAAS_CU(cudaStreamSynchronize(st));
  std::vector<double> us;
  for (int i = 0; i < reps; ++i) {
    float ms = 0;
    EAAS_CU(cudaEventElapsedTime(&ms, ev[static_cast<std::size_t>(i)], ev[static_cast<std::size_t>(i) + 1]));
    us.push_back(ms * 1e3);
  }
  for (auto& e : ev) EAAS_CU(cudaEventDestroy(e));
  return us;
}

// Per-step times (µs, host clock) of `reps` decode-loop steps after `warm` untimed ones: each step uploads its
// tokens, runs `body`, reads a token's worth of output per token back and waits for it, as a serving loop must
// (the next step's tokens come from this one's output). Both buffers are pinned host memory.
std::vector<double> step_loop(cudaStream_t st, int warm, int reps, const std::function<void()>& body,
                              std::uint32_t* d_tokens, const std::uint32_t* h_tokens, const float* d_out, float* h_out,
                              std::uint32_t T) {
  std::vector<double> us;
  for (int i = 0; i < warm + reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    EAAS_CU(cudaMemcpyAsync(d_tokens, h_tokens, std::size_t{T} * 4, cudaMemcpyHostToDevice, st));
    body();
    EAAS_CU(cudaMemcpyAsync(h_out, d_out, std::size_t{T} * 4, cudaMemcpyDeviceToHost, st));
    EAAS_CU(cudaStreamSynchronize(st));
    if (i >= warm)
      us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  return us;
}

// `body` dies on failure itself (EAAS_CU, EAAS_PERF_CHECK).
cudaGraphExec_t capture(cudaStream_t st, const std::function<void()>& body) {
  cudaGraphExec_t exec = nullptr;
  const auto enqueue = [&] {
    body();
    return status::ok;
  };
  EAAS_PERF_CHECK(rt::gpu::capture_graph("eaas-monolithic", st, enqueue, exec));
  return exec;
}

std::vector<float> download(const float* d, std::size_t n, cudaStream_t st) {
  std::vector<float> h(n);
  EAAS_CU(cudaMemcpyAsync(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost, st));
  EAAS_CU(cudaStreamSynchronize(st));
  return h;
}

std::size_t count_wrong(const std::vector<float>& got, const std::vector<float>& want) {
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    wrong += !std::isfinite(got[i]) || std::memcmp(&got[i], &want[i], sizeof(float)) != 0;
  return wrong;
}

#if EAAS_MONO_WITH_NCCL
// ---- --gpus N: expert parallel over NCCL, one process and one thread driving N GPUs ----------------
//
// Every GPU runs the dense part on its own T tokens (data parallel) and holds experts/N experts of each
// layer. Per layer: dispatch each (token, k) pair into a fixed-capacity send buffer per destination GPU
// (row, local expert id, router weight; unused slots carry an invalid id), one grouped ncclSend/ncclRecv
// all-to-all, the receiver's local MoE layer (moe_local with topk 1: every received row is a "token"
// with one expert; invalid ids are skipped), a second all-to-all back (fp32 rows), and the combine.
// Sizes are fixed by the capacity, so every GPU's step can be captured in its own CUDA graph (as
// nccl-tests -G does). Capacity per destination: T*topk rows (--ep-capacity 0, nothing can be dropped),
// or ceil(F*T*topk/N) rows (a capacity factor F; pairs past it are dropped and counted).
// Validation: the results of GPU g must equal, bit for bit, the single-GPU forward of its tokens (same
// weights: fill_random by global expert index), unless pairs were dropped.

#define NC(x)                                                                                                \
  do {                                                                                                       \
    if (const ncclResult_t r_ = (x); r_ != ncclSuccess) {                                                    \
      std::fprintf(stderr, "NCCL error: %s at %s:%d: %s\n", #x, __FILE__, __LINE__, ncclGetErrorString(r_)); \
      std::exit(2);                                                                                          \
    }                                                                                                        \
  } while (0)

// One block per (token, k) pair: claim a slot in the destination's send buffer, then copy the row.
__global__ void k_ep_dispatch(const std::uint32_t* ids, const float* weights, const __nv_bfloat16* normed,
                              std::uint32_t topk, std::uint32_t hidden, std::uint32_t local_experts, std::uint32_t cap,
                              std::int32_t* cnt, std::int32_t* pair_loc, std::uint32_t* send_id, float* send_w,
                              __nv_bfloat16* send_x, std::uint32_t* dropped) {
  __shared__ std::int32_t s_loc;
  const std::uint32_t i = blockIdx.x;
  if (threadIdx.x == 0) {
    const std::uint32_t e = ids[i], d = e / local_experts;  // e < experts (the router's), so d < N
    const std::int32_t slot = atomicAdd(&cnt[d], 1);
    std::int32_t loc = -1;
    if (static_cast<std::uint32_t>(slot) < cap) {
      loc = static_cast<std::int32_t>(d * cap + static_cast<std::uint32_t>(slot));
      send_id[loc] = e - d * local_experts;
      send_w[loc] = weights[i];
    } else {
      atomicAdd(dropped, 1u);
    }
    pair_loc[i] = loc;
    s_loc = loc;
  }
  __syncthreads();
  const std::int32_t loc = s_loc;
  if (loc < 0) return;
  const uint4* src = reinterpret_cast<const uint4*>(normed + std::size_t{i / topk} * hidden);
  uint4* dst = reinterpret_cast<uint4*>(send_x + std::size_t(loc) * hidden);
  for (std::uint32_t j = threadIdx.x; j < hidden / 8; j += blockDim.x) dst[j] = src[j];
}

// Rows that carry a valid expert start from zero (moe_local adds its output to them).
__global__ void k_ep_zero_valid(const std::uint32_t* recv_id, std::uint32_t local_experts, std::uint32_t hidden,
                                float* y) {
  if (recv_id[blockIdx.x] >= local_experts) return;
  float4* row = reinterpret_cast<float4*>(y + std::size_t{blockIdx.x} * hidden);
  for (std::uint32_t j = threadIdx.x; j < hidden / 4; j += blockDim.x) row[j] = make_float4(0.f, 0.f, 0.f, 0.f);
}

// x[t] += Σ_k ret[pair_loc[t, k]], k in order (as moe_local's combine, so the bits match one GPU's).
__global__ void k_ep_combine(const std::int32_t* pair_loc, std::uint32_t topk, const float* ret, std::uint32_t hidden,
                             float* x) {
  rt::gpu::add_topk_rows(pair_loc + std::size_t{blockIdx.x} * topk, topk, ret, hidden,
                         x + std::size_t{blockIdx.x} * hidden);
}

template <class T>
T* dmalloc(std::size_t n) {
  void* p = nullptr;
  EAAS_CU(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
  return static_cast<T*>(p);
}

struct ep_gpu {
  int dev = 0;
  cudaStream_t st = nullptr;
  std::unique_ptr<rt::gpu::dense_gpu> dense;
  std::unique_ptr<rt::gpu::moe_local> moe;
  std::uint32_t* tokens = nullptr;
  float* x = nullptr;
  __nv_bfloat16* normed = nullptr;
  std::uint32_t* ids = nullptr;
  float* w = nullptr;
  std::int32_t *cnt = nullptr, *pair_loc = nullptr;
  std::uint32_t* dropped = nullptr;
  __nv_bfloat16 *send_x = nullptr, *recv_x = nullptr;
  std::uint32_t *send_id = nullptr, *recv_id = nullptr;
  float *send_w = nullptr, *recv_w = nullptr, *y = nullptr, *ret = nullptr;
};

struct ep_setup {
  std::uint32_t n = 0, max_tokens = 0, cap = 0;  // GPUs, tokens per GPU, rows per destination
  rt::model_shape shape{};
  std::vector<ep_gpu> g;
  std::vector<ncclComm_t> comms;
};

// Queues one forward of T tokens per GPU on every GPU's stream (capturable: fixed sizes only).
void ep_forward(ep_setup& e, std::uint32_t T, bool shrink) {
  const rt::model_shape& s = e.shape;
  const std::uint32_t N = e.n, El = s.experts / N, h = s.hidden, C = e.cap, pairs = T * s.topk;
  const std::size_t rows = std::size_t{N} * C;
  for (auto& q : e.g) {
    EAAS_CU(cudaSetDevice(q.dev));
    EAAS_PERF_CHECK(q.dense->embed(q.tokens, T, q.x, q.st));
  }
  for (std::uint32_t l = 0; l < s.layers; ++l) {
    for (auto& q : e.g) {
      EAAS_CU(cudaSetDevice(q.dev));
      EAAS_PERF_CHECK(q.dense->attention(l, T, q.x, q.normed, q.st));
      EAAS_PERF_CHECK(q.dense->route(l, T, q.normed, q.ids, q.w, q.st));
      EAAS_CU(cudaMemsetAsync(q.cnt, 0, N * sizeof(std::int32_t), q.st));
      EAAS_CU(cudaMemsetAsync(q.send_id, 0xff, rows * sizeof(std::uint32_t), q.st));  // invalid unless claimed
      k_ep_dispatch<<<pairs, 128, 0, q.st>>>(q.ids, q.w, q.normed, s.topk, h, El, C, q.cnt, q.pair_loc, q.send_id,
                                             q.send_w, q.send_x, q.dropped);
      EAAS_CU(cudaGetLastError());
    }
    NC(ncclGroupStart());
    for (std::uint32_t a = 0; a < N; ++a)
      for (std::uint32_t p = 0; p < N; ++p) {
        ep_gpu& q = e.g[a];
        const std::size_t at = std::size_t{p} * C;
        NC(ncclSend(q.send_x + at * h, std::size_t{C} * h, ncclBfloat16, static_cast<int>(p), e.comms[a], q.st));
        NC(ncclRecv(q.recv_x + at * h, std::size_t{C} * h, ncclBfloat16, static_cast<int>(p), e.comms[a], q.st));
        NC(ncclSend(q.send_id + at, C, ncclUint32, static_cast<int>(p), e.comms[a], q.st));
        NC(ncclRecv(q.recv_id + at, C, ncclUint32, static_cast<int>(p), e.comms[a], q.st));
        NC(ncclSend(q.send_w + at, C, ncclFloat32, static_cast<int>(p), e.comms[a], q.st));
        NC(ncclRecv(q.recv_w + at, C, ncclFloat32, static_cast<int>(p), e.comms[a], q.st));
      }
    NC(ncclGroupEnd());
    for (auto& q : e.g) {
      EAAS_CU(cudaSetDevice(q.dev));
      k_ep_zero_valid<<<static_cast<unsigned>(rows), 128, 0, q.st>>>(q.recv_id, El, h, q.y);
      EAAS_CU(cudaGetLastError());
      EAAS_PERF_CHECK(
          q.moe->run(l, static_cast<std::uint32_t>(rows), q.recv_x, q.recv_id, q.recv_w, q.y, shrink, q.st));
    }
    NC(ncclGroupStart());
    for (std::uint32_t a = 0; a < N; ++a)
      for (std::uint32_t p = 0; p < N; ++p) {
        ep_gpu& q = e.g[a];
        const std::size_t at = std::size_t{p} * C * h;
        NC(ncclSend(q.y + at, std::size_t{C} * h, ncclFloat32, static_cast<int>(p), e.comms[a], q.st));
        NC(ncclRecv(q.ret + at, std::size_t{C} * h, ncclFloat32, static_cast<int>(p), e.comms[a], q.st));
      }
    NC(ncclGroupEnd());
    for (auto& q : e.g) {
      EAAS_CU(cudaSetDevice(q.dev));
      k_ep_combine<<<T, 256, 0, q.st>>>(q.pair_loc, s.topk, q.ret, h, q.x);
      EAAS_CU(cudaGetLastError());
    }
  }
}

// Per-iteration times (µs, the slowest GPU's) of `reps` back-to-back calls after `warm` untimed ones.
std::vector<double> ep_time_loop(ep_setup& e, int warm, int reps, const std::function<void()>& body) {
  for (int i = 0; i < warm; ++i) body();
  std::vector<std::vector<cudaEvent_t>> ev(e.n, std::vector<cudaEvent_t>(static_cast<std::size_t>(reps) + 1));
  for (std::uint32_t a = 0; a < e.n; ++a) {
    EAAS_CU(cudaSetDevice(e.g[a].dev));
    for (auto& v : ev[a]) EAAS_CU(cudaEventCreate(&v));
    EAAS_CU(cudaStreamSynchronize(e.g[a].st));
  }
  auto record = [&](std::size_t i) {
    for (std::uint32_t a = 0; a < e.n; ++a) {
      EAAS_CU(cudaSetDevice(e.g[a].dev));
      EAAS_CU(cudaEventRecord(ev[a][i], e.g[a].st));
    }
  };
  record(0);
  for (int i = 0; i < reps; ++i) {
    body();
    record(static_cast<std::size_t>(i) + 1);
  }
  std::vector<double> us(static_cast<std::size_t>(reps), 0.0);
  for (std::uint32_t a = 0; a < e.n; ++a) {
    EAAS_CU(cudaSetDevice(e.g[a].dev));
    EAAS_CU(cudaStreamSynchronize(e.g[a].st));
    for (std::size_t i = 0; i < us.size(); ++i) {
      float ms = 0;
      EAAS_CU(cudaEventElapsedTime(&ms, ev[a][i], ev[a][i + 1]));
      us[i] = std::max(us[i], static_cast<double>(ms) * 1e3);
    }
    for (auto& v : ev[a]) EAAS_CU(cudaEventDestroy(v));
  }
  return us;
}

// The --gpus N mode: prints rows like the one-GPU mode (tokens = all GPUs' tokens) and appends points.
bool run_ep(std::uint32_t N, const model& md, std::uint32_t layers, const rt::dense_options& opts,
            const std::vector<std::uint32_t>& tokens_sel, float capacity, std::uint64_t seed, int warm, int reps,
            nlohmann::json& points) {
  const rt::model_shape shape{md.hidden, md.inter, md.experts, md.topk, layers};
  if (md.experts % N != 0) die("--gpus must divide the experts", status::invalid_argument);
  ep_setup e;
  e.n = N;
  e.shape = shape;
  e.max_tokens = *std::max_element(tokens_sel.begin(), tokens_sel.end());
  auto cap_for = [&](std::uint32_t T) {
    const std::uint64_t pairs = std::uint64_t{T} * md.topk;
    if (capacity <= 0) return static_cast<std::uint32_t>(pairs);
    return static_cast<std::uint32_t>(std::min<std::uint64_t>(
        pairs, static_cast<std::uint64_t>(std::ceil(capacity * static_cast<double>(pairs) / N))));
  };
  const std::uint32_t max_cap = cap_for(e.max_tokens);
  const std::size_t rows = std::size_t{N} * max_cap, h = md.hidden;
  const rt::model_shape local{md.hidden, md.inter, md.experts / N, 1, layers};
  const auto dense_w = rt::synthetic_dense_weights(shape, seed, opts);
  std::vector<int> devs(N);
  e.g.resize(N);
  for (std::uint32_t a = 0; a < N; ++a) {
    ep_gpu& q = e.g[a];
    q.dev = devs[a] = static_cast<int>(a);
    EAAS_CU(cudaSetDevice(q.dev));
    EAAS_CU(cudaStreamCreateWithFlags(&q.st, cudaStreamNonBlocking));
    EAAS_PERF_CHECK(rt::gpu::dense_gpu::create(q.dev, shape, opts, dense_w, e.max_tokens, q.dense));
    EAAS_PERF_CHECK(rt::gpu::moe_local::create(q.dev, local, static_cast<std::uint32_t>(rows), q.moe));
    EAAS_PERF_CHECK(q.moe->fill_random(seed, a * local.experts, md.experts));
    q.tokens = dmalloc<std::uint32_t>(e.max_tokens);
    q.x = dmalloc<float>(std::size_t{e.max_tokens} * h);
    q.normed = dmalloc<__nv_bfloat16>(std::size_t{e.max_tokens} * h);
    q.ids = dmalloc<std::uint32_t>(std::size_t{e.max_tokens} * md.topk);
    q.w = dmalloc<float>(std::size_t{e.max_tokens} * md.topk);
    q.cnt = dmalloc<std::int32_t>(N);
    q.pair_loc = dmalloc<std::int32_t>(std::size_t{e.max_tokens} * md.topk);
    q.dropped = dmalloc<std::uint32_t>(1);
    q.send_x = dmalloc<__nv_bfloat16>(rows * h);
    q.recv_x = dmalloc<__nv_bfloat16>(rows * h);
    q.send_id = dmalloc<std::uint32_t>(rows);
    q.recv_id = dmalloc<std::uint32_t>(rows);
    q.send_w = dmalloc<float>(rows);
    q.recv_w = dmalloc<float>(rows);
    q.y = dmalloc<float>(rows * h);
    q.ret = dmalloc<float>(rows * h);
    EAAS_CU(cudaDeviceSynchronize());
  }
  e.comms.resize(N);
  NC(ncclCommInitAll(e.comms.data(), static_cast<int>(N), devs.data()));

  // The reference: every expert on GPU 0, the same weights.
  EAAS_CU(cudaSetDevice(0));
  std::unique_ptr<rt::gpu::monolithic_gpu> ref;
  EAAS_PERF_CHECK(rt::gpu::monolithic_gpu::create(0, shape, opts, dense_w, e.max_tokens, ref));
  EAAS_PERF_CHECK(ref->moe().fill_random(seed));

  bool all_ok = true;
  for (const std::uint32_t T : tokens_sel) {
    e.cap = cap_for(T);
    std::vector<std::vector<float>> want(N);
    for (std::uint32_t a = 0; a < N; ++a) {
      std::mt19937_64 rng(seed * 1000003u + T * 131u + a);
      std::vector<std::uint32_t> toks(T);
      for (auto& v : toks) v = static_cast<std::uint32_t>(rng() % opts.vocab);
      EAAS_CU(cudaSetDevice(0));
      EAAS_CU(cudaMemcpy(ref->tokens(), toks.data(), T * 4, cudaMemcpyHostToDevice));
      EAAS_CU(cudaDeviceSynchronize());
      EAAS_PERF_CHECK(ref->forward(T, true, nullptr));
      want[a].resize(std::size_t{T} * h);
      EAAS_CU(cudaMemcpy(want[a].data(), ref->hidden_states(), want[a].size() * 4, cudaMemcpyDeviceToHost));
      EAAS_CU(cudaSetDevice(e.g[a].dev));
      EAAS_CU(cudaMemcpy(e.g[a].tokens, toks.data(), T * 4, cudaMemcpyHostToDevice));
      EAAS_CU(cudaDeviceSynchronize());
    }
    // An eager forward first: NCCL connects peers and CUDA loads kernels lazily, on first use, which must
    // not happen during stream capture.
    ep_forward(e, T, true);
    for (auto& q : e.g) {
      EAAS_CU(cudaSetDevice(q.dev));
      EAAS_CU(cudaStreamSynchronize(q.st));
    }
    for (const bool graph : {true, false})
      for (const bool shrink : {true, false}) {
        std::vector<cudaGraphExec_t> exec(N, nullptr);
        if (graph) {
          for (auto& q : e.g) {
            EAAS_CU(cudaSetDevice(q.dev));
            EAAS_CU(cudaStreamBeginCapture(q.st, cudaStreamCaptureModeRelaxed));
          }
          ep_forward(e, T, shrink);
          for (std::uint32_t a = 0; a < N; ++a) {
            cudaGraph_t gr = nullptr;
            EAAS_CU(cudaSetDevice(e.g[a].dev));
            EAAS_CU(cudaStreamEndCapture(e.g[a].st, &gr));
            EAAS_CU(cudaGraphInstantiate(&exec[a], gr, 0));
            EAAS_CU(cudaGraphDestroy(gr));
          }
        }
        auto body = [&] {
          if (!graph) return ep_forward(e, T, shrink);
          for (std::uint32_t a = 0; a < N; ++a) {
            EAAS_CU(cudaSetDevice(e.g[a].dev));
            EAAS_CU(cudaGraphLaunch(exec[a], e.g[a].st));
          }
        };
        // Validate one forward against the single-GPU reference.
        for (auto& q : e.g) {
          EAAS_CU(cudaSetDevice(q.dev));
          EAAS_CU(cudaMemsetAsync(q.dropped, 0, 4, q.st));
        }
        body();
        std::size_t wrong = 0;
        std::uint64_t dropped = 0;
        for (std::uint32_t a = 0; a < N; ++a) {
          ep_gpu& q = e.g[a];
          EAAS_CU(cudaSetDevice(q.dev));
          EAAS_CU(cudaStreamSynchronize(q.st));
          std::uint32_t d = 0, err = 0;
          EAAS_CU(cudaMemcpy(&d, q.dropped, 4, cudaMemcpyDeviceToHost));
          EAAS_CU(cudaMemcpy(&err, q.moe->error_word(), 4, cudaMemcpyDeviceToHost));
          dropped += d;
          std::vector<float> got(std::size_t{T} * h);
          EAAS_CU(cudaMemcpy(got.data(), q.x, got.size() * 4, cudaMemcpyDeviceToHost));
          if (d == 0) wrong += count_wrong(got, want[a]);
          wrong += err != 0;
        }
        all_ok = all_ok && wrong == 0;
        const latency_stats s = summarize(ep_time_loop(e, warm, reps, body));
        for (std::uint32_t a = 0; a < N; ++a)
          if (exec[a] != nullptr) {
            EAAS_CU(cudaSetDevice(e.g[a].dev));
            EAAS_CU(cudaGraphExecDestroy(exec[a]));
          }
        point p = point_of(md, layers, std::uint64_t{T} * N, graph, shrink, s, wrong);
        std::printf(
            "%-14s %6u %6u %5d %6d %10.1f %10.1f %10.1f %10.1f %10.1f %12.0f %12.0f %7s %6zu %10s %12s  gpus %u cap %u "
            "dropped %llu\n",
            md.name.c_str(), layers, T * N, graph ? 1 : 0, shrink ? 1 : 0, s.t_min, s.t_typical, s.t_avg, s.p99,
            p.layer_us, p.tps, p.tps_depth, "-", wrong, "-", "-", N, e.cap, static_cast<unsigned long long>(dropped));
        std::fflush(stdout);
        p.json["gpus"] = N;
        p.json["tokens_per_gpu"] = T;
        p.json["capacity_rows"] = e.cap;
        p.json["dropped_pairs"] = dropped;
        points.push_back(std::move(p.json));
      }
  }
  ref.reset();
  for (std::uint32_t a = 0; a < N; ++a) NC(ncclCommDestroy(e.comms[a]));
  for (auto& q : e.g) {
    EAAS_CU(cudaSetDevice(q.dev));
    EAAS_CU(cudaDeviceSynchronize());
    for (void* p :
         {static_cast<void*>(q.tokens), static_cast<void*>(q.x), static_cast<void*>(q.normed),
          static_cast<void*>(q.ids), static_cast<void*>(q.w), static_cast<void*>(q.cnt), static_cast<void*>(q.pair_loc),
          static_cast<void*>(q.dropped), static_cast<void*>(q.send_x), static_cast<void*>(q.recv_x),
          static_cast<void*>(q.send_id), static_cast<void*>(q.recv_id), static_cast<void*>(q.send_w),
          static_cast<void*>(q.recv_w), static_cast<void*>(q.y), static_cast<void*>(q.ret)})
      EAAS_CU(cudaFree(p));
    q.dense.reset();
    q.moe.reset();
    EAAS_CU(cudaStreamDestroy(q.st));
  }
  return all_ok;
}
#endif  // EAAS_MONO_WITH_NCCL

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> models_sel = {"qwen3-30b-a3b", "deepseek-v3"};
  std::vector<std::uint32_t> tokens_sel = {64, 128, 256, 512, 1024, 2048, 4096};
  std::uint32_t layers = 2, hidden = 0, inter = 0, experts = 0, topk = 8, vocab = 4096, attention_cost = 1, gpus = 1;
  int reps = 50, warm = 5;
  std::uint64_t seed = 1;
  std::string json;
  CLI::App app{
      "eaas-monolithic: decode tokens/s of the monolithic MoE forward (dense part + local grouped GEMM per layer) "
      "on one GPU (or expert parallel over NCCL), with CUDA graphs and kernel shrinking on and off"};
  app.add_option("--model", models_sel, "qwen3-30b-a3b, deepseek-v3, custom (with --hidden --inter --experts)")
      ->capture_default_str();
  app.add_option("--tokens", tokens_sel, "batch sizes (tokens per forward)")->capture_default_str();
  app.add_option("--layers", layers, "layers in the forward (every expert of every layer is resident)")
      ->capture_default_str();
  app.add_option("--hidden", hidden, "custom model: hidden size");
  app.add_option("--inter", inter, "custom model: expert intermediate size");
  app.add_option("--experts", experts, "custom model: experts");
  app.add_option("--topk", topk, "custom model: experts per token")->capture_default_str();
  app.add_option("--vocab", vocab, "embedding rows")->capture_default_str();
  app.add_option("--attention-cost", attention_cost, "hidden x hidden GEMMs per layer in the attention stand-in")
      ->capture_default_str();
  app.add_option("--reps", reps, "timed forwards per point")->capture_default_str();
  app.add_option("--warmup", warm, "untimed forwards before timing")->capture_default_str();
  app.add_option("--seed", seed, "weight and token seed")->capture_default_str();
  app.add_option("--gpus", gpus,
                 "GPUs: 1, or N > 1 for expert parallel over NCCL (one thread, T tokens per GPU, experts/N experts "
                 "per GPU; needs a build with NCCL)")
      ->capture_default_str();
  float ep_capacity = 0;
  app.add_option("--ep-capacity", ep_capacity,
                 "with --gpus N: rows per destination = ceil(F*tokens*topk/N) (pairs past it are dropped); 0: "
                 "tokens*topk, lossless")
      ->capture_default_str();
  app.add_option("--json", json, "write results as JSON to this file");
  bool no_pdl = false;
  app.add_flag("--no-pdl", no_pdl,
               "one GPU: plain launches instead of programmatic dependent launch between each layer's MoE kernels "
               "(the ablation)");
  CLI11_PARSE(app, argc, argv);

#if !EAAS_MONO_WITH_NCCL
  if (gpus != 1) die("--gpus " + std::to_string(gpus) + ": this build has no NCCL", status::unsupported);
#endif
  if (no_pdl && gpus != 1)
    die("--no-pdl: one GPU only (the expert-parallel path launches plainly)", status::invalid_argument);
  if (gpus == 0) die("--gpus must be >= 1", status::invalid_argument);
  if (layers == 0 || reps < 1 || warm < 0 || tokens_sel.empty() || vocab == 0)
    die("bad --layers/--reps/--warmup/--tokens/--vocab", status::invalid_argument);
  std::vector<model> models;
  for (const auto& m : models_sel) {
    if (m == "qwen3-30b-a3b")
      models.push_back({m, 2048, 768, 128, 8, 48});
    else if (m == "deepseek-v3")
      models.push_back({m, 7168, 2048, 256, 8, 58});
    else if (m == "custom" && hidden && inter && experts && topk && topk <= experts)
      models.push_back({m, hidden, inter, experts, topk, layers});
    else
      die("unknown model or incomplete custom shape: " + m, status::invalid_argument);
  }
  for (const std::uint32_t t : tokens_sel)
    if (t == 0) die("--tokens must be >= 1", status::invalid_argument);
  const std::uint32_t max_tokens = *std::max_element(tokens_sel.begin(), tokens_sel.end());

  int count = 0;
  EAAS_CU(cudaGetDeviceCount(&count));
  if (count == 0) die("no CUDA device", status::unsupported);
  if (static_cast<std::uint32_t>(count) < gpus) die("--gpus exceeds the CUDA devices", status::invalid_argument);
  EAAS_CU(cudaSetDevice(0));
  cudaDeviceProp prop{};
  EAAS_CU(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t st;
  EAAS_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));

  std::printf("# eaas-monolithic on %s (%d SMs, %.0f GiB)\n", prop.name, prop.multiProcessorCount,
              prop.totalGlobalMem / 1073741824.0);
  std::printf(
      "# forward = embed + %u x (attention stand-in (cost %u) + rmsnorm + router + local MoE); times in us: %d\n"
      "#   back-to-back forwards after %d untimed; tok/s = tokens / t_typical (median); layer_us = t_typical /\n"
      "#   layers; tok/s@depth = tokens / (layer_us x the model's MoE layers); active = experts with rows per\n"
      "#   layer (mean); #wrong = outputs not bit-equal across eager / graph / unshrunk, or not finite;\n"
      "#   step_us = median of %d decode-loop steps, each synchronized on the host (tokens up, forward, T x 4 bytes\n"
      "#   of output back, wait: what a serving loop pays per step, host turn included); step tok/s = tokens /\n"
      "#   step_us\n",
      layers, attention_cost, reps, warm, reps);
  std::printf("%-14s %6s %6s %5s %6s %10s %10s %10s %10s %10s %12s %12s %7s %6s %10s %12s\n", "#model", "layers",
              "tokens", "graph", "shrink", "t_min", "t_typical", "t_avg", "p99", "layer_us", "tok/s", "tok/s@depth",
              "active", "#wrong", "step_us", "step tok/s");
  nlohmann::json out = {{"tool", "eaas-monolithic"},        {"date", today_utc()}, {"gpu", prop.name},
                        {"sms", prop.multiProcessorCount},  {"gpus", gpus},        {"layers", layers},
                        {"attention_cost", attention_cost}, {"vocab", vocab},      {"reps", reps}};
  nlohmann::json points = nlohmann::json::array();
  bool all_ok = true;

  for (const model& md : models) {
    const rt::model_shape shape{md.hidden, md.inter, md.experts, md.topk, layers};
    const rt::dense_options opts{.vocab = vocab, .attention_cost = attention_cost};
#if EAAS_MONO_WITH_NCCL
    if (gpus > 1) {
      all_ok = run_ep(gpus, md, layers, opts, tokens_sel, ep_capacity, seed, warm, reps, points) && all_ok;
      continue;
    }
#endif
    std::unique_ptr<rt::gpu::monolithic_gpu> mono;
    EAAS_PERF_CHECK(rt::gpu::monolithic_gpu::create(0, shape, opts, rt::synthetic_dense_weights(shape, seed, opts),
                                                    max_tokens, mono));
    EAAS_PERF_CHECK(mono->moe().fill_random(seed));
    mono->moe().set_pdl(!no_pdl);
    std::printf("# %s: MoE kernels %s\n", md.name.c_str(),
                no_pdl ? "with plain launches (--no-pdl)" : "with programmatic dependent launch where the GPU has it");

    for (const std::uint32_t T : tokens_sel) {
      std::mt19937_64 rng(seed * 1000003u + T);
      std::vector<std::uint32_t> toks(T);
      for (auto& v : toks) v = static_cast<std::uint32_t>(rng() % vocab);
      EAAS_CU(cudaMemcpyAsync(mono->tokens(), toks.data(), T * sizeof(std::uint32_t), cudaMemcpyHostToDevice, st));
      std::uint32_t* h_tokens = nullptr;  // pinned, for the decode-loop steps
      float* h_out = nullptr;
      EAAS_CU(cudaMallocHost(&h_tokens, std::size_t{T} * 4));
      EAAS_CU(cudaMallocHost(&h_out, std::size_t{T} * 4));
      std::memcpy(h_tokens, toks.data(), std::size_t{T} * 4);
      const std::size_t n = std::size_t{T} * md.hidden;

      // Validate: eager (shrink on) is the reference; unshrunk and graph replays must match it bit for bit.
      EAAS_PERF_CHECK(mono->forward(T, true, st));
      const std::vector<float> ref = download(mono->hidden_states(), n, st);
      std::vector<std::int32_t> active(layers);
      EAAS_CU(cudaMemcpyAsync(active.data(), mono->moe().active_counts(), layers * sizeof(std::int32_t),
                              cudaMemcpyDeviceToHost, st));
      EAAS_CU(cudaStreamSynchronize(st));
      double active_mean = 0;
      for (const std::int32_t a : active) active_mean += a;
      active_mean /= layers;
      std::size_t wrong_shared = 0;
      for (const float v : ref) wrong_shared += !std::isfinite(v);

      for (const bool graph : {true, false})
        for (const bool shrink : {true, false}) {
          cudaGraphExec_t exec = nullptr;
          if (graph) exec = capture(st, [&] { EAAS_PERF_CHECK(mono->forward(T, shrink, st)); });
          auto body = [&] {
            if (graph)
              EAAS_CU(cudaGraphLaunch(exec, st));
            else
              EAAS_PERF_CHECK(mono->forward(T, shrink, st));
          };
          body();
          std::size_t wrong = wrong_shared + count_wrong(download(mono->hidden_states(), n, st), ref);
          std::uint32_t err = 0;
          EAAS_CU(cudaMemcpyAsync(&err, mono->moe().error_word(), 4, cudaMemcpyDeviceToHost, st));
          EAAS_CU(cudaStreamSynchronize(st));
          if (err != 0) wrong += 1;
          all_ok = all_ok && wrong == 0;

          const latency_stats s = summarize(time_loop(st, warm, reps, body));
          const latency_stats step =
              summarize(step_loop(st, warm, reps, body, mono->tokens(), h_tokens, mono->hidden_states(), h_out, T));
          if (exec != nullptr) EAAS_CU(cudaGraphExecDestroy(exec));
          point p = point_of(md, layers, T, graph, shrink, s, wrong);
          const double step_tps = static_cast<double>(T) / (step.t_typical * 1e-6);
          std::printf(
              "%-14s %6u %6u %5d %6d %10.1f %10.1f %10.1f %10.1f %10.1f %12.0f %12.0f %7.1f %6zu %10.1f %12.0f\n",
              md.name.c_str(), layers, T, graph ? 1 : 0, shrink ? 1 : 0, s.t_min, s.t_typical, s.t_avg, s.p99,
              p.layer_us, p.tps, p.tps_depth, active_mean, wrong, step.t_typical, step_tps);
          p.json["step_time"] = to_json(0, step);
          p.json["tokens_per_s_step"] = step_tps;
          std::fflush(stdout);
          p.json["active_experts_per_layer"] = active_mean;
          p.json["grouped_gemm_error"] = err;
          points.push_back(std::move(p.json));
        }
      EAAS_CU(cudaFreeHost(h_tokens));
      EAAS_CU(cudaFreeHost(h_out));
    }
  }
  out["points"] = points;
  out["ok"] = all_ok;
  if (!json.empty()) {
    std::ofstream f(json);
    f << out.dump(2) << "\n";
    if (!f) die("cannot write " + json, status::internal_error);
  }
  EAAS_CU(cudaStreamDestroy(st));
  return all_ok ? 0 : 1;
}
