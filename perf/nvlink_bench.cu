// eaas-nvlink-bench: the nvlink transport measured next to its floors, in one process driving two
// contexts (one per GPU; both on GPU 0 with --same-gpu or on a one-GPU machine).
//   latency:   8-byte put_signal ping-pong between kernels (RTT/2) vs a raw flag ping-pong kernel
//              (st.release.sys / ld.acquire.sys on the same mapped memory), alternating rounds
//   bandwidth: put from 1/4/16/132 blocks vs cudaMemcpyPeerAsync (copy engines), 4 KiB .. 1 GiB

#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <vector>

#include "driver.hpp"
#include "eaas/device/ops.hpp"
#include "gpu_util.cuh"

using namespace eaas;
using namespace eaas::perf;

namespace {

// ---- latency ----------------------------------------------------------------------------------

struct lat_args {
  device_endpoint ep;
  remote_view peer;         // the other side's region: signal at 0, payload at 64
  std::uint64_t* my_sig;    // this side's signal word (local)
  std::uint64_t* peer_raw;  // the other side's region, as a raw pointer (raw mode)
  const std::uint64_t* src;
  std::uint64_t first_seq, count, warm;
  long long* cycles;       // client: per-iteration round trip in SM cycles
  unsigned long long* ns;  // client: [0] = start, [1] = end (%globaltimer)
  status* result;
};

template <bool Raw>
__device__ __forceinline__ status send(const lat_args& a, std::uint64_t seq) {
  if constexpr (Raw) {
    a.peer_raw[8] = *a.src;  // payload at +64
    detail::store_release(a.peer_raw, seq);
    return status::ok;
  } else {
    return put_signal(coop_thread{}, a.ep, a.peer, 64, a.src, 8, a.peer, 0, seq, signal_op::set);
  }
}

// Send variants that locate the ops' cost: 0 the op (put_signal), 1 raw (st.global + st.release.sys),
// 4 raw with the payload stored through a generic address, 5 the op's copy body without its checks.
template <int Send>
__device__ __forceinline__ status send_as(const lat_args& a, std::uint64_t seq) {
  if constexpr (Send == 4) {
    asm volatile("st.u64 [%0], %1;" ::"l"(a.peer_raw + 8), "l"(*a.src) : "memory");
    detail::store_release(a.peer_raw, seq);
    return status::ok;
  } else if constexpr (Send == 5) {
    (void)detail::ldst_dev::put<coop_thread>(a.peer, 64, a.src, 8);
    detail::store_release(a.peer_raw, seq);
    return status::ok;
  } else {
    return send<Send == 1>(a, seq);
  }
}

template <bool Raw>
__device__ __forceinline__ status await(const lat_args& a, std::uint64_t seq) {
  if constexpr (Raw) {
    while (detail::load_acquire(a.my_sig) < seq) {
    }
    return status::ok;
  } else {
    return wait_signal(a.ep, a.my_sig, cmp_op::ge, seq, timeout{2'000'000'000ull});
  }
}

// Mode bit 0: raw send, bit 1: raw wait (0: eaas put_signal + wait_signal; 3: the raw floor; 1 and 2
// tell which half of the op pair costs what).
template <int Mode>
__global__ void lat_client(lat_args a) {
  status s = status::ok;
  for (std::uint64_t i = 0; i < a.warm + a.count && s == status::ok; ++i) {
    if (i == a.warm) a.ns[0] = now_ns();
    const long long t0 = clock64();
    const std::uint64_t seq = a.first_seq + i;
    s = send_as<(Mode >= 4 ? Mode : (Mode & 1))>(a, seq);
    if (s == status::ok) s = await < (Mode & 2) != 0 || Mode >= 4 > (a, seq);
    const long long t1 = clock64();
    if (i >= a.warm) a.cycles[i - a.warm] = t1 - t0;
  }
  a.ns[1] = now_ns();
  *a.result = s;
}

template <int Mode>
__global__ void lat_server(lat_args a) {
  status s = status::ok;
  for (std::uint64_t i = 0; i < a.warm + a.count && s == status::ok; ++i) {
    const std::uint64_t seq = a.first_seq + i;
    s = await < (Mode & 2) != 0 || Mode >= 4 > (a, seq);
    if (s == status::ok) s = send_as<(Mode >= 4 ? Mode : (Mode & 1))>(a, seq);
  }
  *a.result = s;
}

// ---- bandwidth --------------------------------------------------------------------------------

__global__ void put_blocks(device_endpoint ep, remote_view dst, const unsigned char* src, std::size_t n,
                           status* result) {
  // Block b puts its 16-byte-aligned chunk; one put per block, all blocks in parallel.
  const std::size_t chunk = ((n + gridDim.x - 1) / gridDim.x + 15) / 16 * 16;
  const std::size_t begin = chunk * blockIdx.x < n ? chunk * blockIdx.x : n;
  const std::size_t end = begin + chunk < n ? begin + chunk : n;
  status s = put(coop_block{}, ep, dst, begin, src + begin, end - begin);
  if (s == status::ok) s = quiet(coop_block{}, ep);
  if (threadIdx.x == 0 && s != status::ok) *result = s;
}

struct setup {
  int ga, gb;
  std::unique_ptr<context> a, b;
  std::unique_ptr<memory_region> ra, rb;
  std::unique_ptr<endpoint> ab, ba;
  std::unique_ptr<remote_region> rb_from_a, ra_from_b;
};

void connect_pair(setup& s, std::size_t bytes) {
  EAAS_PERF_CHECK(context::create({.name = "A", .cuda_device = s.ga}, s.a));
  EAAS_PERF_CHECK(context::create({.name = "B", .cuda_device = s.gb}, s.b));
  EAAS_PERF_CHECK(s.a->allocate(bytes, memory_kind::device, s.ra));
  EAAS_PERF_CHECK(s.b->allocate(bytes, memory_kind::device, s.rb));
  handle_bytes ca, cb, ha, hb;
  EAAS_PERF_CHECK(s.a->connection_handle(ca));
  EAAS_PERF_CHECK(s.b->connection_handle(cb));
  EAAS_PERF_CHECK(s.a->connect(cb, s.ab));
  EAAS_PERF_CHECK(s.b->connect(ca, s.ba));
  EAAS_PERF_CHECK(s.ra->export_handle(ha));
  EAAS_PERF_CHECK(s.rb->export_handle(hb));
  EAAS_PERF_CHECK(s.ab->import_region(hb, s.rb_from_a));
  EAAS_PERF_CHECK(s.ba->import_region(ha, s.ra_from_b));
}

// One latency phase; returns half round trips in µs (SM cycles scaled by the phase's own
// %globaltimer span, so the clock rate needs no assumption).
template <int Mode>
std::vector<double> latency_phase(setup& s, std::uint64_t& seq, std::size_t iters, std::size_t warm,
                                  std::uint64_t* src_a, std::uint64_t* src_b) {
  long long* cycles = nullptr;
  unsigned long long* ns = nullptr;
  status *ra = nullptr, *rb = nullptr;
  EAAS_CU(cudaSetDevice(s.ga));
  EAAS_CU(cudaMalloc(&cycles, iters * sizeof(long long)));
  EAAS_CU(cudaMalloc(&ns, 2 * sizeof(unsigned long long)));
  EAAS_CU(cudaMalloc(&ra, sizeof(status)));
  EAAS_CU(cudaSetDevice(s.gb));
  EAAS_CU(cudaMalloc(&rb, sizeof(status)));
  cudaStream_t sa, sb;
  EAAS_CU(cudaStreamCreateWithFlags(&sb, cudaStreamNonBlocking));
  EAAS_CU(cudaSetDevice(s.ga));
  EAAS_CU(cudaStreamCreateWithFlags(&sa, cudaStreamNonBlocking));
  // Both kernels are loaded before either runs: lazy loading of one while the other spins on
  // the same GPU would wait for it forever.
  cudaFuncAttributes attr{};
  EAAS_CU(cudaFuncGetAttributes(&attr, lat_client<Mode>));
  EAAS_CU(cudaSetDevice(s.gb));
  EAAS_CU(cudaFuncGetAttributes(&attr, lat_server<Mode>));
  EAAS_CU(cudaSetDevice(s.ga));
  lat_args client{s.ab->view(),
                  s.rb_from_a->view(),
                  static_cast<std::uint64_t*>(s.ra->data()),
                  static_cast<std::uint64_t*>(s.rb->data()),
                  src_a,
                  seq,
                  iters,
                  warm,
                  cycles,
                  ns,
                  ra};
  lat_args server{s.ba->view(),
                  s.ra_from_b->view(),
                  static_cast<std::uint64_t*>(s.rb->data()),
                  static_cast<std::uint64_t*>(s.ra->data()),
                  src_b,
                  seq,
                  iters,
                  warm,
                  nullptr,
                  nullptr,
                  rb};
  EAAS_CU(cudaSetDevice(s.gb));
  lat_server<Mode><<<1, 1, 0, sb>>>(server);
  EAAS_CU(cudaGetLastError());
  EAAS_CU(cudaSetDevice(s.ga));
  lat_client<Mode><<<1, 1, 0, sa>>>(client);
  EAAS_CU(cudaGetLastError());
  EAAS_CU(cudaStreamSynchronize(sa));
  EAAS_CU(cudaSetDevice(s.gb));
  EAAS_CU(cudaStreamSynchronize(sb));
  status r1 = status::internal_error, r2 = status::internal_error;
  EAAS_CU(cudaMemcpy(&r2, rb, sizeof(status), cudaMemcpyDeviceToHost));
  EAAS_CU(cudaSetDevice(s.ga));
  EAAS_CU(cudaMemcpy(&r1, ra, sizeof(status), cudaMemcpyDeviceToHost));
  if (r1 != status::ok || r2 != status::ok)
    die(Mode == 3 ? "raw ping-pong" : "put_signal ping-pong", r1 != status::ok ? r1 : r2);
  std::vector<long long> cyc(iters);
  unsigned long long span[2];
  EAAS_CU(cudaMemcpy(cyc.data(), cycles, iters * sizeof(long long), cudaMemcpyDeviceToHost));
  EAAS_CU(cudaMemcpy(span, ns, sizeof(span), cudaMemcpyDeviceToHost));
  std::vector<double> us = half_rtt_us(cyc, span[1] - span[0]);
  EAAS_CU(cudaFree(cycles));
  EAAS_CU(cudaFree(ns));
  EAAS_CU(cudaFree(ra));
  EAAS_CU(cudaStreamDestroy(sa));
  EAAS_CU(cudaSetDevice(s.gb));
  EAAS_CU(cudaFree(rb));
  EAAS_CU(cudaStreamDestroy(sb));
  seq += warm + iters;
  return us;
}

}  // namespace

int main(int argc, char** argv) {
  bool same_gpu = false;
  std::size_t iters = 20000, max_bytes = std::size_t{1} << 30;
  int reps = 20;
  std::string json;
  CLI::App app{"eaas-nvlink-bench: nvlink put_signal latency and put bandwidth next to their floors"};
  app.add_flag("--same-gpu", same_gpu, "both contexts on GPU 0 (two processes' worth of contexts on one GPU)");
  app.add_option("-n,--iters", iters, "latency iterations (split over 10 alternating rounds)");
  app.add_option("--max-size", max_bytes, "largest bandwidth message");
  app.add_option("--reps", reps, "bandwidth repetitions per point");
  app.add_option("--json", json, "write results as JSON to this file");
  CLI11_PARSE(app, argc, argv);

  int count = 0;
  EAAS_CU(cudaGetDeviceCount(&count));
  if (count == 0) die("no CUDA device", status::unsupported);
  setup s;
  s.ga = 0;
  s.gb = (!same_gpu && count > 1) ? 1 : 0;
  connect_pair(s, max_bytes + 4096);
  cudaDeviceProp pa{}, pb{};
  EAAS_CU(cudaGetDeviceProperties(&pa, s.ga));
  EAAS_CU(cudaGetDeviceProperties(&pb, s.gb));
  std::printf("# eaas-nvlink-bench: context A on GPU %d (%s), context B on GPU %d (%s), transport %s\n", s.ga, pa.name,
              s.gb, pb.name, transport_name(s.ab->transport()));
  nlohmann::json out = {{"tool", "eaas-nvlink-bench"},
                        {"date", today_utc()},
                        {"gpu_a", pa.name},
                        {"gpu_b", pb.name},
                        {"same_gpu", s.ga == s.gb}};

  // Latency: 8-byte payload, alternating rounds of eaas and raw.
  std::uint64_t *src_a = nullptr, *src_b = nullptr;
  EAAS_CU(cudaSetDevice(s.ga));
  EAAS_CU(cudaMalloc(&src_a, 8));
  EAAS_CU(cudaMemset(src_a, 1, 8));
  EAAS_CU(cudaSetDevice(s.gb));
  EAAS_CU(cudaMalloc(&src_b, 8));
  EAAS_CU(cudaMemset(src_b, 2, 8));
  std::uint64_t seq = 1;
  std::vector<double> ops, raw, eaas_send, eaas_wait, generic, copy_only;
  constexpr int kRounds = 10;
  for (int r = 0; r < kRounds; ++r) {
    auto x = latency_phase<0>(s, seq, iters / kRounds, 100, src_a, src_b);
    auto y = latency_phase<3>(s, seq, iters / kRounds, 100, src_a, src_b);
    auto z = latency_phase<2>(s, seq, iters / kRounds, 100, src_a, src_b);
    auto w = latency_phase<1>(s, seq, iters / kRounds, 100, src_a, src_b);
    auto g = latency_phase<4>(s, seq, iters / kRounds, 100, src_a, src_b);
    auto c = latency_phase<5>(s, seq, iters / kRounds, 100, src_a, src_b);
    generic.insert(generic.end(), g.begin(), g.end());
    copy_only.insert(copy_only.end(), c.begin(), c.end());
    ops.insert(ops.end(), x.begin(), x.end());
    raw.insert(raw.end(), y.begin(), y.end());
    eaas_send.insert(eaas_send.end(), z.begin(), z.end());
    eaas_wait.insert(eaas_wait.end(), w.begin(), w.end());
  }
  const latency_stats lo = summarize(ops), lr = summarize(raw), ls = summarize(eaas_send), lw = summarize(eaas_wait),
                      lg = summarize(generic), lc = summarize(copy_only);
  std::printf("# 8-byte ping-pong, RTT/2, kernel-timed (launch excluded), %d alternating rounds\n", kRounds);
  print_latency_header({"ratio"});
  print_latency_row(8, lo, {lo.t_typical / lr.t_typical});
  print_latency_row(8, lr, {1.0});
  print_latency_row(8, ls, {ls.t_typical / lr.t_typical});
  print_latency_row(8, lw, {lw.t_typical / lr.t_typical});
  print_latency_row(8, lg, {lg.t_typical / lr.t_typical});
  print_latency_row(8, lc, {lc.t_typical / lr.t_typical});
  std::printf(
      "# rows: eaas put_signal + wait_signal; raw flag (st.release.sys / ld.acquire.sys); eaas put_signal + raw "
      "wait; raw send + eaas wait_signal; raw with a generic-address payload store; the op's copy body without "
      "checks + raw signal, raw wait\n");
  out["latency"] = {{"eaas", to_json(8, lo)},
                    {"raw_flag", to_json(8, lr)},
                    {"eaas_send_raw_wait", to_json(8, ls)},
                    {"raw_send_eaas_wait", to_json(8, lw)},
                    {"raw_generic_store", to_json(8, lg)},
                    {"copy_body_raw_signal", to_json(8, lc)},
                    {"ratio", lo.t_typical / lr.t_typical}};

  // Bandwidth.
  EAAS_CU(cudaSetDevice(s.ga));
  unsigned char* src = nullptr;
  EAAS_CU(cudaMalloc(&src, max_bytes));
  fill_pattern_async(src, max_bytes, 77, nullptr);
  EAAS_CU(cudaDeviceSynchronize());
  status* bres = nullptr;
  EAAS_CU(cudaMalloc(&bres, sizeof(status)));
  EAAS_CU(cudaMemset(bres, 0, sizeof(status)));
  cudaStream_t st;
  EAAS_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  EAAS_CU(cudaEventCreate(&e0));
  EAAS_CU(cudaEventCreate(&e1));
  auto dst = static_cast<unsigned char*>(s.rb->data());
  auto timed = [&](auto&& body) {
    body();  // warm-up
    EAAS_CU(cudaEventRecord(e0, st));
    for (int i = 0; i < reps; ++i) body();
    EAAS_CU(cudaEventRecord(e1, st));
    EAAS_CU(cudaEventSynchronize(e1));
    float ms = 0;
    EAAS_CU(cudaEventElapsedTime(&ms, e0, e1));
    return static_cast<double>(ms) / reps;
  };
  auto check = [&](std::size_t n) {
    EAAS_CU(cudaSetDevice(s.gb));
    const unsigned long long w = count_wrong(dst, n, 77, nullptr);  // wrong bytes
    EAAS_CU(cudaSetDevice(s.ga));
    return w;
  };
  constexpr int kThreads = 512;
  const std::vector<int> block_counts = {1, 4, 16, 32, 64, 132};
  std::printf(
      "# put bandwidth GPU %d -> GPU %d, GB/s (bytes / time, cudaEvent-timed, mean of %d), %d threads per block\n",
      s.ga, s.gb, reps, kThreads);
  std::printf("%12s %9s %9s %9s %9s %9s %9s %12s %9s %8s\n", "#bytes", "1 blk", "4 blk", "16 blk", "32 blk", "64 blk",
              "132 blk", "copy engine", "best/CE", "#wrong");
  nlohmann::json rows = nlohmann::json::array();
  for (std::size_t n = 4096; n <= max_bytes; n *= 4) {
    std::vector<double> gbps;
    unsigned long long w = 0;
    for (int blocks : block_counts) {
      EAAS_CU(cudaSetDevice(s.gb));
      EAAS_CU(cudaMemset(dst, 0, n));
      EAAS_CU(cudaDeviceSynchronize());
      EAAS_CU(cudaSetDevice(s.ga));
      const double ms =
          timed([&] { put_blocks<<<blocks, kThreads, 0, st>>>(s.ab->view(), s.rb_from_a->view(), src, n, bres); });
      status r = status::internal_error;
      EAAS_CU(cudaMemcpy(&r, bres, sizeof(r), cudaMemcpyDeviceToHost));
      if (r != status::ok) die("put_blocks", r);
      w += check(n);
      gbps.push_back(static_cast<double>(n) / ms / 1e6);
    }
    EAAS_CU(cudaSetDevice(s.gb));
    EAAS_CU(cudaMemset(dst, 0, n));
    EAAS_CU(cudaDeviceSynchronize());
    EAAS_CU(cudaSetDevice(s.ga));
    const double ce_ms = timed([&] { EAAS_CU(cudaMemcpyPeerAsync(dst, s.gb, src, s.ga, n, st)); });
    w += check(n);
    const double ce = static_cast<double>(n) / ce_ms / 1e6;
    const double best = *std::max_element(gbps.begin(), gbps.end());
    std::printf("%12zu %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %12.1f %8.0f%% %8llu\n", n, gbps[0], gbps[1], gbps[2],
                gbps[3], gbps[4], gbps[5], ce, 100.0 * best / ce, w);
    rows.push_back(
        {{"bytes", n}, {"blocks", block_counts}, {"put_gbps", gbps}, {"copy_engine_gbps", ce}, {"wrong", w}});
    if (w != 0) die("bandwidth check found wrong bytes", status::internal_error);
  }
  out["bandwidth"] = rows;
  if (!json.empty()) {
    std::ofstream f(json);
    f << out.dump(2) << "\n";
  }
  return 0;
}
