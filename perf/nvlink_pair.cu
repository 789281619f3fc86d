// eaas-pingpong / eaas-bw `--transport nvlink`: two processes, kernels on both sides (see nvlink_pair.hpp).
//
// Ping-pong (RTT/2 of put_signal + wait_signal, perftest ib_write_lat columns), per size:
//   launch excluded  one kernel runs every message; each round trip timed in SM cycles, scaled by the
//                    kernel's own %globaltimer span;
//   launch included  one kernel launch per message, timed on the host around launch + synchronize;
//   graph            (--graph) one kernel per message as the nodes of a CUDA graph, replayed;
//   raw floor        the same copy by the same threads plus st.release.sys / ld.acquire.sys on the same
//                    mapped memory, without the ops' checks: alternating rounds with the ops.
// Bandwidth (ib_write_bw columns): messages streamed from --blocks blocks into a ring in the peer's GPU,
// the last one signalled once every block's bytes are there (grid_put_signal), next to the copy engine
// (cudaMemcpyAsync into the same mapped ring) in the same run. Every size is checked byte for byte first.

#include <cuda_runtime.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <thread>

#include "driver.hpp"
#include "eaas/device/grid_put.cuh"
#include "eaas/device/ops.hpp"
#include "gpu_util.cuh"
#include "nvlink_pair.hpp"

namespace eaas::perf {

namespace {

using detail::ldst_dev::group;

constexpr std::uint64_t kSecond = 1'000'000'000ull;
constexpr std::uint64_t kWaitNs = 20 * kSecond;  // any single wait of a kernel
// Region layout, both sides (GPU memory): signal words, the phase description, then the receive ring.
constexpr std::uint64_t kSig = 0;         // ping-pong message / bandwidth data signal
constexpr std::uint64_t kCtrlSig = 64;    // server: the client's phase number
constexpr std::uint64_t kAckSig = 128;    // client: the server saw the data of a phase
constexpr std::uint64_t kReadySig = 192;  // client: the server's kernels of a phase are queued
constexpr std::uint64_t kGoSig = 256;     // server: start streaming (both ways)
constexpr std::uint64_t kCtrl = 320;      // server: ctrl_words
constexpr std::uint64_t kRecv = 4096;
constexpr unsigned kSlots = 4;
constexpr unsigned kBwThreads = 512;

enum phase_mode : std::uint64_t { mode_done = 0, mode_echo = 1, mode_echo_raw = 2, mode_sink = 3, mode_bidir = 4 };
enum scope_id : std::uint64_t { scope_thread = 0, scope_warp = 1, scope_block = 2 };

struct ctrl_words {
  std::uint64_t mode, bytes, count, first_seq, scope, blocks, value, reserved;
};
static_assert(sizeof(ctrl_words) == 64);

__host__ __device__ constexpr std::uint64_t stride(std::uint64_t n) { return (n + 4095) / 4096 * 4096; }
std::uint64_t region_bytes(std::uint64_t max) { return kRecv + kSlots * stride(max); }

unsigned threads_of(std::uint64_t scope) { return scope == scope_thread ? 1 : scope == scope_warp ? 32 : 512; }
std::uint64_t scope_of(const std::string& s) {
  return s == "thread" ? scope_thread : s == "warp" ? scope_warp : scope_block;
}

// ---- kernels ----------------------------------------------------------------------------------

template <class Coop>
__device__ __forceinline__ status broadcast(status s) {
  if constexpr (std::is_same_v<Coop, coop_thread>) {
    return s;
  } else if constexpr (std::is_same_v<Coop, coop_warp>) {
    s = static_cast<status>(__shfl_sync(0xffffffffu, static_cast<int>(s), 0));
    __syncwarp();
    return s;
  } else {
    __shared__ int shared;
    __syncthreads();
    if (threadIdx.x == 0) shared = static_cast<int>(s);
    __syncthreads();
    s = static_cast<status>(shared);
    __syncthreads();
    return s;
  }
}

struct pp_args {
  device_endpoint ep;
  remote_view peer;
  std::uint64_t* my_sig;
  const unsigned char* my_recv;
  unsigned char* peer_raw;  // the peer's region as mapped here (raw floor)
  const unsigned char* src;
  std::uint64_t bytes;
  std::uint64_t* seq;  // client: the last sequence number used (device word); server: unused
  std::uint64_t first_seq, count, warm;
  long long* cycles;       // client: per-message round trip in SM cycles, or null
  unsigned long long* ns;  // client: %globaltimer at the first timed message and at the end, or null
  int* result;
};

// The floor's copy: the widest word the size allows, no alignment analysis.
template <class Coop>
__device__ __forceinline__ void raw_copy(unsigned char* d, const unsigned char* s, std::uint64_t n) {
  using G = group<Coop>;
  const std::uint64_t r = G::rank(), sz = G::size();
  if ((n & 15) == 0) {
    for (std::uint64_t i = r; i < n / 16; i += sz) reinterpret_cast<int4*>(d)[i] = reinterpret_cast<const int4*>(s)[i];
  } else if ((n & 7) == 0) {
    for (std::uint64_t i = r; i < n / 8; i += sz)
      reinterpret_cast<std::uint64_t*>(d)[i] = reinterpret_cast<const std::uint64_t*>(s)[i];
  } else {
    for (std::uint64_t i = r; i < n; i += sz) d[i] = s[i];
  }
}

template <class Coop, bool Raw>
__device__ __forceinline__ status send(const pp_args& a, const unsigned char* from, std::uint64_t seq) {
  if constexpr (Raw) {
    raw_copy<Coop>(a.peer_raw + kRecv, from, a.bytes);
    group<Coop>::sync();
    if (group<Coop>::rank() == 0) detail::store_release(reinterpret_cast<std::uint64_t*>(a.peer_raw + kSig), seq);
    return status::ok;
  } else {
    return put_signal(Coop{}, a.ep, a.peer, kRecv, from, a.bytes, a.peer, kSig, seq, signal_op::set);
  }
}

template <class Coop, bool Raw>
__device__ __forceinline__ status await(const pp_args& a, std::uint64_t seq) {
  status s = status::ok;
  if (group<Coop>::rank() == 0) {
    if constexpr (Raw) {
      const std::uint64_t until = now_ns() + kWaitNs;
      std::uint32_t spins = 0;
      while (detail::load_acquire(a.my_sig) < seq) {
        if ((++spins & 1023u) == 0 && now_ns() > until) {
          s = status::timeout;
          break;
        }
      }
    } else {
      s = wait_signal(a.ep, a.my_sig, cmp_op::ge, seq, timeout{kWaitNs});
    }
  }
  return broadcast<Coop>(s);
}

template <class Coop, bool Raw>
__global__ void k_client(pp_args a) {
  using G = group<Coop>;
  const bool lead = G::rank() == 0;
  const std::uint64_t first = *a.seq + 1;
  status s = status::ok;
  for (std::uint64_t i = 0; i < a.warm + a.count; ++i) {
    if (lead && i == a.warm && a.ns != nullptr) a.ns[0] = now_ns();
    const long long t0 = clock64();
    s = send<Coop, Raw>(a, a.src, first + i);
    if (s == status::ok) s = await<Coop, Raw>(a, first + i);
    const long long t1 = clock64();
    if (lead && i >= a.warm && a.cycles != nullptr) a.cycles[i - a.warm] = t1 - t0;
    if (s != status::ok) break;
  }
  G::sync();  // every thread has read *a.seq
  if (lead) {
    if (a.ns != nullptr) a.ns[1] = now_ns();
    *a.seq = first + a.warm + a.count - 1;
    if (s != status::ok) atomicCAS(a.result, 0, static_cast<int>(s));
  }
}

template <class Coop, bool Raw>
__global__ void k_echo(pp_args a) {
  status s = status::ok;
  for (std::uint64_t i = 0; i < a.count && s == status::ok; ++i) {
    s = await<Coop, Raw>(a, a.first_seq + i);
    if (s == status::ok) s = send<Coop, Raw>(a, a.my_recv, a.first_seq + i);
  }
  if (group<Coop>::rank() == 0 && s != status::ok) atomicCAS(a.result, 0, static_cast<int>(s));
}

__global__ void k_put_words(device_endpoint ep, remote_view peer, std::uint64_t off, const std::uint64_t* words,
                            std::uint64_t n, std::uint64_t sig_off, std::uint64_t value, int* result) {
  status s = put_signal(coop_thread{}, ep, peer, off, words, n * 8, peer, sig_off, value, signal_op::set);
  if (s == status::ok) s = quiet(coop_thread{}, ep);
  if (s != status::ok) atomicCAS(result, 0, static_cast<int>(s));
}

// Waits until the local words at `a` and (when b != null) `b` reach `value`.
__global__ void k_wait2(device_endpoint ep, const std::uint64_t* a, const std::uint64_t* b, std::uint64_t value,
                        int* result) {
  status s = wait_signal(ep, a, cmp_op::ge, value, timeout{kWaitNs});
  if (s == status::ok && b != nullptr) s = wait_signal(ep, b, cmp_op::ge, value, timeout{kWaitNs});
  if (s != status::ok) atomicCAS(result, 0, static_cast<int>(s));
}

// Server: waits for the data signal of a phase, then acknowledges it to the client.
__global__ void k_sink(device_endpoint ep, remote_view peer, const std::uint64_t* my_sig, std::uint64_t value,
                       int* result) {
  status s = wait_signal(ep, my_sig, cmp_op::ge, value, timeout{kWaitNs});
  if (s == status::ok) s = signal(coop_thread{}, ep, peer, kAckSig, value, signal_op::set);
  if (s == status::ok) s = quiet(coop_thread{}, ep);
  if (s != status::ok) atomicCAS(result, 0, static_cast<int>(s));
}

struct stream_args {
  device_endpoint ep;
  remote_view peer;
  const unsigned char* src;
  std::uint64_t bytes, count, value;
  unsigned int* arrivals;
  int* result;
};

// `count` messages of `bytes` into the peer's ring, each split over the grid's blocks; the last one
// signals kSig = value once every block's bytes of every message are at the peer.
__global__ void k_stream(stream_args a) {
  const std::uint64_t st = stride(a.bytes);
  std::uint64_t begin = 0, n = 0;
  grid_share(a.bytes, blockIdx.x, gridDim.x, begin, n);
  for (std::uint64_t m = 0; m + 1 < a.count; ++m) {
    if (n == 0) break;
    const status s = put(coop_block{}, a.ep, a.peer, kRecv + (m % kSlots) * st + begin, a.src + begin, n);
    if (s != status::ok) {
      if (threadIdx.x == 0) atomicCAS(a.result, 0, static_cast<int>(s));
      break;
    }
  }
  const grid_put j{.ep = a.ep,
                   .dst = a.peer,
                   .dst_offset = kRecv + ((a.count - 1) % kSlots) * st,
                   .src = a.src,
                   .bytes = a.bytes,
                   .sig = a.peer,
                   .sig_offset = kSig,
                   .value = a.value,
                   .arrivals = a.arrivals,
                   .result = a.result};
  grid_put_signal(j, blockIdx.x, gridDim.x);
}

// ---- host side --------------------------------------------------------------------------------

// Zeroed device memory of the current device, freed with its owner.
template <class T>
struct dev_ptr {
  T* p = nullptr;
  dev_ptr() = default;
  explicit dev_ptr(std::size_t n) { reset(n); }
  void reset(std::size_t n) {
    if (p != nullptr) EAAS_CU(cudaFree(p));
    EAAS_CU(cudaMalloc(&p, n * sizeof(T)));
    EAAS_CU(cudaMemset(p, 0, n * sizeof(T)));
  }
  dev_ptr(const dev_ptr&) = delete;
  dev_ptr& operator=(const dev_ptr&) = delete;
  ~dev_ptr() {
    if (p != nullptr) cudaFree(p);
  }
};

struct side {
  int gpu = 0;
  std::unique_ptr<context> ctx;
  std::unique_ptr<memory_region> mine;
  std::unique_ptr<endpoint> ep;
  std::unique_ptr<remote_region> peer;
  cudaStream_t stream{};
  dev_ptr<unsigned char> src;
  dev_ptr<int> result;
  dev_ptr<unsigned int> arrivals;
  dev_ptr<std::uint64_t> seq, words;
  side() = default;
  side(const side&) = delete;
  ~side() {
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
  unsigned char* base() const { return static_cast<unsigned char*>(mine->data()); }
  std::uint64_t* word(std::uint64_t off) const { return reinterpret_cast<std::uint64_t*>(base() + off); }
  unsigned char* peer_base() const {
    return reinterpret_cast<unsigned char*>(static_cast<std::uintptr_t>(peer->view().addr));
  }
  // Dies with `what` when a kernel recorded a failure (and clears it).
  void check(const char* what) {
    EAAS_CU(cudaStreamSynchronize(stream));
    int r = 0;
    EAAS_CU(cudaMemcpy(&r, result.p, sizeof(r), cudaMemcpyDeviceToHost));
    if (r != 0) die(what, static_cast<status>(r));
  }
  std::uint64_t read_word(std::uint64_t off) {
    std::uint64_t v = 0;
    EAAS_CU(cudaMemcpyAsync(&v, word(off), 8, cudaMemcpyDeviceToHost, stream));
    EAAS_CU(cudaStreamSynchronize(stream));
    return v;
  }
};

void setup(side& s, const nvlink_pair_options& o, const char* me, const char* other) {
  s.gpu = o.gpu >= 0 ? o.gpu : nvlink_default_gpu(o.role);
  EAAS_CU(cudaSetDevice(s.gpu));
  EAAS_CU(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  s.result.reset(1);
  s.arrivals.reset(1);
  s.seq.reset(1);
  s.words.reset(8);
  s.src.reset(std::max<std::size_t>(o.max_size, 16));
  EAAS_PERF_CHECK(context::create({.name = me, .cuda_device = s.gpu}, s.ctx));
  EAAS_PERF_CHECK(s.ctx->allocate(region_bytes(o.max_size), memory_kind::device, s.mine));
  connect_through(o.rendezvous, me, other, *s.ctx, *s.mine, s.ep, s.peer);
  if (s.ep->transport() != transport_kind::nvlink)
    die(std::string("the peer is reachable only over ") + transport_name(s.ep->transport()) + ", not nvlink",
        status::unsupported);
}

// Loads every kernel before any of them spins (lazy module loading while a kernel of this process
// waits would otherwise wait for it).
template <class Coop>
void load_pp_kernels() {
  cudaFuncAttributes at{};
  EAAS_CU(cudaFuncGetAttributes(&at, k_client<Coop, false>));
  EAAS_CU(cudaFuncGetAttributes(&at, k_client<Coop, true>));
  EAAS_CU(cudaFuncGetAttributes(&at, k_echo<Coop, false>));
  EAAS_CU(cudaFuncGetAttributes(&at, k_echo<Coop, true>));
}
void load_kernels() {
  load_pp_kernels<coop_thread>();
  load_pp_kernels<coop_warp>();
  load_pp_kernels<coop_block>();
  cudaFuncAttributes at{};
  EAAS_CU(cudaFuncGetAttributes(&at, k_put_words));
  EAAS_CU(cudaFuncGetAttributes(&at, k_wait2));
  EAAS_CU(cudaFuncGetAttributes(&at, k_sink));
  EAAS_CU(cudaFuncGetAttributes(&at, k_stream));
}

pp_args make_pp_args(side& s, std::uint64_t bytes) {
  pp_args a{};
  a.ep = s.ep->view();
  a.peer = s.peer->view();
  a.my_sig = s.word(kSig);
  a.my_recv = s.base() + kRecv;
  a.peer_raw = s.peer_base();
  a.src = s.src.p;
  a.bytes = bytes;
  a.seq = s.seq.p;
  a.result = s.result.p;
  return a;
}

template <bool Raw>
void launch_client(const pp_args& a, std::uint64_t scope, cudaStream_t st) {
  if (scope == scope_thread)
    k_client<coop_thread, Raw><<<1, 1, 0, st>>>(a);
  else if (scope == scope_warp)
    k_client<coop_warp, Raw><<<1, 32, 0, st>>>(a);
  else
    k_client<coop_block, Raw><<<1, 512, 0, st>>>(a);
  EAAS_CU(cudaGetLastError());
}

template <bool Raw>
void launch_echo(const pp_args& a, std::uint64_t scope, cudaStream_t st) {
  if (scope == scope_thread)
    k_echo<coop_thread, Raw><<<1, 1, 0, st>>>(a);
  else if (scope == scope_warp)
    k_echo<coop_warp, Raw><<<1, 32, 0, st>>>(a);
  else
    k_echo<coop_block, Raw><<<1, 512, 0, st>>>(a);
  EAAS_CU(cudaGetLastError());
}

// ---- server -----------------------------------------------------------------------------------

const char* check_ctrl(const ctrl_words& c, std::uint64_t max_size) {
  if (c.mode > mode_bidir) return "an unknown phase mode";
  if (c.mode == mode_done) return nullptr;
  if (c.bytes == 0 || c.bytes > max_size) return "a message size of 0 or beyond --max-size";
  if (c.count == 0 || c.count > (std::uint64_t{1} << 32)) return "a message count of 0 or beyond 2^32";
  if (c.scope > scope_block) return "an unknown scope";
  if (c.blocks == 0 || c.blocks > 1024) return "a block count outside 1 .. 1024";
  return nullptr;
}

}  // namespace

int nvlink_default_gpu(const std::string& role) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) die("--transport nvlink: no CUDA device", status::unsupported);
  return role == "server" && n > 1 ? 1 : 0;
}

int run_nvlink_server(const nvlink_pair_options& o) {
  side s;
  setup(s, o, "server", "client");
  load_kernels();
  std::uint64_t filled = 0;  // size whose pattern src holds (bidir)
  for (std::uint64_t phase = 1;; ++phase) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (s.read_word(kCtrlSig) < phase) {
      if (std::chrono::steady_clock::now() > until) die("server: no phase from the client in 120 s", status::timeout);
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
    ctrl_words c{};
    EAAS_CU(cudaMemcpy(&c, s.word(kCtrl), sizeof(c), cudaMemcpyDeviceToHost));
    if (const char* bad = check_ctrl(c, o.max_size); bad != nullptr)
      die(std::string("server: the client asked for ") + bad, status::invalid_argument);
    if (c.mode == mode_done) return 0;
    const auto ep = s.ep->view();
    const auto peer = s.peer->view();
    if (c.mode == mode_echo || c.mode == mode_echo_raw) {
      pp_args a = make_pp_args(s, c.bytes);
      a.first_seq = c.first_seq;
      a.count = c.count;
      if (c.mode == mode_echo)
        launch_echo<false>(a, c.scope, s.stream);
      else
        launch_echo<true>(a, c.scope, s.stream);
      s.check("server: echo");
      continue;
    }
    // Bandwidth: tell the client this side is queued, then (bidir) stream back on its go, then sink.
    k_put_words<<<1, 1, 0, s.stream>>>(ep, peer, kReadySig, nullptr, 0, kReadySig, c.value, s.result.p);
    if (c.mode == mode_bidir) {
      if (filled != c.bytes) {
        fill_pattern_async(s.src.p, c.bytes, c.bytes * 13 + 5, s.stream);
        filled = c.bytes;
      }
      k_wait2<<<1, 1, 0, s.stream>>>(ep, s.word(kGoSig), nullptr, c.value, s.result.p);
      const stream_args sa{ep, peer, s.src.p, c.bytes, c.count, c.value, s.arrivals.p, s.result.p};
      k_stream<<<static_cast<unsigned>(c.blocks), kBwThreads, 0, s.stream>>>(sa);
    }
    k_sink<<<1, 1, 0, s.stream>>>(ep, peer, s.word(kSig), c.value, s.result.p);
    EAAS_CU(cudaGetLastError());
    s.check("server: bandwidth phase");
  }
}

namespace {

struct client {
  const nvlink_pair_options& o;
  side s;
  std::uint64_t phase = 0, seq = 0, data = 0;
  cudaGraphExec_t graph{};
  std::uint64_t graph_bytes = 0, graph_scope = ~0ull;
  static constexpr unsigned kGraphNodes = 32;

  explicit client(const nvlink_pair_options& opt) : o(opt) {
    setup(s, o, "client", "server");
    load_kernels();
  }
  ~client() {
    if (graph != nullptr) cudaGraphExecDestroy(graph);
  }

  void start_phase(ctrl_words c) {
    EAAS_CU(cudaMemcpyAsync(s.words.p, &c, sizeof(c), cudaMemcpyHostToDevice, s.stream));
    k_put_words<<<1, 1, 0, s.stream>>>(s.ep->view(), s.peer->view(), kCtrl, s.words.p, 8, kCtrlSig, ++phase,
                                       s.result.p);
    EAAS_CU(cudaGetLastError());
  }
  void echo_phase(bool raw, std::uint64_t n, std::uint64_t scope, std::uint64_t count) {
    start_phase({raw ? mode_echo_raw : mode_echo, n, count, seq + 1, scope, 1, 0, 0});
  }

  // One kernel of `count` timed messages after `warm`; half round trips in µs.
  template <bool Raw>
  std::vector<double> kernel_timed(std::uint64_t n, std::uint64_t scope, std::uint64_t count, std::uint64_t warm) {
    dev_ptr<long long> cycles(count);
    dev_ptr<unsigned long long> ns(2);
    echo_phase(Raw, n, scope, warm + count);
    pp_args a = make_pp_args(s, n);
    a.count = count;
    a.warm = warm;
    a.cycles = cycles.p;
    a.ns = ns.p;
    launch_client<Raw>(a, scope, s.stream);
    s.check(Raw ? "raw ping-pong" : "put_signal ping-pong");
    seq += warm + count;
    std::vector<long long> cyc(count);
    unsigned long long span[2];
    EAAS_CU(cudaMemcpy(cyc.data(), cycles.p, count * sizeof(long long), cudaMemcpyDeviceToHost));
    EAAS_CU(cudaMemcpy(span, ns.p, sizeof(span), cudaMemcpyDeviceToHost));
    return half_rtt_us(cyc, span[1] - span[0]);
  }

  // One launch (and synchronize) per message, timed on the host.
  std::vector<double> launch_timed(std::uint64_t n, std::uint64_t scope, std::uint64_t count, std::uint64_t warm) {
    echo_phase(false, n, scope, warm + count);
    pp_args a = make_pp_args(s, n);
    a.count = 1;
    std::vector<double> us;
    us.reserve(count);
    for (std::uint64_t i = 0; i < warm + count; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      launch_client<false>(a, scope, s.stream);
      EAAS_CU(cudaStreamSynchronize(s.stream));
      const auto t1 = std::chrono::steady_clock::now();
      if (i >= warm) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / 2);
    }
    s.check("put_signal ping-pong, one launch per message");
    seq += warm + count;
    return us;
  }

  // kGraphNodes kernels of one message each, captured once per (size, scope); each replay timed.
  std::vector<double> graph_timed(std::uint64_t n, std::uint64_t scope, std::uint64_t replays) {
    if (graph == nullptr || graph_bytes != n || graph_scope != scope) {
      if (graph != nullptr) EAAS_CU(cudaGraphExecDestroy(graph));
      pp_args a = make_pp_args(s, n);
      a.count = 1;
      cudaGraph_t g{};
      EAAS_CU(cudaStreamBeginCapture(s.stream, cudaStreamCaptureModeThreadLocal));
      for (unsigned k = 0; k < kGraphNodes; ++k) launch_client<false>(a, scope, s.stream);
      EAAS_CU(cudaStreamEndCapture(s.stream, &g));
      EAAS_CU(cudaGraphInstantiate(&graph, g, 0));
      EAAS_CU(cudaGraphDestroy(g));
      graph_bytes = n;
      graph_scope = scope;
    }
    echo_phase(false, n, scope, (replays + 1) * kGraphNodes);
    std::vector<double> us;
    for (std::uint64_t r = 0; r < replays + 1; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      EAAS_CU(cudaGraphLaunch(graph, s.stream));
      EAAS_CU(cudaStreamSynchronize(s.stream));
      const auto t1 = std::chrono::steady_clock::now();
      if (r > 0) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / kGraphNodes / 2);
    }
    s.check("put_signal ping-pong in a CUDA graph");
    seq += (replays + 1) * kGraphNodes;
    return us;
  }

  // The echo of a pattern comes back intact (before anything is timed).
  void check_echo(std::uint64_t n, std::uint64_t scope) {
    fill_pattern_async(s.src.p, n, n * 7 + 1, s.stream);
    EAAS_CU(cudaMemsetAsync(s.base() + kRecv, 0xA5, n, s.stream));
    echo_phase(false, n, scope, 1);
    pp_args a = make_pp_args(s, n);
    a.count = 1;
    launch_client<false>(a, scope, s.stream);
    s.check("put_signal ping-pong (check)");
    ++seq;
    if (const auto bad = count_wrong(s.base() + kRecv, n, n * 7 + 1, s.stream); bad != 0) {
      std::fprintf(stderr, "error: %llu-byte echo came back with %llu wrong bytes\n",
                   static_cast<unsigned long long>(n), bad);
      std::exit(3);
    }
  }

  void finish() {
    start_phase({mode_done, 0, 0, 0, 0, 0, 0, 0});
    s.check("ending the server");
  }

  std::string header() const {
    cudaDeviceProp p{};
    EAAS_CU(cudaGetDeviceProperties(&p, s.gpu));
    const int server_gpu = o.server_gpu >= 0 ? o.server_gpu : nvlink_default_gpu("server");
    char buf[256];
    std::snprintf(buf, sizeof(buf), "client GPU %d (%s), server GPU %d%s", s.gpu, p.name, server_gpu,
                  server_gpu == s.gpu ? " (one GPU shared by two processes: time-sliced)" : "");
    return buf;
  }
};

}  // namespace

namespace {

// NVSHMEM's put-with-signal ping-pong at the same sizes and scope, run after ours (the GPUs are free
// again) by the sibling tool eaas-nvshmem-pingpong where it was built (an optional baseline).
void nvshmem_baseline(const nvlink_pair_options& o, const nlohmann::json& rows, nlohmann::json& out) {
  const std::string tool = sibling_program("eaas-nvshmem-pingpong");
  if (tool.empty()) {
    std::printf("# NVSHMEM baseline: not built (eaas-nvshmem-pingpong needs NVSHMEM at configure time)\n");
    return;
  }
  char tmpl[] = "/tmp/eaas-nvshmem-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) die("mkdtemp", status::internal_error);
  const std::string json = std::string(tmpl) + "/nvshmem.json";
  std::vector<std::string> args = {"--scope", o.scope, "--json", json};
  if (o.iters != 0) args.insert(args.end(), {"-n", std::to_string(o.iters)});
  if (o.sizes.size() > 1)
    args.insert(args.end(), {"-a", "--max-size", std::to_string(o.sizes.back())});
  else
    args.insert(args.end(), {"-s", std::to_string(o.sizes.front())});
  std::fflush(stdout);
  const int pid = spawn_program(tool, args);
  int st = 0;
  ::waitpid(pid, &st, 0);
  nlohmann::json theirs;
  std::ifstream f(json);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0 || !(f >> theirs)) {
    std::printf("# NVSHMEM baseline: %s failed (exit %d); no ratio\n", tool.c_str(),
                WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    std::filesystem::remove_all(tmpl);
    return;
  }
  std::filesystem::remove_all(tmpl);
  std::printf("# NVSHMEM %s put-with-signal ping-pong (eaas-nvshmem-pingpong, same sizes and scope, run just after):\n",
              theirs.value("nvshmem_version", std::string("")).c_str());
  std::printf("%10s %20s %22s %14s\n", "#bytes", "eaas t_typical[usec]", "NVSHMEM t_typical[usec]", "eaas/NVSHMEM");
  nlohmann::json ratios = nlohmann::json::array();
  for (const auto& r : rows) {
    for (const auto& t : theirs.value("rows", nlohmann::json::array())) {
      if (t.value("bytes", 0ull) != r.value("bytes", 0ull)) continue;
      const double a = r.value("t_typical_us", 0.0), b = t.value("t_typical_us", 0.0);
      if (b <= 0) continue;
      std::printf("%10llu %20.2f %22.2f %13.2fx\n", static_cast<unsigned long long>(r.value("bytes", 0ull)), a, b,
                  a / b);
      ratios.push_back({{"bytes", r["bytes"]}, {"eaas_us", a}, {"nvshmem_us", b}, {"ratio", a / b}});
    }
  }
  out["nvshmem"] = {{"tool", theirs}, {"ratios", ratios}};
}

}  // namespace

int run_nvlink_pingpong(const nvlink_pair_options& o) {
  client c(o);
  const std::uint64_t scope = scope_of(o.scope);
  std::printf("# eaas-pingpong: transport nvlink, scope %s (%u threads), %s\n", o.scope.c_str(), threads_of(scope),
              c.header().c_str());
  std::printf(
      "# RTT/2 of put_signal + wait_signal; columns t_*: launch excluded (kernel-timed); raw: the floor (same copy, "
      "st.release.sys / ld.acquire.sys), alternating rounds; launch: one launch + sync per message%s\n",
      o.graph ? "; graph: one kernel per message, nodes of a replayed CUDA graph" : "");
  std::vector<std::string> extra = {"BW[GB/s]", "launch[usec]"};
  if (o.graph) extra.push_back("graph[usec]");
  if (o.baseline) {
    extra.push_back("raw[usec]");
    extra.push_back("ops/raw");
  }
  print_latency_header(extra);
  nlohmann::json rows = nlohmann::json::array();
  const std::size_t iters = o.iters ? o.iters : 10000;
  for (std::size_t n : o.sizes) {
    c.check_echo(n, scope);
    // Per size at most 2 GiB each way and at least 16 messages.
    const std::size_t count = std::min(iters, std::max<std::size_t>(16, (std::size_t{2} << 30) / n));
    const std::size_t warm = std::min(o.warmup, std::max<std::size_t>(2, count / 10));
    constexpr int kRounds = 4;
    const std::size_t per = std::max<std::size_t>(4, count / kRounds);
    std::vector<double> ops, raw;
    for (int r = 0; r < kRounds; ++r) {
      auto x = c.kernel_timed<false>(n, scope, per, warm);
      ops.insert(ops.end(), x.begin(), x.end());
      if (o.baseline) {
        auto y = c.kernel_timed<true>(n, scope, per, warm);
        raw.insert(raw.end(), y.begin(), y.end());
      }
    }
    const latency_stats so = summarize(ops);
    const std::size_t launches = std::max<std::size_t>(8, std::min<std::size_t>(count / 4, 2000));
    const latency_stats sl = summarize(c.launch_timed(n, scope, launches, std::min<std::size_t>(warm, 20)));
    std::vector<double> cols = {static_cast<double>(n) / so.t_typical / 1e3, sl.t_typical};
    nlohmann::json row = to_json(n, so);
    row["bw_gbps"] = cols[0];
    row["launch_included"] = to_json(n, sl);
    if (o.graph) {
      const latency_stats sg = summarize(c.graph_timed(n, scope, std::max<std::size_t>(4, launches / 32)));
      cols.push_back(sg.t_typical);
      row["graph"] = to_json(n, sg);
    }
    if (o.baseline) {
      const latency_stats sr = summarize(raw);
      cols.push_back(sr.t_typical);
      cols.push_back(so.t_typical / sr.t_typical);
      row["raw_floor"] = to_json(n, sr);
      row["ratio_to_raw_typical"] = so.t_typical / sr.t_typical;
    }
    print_latency_row(n, so, cols);
    rows.push_back(row);
  }
  c.finish();
  nlohmann::json out = {{"tool", "eaas-pingpong"},
                        {"transport", "nvlink"},
                        {"scope", o.scope},
                        {"date", today_utc()},
                        {"host", c.header()},
                        {"graph", o.graph},
                        {"metric", "half round trip (RTT/2), microseconds"},
                        {"rows", rows}};
  if (o.baseline) nvshmem_baseline(o, rows, out);
  if (!o.json.empty()) {
    std::ofstream f(o.json);
    f << out.dump(2) << "\n";
    if (!f) die("writing " + o.json, status::internal_error);
  }
  return 0;
}

int run_nvlink_bw(const nvlink_pair_options& o) {
  client c(o);
  side& s = c.s;
  const auto ep = s.ep->view();
  const auto peer = s.peer->view();
  std::printf("# eaas-bw: put bandwidth, transport nvlink, %s, %u blocks x %u threads, %s\n",
              o.bidir ? "both ways (sum)" : "one way", o.blocks, kBwThreads, c.header().c_str());
  std::printf("# copy engine: cudaMemcpyAsync of the same messages into the same mapped ring, same run\n");
  std::printf("%10s %12s %20s %23s %16s %16s %10s %8s\n", "#bytes", "#iterations", "BW peak[GB/sec]",
              "BW average[GB/sec]", "MsgRate[Mpps]", "CE[GB/sec]", "BW/CE", "#wrong");
  nlohmann::json rows = nlohmann::json::array();
  cudaEvent_t e0, e1;
  EAAS_CU(cudaEventCreate(&e0));
  EAAS_CU(cudaEventCreate(&e1));
  const double factor = o.bidir ? 2 : 1;
  for (std::size_t n : o.sizes) {
    const std::uint64_t seed = n * 7 + 1;
    fill_pattern_async(s.src.p, n, seed, s.stream);
    // One phase: the server queues its side, says so, the client (and in bidir the server, on the go
    // signal) streams `count` messages; returns the seconds from the start of the stream to the ack
    // (and in bidir to the server's last message landing here).
    auto run_phase = [&](std::uint64_t count) {
      const std::uint64_t v = ++c.data;
      c.start_phase({o.bidir ? mode_bidir : mode_sink, n, count, 0, scope_block, o.blocks, v, 0});
      k_wait2<<<1, 1, 0, s.stream>>>(ep, s.word(kReadySig), nullptr, v, s.result.p);
      EAAS_CU(cudaEventRecord(e0, s.stream));
      if (o.bidir) k_put_words<<<1, 1, 0, s.stream>>>(ep, peer, kGoSig, nullptr, 0, kGoSig, v, s.result.p);
      const stream_args sa{ep, peer, s.src.p, n, count, v, s.arrivals.p, s.result.p};
      k_stream<<<o.blocks, kBwThreads, 0, s.stream>>>(sa);
      k_wait2<<<1, 1, 0, s.stream>>>(ep, s.word(kAckSig), o.bidir ? s.word(kSig) : nullptr, v, s.result.p);
      EAAS_CU(cudaGetLastError());
      EAAS_CU(cudaEventRecord(e1, s.stream));
      s.check("bandwidth phase");
      float ms = 0;
      EAAS_CU(cudaEventElapsedTime(&ms, e0, e1));
      return static_cast<double>(ms) * 1e-3;
    };
    // Checked: one message lands intact in the peer's ring (and, both ways, the server's here).
    EAAS_CU(cudaMemsetAsync(s.peer_base() + kRecv, 0, n, s.stream));
    run_phase(1);
    unsigned long long wrong = count_wrong(s.peer_base() + kRecv, n, seed, s.stream);
    if (o.bidir) wrong += count_wrong(s.base() + kRecv, n, n * 13 + 5, s.stream);
    const std::size_t count = o.iters ? o.iters : std::clamp<std::size_t>((std::size_t{1} << 30) / n, 8, 1u << 16);
    run_phase(kSlots);  // warm-up lap over the ring
    constexpr int kReps = 5;
    double peak = 0, total = 0;
    for (int r = 0; r < kReps; ++r) {
      const double secs = run_phase(count);
      total += secs;
      peak = std::max(peak, factor * static_cast<double>(n * count) / secs / 1e9);
    }
    const double avg = factor * static_cast<double>(n * count) * kReps / total / 1e9;
    const double rate = factor * static_cast<double>(count) * kReps / total / 1e6;
    double ce = 0;
    if (o.baseline) {
      auto ce_lap = [&](std::size_t k) {
        for (std::size_t m = 0; m < k; ++m)
          EAAS_CU(cudaMemcpyAsync(s.peer_base() + kRecv + (m % kSlots) * stride(n), s.src.p, n,
                                  cudaMemcpyDeviceToDevice, s.stream));
      };
      ce_lap(kSlots);
      EAAS_CU(cudaEventRecord(e0, s.stream));
      for (int r = 0; r < kReps; ++r) ce_lap(count);
      EAAS_CU(cudaEventRecord(e1, s.stream));
      EAAS_CU(cudaEventSynchronize(e1));
      float ms = 0;
      EAAS_CU(cudaEventElapsedTime(&ms, e0, e1));
      ce = static_cast<double>(n * count) * kReps / (static_cast<double>(ms) * 1e-3) / 1e9;
      wrong += count_wrong(s.peer_base() + kRecv + ((count - 1) % kSlots) * stride(n), n, seed, s.stream);
    }
    std::printf("%10zu %12zu %20.2f %23.2f %16.4f %16.2f %9.1f%% %8llu\n", n, count, peak, avg, rate, ce,
                ce > 0 ? 100 * avg / (ce * factor) : 0.0, wrong);
    std::fflush(stdout);
    rows.push_back({{"bytes", n},
                    {"iterations", count},
                    {"bw_peak_gbs", peak},
                    {"bw_avg_gbs", avg},
                    {"msg_rate_mpps", rate},
                    {"copy_engine_gbs", ce},
                    {"wrong", wrong}});
    if (wrong != 0) die("bytes arrived wrong", status::internal_error);
  }
  EAAS_CU(cudaEventDestroy(e0));
  EAAS_CU(cudaEventDestroy(e1));
  c.finish();
  if (!o.json.empty()) {
    nlohmann::json j = {{"tool", "eaas-bw"},     {"transport", "nvlink"}, {"bidir", o.bidir},   {"blocks", o.blocks},
                        {"threads", kBwThreads}, {"date", today_utc()},   {"host", c.header()}, {"rows", rows}};
    std::ofstream f(o.json);
    f << j.dump(2) << "\n";
    if (!f) die("writing " + o.json, status::internal_error);
  }
  return 0;
}

}  // namespace eaas::perf
