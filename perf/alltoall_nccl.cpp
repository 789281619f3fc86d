// The NCCL baseline of eaas-alltoall --transport nvlink. Per round, two grouped send/recv phases with
// the bytes eaas moves: dispatch (sender s -> receiver r: the [count 64][indices][rows] message, the
// rows already packed: NCCL gets contiguous buffers, its packing is not timed) and combine (the
// answers back). Checked like eaas (first and last round, receive buffers cleared before the last),
// timed with cudaEvents per phase and around the queued rounds, which wait behind the same gate.

#include "alltoall_nccl.hpp"

#include <atomic>
#include <cstring>
#include <fstream>
#include <thread>
#include <vector>

#include "alltoall_gpu.hpp"
#include "alltoall_kernels.hpp"
#include "driver.hpp"

namespace eaas::perf::a2a {

namespace {

#define EAAS_A2A_NCCL(x)                                                                                        \
  do {                                                                                                          \
    if (const ncclResult_t a2a_r_ = (x); a2a_r_ != ncclSuccess) {                                               \
      std::fprintf(stderr, "error: %s at %s:%d: %s (%s)\n", #x, __FILE__, __LINE__, ncclGetErrorString(a2a_r_), \
                   ncclGetLastError(nullptr));                                                                  \
      std::exit(2);                                                                                             \
    }                                                                                                           \
  } while (0)

constexpr std::uint32_t kBatch = 32;

void publish_id(const std::string& dir, const ncclUniqueId& id) {
  const std::string tmp = dir + "/.nccl-id.tmp", path = dir + "/nccl-id";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(id.internal, sizeof(id.internal));
    if (!f) die("writing the NCCL unique id", status::internal_error);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) die("publishing the NCCL unique id", status::internal_error);
}

ncclUniqueId await_id(const std::string& dir) {
  const std::string path = dir + "/nccl-id";
  const deadline until = deadline_after(120'000'000'000ull);
  while (now_ns() < until.ns) {
    std::ifstream f(path, std::ios::binary);
    ncclUniqueId id;
    if (f.read(id.internal, sizeof(id.internal))) return id;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  die("waiting for the NCCL unique id", status::timeout);
}

struct dev_bytes {
  unsigned char* p = nullptr;
  explicit dev_bytes(std::size_t n) {
    EAAS_A2A_CUDA(cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(n, 1)));
    EAAS_A2A_CUDA(cudaMemset(p, 0, std::max<std::size_t>(n, 1)));
  }
  dev_bytes(const dev_bytes&) = delete;
  dev_bytes& operator=(const dev_bytes&) = delete;
  ~dev_bytes() { cudaFree(p); }
};

}  // namespace

nccl_baseline::nccl_baseline(const options& o, const plan& p, int device) : o_(o), p_(p), device_(device) {
  ncclUniqueId id;
  if (o.rank == 0) {
    EAAS_A2A_NCCL(ncclGetUniqueId(&id));
    publish_id(o.rendezvous, id);
  } else {
    id = await_id(o.rendezvous);
  }
  EAAS_A2A_CUDA(cudaSetDevice(device));
  EAAS_A2A_NCCL(ncclCommInitRank(&comm_, static_cast<int>(o.senders + o.receivers), id, o.rank));
}

nccl_baseline::~nccl_baseline() {
  if (comm_ != nullptr) ncclCommDestroy(comm_);
}

void nccl_baseline::run(batch_gate& gate, nlohmann::json& out) {
  const options& o = o_;
  const plan& p = p_;
  EAAS_A2A_CUDA(cudaSetDevice(device_));
  const bool sender = o.rank < static_cast<int>(o.senders);
  const std::uint32_t me = sender ? static_cast<std::uint32_t>(o.rank) : o.rank - o.senders;
  const std::uint32_t npeers = sender ? o.receivers : o.senders;
  // Per peer: the dispatch message (sent by a sender, received by a receiver) and the answers (back).
  std::vector<std::vector<std::uint32_t>> toks(npeers);
  std::vector<std::size_t> d_at(npeers), d_len(npeers), c_at(npeers), c_len(npeers);
  std::vector<unsigned char> d_host, c_host;  // what this rank sends: dispatch (sender) or answers (receiver)
  std::size_t d_total = 0, c_total = 0;
  for (std::uint32_t q = 0; q < npeers; ++q) {
    const std::uint32_t s = sender ? me : q, r = sender ? q : me;
    toks[q] = p.tokens_for(s, r);
    d_at[q] = d_total;
    d_len[q] = p.header_bytes() + toks[q].size() * p.row;
    d_total += d_len[q];
    c_at[q] = c_total;
    c_len[q] = toks[q].size() * p.row;
    c_total += c_len[q];
    if (sender) {
      const auto m = dispatch_message(p, s, r);
      d_host.insert(d_host.end(), m.begin(), m.end());
    } else {
      const auto m = combine_message(p, s, r);
      c_host.insert(c_host.end(), m.begin(), m.end());
    }
  }
  dev_bytes dbuf(d_total), cbuf(c_total);
  if (sender)
    EAAS_A2A_CUDA(cudaMemcpy(dbuf.p, d_host.data(), d_total, cudaMemcpyHostToDevice));
  else
    EAAS_A2A_CUDA(cudaMemcpy(cbuf.p, c_host.data(), c_total, cudaMemcpyHostToDevice));
  unsigned char* const received = sender ? cbuf.p : dbuf.p;
  const std::size_t received_bytes = sender ? c_total : d_total;

  cudaStream_t stream;
  EAAS_A2A_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto peer_rank = [&](std::uint32_t q) { return static_cast<int>(sender ? o.senders + q : q); };
  auto dispatch = [&] {
    EAAS_A2A_NCCL(ncclGroupStart());
    for (std::uint32_t q = 0; q < npeers; ++q) {
      if (sender)
        EAAS_A2A_NCCL(ncclSend(dbuf.p + d_at[q], d_len[q], ncclInt8, peer_rank(q), comm_, stream));
      else
        EAAS_A2A_NCCL(ncclRecv(dbuf.p + d_at[q], d_len[q], ncclInt8, peer_rank(q), comm_, stream));
    }
    EAAS_A2A_NCCL(ncclGroupEnd());
  };
  auto combine = [&] {
    EAAS_A2A_NCCL(ncclGroupStart());
    for (std::uint32_t q = 0; q < npeers; ++q) {
      if (c_len[q] == 0) continue;  // both sides know the count: nothing to send, nothing to post
      if (sender)
        EAAS_A2A_NCCL(ncclRecv(cbuf.p + c_at[q], c_len[q], ncclInt8, peer_rank(q), comm_, stream));
      else
        EAAS_A2A_NCCL(ncclSend(cbuf.p + c_at[q], c_len[q], ncclInt8, peer_rank(q), comm_, stream));
    }
    EAAS_A2A_NCCL(ncclGroupEnd());
  };
  std::uint64_t wrong = 0;
  std::vector<unsigned char> back(received_bytes);
  int checks = 0;
  auto checked_round = [&] {
    EAAS_A2A_CUDA(cudaMemset(received, 0, std::max<std::size_t>(received_bytes, 1)));
    rank_barrier(o, "nccl-check-" + std::to_string(checks++));  // nobody sends before everyone cleared
    dispatch();
    combine();
    EAAS_A2A_CUDA(cudaStreamSynchronize(stream));
    EAAS_A2A_CUDA(cudaMemcpy(back.data(), received, received_bytes, cudaMemcpyDeviceToHost));
    for (std::uint32_t q = 0; q < npeers; ++q) {
      if (sender)
        wrong += wrong_in_combine(p, me, q, toks[q], back.data() + c_at[q]);
      else
        wrong += wrong_in_dispatch(p, q, toks[q], back.data() + d_at[q]);
    }
  };

  checked_round();
  for (std::uint32_t k = 0; k < o.warmup; ++k) {
    dispatch();
    combine();
  }
  EAAS_A2A_CUDA(cudaStreamSynchronize(stream));
  std::vector<cudaEvent_t> ev(3 * std::size_t{kBatch});
  for (auto& e : ev) EAAS_A2A_CUDA(cudaEventCreate(&e));
  cudaEvent_t l0, l1;
  EAAS_A2A_CUDA(cudaEventCreate(&l0));
  EAAS_A2A_CUDA(cudaEventCreate(&l1));
  double loop_ms = 0, d_ms = 0, c_ms = 0;
  for (std::uint32_t k0 = 0; k0 < o.iters; k0 += kBatch) {
    const std::uint32_t n = std::min(kBatch, o.iters - k0);
    EAAS_PERF_CHECK(gate.queue(stream));
    EAAS_A2A_CUDA(cudaEventRecord(l0, stream));
    for (std::uint32_t k = 0; k < n; ++k) {
      EAAS_A2A_CUDA(cudaEventRecord(ev[3 * k], stream));
      dispatch();
      EAAS_A2A_CUDA(cudaEventRecord(ev[3 * k + 1], stream));
      combine();
      EAAS_A2A_CUDA(cudaEventRecord(ev[3 * k + 2], stream));
    }
    EAAS_A2A_CUDA(cudaEventRecord(l1, stream));
    gate.release();
    EAAS_A2A_CUDA(cudaStreamSynchronize(stream));
    float ms = 0;
    EAAS_A2A_CUDA(cudaEventElapsedTime(&ms, l0, l1));
    loop_ms += ms;
    for (std::uint32_t k = 0; k < n; ++k) {
      EAAS_A2A_CUDA(cudaEventElapsedTime(&ms, ev[3 * k], ev[3 * k + 1]));
      d_ms += ms;
      EAAS_A2A_CUDA(cudaEventElapsedTime(&ms, ev[3 * k + 1], ev[3 * k + 2]));
      c_ms += ms;
    }
  }
  int f = 0;
  EAAS_A2A_CUDA(cudaMemcpy(&f, gate.args.failure, sizeof(f), cudaMemcpyDeviceToHost));
  if (f != 0) die("the gate before NCCL's timed rounds", static_cast<status>(f));
  checked_round();
  out["nccl_wrong"] = wrong;
  out["nccl_loop_us"] = loop_ms * 1e3 / o.iters;
  out["nccl_dispatch_us"] = d_ms * 1e3 / o.iters;
  out["nccl_combine_us"] = c_ms * 1e3 / o.iters;
  out["nccl_round_us"] = (d_ms + c_ms) * 1e3 / o.iters;
  for (auto& e : ev) EAAS_A2A_CUDA(cudaEventDestroy(e));
  EAAS_A2A_CUDA(cudaEventDestroy(l0));
  EAAS_A2A_CUDA(cudaEventDestroy(l1));
  EAAS_A2A_CUDA(cudaStreamDestroy(stream));
}

}  // namespace eaas::perf::a2a
