// eaas-pingpong: half round trip of put_signal between two processes (perftest ib_write_lat style),
// next to the floor measured in the same run: a raw flag ping-pong over the same mapped memory, and
// memcpy for bandwidth.
//
//   eaas-pingpong                       (starts its own server process, then runs the client)
//   eaas-pingpong --role server --rendezvous DIR &  eaas-pingpong --role client --rendezvous DIR -a

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

// Region layout, both sides.
constexpr std::size_t kSig = 0;       // message signal
constexpr std::size_t kCtrlSig = 64;  // phase signal (server)
constexpr std::size_t kCtrl = 128;    // phase: mode, bytes, count, first sequence (server)
constexpr std::size_t kRecv = 4096;   // receive area
constexpr std::uint64_t kSecond = 1'000'000'000ull;
constexpr std::uint64_t kMessageTimeout = 10 * kSecond;

enum mode : std::uint64_t { mode_done = 0, mode_ops = 1, mode_raw = 2 };

struct options {
  std::string role = "both";
  std::string rendezvous;
  std::string transport = "shm";
  std::string scope = "thread";
  std::string json;
  bool all = false;
  std::size_t size = 8;
  std::size_t max_size = 64ull << 20;
  std::size_t iters = 10000;
  std::size_t warmup = 200;
  int cpu = -1;
  bool graph = false;
  gpu_flags gpu;
  bool baseline = true;
};

std::size_t round_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }

struct side {
  std::unique_ptr<context> ctx;
  std::unique_ptr<memory_region> mine;
  std::unique_ptr<endpoint> ep;
  std::unique_ptr<remote_region> peer;
  unsigned char* base() const { return static_cast<unsigned char*>(mine->data()); }
  std::uint64_t* word(std::size_t off) const { return reinterpret_cast<std::uint64_t*>(base() + off); }
};

void setup(side& s, const options& o, std::size_t region_bytes, const char* me, const char* other) {
  EAAS_PERF_CHECK(context::create({.name = me}, s.ctx));
  EAAS_PERF_CHECK(s.ctx->allocate(region_bytes, s.mine));
  connect_through(o.rendezvous, me, other, *s.ctx, *s.mine, s.ep, s.peer);
}

void pin(int core) {
  if (core < 0) return;
  if (bind_thread_to_core(core) != status::ok)
    std::fprintf(stderr, "note: could not pin to core %d (%.*s); running unpinned\n", core,
                 static_cast<int>(last_error().size()), last_error().data());
}

// Raw floor: the same mapped memory, a copy and a release store, an acquire spin. No checks.
void raw_send(const remote_view& peer, const void* src, std::size_t n, std::uint64_t seq) {
  auto* base = reinterpret_cast<unsigned char*>(static_cast<std::uintptr_t>(peer.addr));
  std::memcpy(base + kRecv, src, n);
  detail::store_release(reinterpret_cast<std::uint64_t*>(base + kSig), seq);
}
bool raw_wait(const std::uint64_t* sig, std::uint64_t seq) {
  std::uint64_t spins = 0;
  while (detail::load_acquire(sig) < seq) {
    detail::spin_pause(0);
    // A dead peer must not hang the baseline either; the clock is read once per million polls.
    if ((++spins & 0xfffff) == 0 && spins > (std::uint64_t{1} << 32)) return false;
  }
  return true;
}

int run_server(const options& o) {
  pin(o.cpu);
  side s;
  setup(s, o, kRecv + round_up(o.max_size, 4096), "server", "client");
  const auto ep = s.ep->view();
  const auto peer = s.peer->view();
  for (std::uint64_t phase = 1;; ++phase) {
    status st;
    while ((st = wait_signal(ep, s.word(kCtrlSig), cmp_op::ge, phase, deadline_after(kSecond))) == status::timeout) {
    }
    if (st != status::ok) die("server: waiting for the client", st);
    const std::uint64_t m = s.word(kCtrl)[0], n = s.word(kCtrl)[1], count = s.word(kCtrl)[2], first = s.word(kCtrl)[3];
    if (m == mode_done) return 0;
    if (n > o.max_size) die("server: client asked for more than --max-size", status::invalid_argument);
    for (std::uint64_t seq = first; seq < first + count; ++seq) {
      if (m == mode_raw) {
        if (!raw_wait(s.word(kSig), seq)) die("server: raw ping-pong peer vanished", status::peer_unreachable);
        raw_send(peer, s.base() + kRecv, n, seq);
      } else {
        EAAS_PERF_CHECK(wait_signal(ep, s.word(kSig), cmp_op::ge, seq, timeout{kMessageTimeout}));
        EAAS_PERF_CHECK(
            put_signal(coop_thread{}, ep, peer, kRecv, s.base() + kRecv, n, peer, kSig, seq, signal_op::set));
      }
    }
  }
}

struct client {
  const options& o;
  side s;
  std::size_t send_off;
  std::uint64_t seq = 0, phase = 0;

  explicit client(const options& opt) : o(opt), send_off(kRecv + round_up(opt.max_size, 4096)) {
    setup(s, o, send_off + round_up(o.max_size, 4096), "client", "server");
  }

  void start_phase(std::uint64_t m, std::size_t n, std::size_t count) {
    const std::uint64_t ctrl[4] = {m, n, count, seq + 1};
    EAAS_PERF_CHECK(put_signal(coop_thread{}, s.ep->view(), s.peer->view(), kCtrl, ctrl, sizeof(ctrl), s.peer->view(),
                               kCtrlSig, ++phase, signal_op::set));
  }

  double one_message(std::size_t n) {
    const auto ep = s.ep->view();
    const auto peer = s.peer->view();
    ++seq;
    const auto t0 = std::chrono::steady_clock::now();
    EAAS_PERF_CHECK(
        put_signal(coop_thread{}, ep, peer, kRecv, s.base() + send_off, n, peer, kSig, seq, signal_op::set));
    EAAS_PERF_CHECK(wait_signal(ep, s.word(kSig), cmp_op::ge, seq, timeout{kMessageTimeout}));
    const auto t1 = std::chrono::steady_clock::now();
    return std::chrono::duration<double, std::micro>(t1 - t0).count() / 2.0;  // RTT/2, as perftest
  }

  double one_raw(std::size_t n) {
    ++seq;
    const auto t0 = std::chrono::steady_clock::now();
    raw_send(s.peer->view(), s.base() + send_off, n, seq);
    if (!raw_wait(s.word(kSig), seq)) die("raw ping-pong: server vanished", status::peer_unreachable);
    const auto t1 = std::chrono::steady_clock::now();
    return std::chrono::duration<double, std::micro>(t1 - t0).count() / 2.0;
  }

  std::pair<std::size_t, std::size_t> counts(std::size_t n) const {
    const std::size_t budget = std::size_t{2} << 30;  // bytes per size and direction
    const std::size_t iters = std::min(o.iters, std::max<std::size_t>(16, budget / n));
    const std::size_t warm = std::min(o.warmup, std::max<std::size_t>(2, iters / 10));
    return {iters, warm};
  }

  // One validated, warmed-up phase of eaas put_signal messages; returns the timed samples.
  std::vector<double> sample_ops(std::size_t n, std::size_t iters, std::size_t warm) {
    start_phase(mode_ops, n, 1 + warm + iters);
    // Checked before timed: the echo of a pattern comes back intact.
    fill_pattern(n * 7 + 1, s.base() + send_off, n);
    std::memset(s.base() + kRecv, 0xA5, n);
    one_message(n);
    if (const auto bad = count_mismatches(n * 7 + 1, s.base() + kRecv, n); bad != 0) {
      std::fprintf(stderr, "error: %zu-byte echo came back with %llu wrong bytes\n", n,
                   static_cast<unsigned long long>(bad));
      std::exit(3);
    }
    for (std::size_t i = 0; i < warm; ++i) one_message(n);
    std::vector<double> samples(iters);
    for (auto& x : samples) x = one_message(n);
    return samples;
  }

  std::vector<double> sample_raw(std::size_t n, std::size_t iters, std::size_t warm) {
    start_phase(mode_raw, n, warm + iters);
    for (std::size_t i = 0; i < warm; ++i) one_raw(n);
    std::vector<double> samples(iters);
    for (auto& x : samples) x = one_raw(n);
    return samples;
  }

  latency_stats measure(std::size_t n) {
    const auto [iters, warm] = counts(n);
    return summarize(sample_ops(n, iters, warm));
  }

  // eaas and the raw floor in alternating rounds, so that drift of a shared machine hits both alike.
  std::pair<latency_stats, latency_stats> measure_against_floor(std::size_t n) {
    constexpr std::size_t kRounds = 10;
    const auto [iters, warm] = counts(n);
    const std::size_t per = std::max<std::size_t>(1, iters / kRounds);
    std::vector<double> ops, raw;
    for (std::size_t r = 0; r < kRounds; ++r) {
      auto a = sample_ops(n, per, warm);
      auto b = sample_raw(n, per, warm);
      ops.insert(ops.end(), a.begin(), a.end());
      raw.insert(raw.end(), b.begin(), b.end());
    }
    return {summarize(std::move(ops)), summarize(std::move(raw))};
  }

  // memcpy between two private, pre-touched buffers of this process: the bandwidth floor.
  double memcpy_gbps(std::size_t n) {
    const auto [iters, warm] = counts(n);
    std::vector<unsigned char> a(n, 1), b(n, 2);
    std::vector<double> t(iters);
    for (std::size_t i = 0; i < warm; ++i) std::memcpy(b.data(), a.data(), n);
    for (auto& x : t) {
      const auto t0 = std::chrono::steady_clock::now();
      std::memcpy(b.data(), a.data(), n);
      x = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      asm volatile("" : : "r"(b.data()) : "memory");  // the copy must happen
    }
    return static_cast<double>(n) / summarize(std::move(t)).t_typical / 1e3;
  }

  void finish() { start_phase(mode_done, 0, 0); }
};

int run_client(const options& o) {
  pin(o.cpu);
  client c(o);
  topology_info topo;
  const bool have_topo = query_topology(topo) == status::ok;
  std::printf("# eaas-pingpong: transport %s, scope %s, %s\n", o.transport.c_str(), o.scope.c_str(),
              have_topo ? topo.summary.c_str() : "topology unknown");
  std::printf("# half round trip (RTT/2) of put_signal + wait_signal; t_typical is the median\n");
  const std::vector<std::size_t> sizes = o.all ? size_sweep(8, o.max_size) : std::vector<std::size_t>{o.size};
  nlohmann::json rows = nlohmann::json::array();
  print_latency_header(o.baseline ? std::vector<std::string>{"BW[GB/s]", "memcpy[GB/s]", "BW/memcpy"}
                                  : std::vector<std::string>{"BW[GB/s]"});
  double last_bw = 0, last_memcpy = 0;
  for (std::size_t n : sizes) {
    const latency_stats st = c.measure(n);
    const double bw = static_cast<double>(n) / st.t_typical / 1e3;
    auto row = to_json(n, st);
    row["bw_gbps"] = bw;
    if (o.baseline) {
      const double mc = c.memcpy_gbps(n);
      row["memcpy_gbps"] = mc;
      print_latency_row(n, st, {bw, mc, bw / mc});
      last_bw = bw;
      last_memcpy = mc;
    } else {
      print_latency_row(n, st, {bw});
    }
    rows.push_back(row);
  }
  nlohmann::json out = {{"tool", "eaas-pingpong"},
                        {"transport", o.transport},
                        {"scope", o.scope},
                        {"date", today_utc()},
                        {"host", have_topo ? topo.summary : "unknown"},
                        {"metric", "half round trip (RTT/2), microseconds"},
                        {"rows", rows}};
  if (o.baseline) {
    const std::size_t n0 = sizes.front();
    const auto [ops, raw] = c.measure_against_floor(n0);
    std::printf(
        "# floor, same run, alternating rounds at %zu B: eaas put_signal, then raw flag ping-pong "
        "(memcpy + release store / acquire spin on the same mapped memory)\n",
        n0);
    print_latency_row(n0, ops, {});
    print_latency_row(n0, raw, {});
    const double ratio = ops.t_typical / raw.t_typical;
    std::printf("# eaas put_signal / raw floor at %zu B (t_typical): %.2fx\n", n0, ratio);
    if (sizes.size() > 1)
      std::printf("# put bandwidth / memcpy at %zu B: %.1f%%\n", sizes.back(), 100.0 * last_bw / last_memcpy);
    out["baseline"] = {{"eaas_interleaved", to_json(n0, ops)},
                       {"raw_flag_interleaved", to_json(n0, raw)},
                       {"ratio_to_raw_typical", ratio}};
    if (sizes.size() > 1)
      out["baseline"]["largest"] = {{"bytes", sizes.back()},
                                    {"bw_gbps", last_bw},
                                    {"memcpy_gbps", last_memcpy},
                                    {"ratio", last_bw / last_memcpy}};
  }
  c.finish();
  if (!o.json.empty()) {
    std::ofstream f(o.json);
    f << out.dump(2) << "\n";
    if (!f) die("writing " + o.json, status::internal_error);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"eaas-pingpong: put_signal half round trip between two processes (perftest columns)"};
  app.add_option("--role", o.role, "server, client, or both (start a server process, then be the client)")
      ->check(CLI::IsMember({"server", "client", "both"}));
  app.add_option("--rendezvous", o.rendezvous, "directory where the two sides exchange handles");
  app.add_option("--transport", o.transport, "shm (host processes) or nvlink (kernels on two GPUs; GPU build)")
      ->check(CLI::IsMember({"shm", "nvlink", "ibgda"}));
  app.add_option("--scope", o.scope, "who issues each op: thread, warp (32 threads) or block (512); GPU transports")
      ->check(CLI::IsMember({"thread", "warp", "block"}));
  app.add_flag("--graph", o.graph, "nvlink: also time messages replayed as the nodes of a CUDA graph");
  add_gpu_flags(app, o.gpu);
  app.add_flag("-a,--all", o.all, "sweep sizes 8 B .. --max-size in powers of two");
  app.add_option("-s,--size", o.size, "message size in bytes (without -a)")->check(CLI::Range(1ull, 1ull << 30));
  app.add_option("--max-size", o.max_size, "largest size of the sweep")->check(CLI::Range(8ull, 1ull << 30));
  app.add_option("-n,--iters", o.iters, "timed iterations per size (fewer for large sizes)")
      ->check(CLI::PositiveNumber);
  app.add_option("-w,--warmup", o.warmup, "untimed iterations per size");
  app.add_option("--cpu", o.cpu, "pin to this physical core (default: client 0, server 1)");
  app.add_option("--json", o.json, "write results as JSON to this file");
  app.add_flag("!--no-baseline", o.baseline, "skip the raw-floor and memcpy baselines");
  CLI11_PARSE(app, argc, argv);

  if (!o.all) o.max_size = std::max(o.max_size, o.size);
  if (o.transport == "nvlink") {
    nvlink_pair_options g;
    g.role = o.role;
    g.rendezvous = o.rendezvous;
    g.sizes = o.all ? size_sweep(8, o.max_size) : std::vector<std::size_t>{o.size};
    g.max_size = o.max_size;
    g.iters = o.iters;
    g.warmup = o.warmup;
    g.baseline = o.baseline;
    g.json = o.json;
    g.scope = o.scope;
    g.graph = o.graph;
    return run_nvlink(g, o.gpu, nvlink_tool::pingpong);
  }
  if (o.transport == "ibgda")
    return run_ibgda(
        o.gpu, o.all ? size_sweep(8, std::min<std::size_t>(o.max_size, 1 << 20)) : std::vector<std::size_t>{o.size},
        o.iters, o.warmup, o.json);
  if (o.scope != "thread")
    die("--scope " + o.scope + ": host (shm) ops are issued by one thread; warp and block are GPU scopes",
        status::unsupported);
  if (o.graph) die("--graph: CUDA graphs need a GPU transport (--transport nvlink)", status::unsupported);

  if (o.role == "both") {
    std::string dir = o.rendezvous;
    bool own_dir = false;
    if (dir.empty()) {
      char tmpl[] = "/tmp/eaas-pingpong-XXXXXX";
      if (::mkdtemp(tmpl) == nullptr) die("mkdtemp", status::internal_error);
      dir = tmpl;
      own_dir = true;
    }
    const std::string max = std::to_string(o.max_size);
    const std::string server_cpu = std::to_string(o.cpu >= 0 ? o.cpu + 1 : 1);
    const pid_t server = spawn_self({"--role", "server", "--rendezvous", dir, "--max-size", max, "--cpu", server_cpu});
    o.rendezvous = dir;
    if (o.cpu < 0) o.cpu = 0;
    const int rc = run_client(o);
    int st = 0;
    ::waitpid(server, &st, 0);
    if (own_dir) std::filesystem::remove_all(dir);
    return rc != 0 ? rc : (WIFEXITED(st) ? WEXITSTATUS(st) : 4);
  }
  if (o.rendezvous.empty()) die("--role " + o.role + " needs --rendezvous DIR", status::invalid_argument);
  if (o.role == "server") return run_server(o);
  if (o.cpu < 0) o.cpu = 0;
  return run_client(o);
}
