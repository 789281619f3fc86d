// eaas-nvshmem-pingpong: the NVSHMEM baseline of issues #3 and #6. Half round trip (RTT/2) of NVSHMEM's
// put-with-signal between two GPUs, two processes with one GPU each, in perftest ib_write_lat columns, so
// that it reads next to `eaas-pingpong --transport nvlink`.
//
//   eaas-nvshmem-pingpong [-a] [--scope thread|warp|block]   (starts rank 1 itself, then is rank 0)
//   eaas-nvshmem-pingpong --role 1 --rendezvous DIR &  eaas-nvshmem-pingpong --role 0 --rendezvous DIR -a
//
// Launch excluded: one kernel runs every message of a size; each round trip is timed in SM cycles and
// scaled by the kernel's own %globaltimer span (as nvlink_pair.cu's k_client). Each size is checked
// first: a pattern goes out, is echoed back by rank 1 and compared byte for byte.
//
// Bootstrap without MPI: rank 0 takes an NVSHMEM unique ID and publishes it with the plan (sizes,
// iterations, scope, heap) in DIR/nvshmem-uid; rank 1 waits for that file and follows the plan. Only
// NVSHMEM's P2P transport is used (NVSHMEM_REMOTE_TRANSPORT=none unless set), so no NIC is needed.
//
// NVSHMEM's own waits (nvshmem_signal_wait_until, init, barriers) have no deadline. This tool bounds
// them from the host: kernels are polled with a deadline, blocking host calls run under alarm(); on
// expiry it says what it was waiting for and exits with 2. It never hangs.

#include <cuda_runtime.h>
#include <link.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "driver.hpp"
#include "eaas/detail/ptx.cuh"
#include "gpu_util.cuh"

using namespace eaas;
using namespace eaas::perf;

namespace {

constexpr const char* kUidFile = "nvshmem-uid";
constexpr const char* kPlanMagic = "eaas-nvshmem-pingpong-plan";
constexpr int kPlanVersion = 1;
constexpr unsigned kBlockThreads = 512;  // --scope block, as eaas-pingpong
// Symmetric layout (one nvshmem_malloc): the signal word the peer sets, then the receive area (where
// the peer's message lands), then rank 0's send area.
constexpr std::uint64_t kSig = 0;
constexpr std::uint64_t kRecv = 4096;

std::uint64_t stride(std::uint64_t n) { return (n + 4095) / 4096 * 4096; }
std::uint64_t heap_bytes(std::uint64_t max) { return kRecv + 2 * stride(max); }

enum class scope_kind { thread, warp, block };

scope_kind scope_of(const std::string& s) {
  return s == "thread" ? scope_kind::thread : s == "warp" ? scope_kind::warp : scope_kind::block;
}
unsigned threads_of(scope_kind s) { return s == scope_kind::thread ? 1 : s == scope_kind::warp ? 32 : kBlockThreads; }
const char* op_of(scope_kind s) {
  return s == scope_kind::thread ? "nvshmem_putmem_signal_nbi"
         : s == scope_kind::warp ? "nvshmemx_putmem_signal_nbi_warp"
                                 : "nvshmemx_putmem_signal_nbi_block";
}

struct options {
  std::string role = "both";
  std::string rendezvous;
  std::string scope = "thread";
  std::string json;
  bool all = false;
  std::size_t size = 8;
  std::size_t max_size = std::size_t{1} << 20;
  std::size_t iters = 10000;
  std::size_t warmup = 200;
  double timeout_s = 60;
};

// What both ranks run, decided by rank 0 and handed to rank 1 with the unique ID.
struct size_step {
  std::uint64_t bytes = 0, count = 0, warm = 0;
};
struct plan {
  std::string scope;
  std::uint64_t max_size = 0;
  std::vector<size_step> steps;
};

// ---- bounded waits ----------------------------------------------------------------------------

// --role both: rank 1, started by this process; ended when rank 0 gives up, so that it does not wait out
// its own deadlines.
pid_t g_rank1 = 0;

void end_rank1() {
  if (g_rank1 > 0) ::kill(g_rank1, SIGTERM);  // async-signal-safe: also called from on_alarm
}

// Blocking NVSHMEM host calls (init, barriers, collective malloc/free) wait for the other rank without
// a deadline; SIGALRM ends the process with a message when one takes too long.
char g_alarm_msg[256];

extern "C" void on_alarm(int) {
  const ssize_t r = ::write(STDERR_FILENO, g_alarm_msg, std::strlen(g_alarm_msg));
  (void)r;
  end_rank1();
  std::_Exit(2);
}

class host_deadline {
 public:
  host_deadline(const char* what, double seconds) {
    std::snprintf(g_alarm_msg, sizeof(g_alarm_msg),
                  "error: %s did not return within %.0f s (is the other rank alive?)\n", what, seconds);
    struct sigaction sa {};
    sa.sa_handler = on_alarm;
    ::sigaction(SIGALRM, &sa, nullptr);
    ::alarm(static_cast<unsigned>(std::max(1.0, seconds)));
  }
  host_deadline(const host_deadline&) = delete;
  host_deadline& operator=(const host_deadline&) = delete;
  ~host_deadline() { ::alarm(0); }
};

// Waits for the kernels of `s` with a deadline: NVSHMEM's signal waits spin until the peer answers.
void wait_stream(cudaStream_t s, double seconds, const char* what) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  for (;;) {
    const cudaError_t e = cudaStreamQuery(s);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) {
      std::fprintf(stderr, "CUDA error: %s: %s\n", what, cudaGetErrorString(e));
      std::exit(2);
    }
    if (std::chrono::steady_clock::now() > until) {
      std::fprintf(stderr, "error: %s: the kernel did not finish within %.0f s (is the other rank alive?)\n", what,
                   seconds);
      std::fflush(stderr);
      end_rank1();
      std::_Exit(2);  // a spinning kernel is still queued: no exit handlers that would synchronize with it
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

// ---- NVSHMEM environment ----------------------------------------------------------------------

void default_env(const char* name, const std::string& value) { ::setenv(name, value.c_str(), 0); }

// The directory of the libnvshmem_host this process loaded (empty if none is found).
std::string loaded_nvshmem_dir() {
  std::string dir;
  ::dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* out) {
        const std::string name = info->dlpi_name != nullptr ? info->dlpi_name : "";
        if (name.find("libnvshmem_host.so") == std::string::npos) return 0;
        *static_cast<std::string*>(out) = std::filesystem::path(name).parent_path().string();
        return 1;
      },
      &dir);
  return dir;
}

// Defaults for a machine with NVLink and no RDMA NIC; a variable the user set wins.
void set_nvshmem_env(std::uint64_t max_size) {
  default_env("NVSHMEM_REMOTE_TRANSPORT", "none");
  default_env("NVSHMEM_IB_ENABLE_IBGDA", "0");
  default_env("NVSHMEM_DISABLE_NCCL", "1");
  default_env("NVSHMEM_DISABLE_GDRCOPY", "1");
  default_env("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo");
  default_env("NVSHMEM_BOOTSTRAP_UID_SOCK_FAMILY", "AF_INET");
  const std::uint64_t heap = std::max<std::uint64_t>(256ull << 20, heap_bytes(max_size) + (128ull << 20));
  default_env("NVSHMEM_SYMMETRIC_SIZE", std::to_string(heap));
  // The UID bootstrap is a plugin that libnvshmem_host dlopen()s by file name (nvshmem_bootstrap_uid.so.3
  // in NVSHMEM 3.x), found through the loader's search path, which need not include NVSHMEM's lib dir.
  if (std::getenv("NVSHMEM_BOOTSTRAP_UID_PLUGIN") == nullptr) {
    std::vector<std::string> dirs = {loaded_nvshmem_dir()};
#ifdef EAAS_NVSHMEM_LIB_DIR
    dirs.push_back(EAAS_NVSHMEM_LIB_DIR);
#endif
    for (const auto& d : dirs) {
      if (d.empty()) continue;
      const std::string p = d + "/nvshmem_bootstrap_uid.so." + std::to_string(NVSHMEM_BOOTSTRAP_PLUGIN_MAJOR_VERSION);
      if (std::filesystem::exists(p)) {
        ::setenv("NVSHMEM_BOOTSTRAP_UID_PLUGIN", p.c_str(), 0);
        break;
      }
    }
  }
}

// ---- rendezvous: the unique ID and the plan ---------------------------------------------------

std::string to_hex(const void* p, std::size_t n) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s;
  for (std::size_t i = 0; i < n; ++i) {
    const auto b = static_cast<const unsigned char*>(p)[i];
    s += kDigits[b >> 4];
    s += kDigits[b & 15];
  }
  return s;
}

bool from_hex(const std::string& s, void* p, std::size_t n) {
  if (s.size() != 2 * n) return false;
  auto nibble = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1; };
  for (std::size_t i = 0; i < n; ++i) {
    const int hi = nibble(s[2 * i]), lo = nibble(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    static_cast<unsigned char*>(p)[i] = static_cast<unsigned char>(hi * 16 + lo);
  }
  return true;
}

void publish_plan(const std::string& dir, const nvshmemx_uniqueid_t& uid, const plan& p) {
  const std::string tmp = dir + "/." + kUidFile + ".tmp", final_path = dir + "/" + kUidFile;
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << kPlanMagic << " " << kPlanVersion << " " << sizeof(uid) << "\n"
      << to_hex(&uid, sizeof(uid)) << "\n"
      << p.scope << " " << p.max_size << " " << p.steps.size() << "\n";
    for (const auto& s : p.steps) f << s.bytes << " " << s.count << " " << s.warm << "\n";
    f << "end\n";
    if (!f) die("writing " + tmp, status::internal_error);
  }
  if (std::rename(tmp.c_str(), final_path.c_str()) != 0) die("publishing " + final_path, status::internal_error);
}

// Rank 1: waits (bounded) for rank 0's file; dies on a malformed or mismatched one.
void await_plan(const std::string& dir, double seconds, nvshmemx_uniqueid_t& uid, plan& p) {
  const std::string path = dir + "/" + kUidFile;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::ifstream f;
  while (!(f = std::ifstream(path))) {
    if (std::chrono::steady_clock::now() > until) die("waiting for rank 0's " + path, status::timeout);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::string magic, hex, end;
  int version = 0;
  std::size_t uid_size = 0, n = 0;
  f >> magic >> version >> uid_size >> hex >> p.scope >> p.max_size >> n;
  if (!f || magic != kPlanMagic) die(path + " is not an eaas-nvshmem-pingpong plan", status::invalid_handle);
  if (version != kPlanVersion || uid_size != sizeof(uid))
    die(path + ": written by another version of eaas-nvshmem-pingpong or NVSHMEM (plan v" + std::to_string(version) +
            ", unique ID of " + std::to_string(uid_size) + " bytes; this one: v" + std::to_string(kPlanVersion) + ", " +
            std::to_string(sizeof(uid)) + ")",
        status::invalid_handle);
  if (!from_hex(hex, &uid, sizeof(uid))) die(path + ": bad unique ID", status::invalid_handle);
  if (!f || n > 64 || p.max_size > (std::uint64_t{1} << 30)) die(path + ": malformed plan", status::invalid_handle);
  p.steps.resize(n);
  for (auto& s : p.steps) f >> s.bytes >> s.count >> s.warm;
  f >> end;
  if (!f || end != "end" || (p.scope != "thread" && p.scope != "warp" && p.scope != "block"))
    die(path + ": malformed plan", status::invalid_handle);
}

// ---- kernels ----------------------------------------------------------------------------------

struct pp_args {
  unsigned char* recv;        // symmetric: where the peer's message lands, here and there
  const unsigned char* send;  // what this rank sends: rank 0 its send area, rank 1 what it received
  std::uint64_t* sig;         // symmetric: the word the peer sets, here and there
  std::uint64_t bytes, first_seq, warm, count;
  int peer;
  long long* cycles;       // rank 0: per-message round trip in SM cycles, or null
  unsigned long long* ns;  // rank 0: %globaltimer at the first timed message and at the end, or null
};

template <scope_kind S>
__device__ __forceinline__ void group_sync() {
  if constexpr (S == scope_kind::warp) __syncwarp();
  if constexpr (S == scope_kind::block) __syncthreads();
}

template <scope_kind S>
__device__ __forceinline__ void put_signal(const pp_args& a, std::uint64_t seq) {
  if constexpr (S == scope_kind::thread)
    nvshmem_putmem_signal_nbi(a.recv, a.send, a.bytes, a.sig, seq, NVSHMEM_SIGNAL_SET, a.peer);
  else if constexpr (S == scope_kind::warp)
    nvshmemx_putmem_signal_nbi_warp(a.recv, a.send, a.bytes, a.sig, seq, NVSHMEM_SIGNAL_SET, a.peer);
  else
    nvshmemx_putmem_signal_nbi_block(a.recv, a.send, a.bytes, a.sig, seq, NVSHMEM_SIGNAL_SET, a.peer);
}

// One thread waits, the group follows (as NVSHMEM's perftests and eaas's wait_signal).
template <scope_kind S>
__device__ __forceinline__ void wait_signal(const pp_args& a, std::uint64_t seq) {
  if (threadIdx.x == 0) nvshmem_signal_wait_until(a.sig, NVSHMEM_CMP_GE, seq);
  group_sync<S>();
}

template <scope_kind S>
__global__ void k_ping(pp_args a) {
  const bool lead = threadIdx.x == 0;
  for (std::uint64_t i = 0; i < a.warm + a.count; ++i) {
    if (lead && i == a.warm && a.ns != nullptr) a.ns[0] = detail::ptx::globaltimer();
    const long long t0 = clock64();
    put_signal<S>(a, a.first_seq + i);
    wait_signal<S>(a, a.first_seq + i);
    const long long t1 = clock64();
    if (lead && i >= a.warm && a.cycles != nullptr) a.cycles[i - a.warm] = t1 - t0;
  }
  if (lead && a.ns != nullptr) a.ns[1] = detail::ptx::globaltimer();
  if (lead) nvshmem_quiet();
}

template <scope_kind S>
__global__ void k_pong(pp_args a) {
  for (std::uint64_t i = 0; i < a.warm + a.count; ++i) {
    wait_signal<S>(a, a.first_seq + i);
    put_signal<S>(a, a.first_seq + i);
  }
  if (threadIdx.x == 0) nvshmem_quiet();
}

template <scope_kind S>
void launch(bool ping, const pp_args& a, cudaStream_t s) {
  if (ping)
    k_ping<S><<<1, threads_of(S), 0, s>>>(a);
  else
    k_pong<S><<<1, threads_of(S), 0, s>>>(a);
}

void launch(scope_kind k, bool ping, const pp_args& a, cudaStream_t s) {
  if (k == scope_kind::thread)
    launch<scope_kind::thread>(ping, a, s);
  else if (k == scope_kind::warp)
    launch<scope_kind::warp>(ping, a, s);
  else
    launch<scope_kind::block>(ping, a, s);
  EAAS_CU(cudaGetLastError());
}

// Loads every kernel up front: lazy module loading while a kernel of this process spins would wait for it.
void load_kernels() {
  cudaFuncAttributes at{};
  EAAS_CU(cudaFuncGetAttributes(&at, k_ping<scope_kind::thread>));
  EAAS_CU(cudaFuncGetAttributes(&at, k_ping<scope_kind::warp>));
  EAAS_CU(cudaFuncGetAttributes(&at, k_ping<scope_kind::block>));
  EAAS_CU(cudaFuncGetAttributes(&at, k_pong<scope_kind::thread>));
  EAAS_CU(cudaFuncGetAttributes(&at, k_pong<scope_kind::warp>));
  EAAS_CU(cudaFuncGetAttributes(&at, k_pong<scope_kind::block>));
  EAAS_CU(cudaFuncGetAttributes(&at, fill_pattern_kernel));
  EAAS_CU(cudaFuncGetAttributes(&at, count_wrong_kernel));
}

// ---- one rank -----------------------------------------------------------------------------------

std::string version_string() {
  int major = 0, minor = 0, patch = 0;
  nvshmemx_vendor_get_version_info(&major, &minor, &patch);
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

struct rank_state {
  int rank = 0;
  double timeout_s = 60;
  plan p;
  scope_kind scope = scope_kind::thread;
  cudaStream_t stream{};
  unsigned char* heap = nullptr;  // nvshmem_malloc
  std::uint64_t seq = 0;          // the last sequence number used; both ranks count alike

  pp_args args(std::uint64_t bytes) const {
    pp_args a{};
    a.recv = heap + kRecv;
    a.send = rank == 0 ? heap + kRecv + stride(p.max_size) : heap + kRecv;
    a.sig = reinterpret_cast<std::uint64_t*>(heap + kSig);
    a.bytes = bytes;
    a.first_seq = seq + 1;
    a.peer = 1 - rank;
    return a;
  }

  // Rank 0: `count` timed messages after `warm`, half round trips in µs. Rank 1: echoes them.
  std::vector<double> run_step(std::uint64_t bytes, std::uint64_t count, std::uint64_t warm) {
    pp_args a = args(bytes);
    a.count = count;
    a.warm = warm;
    long long* cycles = nullptr;
    unsigned long long* ns = nullptr;
    if (rank == 0 && count > 0) {
      EAAS_CU(cudaMalloc(&cycles, count * sizeof(long long)));
      EAAS_CU(cudaMalloc(&ns, 2 * sizeof(unsigned long long)));
      a.cycles = cycles;
      a.ns = ns;
    }
    launch(scope, rank == 0, a, stream);
    wait_stream(stream, timeout_s, rank == 0 ? "ping-pong (rank 0)" : "ping-pong echo (rank 1)");
    EAAS_CU(cudaGetLastError());
    seq += warm + count;
    if (rank != 0 || count == 0) return {};
    std::vector<long long> cyc(count);
    unsigned long long span[2];
    EAAS_CU(cudaMemcpy(cyc.data(), cycles, count * sizeof(long long), cudaMemcpyDeviceToHost));
    EAAS_CU(cudaMemcpy(span, ns, sizeof(span), cudaMemcpyDeviceToHost));
    EAAS_CU(cudaFree(cycles));
    EAAS_CU(cudaFree(ns));
    return half_rtt_us(cyc, span[1] - span[0]);
  }

  // Rank 0: a pattern sent to rank 1 comes back intact (before anything is timed). Rank 1: echoes it.
  void check_echo(std::uint64_t bytes) {
    const std::uint64_t seed = bytes * 7 + 1;
    if (rank == 0) {
      fill_pattern_async(heap + kRecv + stride(p.max_size), bytes, seed, stream);
      EAAS_CU(cudaMemsetAsync(heap + kRecv, 0xA5, bytes, stream));
    }
    run_step(bytes, 1, 0);
    if (rank != 0) return;
    if (const auto bad = count_wrong(heap + kRecv, bytes, seed, stream); bad != 0) {
      std::fprintf(stderr, "error: %llu-byte echo came back with %llu wrong bytes\n",
                   static_cast<unsigned long long>(bytes), bad);
      std::exit(3);
    }
  }
};

std::string gpu_name(int dev) {
  cudaDeviceProp prop{};
  EAAS_CU(cudaGetDeviceProperties(&prop, dev));
  return prop.name;
}

int run_rank(int rank, const options& o, const plan& given) {
  rank_state r;
  r.rank = rank;
  r.timeout_s = o.timeout_s;
  nvshmemx_uniqueid_t uid = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (rank == 0) {
    r.p = given;
    set_nvshmem_env(r.p.max_size);
    std::filesystem::create_directories(o.rendezvous);
    std::filesystem::remove(o.rendezvous + "/" + kUidFile);  // a stale ID would point rank 1 at a dead root
    if (nvshmemx_get_uniqueid(&uid) != 0) die("nvshmemx_get_uniqueid", status::internal_error);
    publish_plan(o.rendezvous, uid, r.p);
  } else {
    await_plan(o.rendezvous, o.timeout_s, uid, r.p);
    set_nvshmem_env(r.p.max_size);
  }
  r.scope = scope_of(r.p.scope);

  EAAS_CU(cudaSetDevice(rank));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, 2, &uid, &attr) != 0)
    die("nvshmemx_set_attr_uniqueid_args", status::internal_error);
  {
    host_deadline d("nvshmemx_init_attr (unique-ID bootstrap with the other rank)", o.timeout_s);
    if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0) die("nvshmemx_init_attr", status::internal_error);
  }
  if (nvshmem_n_pes() != 2 || nvshmem_my_pe() != rank)
    die("NVSHMEM made this PE " + std::to_string(nvshmem_my_pe()) + " of " + std::to_string(nvshmem_n_pes()) +
            "; expected " + std::to_string(rank) + " of 2",
        status::internal_error);
  const std::string version = version_string();
  EAAS_CU(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking));
  load_kernels();
  {
    host_deadline d("nvshmem_malloc (collective)", o.timeout_s);
    r.heap = static_cast<unsigned char*>(nvshmem_malloc(heap_bytes(r.p.max_size)));
  }
  if (r.heap == nullptr) die("nvshmem_malloc of the symmetric buffers", status::no_resource);
  // Only P2P is configured: a peer NVSHMEM cannot map would leave its puts to a proxy with no transport.
  if (nvshmem_ptr(r.heap, 1 - rank) == nullptr)
    die("NVSHMEM cannot map the other GPU's memory (no P2P between GPU 0 and GPU 1?); this baseline uses "
        "NVSHMEM's P2P transport only (NVSHMEM_REMOTE_TRANSPORT=" +
            std::string(std::getenv("NVSHMEM_REMOTE_TRANSPORT")) + ")",
        status::unsupported);
  EAAS_CU(cudaMemset(r.heap, 0, heap_bytes(r.p.max_size)));
  EAAS_CU(cudaDeviceSynchronize());
  {
    host_deadline d("nvshmem_barrier_all before the first message", o.timeout_s);
    nvshmem_barrier_all();
  }

  nlohmann::json rows = nlohmann::json::array();
  std::string host;
  if (rank == 0) {
    host = "GPU 0 (" + gpu_name(0) + ") <-> GPU 1 (" + gpu_name(1) + ")";
    std::printf(
        "# eaas-nvshmem-pingpong: NVSHMEM %s put-with-signal, scope %s (%u threads), %s, P2P transport "
        "(NVSHMEM_REMOTE_TRANSPORT=%s)\n",
        version.c_str(), r.p.scope.c_str(), threads_of(r.scope), host.c_str(), std::getenv("NVSHMEM_REMOTE_TRANSPORT"));
    std::printf(
        "# RTT/2 of %s (SIGNAL_SET; the put-with-signal NVSHMEM's own shmem_put_signal_ping_pong_latency "
        "perftest uses) + nvshmem_signal_wait_until(CMP_GE) by one thread; launch excluded (kernel-timed)\n",
        op_of(r.scope));
    print_latency_header({"BW[GB/s]"});
  }
  for (const auto& s : r.p.steps) {
    r.check_echo(s.bytes);
    std::vector<double> us = r.run_step(s.bytes, s.count, s.warm);
    if (rank != 0) continue;
    const latency_stats st = summarize(std::move(us));
    const double bw = static_cast<double>(s.bytes) / st.t_typical / 1e3;
    print_latency_row(s.bytes, st, {bw});
    nlohmann::json row = to_json(s.bytes, st);
    row["bw_gbps"] = bw;
    rows.push_back(row);
  }

  {
    host_deadline d("nvshmem_barrier_all / nvshmem_finalize at the end", o.timeout_s);
    nvshmem_barrier_all();
    nvshmem_free(r.heap);
    nvshmem_finalize();
  }
  EAAS_CU(cudaStreamDestroy(r.stream));
  if (rank == 0 && !o.json.empty()) {
    nlohmann::json out = {{"tool", "eaas-nvshmem-pingpong"},
                          {"library", "nvshmem"},
                          {"nvshmem_version", version},
                          {"op", op_of(r.scope)},
                          {"scope", r.p.scope},
                          {"threads", threads_of(r.scope)},
                          {"transport", "p2p"},
                          {"date", today_utc()},
                          {"host", host},
                          {"metric", "half round trip (RTT/2), microseconds, launch excluded"},
                          {"rows", rows}};
    std::ofstream f(o.json);
    f << out.dump(2) << "\n";
    if (!f) die("writing " + o.json, status::internal_error);
  }
  return 0;
}

plan make_plan(const options& o) {
  plan p;
  p.scope = o.scope;
  p.max_size = o.all ? o.max_size : o.size;
  const std::vector<std::size_t> sizes = o.all ? size_sweep(8, o.max_size) : std::vector<std::size_t>{o.size};
  for (std::size_t n : sizes) {
    // As eaas-pingpong: per size at most 2 GiB each way and at least 16 messages.
    const std::size_t count = std::min(o.iters, std::max<std::size_t>(16, (std::size_t{2} << 30) / n));
    const std::size_t warm = std::min(o.warmup, std::max<std::size_t>(2, count / 10));
    p.steps.push_back({n, count, warm});
  }
  return p;
}

// Exits with 77 (skipped) unless rank r can have GPU r.
void require_two_gpus() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
  if (n < 2) {
    std::fprintf(stderr, "eaas-nvshmem-pingpong needs 2 GPUs (rank r uses GPU r); found %d\n", n);
    std::exit(77);
  }
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"eaas-nvshmem-pingpong: NVSHMEM put-with-signal half round trip between two GPUs (perftest columns)"};
  app.add_option("--role", o.role,
                 "0, 1, or both (start rank 1 as a second process, then be rank 0); rank 1 follows rank 0's plan")
      ->check(CLI::IsMember({"0", "1", "both"}));
  app.add_option("--rendezvous", o.rendezvous, "directory where rank 0 publishes the NVSHMEM unique ID and the plan");
  app.add_option("--scope", o.scope, "who issues each put: thread, warp (32 threads) or block (512)")
      ->check(CLI::IsMember({"thread", "warp", "block"}));
  app.add_flag("-a,--all", o.all, "sweep sizes 8 B .. --max-size in powers of two");
  app.add_option("-s,--size", o.size, "message size in bytes (without -a)")->check(CLI::Range(1ull, 1ull << 30));
  app.add_option("--max-size", o.max_size, "largest size of the sweep")->check(CLI::Range(8ull, 1ull << 30));
  app.add_option("-n,--iters", o.iters, "timed iterations per size (fewer for large sizes)")
      ->check(CLI::PositiveNumber);
  app.add_option("-w,--warmup", o.warmup, "untimed iterations per size");
  app.add_option("--timeout", o.timeout_s, "seconds any wait for the other rank may take before the tool gives up")
      ->check(CLI::Range(1.0, 3600.0));
  app.add_option("--json", o.json, "write results as JSON to this file (rank 0)");
  CLI11_PARSE(app, argc, argv);

  require_two_gpus();
  if (o.role == "both") {
    char tmpl[] = "/tmp/eaas-nvshmem-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) die("mkdtemp", status::internal_error);
    o.rendezvous = tmpl;
    char timeout[32];
    std::snprintf(timeout, sizeof(timeout), "%g", o.timeout_s);
    g_rank1 = spawn_self({"--role", "1", "--rendezvous", o.rendezvous, "--timeout", timeout});
    std::atexit(end_rank1);  // die() on this side
    const int rc = run_rank(0, o, make_plan(o));
    int st = 0;
    ::waitpid(g_rank1, &st, 0);
    g_rank1 = 0;
    std::filesystem::remove_all(o.rendezvous);
    return rc != 0 ? rc : (WIFEXITED(st) ? WEXITSTATUS(st) : 4);
  }
  if (o.rendezvous.empty()) die("--role " + o.role + " needs --rendezvous DIR", status::invalid_argument);
  if (o.role == "1") return run_rank(1, o, {});  // the plan comes from rank 0
  return run_rank(0, o, make_plan(o));
}
