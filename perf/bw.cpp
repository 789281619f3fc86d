// eaas-bw: one-sided put bandwidth between two processes (perftest ib_write_bw columns), next to
// memcpy measured in the same run.
//
// The client streams `put`s of one size into a ring of buffers in the server's region and ends with a
// put_signal; the server answers once it has seen it (so the time covers the data landing). With
// --bidir both sides stream at once and the bandwidth is the sum. Before each size is timed, one message
// of a known pattern is checked byte for byte by the receiver.
//
//   eaas-bw -a                       (starts its own server process)
//   eaas-bw --role server --rendezvous DIR &  eaas-bw --role client --rendezvous DIR -s 1048576 --bidir

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "driver.hpp"
#include "gpu_modes.hpp"
#include "pattern.hpp"

extern char** environ;

using namespace eaas;
using namespace eaas::perf;

namespace {

constexpr std::uint64_t kSecond = 1'000'000'000ull;
// Region layout, both sides: control words, then the receive ring.
constexpr std::size_t kPhaseSig = 0;   // the client's phase number (server side)
constexpr std::size_t kParams = 64;    // mode, size, count, check result
constexpr std::size_t kDataSig = 128;  // "all data of this phase sent" (receiver side)
constexpr std::size_t kAckSig = 192;   // the server's answer (client side)
constexpr std::size_t kRing = 4096;
constexpr std::size_t kSlots = 8;  // messages in flight land in different buffers

enum mode : std::uint64_t { mode_done = 0, mode_check = 1, mode_bw = 2, mode_bidir = 3 };

struct options {
  std::string role = "both", rendezvous, json, transport = "shm";
  unsigned blocks = 16;
  gpu_flags gpu;
  bool all = false, bidir = false, baseline = true;
  std::size_t size = 1 << 20, max_size = 64ull << 20, iters = 0, min_size = 64;
};

struct side {
  std::unique_ptr<context> ctx;
  std::unique_ptr<memory_region> mine;
  std::unique_ptr<endpoint> ep;
  std::unique_ptr<remote_region> peer;
  unsigned char* base() const { return static_cast<unsigned char*>(mine->data()); }
  std::uint64_t* word(std::size_t off) const { return reinterpret_cast<std::uint64_t*>(base() + off); }
};

std::size_t region_bytes(const options& o) { return kRing + kSlots * ((o.max_size + 4095) / 4096 * 4096); }

void setup(side& s, const options& o, const char* me, const char* other) {
  EAAS_PERF_CHECK(context::create({.name = me}, s.ctx));
  EAAS_PERF_CHECK(s.ctx->allocate(region_bytes(o), s.mine));
  connect_through(o.rendezvous, me, other, *s.ctx, *s.mine, s.ep, s.peer);
}

std::size_t slot_stride(std::size_t n) { return (n + 4095) / 4096 * 4096; }

/// Streams `count` puts of `n` bytes into the peer's ring, then signals `data_sig` = phase. Returns
/// the peak bandwidth over windows of kSlots messages (GB/s) through `peak`.
void stream(side& s, const unsigned char* src, std::size_t n, std::size_t count, std::uint64_t phase, double* peak) {
  const auto ep = s.ep->view();
  const auto dst = s.peer->view();
  std::uint64_t w0 = now_ns();
  for (std::size_t i = 0; i < count; ++i) {
    EAAS_PERF_CHECK(put(coop_thread{}, ep, dst, kRing + (i % kSlots) * slot_stride(n), src, n));
    if (peak != nullptr && (i + 1) % kSlots == 0) {
      const std::uint64_t w1 = now_ns();
      if (w1 > w0) *peak = std::max(*peak, double(kSlots * n) / double(w1 - w0));
      w0 = w1;
    }
  }
  EAAS_PERF_CHECK(put_signal(coop_thread{}, ep, dst, 0, nullptr, 0, dst, kDataSig, phase, signal_op::set));
  EAAS_PERF_CHECK(quiet(coop_thread{}, ep));
}

int run_server(const options& o) {
  side s;
  setup(s, o, "server", "client");
  const auto ep = s.ep->view();
  const auto peer = s.peer->view();
  std::vector<unsigned char> src(o.max_size);
  for (std::uint64_t phase = 1;; ++phase) {
    status st;
    while ((st = wait_signal(ep, s.word(kPhaseSig), cmp_op::ge, phase, deadline_after(kSecond))) == status::timeout) {
    }
    if (st != status::ok) die("server: waiting for the client", st);
    const std::uint64_t m = s.word(kParams)[0], n = s.word(kParams)[1], count = s.word(kParams)[2];
    if (m == mode_done) return 0;
    if (n == 0 || n > o.max_size)
      die("server: the client asked for a size beyond --max-size", status::invalid_argument);
    if (m == mode_bidir) {
      fill_pattern(phase, src.data(), n);
      stream(s, src.data(), n, count, phase, nullptr);
    }
    EAAS_PERF_CHECK(wait_signal(ep, s.word(kDataSig), cmp_op::ge, phase, timeout{60 * kSecond}));
    std::uint64_t verdict = 0;
    if (m == mode_check) verdict = count_mismatches(phase, s.base() + kRing, n) == 0 ? 1 : 2;
    EAAS_PERF_CHECK(
        put_signal(coop_thread{}, ep, peer, kParams + 24, &verdict, 8, peer, kAckSig, phase, signal_op::set));
  }
}

struct row {
  std::size_t bytes, iters;
  double peak, avg, mpps, memcpy_gbs;
};

int run_client(const options& o) {
  side s;
  setup(s, o, "client", "server");
  const auto ep = s.ep->view();
  const auto peer = s.peer->view();
  std::vector<unsigned char> src(o.max_size);
  std::uint64_t phase = 0;
  auto start_phase = [&](std::uint64_t m, std::size_t n, std::size_t count) {
    ++phase;
    const std::uint64_t params[3] = {m, n, count};
    EAAS_PERF_CHECK(
        put_signal(coop_thread{}, ep, peer, kParams, params, sizeof(params), peer, kPhaseSig, phase, signal_op::set));
  };
  auto await_ack = [&] { EAAS_PERF_CHECK(wait_signal(ep, s.word(kAckSig), cmp_op::ge, phase, timeout{60 * kSecond})); };
  std::vector<std::size_t> sizes = o.all ? size_sweep(o.min_size, o.max_size) : std::vector<std::size_t>{o.size};
  std::printf("# eaas-bw: put bandwidth, shm, %s; memcpy measured in the same run\n",
              o.bidir ? "bidirectional" : "one way");
  std::printf("%10s %12s %20s %23s %16s %18s %10s\n", "#bytes", "#iterations", "BW peak[GB/sec]", "BW average[GB/sec]",
              "MsgRate[Mpps]", "memcpy[GB/sec]", "ratio");
  std::vector<row> rows;
  for (std::size_t n : sizes) {
    // Check one message first.
    fill_pattern(phase + 1, src.data(), n);
    start_phase(mode_check, n, 1);
    stream(s, src.data(), n, 1, phase, nullptr);
    await_ack();
    if (s.word(kParams)[3] != 1) die("the server found the checked message corrupted", status::internal_error);
    // 256 MiB per size (at least 16, at most 2^20 messages) unless -n says otherwise.
    const std::size_t count = o.iters ? o.iters : std::clamp<std::size_t>((256ull << 20) / n, 16, 1u << 20);
    // Warm-up: one untimed lap over the ring (first touches of the peer's pages are not bandwidth).
    start_phase(o.bidir ? mode_bidir : mode_bw, n, kSlots);
    stream(s, src.data(), n, kSlots, phase, nullptr);
    if (o.bidir) EAAS_PERF_CHECK(wait_signal(ep, s.word(kDataSig), cmp_op::ge, phase, timeout{60 * kSecond}));
    await_ack();
    double peak = 0;
    start_phase(o.bidir ? mode_bidir : mode_bw, n, count);
    const std::uint64_t t0 = now_ns();
    stream(s, src.data(), n, count, phase, &peak);
    if (o.bidir) EAAS_PERF_CHECK(wait_signal(ep, s.word(kDataSig), cmp_op::ge, phase, timeout{60 * kSecond}));
    await_ack();
    const double secs = double(now_ns() - t0) * 1e-9;
    const double factor = o.bidir ? 2 : 1;
    row r{n, count, peak * factor, factor * double(n) * double(count) / secs / 1e9, factor * double(count) / secs / 1e6,
          0};
    if (o.baseline) {
      // The same stream of copies inside this process: into a ring of kSlots buffers.
      std::vector<unsigned char> ring(kSlots * slot_stride(n));
      std::memset(ring.data(), 0, ring.size());
      const std::uint64_t m0 = now_ns();
      for (std::size_t i = 0; i < count; ++i) std::memcpy(ring.data() + (i % kSlots) * slot_stride(n), src.data(), n);
      const double msecs = double(now_ns() - m0) * 1e-9;
      static volatile unsigned char sink;
      sink = ring[(count - 1) % kSlots * slot_stride(n)];  // the copies are used
      (void)sink;
      r.memcpy_gbs = double(n) * double(count) / msecs / 1e9;
    }
    std::printf("%10zu %12zu %20.2f %23.2f %16.4f %18.2f %9.1f%%\n", r.bytes, r.iters, r.peak, r.avg, r.mpps,
                r.memcpy_gbs, r.memcpy_gbs > 0 ? 100 * r.avg / (r.memcpy_gbs * factor) : 0.0);
    std::fflush(stdout);
    rows.push_back(r);
  }
  start_phase(mode_done, 0, 0);
  if (!o.json.empty()) {
    nlohmann::json j = {{"tool", "eaas-bw"}, {"transport", "shm"}, {"bidir", o.bidir}, {"date", today_utc()}};
    for (const auto& r : rows)
      j["rows"].push_back({{"bytes", r.bytes},
                           {"iterations", r.iters},
                           {"bw_peak_gbs", r.peak},
                           {"bw_avg_gbs", r.avg},
                           {"msg_rate_mpps", r.mpps},
                           {"memcpy_gbs", r.memcpy_gbs}});
    std::ofstream(o.json) << j.dump(2) << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"eaas-bw: put bandwidth between two processes (perftest ib_write_bw columns)"};
  app.add_option("--role", o.role, "server, client, or both (start a server process, then be the client)")
      ->check(CLI::IsMember({"server", "client", "both"}));
  app.add_option("--rendezvous", o.rendezvous, "directory where the two sides exchange handles");
  app.add_flag("-a,--all", o.all, "sweep sizes 64 B .. --max-size in powers of two");
  app.add_option("-s,--size", o.size, "message size in bytes (without -a)")->check(CLI::Range(1ull, 1ull << 30));
  app.add_option("--min-size", o.min_size, "smallest size of the sweep (-a)")->check(CLI::Range(8ull, 1ull << 30));
  app.add_option("--max-size", o.max_size, "largest size")->check(CLI::Range(64ull, 1ull << 30));
  app.add_option("-n,--iters", o.iters, "messages per size (default: 256 MiB worth, 16 .. 2^20)")
      ->check(CLI::PositiveNumber);
  app.add_flag("--bidir", o.bidir, "both sides stream at once; bandwidth is the sum");
  app.add_option("--transport", o.transport, "shm (host processes) or nvlink (kernels on two GPUs; GPU build)")
      ->check(CLI::IsMember({"shm", "nvlink", "ibgda"}));
  app.add_option("--blocks", o.blocks, "nvlink: blocks (of 512 threads) that split each message")
      ->check(CLI::Range(1u, 1024u));
  add_gpu_flags(app, o.gpu);
  app.add_option("--json", o.json, "write results as JSON to this file");
  app.add_flag("!--no-baseline", o.baseline, "skip the memcpy baseline");
  CLI11_PARSE(app, argc, argv);
  if (!o.all) o.max_size = std::max(o.max_size, o.size);
  if (o.transport == "nvlink") {
    nvlink_pair_options g;
    g.role = o.role;
    g.rendezvous = o.rendezvous;
    g.sizes =
        o.all ? size_sweep(std::max<std::size_t>(o.min_size, 4096), o.max_size) : std::vector<std::size_t>{o.size};
    g.max_size = o.max_size;
    g.iters = o.iters;
    g.baseline = o.baseline;
    g.json = o.json;
    g.blocks = o.blocks;
    g.bidir = o.bidir;
    return run_nvlink(g, o.gpu, nvlink_tool::bw);
  }
  if (o.transport == "ibgda")
    return run_ibgda(o.gpu,
                     o.all
                         ? size_sweep(std::max<std::size_t>(o.min_size, 8), std::min<std::size_t>(o.max_size, 1 << 20))
                         : std::vector<std::size_t>{std::min<std::size_t>(o.size, 1 << 20)},
                     o.iters, 1000, o.json);
  if (o.blocks != 16 || o.gpu.gpu >= 0 || o.gpu.server_gpu >= 0)
    die("--blocks / --gpu / --server-gpu: GPU options (--transport nvlink)", status::invalid_argument);

  if (o.role == "both") {
    char tmpl[] = "/tmp/eaas-bw-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) die("mkdtemp", status::internal_error);
    o.rendezvous = tmpl;
    const pid_t server =
        spawn_self({"--role", "server", "--rendezvous", o.rendezvous, "--max-size", std::to_string(o.max_size)});
    const int rc = run_client(o);
    int st = 0;
    ::waitpid(server, &st, 0);
    std::filesystem::remove_all(o.rendezvous);
    return rc != 0 ? rc : (WIFEXITED(st) ? WEXITSTATUS(st) : 4);
  }
  if (o.rendezvous.empty()) die("--role " + o.role + " needs --rendezvous DIR", status::invalid_argument);
  return o.role == "server" ? run_server(o) : run_client(o);
}
