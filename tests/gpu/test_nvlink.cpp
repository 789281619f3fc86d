// nvlink transport tests: two contexts of this process, on two GPUs when there are two, and on one
// shared GPU. Every kernel is a real launch; every byte that moves is checked on the host.

#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../../perf/pattern.hpp"
#include "../common/require_ok.hpp"
#include "eaas/eaas.hpp"
#include "kernels.hpp"
#include "nvlink_kernels.hpp"

using namespace eaas;
using namespace eaas::gputest;

namespace {

#define REQUIRE_CUDA(expr) REQUIRE((expr) == cudaSuccess)

constexpr std::size_t kRegion = 8u << 20;

/// Contexts A (GPU ga) and B (GPU gb), a device region on each, endpoints both ways, and each
/// side's region imported by the other.
struct gpu_pair {
  int ga, gb;
  std::unique_ptr<context> a, b;
  std::unique_ptr<memory_region> ra, rb;
  std::unique_ptr<endpoint> ab, ba;
  std::unique_ptr<remote_region> rb_from_a, ra_from_b;

  gpu_pair(int ga_, int gb_) : ga(ga_), gb(gb_) {
    REQUIRE_OK(context::create({.name = "A", .cuda_device = ga}, a));
    REQUIRE_OK(context::create({.name = "B", .cuda_device = gb}, b));
    REQUIRE_OK(a->allocate(kRegion, memory_kind::device, ra));
    REQUIRE_OK(b->allocate(kRegion, memory_kind::device, rb));
    handle_bytes ca, cb, ha, hb;
    REQUIRE_OK(a->connection_handle(ca));
    REQUIRE_OK(b->connection_handle(cb));
    REQUIRE_OK(a->connect(cb, ab));
    REQUIRE_OK(b->connect(ca, ba));
    CHECK(ab->transport() == transport_kind::nvlink);
    REQUIRE_OK(ra->export_handle(ha));
    REQUIRE_OK(rb->export_handle(hb));
    REQUIRE_OK(ab->import_region(hb, rb_from_a));
    REQUIRE_OK(ba->import_region(ha, ra_from_b));
  }
  unsigned char* b_bytes() const { return static_cast<unsigned char*>(rb->data()); }
  unsigned char* a_bytes() const { return static_cast<unsigned char*>(ra->data()); }
};

std::vector<std::pair<int, int>> configs() {
  std::vector<std::pair<int, int>> v{{0, 0}};  // two contexts sharing one GPU
  if (device_count() > 1)
    v.emplace_back(0, 1);
  else
    MESSAGE("one GPU: the two-GPU configuration is not run here");
  return v;
}

std::size_t log_uniform(std::mt19937_64& rng, std::size_t max) {
  std::uniform_real_distribution<double> u(0.0, std::log2(static_cast<double>(max)));
  return std::max<std::size_t>(1, static_cast<std::size_t>(std::exp2(u(rng))));
}

}  // namespace

TEST_CASE("nvlink: put, get and put_signal of random sizes and offsets in every scope, every byte checked") {
  for (auto [ga, gb] : configs()) {
    CAPTURE(ga);
    CAPTURE(gb);
    gpu_pair p(ga, gb);
    // Source data on A's GPU: a pattern, at a misaligned start to exercise heads and tails.
    constexpr std::size_t kMax = 3u << 20;
    std::vector<unsigned char> pattern(kMax + 64), host(kMax + 256);
    perf::fill_pattern(4242, pattern.data(), pattern.size());
    unsigned char* src = nullptr;
    REQUIRE_CUDA(cudaSetDevice(ga));
    REQUIRE_CUDA(cudaMalloc(reinterpret_cast<void**>(&src), pattern.size()));
    REQUIRE_CUDA(cudaMemcpy(src, pattern.data(), pattern.size(), cudaMemcpyHostToDevice));
    unsigned char* dst_a = p.a_bytes();

    std::mt19937_64 rng(ga * 10 + gb + 1);
    std::vector<std::size_t> sizes = {1, 15, 16, 17, 63, 64, 65, 4099, kMax};
    for (int i = 0; i < 45; ++i) sizes.push_back(log_uniform(rng, kMax));
    int cases = 0;
    for (std::size_t n : sizes) {
      const auto sc = static_cast<scope>(rng() % 3);
      const std::size_t soff = rng() % 32, doff = 64 + rng() % (kRegion - 2 * 64 - n - 64);
      CAPTURE(n);
      CAPTURE(scope_name(sc));
      CAPTURE(soff);
      CAPTURE(doff);
      // put A -> B, poisoned around the target
      REQUIRE_CUDA(cudaSetDevice(gb));
      REQUIRE_CUDA(cudaMemset(p.b_bytes() + doff - 64, 0xA5, n + 128));
      status r = status::internal_error;
      REQUIRE_OK(launch_put(ga, sc, p.ab->view(), p.rb_from_a->view(), doff, src + soff, n, r));
      REQUIRE(r == status::ok);
      REQUIRE_CUDA(cudaMemcpy(host.data(), p.b_bytes() + doff - 64, n + 128, cudaMemcpyDeviceToHost));
      CHECK(std::memcmp(host.data() + 64, pattern.data() + soff, n) == 0);
      CHECK(std::count(host.begin(), host.begin() + 64, 0xA5) == 64);
      CHECK(std::count(host.begin() + 64 + n, host.begin() + 128 + n, 0xA5) == 64);
      // get B -> A into a poisoned local buffer at another misalignment
      const std::size_t goff = rng() % 32;
      REQUIRE_CUDA(cudaSetDevice(ga));
      REQUIRE_CUDA(cudaMemset(dst_a, 0x5A, n + 64));
      REQUIRE_OK(launch_get(ga, sc, p.ab->view(), p.rb_from_a->view(), doff, dst_a + goff, n, r));
      REQUIRE(r == status::ok);
      REQUIRE_CUDA(cudaMemcpy(host.data(), dst_a, n + 64, cudaMemcpyDeviceToHost));
      CHECK(std::memcmp(host.data() + goff, pattern.data() + soff, n) == 0);
      CHECK(std::count(host.begin(), host.begin() + goff, 0x5A) == static_cast<long>(goff));
      // put_signal: payload and an added signal
      const std::uint64_t before_sig = [&] {
        std::uint64_t v = 0;
        cudaSetDevice(gb);
        cudaMemcpy(&v, p.b_bytes(), 8, cudaMemcpyDeviceToHost);
        return v;
      }();
      REQUIRE_OK(launch_put_signal(ga, sc, p.ab->view(), p.rb_from_a->view(), doff, src + soff + 1, n,
                                   p.rb_from_a->view(), 0, n, signal_op::add, r));
      REQUIRE(r == status::ok);
      std::uint64_t after_sig = 0;
      REQUIRE_CUDA(cudaSetDevice(gb));
      REQUIRE_CUDA(cudaMemcpy(&after_sig, p.b_bytes(), 8, cudaMemcpyDeviceToHost));
      CHECK(after_sig == before_sig + n);
      REQUIRE_CUDA(cudaMemcpy(host.data(), p.b_bytes() + doff, n, cudaMemcpyDeviceToHost));
      CHECK(std::memcmp(host.data(), pattern.data() + soff + 1, n) == 0);
      ++cases;
    }
    MESSAGE("GPU ", ga, " -> GPU ", gb, ": ", cases, " sizes x (put, get, put_signal) verified");
    REQUIRE_CUDA(cudaSetDevice(ga));
    REQUIRE_CUDA(cudaFree(src));
  }
}

TEST_CASE("nvlink: a signal is never observed before its payload, put by a thread, a warp or a block") {
  for (auto [ga, gb] : configs()) {
    gpu_pair p(ga, gb);
    // Payload words at +4096, signal at +0 of B's region.
    remote_view payload = p.rb_from_a->view();
    payload.addr += 4096;
    payload.size = kOrderMaxWords * sizeof(std::uint64_t);
    for (unsigned threads : {1u, 32u, 256u}) {
      CAPTURE(ga);
      CAPTURE(gb);
      CAPTURE(threads);
      // The warp's and block's payloads are 4 KiB: fewer rounds.
      const std::uint64_t iters = threads == 1 ? 1'000'000 : 200'000;
      // Signal and payload start at 0 for each scope (the previous run left them at its last value).
      REQUIRE_CUDA(cudaSetDevice(gb));
      REQUIRE_CUDA(cudaMemset(p.b_bytes(), 0, 4096 + kOrderMaxWords * sizeof(std::uint64_t)));
      REQUIRE_CUDA(cudaDeviceSynchronize());
      order_result r{};
      REQUIRE_OK(run_ordering(ga, p.ab->view(), payload, p.rb_from_a->view(), gb,
                              reinterpret_cast<const std::uint64_t*>(p.b_bytes() + 4096),
                              reinterpret_cast<const std::uint64_t*>(p.b_bytes()), iters, threads, r));
      MESSAGE("GPU ", ga, " -> GPU ", gb, ", ", threads, " threads: ", r.checks, " observations, ", r.in_flight,
              " while in flight");
      CHECK(r.sender == status::ok);
      CHECK(r.receiver == status::ok);
      CHECK(r.last == iters);
      CHECK(r.violations == 0);
      // A wide payload makes each observation slow (512 words read): fewer of them, still thousands in flight.
      CHECK(r.in_flight >= (threads == 1 ? iters / 10 : 2000));
    }
  }
}

TEST_CASE("nvlink: grid_put_signal with a head: its commit word is never seen before any other byte") {
  for (auto [ga, gb] : configs()) {
    gpu_pair p(ga, gb);
    // The transfer at +4096 of B's region (32 KiB from 4 blocks: 8 KiB each after the 64-byte head), the
    // signal at +0; both start at 0.
    constexpr std::uint32_t kWords = 4096;
    constexpr std::uint64_t kIters = 20'000;
    remote_view dst = p.rb_from_a->view();
    dst.addr += 4096;
    dst.size = kWords * sizeof(std::uint64_t);
    REQUIRE_CUDA(cudaSetDevice(gb));
    REQUIRE_CUDA(cudaMemset(p.b_bytes(), 0, 4096 + kWords * sizeof(std::uint64_t)));
    REQUIRE_CUDA(cudaDeviceSynchronize());
    head_order_result r{};
    REQUIRE_OK(run_head_ordering(ga, p.ab->view(), dst, p.rb_from_a->view(), gb,
                                 reinterpret_cast<const std::uint64_t*>(p.b_bytes() + 4096),
                                 reinterpret_cast<const std::uint64_t*>(p.b_bytes()), kIters, kWords, 4, r));
    CAPTURE(ga);
    CAPTURE(gb);
    MESSAGE("GPU ", ga, " -> GPU ", gb, ": ", r.checks, " observations, ", r.in_flight, " while in flight");
    CHECK(r.sender == status::ok);
    CHECK(r.receiver == status::ok);
    CHECK(r.last == kIters);
    CHECK(r.violations == 0);
    CHECK(r.in_flight >= kIters / 20);  // the receiver looked while transfers were under way
    CHECK(r.signal == kIters);
    // Every byte of the last transfer, the commit word included, and nothing of the refused one.
    std::vector<std::uint64_t> got(kWords);
    REQUIRE_CUDA(cudaSetDevice(gb));
    REQUIRE_CUDA(cudaMemcpy(got.data(), p.b_bytes() + 4096, got.size() * 8, cudaMemcpyDeviceToHost));
    CHECK(std::count(got.begin(), got.end(), kIters) == static_cast<long>(kWords));
    CHECK(r.bad_head == status::invalid_argument);
    CHECK(r.untouched_by_bad_head);
  }
}

TEST_CASE("nvlink: fetch_add from many blocks sums exactly and hands out every value once") {
  for (auto [ga, gb] : configs()) {
    gpu_pair p(ga, gb);
    constexpr int kBlocks = 132, kThreads = 256, kTotal = kBlocks * kThreads;
    std::uint64_t* fetched = nullptr;
    REQUIRE_CUDA(cudaSetDevice(ga));
    REQUIRE_CUDA(cudaMalloc(reinterpret_cast<void**>(&fetched), kTotal * sizeof(std::uint64_t)));
    REQUIRE_CUDA(cudaMemset(fetched, 0xff, kTotal * sizeof(std::uint64_t)));
    status r = status::internal_error;
    REQUIRE_OK(launch_fetch_add(ga, p.ab->view(), p.rb_from_a->view(), 64, kBlocks, kThreads, fetched, r));
    CHECK(r == status::ok);
    std::vector<std::uint64_t> got(kTotal);
    REQUIRE_CUDA(cudaMemcpy(got.data(), fetched, got.size() * 8, cudaMemcpyDeviceToHost));
    REQUIRE_CUDA(cudaFree(fetched));
    std::uint64_t word = 0;
    REQUIRE_CUDA(cudaSetDevice(gb));
    REQUIRE_CUDA(cudaMemcpy(&word, p.b_bytes() + 64, 8, cudaMemcpyDeviceToHost));
    CHECK(word == static_cast<std::uint64_t>(kTotal));
    std::sort(got.begin(), got.end());
    bool permutation = true;
    for (int i = 0; i < kTotal; ++i) permutation &= got[i] == static_cast<std::uint64_t>(i);
    CHECK(permutation);
  }
}

TEST_CASE("nvlink: peer_pointer's stores from many blocks land at the peer; bad ranges and views get none") {
  for (auto [ga, gb] : configs()) {
    gpu_pair p(ga, gb);
    constexpr std::uint64_t kOff = 4096;
    constexpr std::uint32_t kWords = 300'000;  // 2.4 MB
    REQUIRE_CUDA(cudaSetDevice(gb));
    REQUIRE_CUDA(cudaMemset(p.b_bytes(), 0, kRegion));
    const remote_view v = p.rb_from_a->view();
    std::uint64_t probes[5] = {};
    REQUIRE_OK(launch_peer_pointer(ga, p.ab->view(), v, kOff, kWords, 132, probes));
    CHECK(probes[0] == v.addr + kOff);  // the mapping of B's region in A's address space, at the offset
    CHECK(probes[1] == 0);
    CHECK(probes[2] == 0);
    CHECK(probes[3] == 0);
    CHECK(probes[4] == v.addr + v.size);
    std::vector<std::uint64_t> got(kRegion / 8);
    REQUIRE_CUDA(cudaSetDevice(gb));
    REQUIRE_CUDA(cudaMemcpy(got.data(), p.b_bytes(), kRegion, cudaMemcpyDeviceToHost));
    std::uint64_t wrong = 0;
    for (std::uint64_t i = 0; i < got.size(); ++i) {
      const std::uint64_t w = i * 8 >= kOff && i * 8 < kOff + std::uint64_t{kWords} * 8 ? i - kOff / 8 : ~0ull;
      wrong += got[i] != (w == ~0ull ? 0 : peer_word_value(w));
    }
    CHECK(wrong == 0);  // every word of the range written, nothing around it
  }
}

TEST_CASE("nvlink: a put_signal/wait loop captured in a CUDA graph replays correctly") {
  for (auto [ga, gb] : configs()) {
    gpu_pair p(ga, gb);
    constexpr int kReplays = 2000;
    graph_result r{};
    REQUIRE_OK(run_graph_pingpong(ga, p.ab->view(), p.rb_from_a->view(), reinterpret_cast<std::uint64_t*>(p.a_bytes()),
                                  gb, p.ba->view(), p.ra_from_b->view(), reinterpret_cast<std::uint64_t*>(p.b_bytes()),
                                  kReplays, r));
    CHECK(r.client == status::ok);
    CHECK(r.server == status::ok);
    CHECK(r.replays_done == kReplays);
    CHECK(r.echo == kReplays);
  }
}

TEST_CASE("nvlink: device ops see close and abort through mapped host memory") {
  gpu_pair p(0, configs().back().second);
  std::uint64_t* sig = reinterpret_cast<std::uint64_t*>(p.a_bytes());
  status r = status::internal_error;
  REQUIRE_OK(launch_wait(p.ga, p.ab->view(), sig, 1, 20'000'000, r));
  CHECK(r == status::timeout);
  p.a->abort();
  REQUIRE_OK(launch_wait(p.ga, p.ab->view(), sig, 1, 30'000'000'000ull, r));
  CHECK(r == status::aborted);
  p.a->clear_abort();
  const auto view = p.ab->view();
  p.ab->close();
  REQUIRE_OK(launch_wait(p.ga, view, sig, 1, 30'000'000'000ull, r));
  CHECK(r == status::not_connected);
  // Device puts do not read the state (a PCIe round trip); the quiet after them reports it.
  REQUIRE_OK(launch_put_signal(p.ga, scope::warp, view, p.rb_from_a->view(), 64, p.a_bytes() + 64, 8,
                               p.rb_from_a->view(), 8, 1, signal_op::add, r));
  CHECK(r == status::not_connected);
}

TEST_CASE("nvlink: bad handles and wrong pairings are refused on the host") {
  gpu_pair p(0, configs().back().second);
  std::unique_ptr<memory_region> extra;
  REQUIRE_OK(p.b->allocate(4096, memory_kind::device, extra));
  handle_bytes h;
  REQUIRE_OK(extra->export_handle(h));
  std::unique_ptr<remote_region> rr;
  // A's endpoint to B cannot import A's own region, nor B's region through B's endpoint to A.
  handle_bytes ha;
  REQUIRE_OK(p.ra->export_handle(ha));
  CHECK(p.ab->import_region(ha, rr) == status::invalid_argument);
  CHECK(p.ba->import_region(h, rr) == status::invalid_argument);
  // Corruption anywhere is caught.
  for (std::size_t bit = 0; bit < h.size() * 8; bit += 7) {
    auto bad = h;
    bad[bit / 8] ^= static_cast<std::byte>(1u << (bit % 8));
    CHECK(p.ab->import_region(bad, rr) == status::invalid_handle);
  }
  // A freed buffer is refused.
  extra.reset();
  CHECK(p.ab->import_region(h, rr) == status::invalid_handle);
  CHECK(rr == nullptr);
  // Host memory through an nvlink endpoint is the wrong transport.
  std::unique_ptr<memory_region> host_mem;
  REQUIRE_OK(p.b->allocate(4096, memory_kind::host, host_mem));
  REQUIRE_OK(host_mem->export_handle(h));
  CHECK(p.ab->import_region(h, rr) == status::invalid_handle);
  // A host-only context reaches a GPU context over shm.
  std::unique_ptr<context> cpu;
  REQUIRE_OK(context::create({.name = "cpu"}, cpu));
  handle_bytes cb;
  REQUIRE_OK(p.b->connection_handle(cb));
  std::unique_ptr<endpoint> e;
  REQUIRE_OK(cpu->connect(cb, e));
  CHECK(e->transport() == transport_kind::shm);
}
