// eaas-alltoall --transport nvlink: the host side of one rank (a process on GPU rank % device count)
// and the launcher's copy-engine floor.
//
// A round is one kernel per rank (alltoall_kernels.cu). Sender: every warp puts its share of rows
// straight from the token buffer to their compacted place at each receiver (plus the header: count and
// indices), the warp completing a receiver's count signals it, and warp 0 then waits for every
// receiver's answers. Receiver: every warp waits for every sender, then puts its share of the answers
// back the same way. Checked rounds (the first and the last) are split on the receiver: a wait-only
// kernel, the host compares the received bytes, then the answering kernel, so no sender can start the
// next round before the check has read this one's rows.
//
// Timing: the stamps each round kernel writes (%globaltimer: start, waits over, last signal) give the
// per-phase numbers with the launch excluded; the timed rounds are queued behind a gate kernel the host
// releases once all are queued, so each round kernel starts as soon as the previous one ends, and
// cudaEvents around them give the loop time (launch gaps on the GPU included).

#include "alltoall_gpu.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "alltoall_kernels.hpp"
#include "driver.hpp"
#if EAAS_A2A_WITH_NCCL
#include "alltoall_nccl.hpp"
#endif

namespace eaas::perf::a2a {

namespace {

constexpr std::uint64_t kSecond = 1'000'000'000ull;
constexpr std::uint32_t kBatch = 32;        // rounds queued behind one gate (well inside the launch queue)
constexpr unsigned kCombineBlocksFew = 16;  // a receiver's combine blocks where 1 or 2 receivers answer
constexpr unsigned kCombineBlocksMany = 8;  // ... where 3 or more do

/// cudaMalloc'd array, freed on scope exit.
template <class T>
struct dev_array {
  T* p = nullptr;
  std::size_t n = 0;
  explicit dev_array(std::size_t count) : n(count) {
    EAAS_A2A_CUDA(cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(count, 1) * sizeof(T)));
    EAAS_A2A_CUDA(cudaMemset(p, 0, std::max<std::size_t>(count, 1) * sizeof(T)));
  }
  dev_array(const dev_array&) = delete;
  dev_array& operator=(const dev_array&) = delete;
  ~dev_array() { cudaFree(p); }
  void upload(const std::vector<T>& v) {
    EAAS_A2A_CUDA(cudaMemcpy(p, v.data(), std::min(v.size(), n) * sizeof(T), cudaMemcpyHostToDevice));
  }
};

// Where the gate words start in a sender's / receiver's region: after the plan's blocks, one word per
// peer (peer q writes word q).
std::size_t gate_base(const plan& p, bool sender) {
  const std::size_t blocks = sender ? p.send_block * p.o.receivers : p.recv_block * p.o.senders;
  return (blocks + 63) / 64 * 64;
}

void connect_nvlink(const options& o, const plan& p, int device, rank_state& st) {
  const bool sender = o.rank < static_cast<int>(o.senders);
  EAAS_PERF_CHECK(context::create({.name = name_of(o, o.rank), .cuda_device = device}, st.ctx));
  const std::size_t gate_words = sender ? o.receivers : o.senders;
  EAAS_PERF_CHECK(
      st.ctx->allocate(gate_base(p, sender) + (gate_words * 8 + 63) / 64 * 64, memory_kind::device, st.mine));
  connect_peers(o, transport_kind::nvlink, st);
}

double avg(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / static_cast<double>(v.size());
}

// One copy of a phase's pattern: `bytes` from `src_gpu` into `dst_gpu`.
struct ce_copy {
  int src_gpu, dst_gpu;
  std::size_t bytes;
};

// Median time of `copies` run at once, each on a stream of its source GPU (the copy engine pushes, as
// the senders' and receivers' stores do), over `reps` runs after 5 untimed ones. All copies wait for
// one event of GPU `home`'s stream, recorded once a host callback has held that stream until everything
// is queued (so they start together; not where a pair lacks peer access, whose copy may block the host
// until done); a second event there follows every copy's end. The cross-GPU event waits add a little to
// both ends: compare with the same call for one copy.
double concurrent_copies_us(int home, const std::vector<ce_copy>& copies, int reps) {
  struct lane {
    void *src = nullptr, *dst = nullptr;
    cudaStream_t stream = nullptr;
    cudaEvent_t done = nullptr;
  };
  std::vector<lane> lanes(copies.size());
  bool hold_ok = true;
  for (std::size_t i = 0; i < copies.size(); ++i) {
    const ce_copy& c = copies[i];
    const std::size_t n = std::max<std::size_t>(c.bytes, 1);
    EAAS_A2A_CUDA(cudaSetDevice(c.dst_gpu));
    EAAS_A2A_CUDA(cudaMalloc(&lanes[i].dst, n));
    EAAS_A2A_CUDA(cudaSetDevice(c.src_gpu));
    EAAS_A2A_CUDA(cudaMalloc(&lanes[i].src, n));
    EAAS_A2A_CUDA(cudaMemset(lanes[i].src, 1, n));
    if (c.src_gpu != c.dst_gpu) {
      int can = 0;
      EAAS_A2A_CUDA(cudaDeviceCanAccessPeer(&can, c.src_gpu, c.dst_gpu));
      if (can) {
        const cudaError_t e = cudaDeviceEnablePeerAccess(c.dst_gpu, 0);
        if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) EAAS_A2A_CUDA(e);
        (void)cudaGetLastError();
      }
      hold_ok = hold_ok && can != 0;
    }
    EAAS_A2A_CUDA(cudaStreamCreateWithFlags(&lanes[i].stream, cudaStreamNonBlocking));
    EAAS_A2A_CUDA(cudaEventCreateWithFlags(&lanes[i].done, cudaEventDisableTiming));
  }
  EAAS_A2A_CUDA(cudaSetDevice(home));
  cudaStream_t hs;
  EAAS_A2A_CUDA(cudaStreamCreateWithFlags(&hs, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  EAAS_A2A_CUDA(cudaEventCreate(&e0));
  EAAS_A2A_CUDA(cudaEventCreate(&e1));
  std::atomic<int> go{0};
  const cudaHostFn_t hold = [](void* f) {
    auto* g = static_cast<std::atomic<int>*>(f);
    while (g->load(std::memory_order_acquire) == 0) {
    }
  };
  std::vector<double> us;
  for (int r = 0; r < reps + 5; ++r) {
    go.store(0, std::memory_order_relaxed);
    EAAS_A2A_CUDA(cudaSetDevice(home));
    if (hold_ok) EAAS_A2A_CUDA(cudaLaunchHostFunc(hs, hold, &go));
    EAAS_A2A_CUDA(cudaEventRecord(e0, hs));
    for (std::size_t i = 0; i < copies.size(); ++i) {
      const ce_copy& c = copies[i];
      EAAS_A2A_CUDA(cudaSetDevice(c.src_gpu));
      EAAS_A2A_CUDA(cudaStreamWaitEvent(lanes[i].stream, e0, 0));
      EAAS_A2A_CUDA(cudaMemcpyPeerAsync(lanes[i].dst, c.dst_gpu, lanes[i].src, c.src_gpu, c.bytes, lanes[i].stream));
      EAAS_A2A_CUDA(cudaEventRecord(lanes[i].done, lanes[i].stream));
    }
    EAAS_A2A_CUDA(cudaSetDevice(home));
    for (auto& l : lanes) EAAS_A2A_CUDA(cudaStreamWaitEvent(hs, l.done, 0));
    EAAS_A2A_CUDA(cudaEventRecord(e1, hs));
    go.store(1, std::memory_order_release);
    EAAS_A2A_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    EAAS_A2A_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 5) us.push_back(double(ms) * 1e3);
  }
  EAAS_A2A_CUDA(cudaStreamSynchronize(hs));
  EAAS_A2A_CUDA(cudaEventDestroy(e0));
  EAAS_A2A_CUDA(cudaEventDestroy(e1));
  EAAS_A2A_CUDA(cudaStreamDestroy(hs));
  for (std::size_t i = 0; i < copies.size(); ++i) {
    EAAS_A2A_CUDA(cudaSetDevice(copies[i].src_gpu));
    EAAS_A2A_CUDA(cudaStreamSynchronize(lanes[i].stream));
    EAAS_A2A_CUDA(cudaEventDestroy(lanes[i].done));
    EAAS_A2A_CUDA(cudaStreamDestroy(lanes[i].stream));
    EAAS_A2A_CUDA(cudaFree(lanes[i].src));
    EAAS_A2A_CUDA(cudaSetDevice(copies[i].dst_gpu));
    EAAS_A2A_CUDA(cudaFree(lanes[i].dst));
  }
  EAAS_A2A_CUDA(cudaSetDevice(home));
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

}  // namespace

bool nccl_built() { return EAAS_A2A_WITH_NCCL != 0; }

void rank_barrier(const options& o, const std::string& tag) {
  EAAS_PERF_CHECK(publish(o.rendezvous, tag + "-" + name_of(o, o.rank), {}));
  for (int i = 0; i < static_cast<int>(o.senders + o.receivers); ++i) {
    std::vector<handle_bytes> none;
    EAAS_PERF_CHECK(await_peer(o.rendezvous, tag + "-" + name_of(o, i), 0, 120 * kSecond, none));
  }
}

void run_rank_nvlink(const options& o, const plan& p, const std::function<void(const nlohmann::json&)>& report) {
  int gpus = 0;
  EAAS_A2A_CUDA(cudaGetDeviceCount(&gpus));
  if (gpus == 0) die("--transport nvlink: no CUDA device", status::unsupported);
  const int device = o.rank % gpus;
  EAAS_A2A_CUDA(cudaSetDevice(device));
  const bool sender = o.rank < static_cast<int>(o.senders);
  const std::uint32_t me = sender ? static_cast<std::uint32_t>(o.rank) : o.rank - o.senders;
  const std::uint32_t npeers = sender ? o.receivers : o.senders;
  // A sender gathers its rows from the token buffer (one row per put); a receiver's answers to a sender are
  // contiguous at both ends, so a put may take several.
  const std::uint32_t group = sender ? 1u : std::max<std::uint32_t>(o.combine_rows, 1u);

  rank_state st;
  connect_nvlink(o, p, device, st);
#if EAAS_A2A_WITH_NCCL
  std::unique_ptr<nccl_baseline> nccl;
  if (o.nccl) nccl = std::make_unique<nccl_baseline>(o, p, device);  // every rank is up: join now
#endif

  // What this rank sends, where it lands, and which tokens each peer exchanges with us.
  std::vector<std::vector<std::uint32_t>> toks(npeers);  // per peer, in the plan's order
  std::vector<unsigned char> src_host, hdr_host;
  std::vector<std::uint64_t> src_offset;
  std::vector<std::size_t> reply_at(npeers, 0);  // receiver: offset of the answers to each sender in src
  if (sender) {
    src_host.resize(std::size_t{o.tokens} * p.row);
    for (std::uint32_t t = 0; t < o.tokens; ++t) fill(src_host.data() + t * p.row, p.row, dkey(me, t));
    hdr_host.assign(npeers * p.header_bytes(), 0);
    for (std::uint32_t r = 0; r < npeers; ++r) {
      toks[r] = p.tokens_for(me, r);
      const auto msg = dispatch_message(p, me, r);
      std::memcpy(hdr_host.data() + r * p.header_bytes(), msg.data(), p.header_bytes());
      src_offset.push_back(0);  // header item
      for (auto t : toks[r]) src_offset.push_back(std::uint64_t{t} * p.row);
    }
  } else {
    for (std::uint32_t s = 0; s < npeers; ++s) {
      toks[s] = p.tokens_for(s, me);
      const auto msg = combine_message(p, s, me);
      reply_at[s] = src_host.size();
      src_host.insert(src_host.end(), msg.begin(), msg.end());
      src_offset.push_back(0);
      for (std::size_t i = 0; i < toks[s].size(); i += group) src_offset.push_back(reply_at[s] + i * p.row);
    }
  }
  const auto items = static_cast<std::uint32_t>(src_offset.size());
  dev_array<unsigned char> src(src_host.size()), hdr(hdr_host.size());
  src.upload(src_host);
  hdr.upload(hdr_host);
  dev_array<std::uint64_t> src_off(items);
  src_off.upload(src_offset);

  std::vector<peer_desc> descs(npeers);
  std::uint32_t first = 0;
  for (std::uint32_t q = 0; q < npeers; ++q) {
    peer_desc& d = descs[q];
    std::memset(&d, 0, sizeof(d));
    d.ep = st.eps[q]->view();
    d.region = st.peers[q]->view();
    if (sender) {  // q is receiver r: our block of its region is [signal][count][indices][rows]
      d.sig_offset = me * p.recv_block;
      d.hdr_offset = d.sig_offset + 64;
      d.rows_offset = d.sig_offset + 128 + p.idx_bytes;
      d.local_sig = reinterpret_cast<const std::uint64_t*>(st.base() + q * p.send_block);
      d.hdr = hdr.p + q * p.header_bytes();
      d.hdr_bytes = static_cast<std::uint32_t>(p.header_bytes());
    } else {  // q is sender s: our block of its region is [signal][rows]
      d.sig_offset = me * p.send_block;
      d.rows_offset = d.sig_offset + 64;
      d.local_sig = reinterpret_cast<const std::uint64_t*>(st.base() + q * p.recv_block);
    }
    d.rows = static_cast<std::uint32_t>(toks[q].size());
    d.first_item = first;
    d.items = 1 + (d.rows + group - 1) / group;
    first += d.items;
  }
  dev_array<peer_desc> peers(npeers);
  peers.upload(descs);
  dev_array<unsigned long long> arrivals(npeers);
  dev_array<int> failure(1);

  int sms = 0;
  EAAS_A2A_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const unsigned warps_per_block = kRoundThreads / 32;
  const unsigned asked = !sender && o.combine_blocks != 0 ? o.combine_blocks : o.blocks;
  unsigned blocks = asked != 0 ? asked
                               : std::clamp<unsigned>((items + warps_per_block - 1) / warps_per_block, 1u,
                                                      static_cast<unsigned>(sms));
  // The combine's writers: every receiver answers each sender at once, and many blocks writing into one GPU
  // together slow the whole pattern down (H200 x4, Qwen3 x 512, 1 x 3: 132 us with one block per 8 rows, 49 us
  // with 8 blocks per receiver, 52 with 12, 59 with 16). So without --blocks / --combine-blocks a receiver uses
  // 16 blocks (one or two receivers) or 8 (three or more); docs/PERF.md has the sweep.
  if (!sender && asked == 0) blocks = std::min(blocks, o.receivers >= 3 ? kCombineBlocksMany : kCombineBlocksFew);

  const std::uint32_t total = o.warmup + o.iters + 2;  // checked, warm-up, timed, checked
  dev_array<unsigned long long> stamps(kRoundStamps * total);
  {
    std::vector<unsigned long long> init(kRoundStamps * total, 0);
    for (std::uint32_t k = 0; k < total; ++k) init[kRoundStamps * k] = ~0ull;
    stamps.upload(init);
  }
  std::uint64_t* flag_host = nullptr;
  std::uint64_t* flag_dev = nullptr;
  EAAS_A2A_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&flag_host), sizeof(std::uint64_t), cudaHostAllocMapped));
  *flag_host = 0;
  EAAS_A2A_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&flag_dev), flag_host, 0));
  batch_gate gate{};
  gate.flag_host = flag_host;
  gate.args.ctx = st.ctx->view();
  gate.args.flag = flag_dev;
  gate.args.peers = peers.p;
  gate.args.my_gate = reinterpret_cast<const std::uint64_t*>(st.base() + gate_base(p, sender));
  gate.args.peer_gate_offset = gate_base(p, !sender) + 8 * std::uint64_t{me};
  gate.args.value = 0;
  gate.args.timeout_ns = o.timeout_ms * 1'000'000ull;
  gate.args.failure = failure.p;
  gate.args.npeers = npeers;
  gate.args.signal_first = sender;
  cudaStream_t stream;
  EAAS_A2A_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t ev0, ev1;
  EAAS_A2A_CUDA(cudaEventCreate(&ev0));
  EAAS_A2A_CUDA(cudaEventCreate(&ev1));

  auto args_for = [&](std::uint32_t k, bool wait_before, bool send, bool wait_after) {
    round_args a{};
    a.peers = peers.p;
    a.src_offset = src_off.p;
    a.src = src.p;
    a.arrivals = arrivals.p;
    a.stamps = stamps.p + kRoundStamps * k;
    a.failure = failure.p;
    a.row = p.row;
    a.seq = k + 1;
    a.timeout_ns = o.timeout_ms * 1'000'000ull;
    a.npeers = npeers;
    a.items = items;
    a.rows_per_item = group;
    a.wait_before = wait_before;
    a.send = send;
    a.wait_after = wait_after;
    return a;
  };
  auto queue_round = [&](std::uint32_t k) {
    EAAS_PERF_CHECK(launch_round(args_for(k, !sender, true, sender), blocks, stream));
  };
  auto settle = [&](const char* what) {
    EAAS_A2A_CUDA(cudaStreamSynchronize(stream));
    int f = 0;
    EAAS_A2A_CUDA(cudaMemcpy(&f, failure.p, sizeof(f), cudaMemcpyDeviceToHost));
    if (f != 0) die(std::string("nvlink ") + what + " (a device op or wait failed)", static_cast<status>(f));
  };

  // The receiver's injected error: one byte of its first answer to sender 0, in the checked rounds.
  const bool inject = o.inject_error && !sender && me == 0 && !toks[0].empty();
  const std::size_t inject_off = inject ? reply_at[0] + toks[0].size() * p.row / 2 : 0;
  unsigned char* inject_at = src.p + inject_off;
  const unsigned char inject_orig = inject ? src_host[inject_off] : 0;

  std::uint64_t wrong = 0;
  std::vector<unsigned char> back(st.mine->size());
  auto checked_round = [&](std::uint32_t k) {
    if (sender) {
      queue_round(k);
      settle("checked round");
      EAAS_A2A_CUDA(cudaMemcpy(back.data(), st.base(), back.size(), cudaMemcpyDeviceToHost));
      for (std::uint32_t r = 0; r < npeers; ++r)
        wrong += wrong_in_combine(p, me, r, toks[r], back.data() + r * p.send_block + 64);
      return;
    }
    EAAS_PERF_CHECK(launch_round(args_for(k, true, false, false), blocks, stream));
    settle("checked round (wait)");
    EAAS_A2A_CUDA(cudaMemcpy(back.data(), st.base(), back.size(), cudaMemcpyDeviceToHost));
    for (std::uint32_t s = 0; s < npeers; ++s)
      wrong += wrong_in_dispatch(p, s, toks[s], back.data() + s * p.recv_block + 64);
    if (inject) EAAS_A2A_CUDA(cudaMemset(inject_at, inject_orig ^ 1, 1));
    EAAS_PERF_CHECK(launch_round(args_for(k, true, true, false), blocks, stream));
    settle("checked round (answers)");
    if (inject) EAAS_A2A_CUDA(cudaMemset(inject_at, inject_orig, 1));
  };

  checked_round(0);
  for (std::uint32_t k = 1; k <= o.warmup; ++k) queue_round(k);
  settle("warm-up");
  double loop_ms = 0;
  for (std::uint32_t k0 = o.warmup + 1; k0 < o.warmup + 1 + o.iters; k0 += kBatch) {
    const std::uint32_t k1 = std::min(k0 + kBatch, o.warmup + 1 + o.iters);
    EAAS_PERF_CHECK(gate.queue(stream));
    EAAS_A2A_CUDA(cudaEventRecord(ev0, stream));
    for (std::uint32_t k = k0; k < k1; ++k) queue_round(k);
    EAAS_A2A_CUDA(cudaEventRecord(ev1, stream));
    gate.release();
    settle("timed rounds");
    float ms = 0;
    EAAS_A2A_CUDA(cudaEventElapsedTime(&ms, ev0, ev1));
    loop_ms += ms;
  }
  // The last round is checked on bytes moved in it: every rank clears what it receives, then all go on.
  if (sender) {
    for (std::uint32_t r = 0; r < npeers; ++r)
      EAAS_A2A_CUDA(cudaMemset(st.base() + r * p.send_block + 64, 0, p.send_block - 64));
  } else {
    for (std::uint32_t s = 0; s < npeers; ++s)
      EAAS_A2A_CUDA(cudaMemset(st.base() + s * p.recv_block + 64, 0, p.recv_block - 64));
  }
  rank_barrier(o, "eaas-last");
  checked_round(total - 1);

  std::vector<unsigned long long> stamp_host(kRoundStamps * total);
  EAAS_A2A_CUDA(
      cudaMemcpy(stamp_host.data(), stamps.p, stamp_host.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  std::vector<double> dispatch, combine, round;
  // The timed rounds' raw stamps go to the launcher, which lines the ranks up on one time axis (the
  // GPUs' %globaltimer of one host are synchronised to its clock by the driver).
  nlohmann::json raw = nlohmann::json::array();
  for (std::uint32_t k = o.warmup + 1; k < o.warmup + 1 + o.iters; ++k) {
    const unsigned long long* st4 = stamp_host.data() + kRoundStamps * k;
    const double t0 = double(st4[0]), t1 = double(st4[1]), t2 = double(st4[2]);
    if (st4[0] == ~0ull || st4[1] == 0 || st4[2] == 0)
      die("round " + std::to_string(k) + " left no timestamps", status::internal_error);
    raw.push_back({st4[0], st4[1], st4[2], st4[3]});
    if (sender) {
      dispatch.push_back((t2 - t0) * 1e-3);
      combine.push_back((t1 - t2) * 1e-3);
      round.push_back((t1 - t0) * 1e-3);
    } else {
      dispatch.push_back((t1 - t0) * 1e-3);  // waiting for every sender's dispatch
      combine.push_back((t2 - t1) * 1e-3);
    }
  }
  nlohmann::json line = {{"rank", o.rank},
                         {"gpu", device},
                         {"blocks", blocks},
                         {"rows_per_put", group},
                         {"dispatch_us", avg(dispatch)},
                         {"combine_us", avg(combine)},
                         {"round_us", avg(round)},
                         {"loop_us", loop_ms * 1e3 / o.iters},
                         {"wrong", wrong},
                         {"nccl", false},
                         {"stamps", std::move(raw)}};
#if EAAS_A2A_WITH_NCCL
  if (nccl) {
    line["nccl"] = true;
    nccl->run(gate, line);
  }
#endif
  report(line);
  EAAS_A2A_CUDA(cudaEventDestroy(ev0));
  EAAS_A2A_CUDA(cudaEventDestroy(ev1));
  EAAS_A2A_CUDA(cudaStreamDestroy(stream));
  EAAS_A2A_CUDA(cudaFreeHost(flag_host));
}

nlohmann::json copy_engine_floor(const options& o, const plan& p) {
  int gpus = 0;
  EAAS_A2A_CUDA(cudaGetDeviceCount(&gpus));
  if (gpus == 0) die("--transport nvlink: no CUDA device", status::unsupported);
  // Bytes each GPU sends and receives per phase (one rank per GPU): the busiest one bounds the phase.
  std::vector<std::size_t> d_out(o.senders, 0), d_in(o.receivers, 0), c_out(o.receivers, 0), c_in(o.senders, 0);
  for (std::uint32_t s = 0; s < o.senders; ++s)
    for (std::uint32_t r = 0; r < o.receivers; ++r) {
      const std::size_t rows = p.tokens_for(s, r).size() * p.row;
      d_out[s] += p.header_bytes() + rows;
      d_in[r] += p.header_bytes() + rows;
      c_out[r] += rows;
      c_in[s] += rows;
    }
  const std::size_t dispatch_bytes =
      std::max(*std::max_element(d_out.begin(), d_out.end()), *std::max_element(d_in.begin(), d_in.end()));
  const std::size_t combine_bytes =
      std::max(*std::max_element(c_out.begin(), c_out.end()), *std::max_element(c_in.begin(), c_in.end()));
  const int src_gpu = 0, dst_gpu = static_cast<int>(o.senders % static_cast<std::uint32_t>(gpus));
  const std::size_t n = std::max<std::size_t>(std::max(dispatch_bytes, combine_bytes), 1);
  EAAS_A2A_CUDA(cudaSetDevice(dst_gpu));
  void* dst = nullptr;
  EAAS_A2A_CUDA(cudaMalloc(&dst, n));
  EAAS_A2A_CUDA(cudaSetDevice(src_gpu));
  void* src = nullptr;
  EAAS_A2A_CUDA(cudaMalloc(&src, n));
  EAAS_A2A_CUDA(cudaMemset(src, 1, n));
  if (src_gpu != dst_gpu) {
    int can = 0;
    EAAS_A2A_CUDA(cudaDeviceCanAccessPeer(&can, src_gpu, dst_gpu));
    if (can) {
      const cudaError_t e = cudaDeviceEnablePeerAccess(dst_gpu, 0);
      if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) EAAS_A2A_CUDA(e);
      (void)cudaGetLastError();
    }
  }
  cudaStream_t stream;
  EAAS_A2A_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  EAAS_A2A_CUDA(cudaEventCreate(&e0));
  EAAS_A2A_CUDA(cudaEventCreate(&e1));
  constexpr int kReps = 50;
  auto median_us = [&](std::size_t bytes) {
    std::vector<double> us;
    for (int i = 0; i < kReps + 5; ++i) {
      EAAS_A2A_CUDA(cudaEventRecord(e0, stream));
      EAAS_A2A_CUDA(cudaMemcpyPeerAsync(dst, dst_gpu, src, src_gpu, bytes, stream));
      EAAS_A2A_CUDA(cudaEventRecord(e1, stream));
      EAAS_A2A_CUDA(cudaEventSynchronize(e1));
      float ms = 0;
      EAAS_A2A_CUDA(cudaEventElapsedTime(&ms, e0, e1));
      if (i >= 5) us.push_back(double(ms) * 1e3);
    }
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
  };
  const double d_us = median_us(dispatch_bytes), c_us = median_us(combine_bytes);
  cudaDeviceProp prop{};
  EAAS_A2A_CUDA(cudaGetDeviceProperties(&prop, src_gpu));
  EAAS_A2A_CUDA(cudaEventDestroy(e0));
  EAAS_A2A_CUDA(cudaEventDestroy(e1));
  EAAS_A2A_CUDA(cudaStreamDestroy(stream));
  EAAS_A2A_CUDA(cudaFree(src));
  EAAS_A2A_CUDA(cudaSetDevice(dst_gpu));
  EAAS_A2A_CUDA(cudaFree(dst));
  // Each phase's whole pattern at once on the copy engines (every sender -> receiver copy of the dispatch,
  // then every receiver -> sender copy of the combine; rank i on GPU i % gpus), next to one copy of the
  // busiest GPU's bytes through the same event chain: whether the pattern itself (a fan-out, an incast
  // into one GPU) costs more than its busiest GPU's bytes do. Reported beside the floor, not in it.
  std::vector<ce_copy> dispatch_all, combine_all;
  for (std::uint32_t s = 0; s < o.senders; ++s)
    for (std::uint32_t r = 0; r < o.receivers; ++r) {
      const int sg = static_cast<int>(s % static_cast<std::uint32_t>(gpus));
      const int rg = static_cast<int>((o.senders + r) % static_cast<std::uint32_t>(gpus));
      const std::size_t rows = p.tokens_for(s, r).size() * p.row;
      dispatch_all.push_back({sg, rg, p.header_bytes() + rows});
      if (rows != 0) combine_all.push_back({rg, sg, rows});
    }
  const double d_all_us = concurrent_copies_us(src_gpu, dispatch_all, kReps);
  const double c_all_us = combine_all.empty() ? 0 : concurrent_copies_us(src_gpu, combine_all, kReps);
  const double d_one_us = concurrent_copies_us(src_gpu, {{src_gpu, dst_gpu, dispatch_bytes}}, kReps);
  const double c_one_us = concurrent_copies_us(src_gpu, {{dst_gpu, src_gpu, combine_bytes}}, kReps);
  return {{"floor_us", d_us + c_us},
          {"pattern",
           {{"dispatch_all_us", d_all_us},
            {"combine_all_us", c_all_us},
            {"dispatch_one_us", d_one_us},
            {"combine_one_us", c_one_us},
            {"dispatch_copies", dispatch_all.size()},
            {"combine_copies", combine_all.size()}}},
          {"dispatch_bytes", dispatch_bytes},
          {"combine_bytes", combine_bytes},
          {"dispatch_us", d_us},
          {"combine_us", c_us},
          {"copy_engine_gbs", double(dispatch_bytes + combine_bytes) / ((d_us + c_us) * 1e-6) / 1e9},
          {"src_gpu", src_gpu},
          {"dst_gpu", dst_gpu},
          {"reps", kReps},
          {"gpus", gpus},
          {"gpu_name", std::string(prop.name)}};
}

}  // namespace eaas::perf::a2a
