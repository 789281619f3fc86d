// The ibgda posting path on a GPU against the software NIC (see ibgda_softnic.hpp): kernels that post
// through the production code (eaas/detail/ibgda/qp.hpp), timed inside the kernel with %globaltimer.

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "driver.hpp"
#include "eaas/detail/clock.hpp"
#include "eaas/detail/ibgda/qp.hpp"
#include "ibgda_softnic.hpp"
#include "mapped_qp.hpp"
#include "soft_nic.hpp"

namespace eaas::perf {

namespace {

namespace ib = detail::ibgda;
using test::cuda_check;
using test::mapped_buffer;
using test::mapped_qp;
using test::mapped_qp_options;
using test::soft_nic;

// A wait this long is a failure, not a sample.
constexpr std::uint64_t kTimeoutNs = 30'000'000'000ull;
constexpr double kHostLimitS = 120;

// ---------------------------------------------------------------------------------------------------
// Kernels

struct post_args {
  std::uint64_t laddr;  // poster p writes [laddr + p * slot, + bytes) to [raddr + p * slot, + bytes)
  std::uint64_t raddr;
  std::uint64_t slot;
  std::uint64_t timeout_ns;
  std::uint32_t rkey;
  std::uint32_t bytes;
  std::uint32_t count;  // WRITEs per poster
  std::uint32_t lanes;  // posting lanes per warp
  std::uint32_t quiet;  // 1: quiet after the (timed) posts
  std::uint32_t reserved0;
};

struct post_times {
  std::uint64_t begin;  // before the first post
  std::uint64_t end;    // after the last post returned (before the quiet)
  std::uint32_t errors;
  std::uint32_t reserved0;
};

template <ib::poster P>
__global__ void post_kernel(ib::qp_state* q, post_args a, post_times* out) {
  const std::uint32_t lane = threadIdx.x & 31u;
  if (lane >= a.lanes) return;
  const std::uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const std::uint32_t p = warp * a.lanes + lane;
  const std::uint64_t off = p * a.slot;
  post_times t{};
  t.begin = detail::now_ns();
  const deadline dl{t.begin + a.timeout_ns};
  for (std::uint32_t i = 0; i < a.count; ++i)
    t.errors += ib::put<P>(q, a.raddr + off, a.rkey, a.laddr + off, a.bytes, dl) != status::ok;
  t.end = detail::now_ns();
  if (a.quiet != 0) t.errors += ib::quiet<P>(q, deadline{detail::now_ns() + a.timeout_ns}) != status::ok;
  out[p] = t;
}

__global__ void quiet_kernel(ib::qp_state* q, std::uint64_t timeout_ns, std::uint32_t* result) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  *result = static_cast<std::uint32_t>(ib::quiet<ib::poster::shared>(q, deadline{detail::now_ns() + timeout_ns}));
}

// One thread, one owner of the QP: put with a CQE requested and the doorbell rung, then poll until
// it completes. `total` gets post + completion, `post` the posting part alone (ns).
__global__ void latency_kernel(ib::qp_state* q, std::uint32_t rkey, std::uint64_t laddr, std::uint64_t raddr,
                               std::uint32_t bytes, std::uint32_t n, std::uint64_t timeout_ns, std::uint64_t* total,
                               std::uint64_t* post, std::uint32_t* errors) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  constexpr auto P = ib::poster::exclusive;
  std::uint32_t bad = 0;
  for (std::uint32_t i = 0; i < n; ++i) {
    const std::uint64_t t0 = detail::now_ns();
    const deadline dl{t0 + timeout_ns};
    status s = ib::put<P>(q, raddr, rkey, laddr, bytes, dl, ib::post_opts{ib::fence_mode::none, true, true});
    const std::uint64_t t1 = detail::now_ns();
    if (s == status::ok) s = ib::quiet<P>(q, dl);
    const std::uint64_t t2 = detail::now_ns();
    total[i] = t2 - t0;
    post[i] = t1 - t0;
    bad += s != status::ok;
  }
  *errors = bad;
}

// ---------------------------------------------------------------------------------------------------
// Host side

template <class T>
struct device_array {
  T* p = nullptr;
  device_array() = default;
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  ~device_array() {
    if (p != nullptr) (void)cudaFree(p);
  }
  status make(std::size_t n) {
    if (p != nullptr) (void)cudaFree(p);
    p = nullptr;
    if (status s = cuda_check(cudaMalloc(&p, sizeof(T) * std::max<std::size_t>(n, 1)), "cudaMalloc"); s != status::ok)
      return s;
    return cuda_check(cudaMemset(p, 0, sizeof(T) * std::max<std::size_t>(n, 1)), "cudaMemset");
  }
  status read(std::size_t n, T* out) const {
    return cuda_check(cudaMemcpy(out, p, sizeof(T) * n, cudaMemcpyDeviceToHost), "cudaMemcpy back");
  }
};

status fail(const std::string& what) {
  std::fprintf(stderr, "ibgda soft-NIC benchmark: %s\n", what.c_str());
  return status::internal_error;
}

// A QP served by its own software NIC thread, with a local and a remote mapped region.
struct rig {
  soft_nic nic;
  mapped_buffer local, remote;
  soft_nic::keys lk{}, rk{};
  mapped_qp qp;
  int id = 0;
  cudaStream_t stream = nullptr;

  ~rig() {
    nic.stop();
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
  }

  status make(const mapped_qp_options& qo, std::size_t bytes) {
    if (status s = local.allocate(bytes + 4096); s != status::ok) return s;
    if (status s = remote.allocate(bytes + 4096); s != status::ok) return s;
    lk = nic.register_memory(local.get(), local.size());
    rk = nic.register_memory(remote.get(), remote.size());
    // [0, 4096) of the local region: the QP's scratch word; payloads start at 4096.
    if (status s = qp.create(qo, lk.lkey, local.addr(0)); s != status::ok) return s;
    id = nic.attach(qp.initial());
    if (status s = cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
        s != status::ok)
      return s;
    nic.start();
    return status::ok;
  }

  status wait(const char* what) { return test::wait_stream_or_exit(stream, kHostLimitS, what); }

  // Every reserved WQE published, completed, and executed exactly once by the model, which saw no
  // protocol violation.
  status settled() {
    ib::qp_state s{};
    if (status e = qp.read_state(&s); e != status::ok) return e;
    if (s.ready != s.head || s.cq.completed != s.head || s.cq.error != 0)
      return fail("QP not settled: head " + std::to_string(s.head) + ", ready " + std::to_string(s.ready) +
                  ", completed " + std::to_string(s.cq.completed) + ", error " + std::to_string(s.cq.error));
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (nic.executed(id) != s.head) {  // the model counts a WQE just after its CQE
      if (std::chrono::steady_clock::now() > until)
        return fail("the NIC executed " + std::to_string(nic.executed(id)) + " WQEs, the QP reserved " +
                    std::to_string(s.head));
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    if (nic.violations() != 0) return fail("soft NIC protocol violation: " + nic.first_violation());
    return status::ok;
  }
};

struct post_shape {
  std::uint32_t warps, lanes, blocks;
  bool exclusive;
  std::uint32_t posters() const { return warps * lanes; }
};

// Launches post_kernel; `out` gets one post_times per poster.
status launch_posts(rig& r, const post_shape& sh, const post_args& a, std::vector<post_times>& out) {
  device_array<post_times> d;
  if (status s = d.make(sh.posters()); s != status::ok) return s;
  if (sh.exclusive)
    post_kernel<ib::poster::exclusive><<<1, 32, 0, r.stream>>>(r.qp.device_state(), a, d.p);
  else
    post_kernel<ib::poster::shared>
        <<<sh.blocks, 32 * (sh.warps / sh.blocks), 0, r.stream>>>(r.qp.device_state(), a, d.p);
  if (status s = cuda_check(cudaGetLastError(), "post_kernel launch"); s != status::ok) return s;
  if (status s = r.wait("post_kernel"); s != status::ok) return s;
  out.resize(sh.posters());
  if (status s = d.read(out.size(), out.data()); s != status::ok) return s;
  for (const post_times& t : out)
    if (t.errors != 0) return fail("a post or quiet on the GPU did not return ok");
  return status::ok;
}

double span_s(const std::vector<post_times>& t) {
  std::uint64_t b = ~0ull, e = 0;
  for (const post_times& x : t) {
    b = std::min(b, x.begin);
    e = std::max(e, x.end);
  }
  return e > b ? static_cast<double>(e - b) * 1e-9 : 0;
}

status quiet_now(rig& r) {
  device_array<std::uint32_t> d;
  if (status s = d.make(1); s != status::ok) return s;
  quiet_kernel<<<1, 1, 0, r.stream>>>(r.qp.device_state(), kTimeoutNs, d.p);
  if (status s = cuda_check(cudaGetLastError(), "quiet_kernel launch"); s != status::ok) return s;
  if (status s = r.wait("quiet_kernel"); s != status::ok) return s;
  std::uint32_t v = 0;
  if (status s = d.read(1, &v); s != status::ok) return s;
  return static_cast<status>(v) == status::ok
             ? status::ok
             : fail("quiet returned " + std::string(status_name(static_cast<status>(v))));
}

struct post_row {
  post_shape shape;
  std::uint32_t db_batch;
  const char* mode;  // "burst" or "sustained"
  std::uint64_t wqes;
  double seconds;
};

void print_post_header() {
  std::printf("%7s %6s %8s %10s %9s %10s %12s %14s %12s %14s\n", "#warps", "lanes", "posters", "poster", "db_batch",
              "mode", "#wqes", "time[usec]", "Mwqe/s", "Mwqe/s/warp");
}

void print_post_row(const post_row& r) {
  const double rate = r.seconds > 0 ? static_cast<double>(r.wqes) / r.seconds * 1e-6 : 0;
  std::printf("%7u %6u %8u %10s %9u %10s %12llu %14.2f %12.3f %14.3f\n", r.shape.warps, r.shape.lanes,
              r.shape.posters(), r.shape.exclusive ? "exclusive" : "shared", r.db_batch, r.mode,
              static_cast<unsigned long long>(r.wqes), r.seconds * 1e6, rate, rate / r.shape.warps);
  std::fflush(stdout);
}

nlohmann::json post_json(const post_row& r) {
  const double rate = r.seconds > 0 ? static_cast<double>(r.wqes) / r.seconds : 0;
  return {{"warps", r.shape.warps},
          {"lanes", r.shape.lanes},
          {"posters", r.shape.posters()},
          {"poster", r.shape.exclusive ? "exclusive" : "shared"},
          {"db_batch", r.db_batch},
          {"mode", r.mode},
          {"wqes", r.wqes},
          {"seconds", r.seconds},
          {"wqe_per_s", rate},
          {"wqe_per_s_per_warp", rate / r.shape.warps}};
}

// (a) for one shape and one doorbell batch: validate, then sustained, then burst rows.
status posting_rows(const ibgda_softnic_options& o, const post_shape& sh, std::uint32_t batch,
                    std::vector<post_row>& rows) {
  const std::uint64_t slot = (std::uint64_t{o.post_bytes} + 63) / 64 * 64;
  auto r = std::make_unique<rig>();
  if (status s = r->make({o.sq_size, batch, o.signal_period, 0x1234a}, sh.posters() * slot); s != status::ok) return s;
  post_args a{};
  a.laddr = r->local.addr(4096);
  a.raddr = r->remote.addr(4096);
  a.slot = slot;
  a.timeout_ns = kTimeoutNs;
  a.rkey = r->rk.rkey;
  a.bytes = o.post_bytes;
  a.lanes = sh.lanes;
  std::vector<post_times> t;

  // Validation: every poster's bytes arrive.
  std::mt19937_64 rng(sh.posters() * 131 + batch);
  for (std::uint64_t i = 0; i < sh.posters() * slot; ++i) r->local.get()[4096 + i] = static_cast<std::uint8_t>(rng());
  a.count = 2;
  a.quiet = 1;
  if (status s = launch_posts(*r, sh, a, t); s != status::ok) return s;
  for (std::uint32_t p = 0; p < sh.posters(); ++p)
    if (std::memcmp(r->local.get() + 4096 + p * slot, r->remote.get() + 4096 + p * slot, o.post_bytes) != 0)
      return fail("validation: poster " + std::to_string(p) + "'s bytes did not arrive");
  if (status s = r->settled(); s != status::ok) return s;

  // Sustained: many rings while the NIC drains them.
  if (o.warmup != 0) {
    a.count = static_cast<std::uint32_t>(o.warmup);
    if (status s = launch_posts(*r, sh, a, t); s != status::ok) return s;
  }
  a.count = static_cast<std::uint32_t>(o.iterations);
  if (status s = launch_posts(*r, sh, a, t); s != status::ok) return s;
  if (status s = r->settled(); s != status::ok) return s;
  rows.push_back({sh, batch, "sustained", std::uint64_t{a.count} * sh.posters(), span_s(t)});
  print_post_row(rows.back());

  // Burst: at most one ring with the NIC paused, so no post waits for a completion.
  const std::uint32_t per = (o.sq_size - 1) / sh.posters();  // one slot left for quiet's NOP
  if (per == 0) return status::ok;
  std::vector<double> secs;
  a.count = per;
  a.quiet = 0;
  for (std::uint32_t rep = 0; rep < o.burst_reps + 1; ++rep) {  // rep 0 is a warm-up
    r->nic.pause(true);
    const status s = launch_posts(*r, sh, a, t);
    r->nic.pause(false);
    if (s != status::ok) return s;
    if (status e = quiet_now(*r); e != status::ok) return e;
    if (rep != 0) secs.push_back(span_s(t));
  }
  if (status s = r->settled(); s != status::ok) return s;
  std::sort(secs.begin(), secs.end());
  rows.push_back({sh, batch, "burst", std::uint64_t{per} * sh.posters(), secs[secs.size() / 2]});
  print_post_row(rows.back());
  return status::ok;
}

// (b) for one size.
status latency_row(const ibgda_softnic_options& o, std::size_t bytes, nlohmann::json& out) {
  auto r = std::make_unique<rig>();
  if (status s = r->make({64, 1, 1, 0x1234b}, bytes); s != status::ok) return s;
  const std::uint64_t laddr = r->local.addr(4096), raddr = r->remote.addr(4096);
  const auto n = static_cast<std::uint32_t>(o.warmup + o.iterations);
  device_array<std::uint64_t> total, post;
  device_array<std::uint32_t> errors;
  if (status s = total.make(n); s != status::ok) return s;
  if (status s = post.make(n); s != status::ok) return s;
  if (status s = errors.make(1); s != status::ok) return s;
  std::uint32_t bad = 0;

  // Validation: one put, its bytes compared.
  std::mt19937_64 rng(bytes);
  for (std::size_t i = 0; i < bytes; ++i) r->local.get()[4096 + i] = static_cast<std::uint8_t>(rng());
  latency_kernel<<<1, 1, 0, r->stream>>>(r->qp.device_state(), r->rk.rkey, laddr, raddr,
                                         static_cast<std::uint32_t>(bytes), 1, kTimeoutNs, total.p, post.p, errors.p);
  if (status s = cuda_check(cudaGetLastError(), "latency_kernel launch"); s != status::ok) return s;
  if (status s = r->wait("latency_kernel"); s != status::ok) return s;
  if (status s = errors.read(1, &bad); s != status::ok) return s;
  if (bad != 0 || std::memcmp(r->local.get() + 4096, r->remote.get() + 4096, bytes) != 0)
    return fail("validation: the " + std::to_string(bytes) + "-byte put did not arrive");

  latency_kernel<<<1, 1, 0, r->stream>>>(r->qp.device_state(), r->rk.rkey, laddr, raddr,
                                         static_cast<std::uint32_t>(bytes), n, kTimeoutNs, total.p, post.p, errors.p);
  if (status s = cuda_check(cudaGetLastError(), "latency_kernel launch"); s != status::ok) return s;
  if (status s = r->wait("latency_kernel"); s != status::ok) return s;
  if (status s = errors.read(1, &bad); s != status::ok) return s;
  if (bad != 0) return fail(std::to_string(bad) + " timed puts did not complete ok");
  if (status s = r->settled(); s != status::ok) return s;
  std::vector<std::uint64_t> t(n), p(n);
  if (status s = total.read(n, t.data()); s != status::ok) return s;
  if (status s = post.read(n, p.data()); s != status::ok) return s;
  std::vector<double> lat, pst;
  for (std::size_t i = o.warmup; i < n; ++i) {
    lat.push_back(static_cast<double>(t[i]) * 1e-3);
    pst.push_back(static_cast<double>(p[i]) * 1e-3);
  }
  const latency_stats ls = summarize(lat);
  const latency_stats ps = summarize(pst);
  print_latency_row(bytes, ls, {ps.t_typical});
  out = to_json(bytes, ls);
  out["post_typical_us"] = ps.t_typical;
  out["post_avg_us"] = ps.t_avg;
  return status::ok;
}

status check_options(const ibgda_softnic_options& o) {
  auto bad = [](const char* why) {
    std::fprintf(stderr, "ibgda soft-NIC benchmark: %s\n", why);
    return status::invalid_argument;
  };
  if (!ib::is_pow2(o.sq_size) || o.sq_size < 2 || o.sq_size > ib::kMaxSqSize)
    return bad("sq_size must be a power of two in 2 .. 32768");
  if (o.db_batch == 0 || !ib::is_pow2(o.signal_period) || o.db_batch - 1 + o.signal_period > o.sq_size)
    return bad("need db_batch >= 1, signal_period a power of two, db_batch - 1 + signal_period <= sq_size");
  if (o.lanes == 0 || o.lanes > 32) return bad("lanes must be 1 .. 32");
  if (o.blocks == 0) return bad("blocks must be >= 1");
  if (o.post_bytes == 0 || o.post_bytes > (1u << 20)) return bad("post_bytes must be 1 .. 1 MiB");
  if (o.iterations == 0 || o.iterations + o.warmup > (1u << 30)) return bad("iterations must be 1 .. 2^30");
  for (std::size_t s : o.sizes)
    if (s == 0 || s > (1u << 20)) return bad("sizes must be 1 .. 1 MiB");
  for (std::uint32_t w : o.warps) {
    if (w == 0 || w * o.lanes > 4096) return bad("warps must be >= 1, warps x lanes <= 4096");
    const std::uint32_t b = std::min(o.blocks, w);
    if (w % b != 0 || w / b > 32) return bad("each warp count must split evenly into blocks of at most 32 warps");
  }
  if (o.burst_reps == 0) return bad("burst_reps must be >= 1");
  return status::ok;
}

}  // namespace

status run_ibgda_softnic(const ibgda_softnic_options& o) {
  if (status s = check_options(o); s != status::ok) return s;
  if (test::cuda_device_count() <= o.cuda_device || o.cuda_device < 0) {
    std::fprintf(stderr, "ibgda soft-NIC benchmark: no CUDA device %d\n", o.cuda_device);
    return status::unsupported;
  }
  if (status s = cuda_check(cudaSetDevice(o.cuda_device), "cudaSetDevice"); s != status::ok) return s;
  cudaDeviceProp prop{};
  if (status s = cuda_check(cudaGetDeviceProperties(&prop, o.cuda_device), "cudaGetDeviceProperties"); s != status::ok)
    return s;

  std::printf("# eaas ibgda posting path on %s (CUDA device %d) against the SOFTWARE NIC\n", prop.name, o.cuda_device);
  std::printf(
      "# The NIC is a host thread (tests/ibgda/soft_nic) reading the SQ ring, doorbell record and UAR word from\n"
      "# host memory mapped into the GPU: every WQE store, the doorbell-word read-back and every CQE poll cross\n"
      "# PCIe, and completions wait for that thread. Latencies below are the model's, NOT a NIC's. The posting\n"
      "# rate is the number to look at (reserve + build + publish + doorbell); on real hardware the ring sits\n"
      "# in GPU memory, so these rows bound it from below. Times: %%globaltimer inside the kernel.\n");
  nlohmann::json j = {{"tool", "ibgda-softnic"},
                      {"date", today_utc()},
                      {"gpu", prop.name},
                      {"cuda_device", o.cuda_device},
                      {"note",
                       "software NIC (a host thread over PCIe-mapped host memory): latency is the model's, not a "
                       "NIC's; the posting rate is the GPU-side cost with the ring in mapped host memory"},
                      {"options",
                       {{"sq_size", o.sq_size},
                        {"db_batch", o.db_batch},
                        {"signal_period", o.signal_period},
                        {"post_bytes", o.post_bytes},
                        {"iterations", o.iterations},
                        {"warmup", o.warmup},
                        {"lanes", o.lanes},
                        {"blocks", o.blocks},
                        {"burst_reps", o.burst_reps}}}};

  // (a) posting rate.
  std::printf(
      "#\n# (a) posting rate: %u-byte WRITEs on one QP (ring %u, a CQE every %u WQEs); rate = WQEs / (last post\n"
      "# returned - first post began). sustained: %zu WQEs per poster while the NIC drains; burst: one ring's worth\n"
      "# with the NIC paused (no completion waits), median of %u. db_batch 1 = a doorbell per WQE.\n",
      o.post_bytes, o.sq_size, o.signal_period, o.iterations, o.burst_reps);
  print_post_header();
  std::vector<post_row> rows;
  std::vector<std::uint32_t> batches{1};
  if (o.db_batch != 1) batches.push_back(o.db_batch);
  for (std::uint32_t b : batches) {
    if (status s = posting_rows(o, {1, 1, 1, true}, b, rows); s != status::ok) return s;
    for (std::uint32_t w : o.warps)
      if (status s = posting_rows(o, {w, o.lanes, std::min(o.blocks, w), false}, b, rows); s != status::ok) return s;
  }
  nlohmann::json pj = nlohmann::json::array();
  for (const post_row& r : rows) pj.push_back(post_json(r));
  j["posting"] = pj;

  // (b) latency.
  std::printf(
      "#\n# (b) put with local completion, one thread owning the QP: post (doorbell rung, CQE requested) + poll the\n"
      "# CQE. NOT RTT/2 and NOT a NIC latency: dominated by the software NIC thread and PCIe. post[usec]: the\n"
      "# posting part alone (median).\n");
  print_latency_header({"post[usec]"});
  nlohmann::json lj = nlohmann::json::array();
  for (std::size_t bytes : o.sizes) {
    nlohmann::json row;
    if (status s = latency_row(o, bytes, row); s != status::ok) return s;
    lj.push_back(row);
  }
  j["latency"] = lj;

  if (!o.json_path.empty()) {
    std::ofstream f(o.json_path);
    f << j.dump(2) << "\n";
    if (!f) return fail("cannot write " + o.json_path);
  }
  return status::ok;
}

}  // namespace eaas::perf
