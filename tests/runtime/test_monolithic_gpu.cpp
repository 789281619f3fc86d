// The monolithic baseline on one GPU (issue #9): the dense part (runtime/src/gpu/dense_gpu.hpp) against
// the CPU dense_model, the whole forward with the local MoE layer (moe_local.hpp) against
// reference_model::forward with the same routing, a CUDA-graph replay with new token ids, and the
// kernel-shrinking ablation. Exits 77 (ctest: skipped) where there is no CUDA device.

#define DOCTEST_CONFIG_IMPLEMENT
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "../common/doctest_main.hpp"
#include "../common/require_ok.hpp"
#include "bf16.hpp"
#include "cpu_math.hpp"
#include "gpu/dense_gpu.hpp"
#include "gpu/moe_local.hpp"
#include "reference.hpp"
#include "wire.hpp"

using namespace eaas;
using namespace eaas::runtime;
using runtime::gpu::dense_gpu;
using runtime::gpu::monolithic_gpu;

namespace {

const model_shape kShape{.hidden = 256, .inter = 192, .experts = 12, .topk = 3, .layers = 3};
// Many experts, few tokens: most experts are empty, and the scan needs two passes of its 1024 threads.
const model_shape kSparse{.hidden = 64, .inter = 64, .experts = 1500, .topk = 2, .layers = 2};
const dense_options kOpts{.vocab = 512, .attention_cost = 2};
constexpr std::uint64_t kSeed = 7;

#define CUDA_OK(x) REQUIRE_MESSAGE((x) == cudaSuccess, #x)

// A device allocation the test owns.
struct dev {
  void* p = nullptr;
  explicit dev(std::size_t bytes) { CUDA_OK(cudaMalloc(&p, bytes)); }
  ~dev() { cudaFree(p); }
  dev(const dev&) = delete;
  dev& operator=(const dev&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

struct stream {
  cudaStream_t s = nullptr;
  stream() { CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~stream() { cudaStreamDestroy(s); }
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;
};

template <class T>
std::vector<T> download(const T* d, std::size_t n) {
  std::vector<T> h(n);
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

std::vector<float> download_bf16(const void* d, std::size_t n) {
  const auto raw = download(static_cast<const std::uint16_t*>(d), n);
  std::vector<float> f(n);
  for (std::size_t i = 0; i < n; ++i) f[i] = bf16_to_f32(raw[i]);
  return f;
}

template <class T>
void upload(T* d, const std::vector<T>& h) {
  CUDA_OK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  // A pageable copy may return before its DMA lands, and the work that reads it runs on a non-blocking
  // stream, which does not wait for the legacy stream.
  CUDA_OK(cudaDeviceSynchronize());
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::fabs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::fabs(double(b[i])));
  }
  if (!std::isfinite(diff)) return INFINITY;
  return scale > 0 ? diff / scale : diff;
}

std::vector<std::uint32_t> random_tokens(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::uint32_t> t(n);
  for (auto& v : t) v = static_cast<std::uint32_t>(rng() % 5000);  // also ids past vocab (taken modulo)
  return t;
}

// The GPU dense part of `seed`'s weights next to the CPU one, both run layer after layer (no experts).
struct dense_run {
  std::vector<float> x0_gpu, x0_cpu;      // embeddings
  std::vector<double> x_err, normed_err;  // per layer
  std::vector<double> logit_err;          // per layer: max |gpu - cpu| / max |cpu|
  std::size_t compared = 0, near_ties = 0, id_mismatches = 0;
  double weight_err = 0;  // max |gpu - cpu| over the compared tokens' weights
};

dense_run run_dense(std::uint64_t gpu_seed, std::uint32_t T) {
  dense_run r;
  const model_shape& s = kShape;
  const dense_model cpu(s, kSeed, kOpts);
  const auto w_cpu = synthetic_dense_weights(s, kSeed, kOpts);  // for the host logits
  std::unique_ptr<dense_gpu> g;
  REQUIRE_OK(dense_gpu::create(0, s, kOpts, synthetic_dense_weights(s, gpu_seed, kOpts), T, g));
  stream st;
  const auto toks = random_tokens(T, 11);
  dev d_tok(T * 4), d_x(std::size_t{T} * s.hidden * 4), d_n(std::size_t{T} * s.hidden * 2), d_ids(T * s.topk * 4),
      d_w(T * s.topk * 4);
  upload(d_tok.as<std::uint32_t>(), toks);
  CUDA_OK(cudaMemsetAsync(d_x.p, 0xff, std::size_t{T} * s.hidden * 4, st.s));  // poisoned: NaN unless written
  REQUIRE_OK(g->embed(d_tok.as<std::uint32_t>(), T, d_x.as<float>(), st.s));
  std::vector<float> xc, nc;
  cpu.embed(toks, xc);
  r.x0_cpu = xc;
  r.x0_gpu = download(d_x.as<float>(), xc.size());
  routing rc;
  std::vector<float> cl(std::size_t{T} * s.experts);
  for (std::uint32_t l = 0; l < s.layers; ++l) {
    cpu.attention(l, xc, nc);
    REQUIRE_OK(g->attention(l, T, d_x.as<float>(), d_n.p, st.s));
    REQUIRE_OK(g->route(l, T, d_n.p, d_ids.as<std::uint32_t>(), d_w.as<float>(), st.s));
    r.x_err.push_back(rel_err(download(d_x.as<float>(), xc.size()), xc));
    r.normed_err.push_back(rel_err(download_bf16(d_n.p, nc.size()), nc));

    cpu.route(l, nc, rc);
    const auto gid = download(d_ids.as<std::uint32_t>(), rc.ids.size());
    const auto gw = download(d_w.as<float>(), rc.weights.size());
    const auto gl = download(g->logits(), cl.size());
    cpu::gemm_nt(nc.data(), w_cpu.routers[l].gate.data(), cl.data(), T, s.experts, s.hidden);
    double lerr = 0, lscale = 0;
    for (std::size_t i = 0; i < cl.size(); ++i) {
      lerr = std::max(lerr, std::fabs(double(gl[i]) - cl[i]));
      lscale = std::max(lscale, std::fabs(double(cl[i])));
    }
    r.logit_err.push_back(std::isfinite(lerr) ? lerr / lscale : INFINITY);
    // A token's top-k set can differ legitimately only when its k-th and (k+1)-th CPU logits are closer
    // than the logits' errors can move them apart (twice the largest error seen): a near-tie.
    const double tie_eps = 2 * lerr + 1e-6;
    for (std::uint32_t t = 0; t < T; ++t) {
      const float* lt = cl.data() + std::size_t{t} * s.experts;
      std::vector<std::uint32_t> order(s.experts);
      std::iota(order.begin(), order.end(), 0u);
      std::stable_sort(order.begin(), order.end(), [lt](std::uint32_t a, std::uint32_t b) { return lt[a] > lt[b]; });
      // These logits are dense_model's own (same function, same data): its choice must be the top-k of them.
      const std::set<std::uint32_t> cset(rc.ids.begin() + t * s.topk, rc.ids.begin() + (t + 1) * s.topk);
      CHECK(cset == std::set<std::uint32_t>(order.begin(), order.begin() + s.topk));
      if (s.topk < s.experts && double(lt[order[s.topk - 1]]) - lt[order[s.topk]] < tie_eps) {
        ++r.near_ties;
        continue;
      }
      ++r.compared;
      const std::set<std::uint32_t> gset(gid.begin() + t * s.topk, gid.begin() + (t + 1) * s.topk);
      if (gset != cset) {
        ++r.id_mismatches;
        continue;
      }
      for (std::uint32_t k = 0; k < s.topk; ++k)  // match weights by id
        for (std::uint32_t j = 0; j < s.topk; ++j)
          if (gid[t * s.topk + j] == rc.ids[t * s.topk + k])
            r.weight_err = std::max(r.weight_err, std::fabs(double(gw[t * s.topk + j]) - rc.weights[t * s.topk + k]));
    }
  }
  return r;
}

// A monolithic forward on the GPU: the dense part of kSeed, the experts of `expert_seed`.
std::unique_ptr<monolithic_gpu> make_mono(const model_shape& s, std::uint64_t expert_seed, std::uint32_t max_tokens) {
  std::unique_ptr<monolithic_gpu> m;
  REQUIRE_OK(monolithic_gpu::create(0, s, kOpts, synthetic_dense_weights(s, kSeed, kOpts), max_tokens, m));
  for (std::uint32_t l = 0; l < s.layers; ++l)
    for (std::uint32_t e = 0; e < s.experts; ++e)
      REQUIRE_OK(m->moe().upload(l, e, synthetic_expert(s, expert_seed, l, e)));
  return m;
}

struct forward_out {
  std::vector<float> hidden;
  std::vector<routing> routes;
  std::vector<std::int32_t> active;  // per layer
};

forward_out run_forward(monolithic_gpu& m, const model_shape& s, const std::vector<std::uint32_t>& toks, bool shrink,
                        cudaStream_t st) {
  const auto T = static_cast<std::uint32_t>(toks.size());
  upload(m.tokens(), toks);
  REQUIRE_OK(m.forward(T, shrink, st));
  forward_out o;
  o.hidden = download(m.hidden_states(), std::size_t{T} * s.hidden);
  for (std::uint32_t l = 0; l < s.layers; ++l) {
    routing r;
    r.ids = download(m.ids(l), std::size_t{T} * s.topk);
    r.weights = download(m.weights(l), std::size_t{T} * s.topk);
    o.routes.push_back(std::move(r));
  }
  o.active = download(m.moe().active_counts(), s.layers);
  CHECK(download(m.moe().error_word(), 1)[0] == 0u);
  return o;
}

// The active-expert list the scan built for each layer must be exactly the experts the routing names.
void check_active_lists(monolithic_gpu& m, const model_shape& s, const forward_out& o) {
  const auto lists = download(m.moe().active_experts(), std::size_t{s.layers} * s.experts);
  for (std::uint32_t l = 0; l < s.layers; ++l) {
    const std::set<std::uint32_t> want(o.routes[l].ids.begin(), o.routes[l].ids.end());
    REQUIRE(o.active[l] >= 0);
    CHECK(static_cast<std::size_t>(o.active[l]) == want.size());
    std::vector<std::uint32_t> got;
    for (std::int32_t i = 0; i < o.active[l] && i < static_cast<std::int32_t>(s.experts); ++i)
      got.push_back(static_cast<std::uint32_t>(lists[std::size_t{l} * s.experts + i]));
    CHECK(got == std::vector<std::uint32_t>(want.begin(), want.end()));  // ascending
  }
}

}  // namespace

TEST_CASE("monolithic GPU: the dense part matches the CPU dense_model (embedding exact, bf16 elsewhere)") {
  constexpr std::uint32_t T = 128;
  const dense_run r = run_dense(kSeed, T);
  CHECK(r.x0_gpu == r.x0_cpu);  // the table stays fp32: a copy, bit for bit
  for (std::uint32_t l = 0; l < kShape.layers; ++l) {
    INFO("layer " << l);
    CHECK(r.x_err[l] <= 1e-2);
    CHECK(r.normed_err[l] <= 1e-2);
    CHECK(r.logit_err[l] <= 1e-2);
    CHECK(r.logit_err[l] > 1e-6);  // bf16 operands: not fp32 bit-equal, so the GPU really computed them
  }
  MESSAGE("near-ties excluded: " << r.near_ties << " of " << T * kShape.layers << " (token, layer) pairs");
  CHECK(r.id_mismatches == 0);
  CHECK(r.compared >= 3 * (r.near_ties + 1));  // the exclusion must stay the exception
  CHECK(r.weight_err <= 1e-2);                 // weights sum to 1: relative to their sum
}

TEST_CASE("monolithic GPU: dense weights from another seed are caught (the comparison has teeth)") {
  const dense_run r = run_dense(kSeed + 1, 64);
  CHECK(r.x0_gpu != r.x0_cpu);
  CHECK(r.x_err[0] > 0.1);
  CHECK(r.logit_err[0] > 0.1);
}

TEST_CASE("monolithic GPU: the forward (dense + local MoE, every layer) matches reference_model with its routing") {
  for (const model_shape& s : {kShape, kSparse}) {
    INFO("experts " << s.experts);
    constexpr std::uint32_t T = 37;  // not a multiple of any tile
    const reference_model ref(s, kSeed, kOpts);
    auto m = make_mono(s, kSeed, 64);
    stream st;
    const auto toks = random_tokens(T, 21);
    for (const bool shrink : {true, false}) {
      INFO("shrink " << shrink);
      const forward_out o = run_forward(*m, s, toks, shrink, st.s);
      std::vector<float> want;
      std::uint64_t disagreements = 0;
      ref.forward(toks, want, &o.routes, &disagreements);
      const double err = rel_err(o.hidden, want);
      MESSAGE("rel err " << err << ", routing disagreements (near-ties) " << disagreements << " of " << T * s.layers);
      CHECK(err <= 1e-2);
      CHECK(err > 1e-6);  // bf16: the GPU path ran
      CHECK(disagreements * 4 <= std::uint64_t{T} * s.layers);
      check_active_lists(*m, s, o);
    }
  }
}

TEST_CASE("monolithic GPU: experts from another seed are caught (the comparison has teeth)") {
  constexpr std::uint32_t T = 37;
  const reference_model ref(kShape, kSeed, kOpts);
  auto m = make_mono(kShape, kSeed + 1, T);
  stream st;
  const auto toks = random_tokens(T, 21);
  const forward_out o = run_forward(*m, kShape, toks, true, st.s);
  std::vector<float> want;
  ref.forward(toks, want, &o.routes, nullptr);
  CHECK(rel_err(o.hidden, want) > 5e-2);
}

TEST_CASE("monolithic GPU: shrinking on and off give bit-identical outputs (only the visited experts differ)") {
  for (const model_shape& s : {kShape, kSparse}) {
    INFO("experts " << s.experts);
    auto m = make_mono(s, kSeed, 64);
    stream st;
    for (const std::uint32_t T : {1u, 19u, 64u}) {
      INFO("tokens " << T);
      const auto toks = random_tokens(T, 100 + T);
      const forward_out on = run_forward(*m, s, toks, true, st.s);
      const forward_out off = run_forward(*m, s, toks, false, st.s);
      CHECK(std::memcmp(on.hidden.data(), off.hidden.data(), on.hidden.size() * 4) == 0);
      CHECK(on.active == off.active);
      for (const float v : on.hidden) REQUIRE(std::isfinite(v));
      check_active_lists(*m, s, on);
      if (s.experts > std::uint64_t{T} * s.topk) {  // some experts are certainly empty
        for (std::uint32_t l = 0; l < s.layers; ++l) CHECK(on.active[l] < static_cast<std::int32_t>(s.experts));
      }
    }
  }
}

namespace {

// Captures one forward of T tokens in a CUDA graph and replays it `rounds` times for b's tokens and then a's
// (the hidden states poisoned before each replay): every replay must give the eager forward's bits and routing.
void check_replays(monolithic_gpu& m, std::uint32_t T, bool shrink, cudaStream_t s, const std::vector<std::uint32_t>& a,
                   const forward_out& ea, const std::vector<std::uint32_t>& b, const forward_out& eb, int rounds) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  const status captured = m.forward(T, shrink, s);
  CUDA_OK(cudaStreamEndCapture(s, &graph));
  REQUIRE_OK(captured);
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  const std::size_t n = std::size_t{T} * kShape.hidden;
  for (int round = 0; round < rounds; ++round)
    for (const auto* toks : {&b, &a}) {
      CUDA_OK(cudaMemsetAsync(const_cast<float*>(m.hidden_states()), 0xff, n * 4, s));  // NaN unless rewritten
      CUDA_OK(cudaMemcpyAsync(m.tokens(), toks->data(), T * 4, cudaMemcpyHostToDevice, s));
      CUDA_OK(cudaGraphLaunch(exec, s));
      CUDA_OK(cudaStreamSynchronize(s));
      const auto got = download(m.hidden_states(), n);
      const forward_out& want = toks == &a ? ea : eb;
      CHECK(std::memcmp(got.data(), want.hidden.data(), n * 4) == 0);
      for (std::uint32_t l = 0; l < kShape.layers; ++l)
        CHECK(download(m.ids(l), std::size_t{T} * kShape.topk) == want.routes[l].ids);
    }
  CHECK(download(m.moe().error_word(), 1)[0] == 0u);
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
}

}  // namespace

TEST_CASE("monolithic GPU: programmatic dependent launch on and off give bit-identical outputs, eager and in a graph") {
  // Each MoE kernel waits for its predecessor before touching memory (pdl.cuh), and the group counts are zeroed
  // by the scan that read them: forwards in a row, plain or overlapped launches, eager or captured, all agree.
  constexpr std::uint32_t T = 40;
  auto m = make_mono(kShape, kSeed, T);
  stream st;
  const auto a = random_tokens(T, 7), b = random_tokens(T, 8);
  m->moe().set_pdl(false);
  const forward_out plain_a = run_forward(*m, kShape, a, true, st.s);
  const forward_out plain_b = run_forward(*m, kShape, b, true, st.s);
  REQUIRE(rel_err(plain_a.hidden, plain_b.hidden) > 0.1);
  m->moe().set_pdl(true);
  for (int rep = 0; rep < 2; ++rep) {  // twice: the second forward relies on the counts the first scan zeroed
    const forward_out on_a = run_forward(*m, kShape, a, true, st.s);
    CHECK(std::memcmp(on_a.hidden.data(), plain_a.hidden.data(), on_a.hidden.size() * 4) == 0);
    CHECK(on_a.active == plain_a.active);
  }
  check_replays(*m, T, true, st.s, a, plain_a, b, plain_b, 3);  // PDL on inside the graph too
}

TEST_CASE("monolithic GPU: a forward captured in a CUDA graph and replayed with new token ids equals an eager one") {
  constexpr std::uint32_t T = 48;
  for (const bool shrink : {true, false}) {
    INFO("shrink " << shrink);
    auto m = make_mono(kShape, kSeed, T);
    stream st;
    const auto a = random_tokens(T, 1), b = random_tokens(T, 2);
    const forward_out ea = run_forward(*m, kShape, a, shrink, st.s);
    const forward_out eb = run_forward(*m, kShape, b, shrink, st.s);
    REQUIRE(rel_err(ea.hidden, eb.hidden) > 0.1);  // different tokens, different outputs
    check_replays(*m, T, shrink, st.s, a, ea, b, eb, 2);
  }
}

int main(int argc, char** argv) {
  return eaas::test::run_tests(argc, argv, [] {
    return runtime::cuda_device_count() == 0 ? "no CUDA device: skipping the monolithic GPU tests" : nullptr;
  });
}
