// The attention client's forward on its GPU: dense part, dispatch, wait, combine (client_step.hpp).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <cuda/atomic>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "capture_lock.hpp"
#include "client_step.hpp"
#include "combine.cuh"
#include "cuda_fail.cuh"
#include "dense_gpu.hpp"
#include "dense_gpu_detail.cuh"
#include "eaas/device/grid_put.cuh"
#include "eaas/runtime/slot.hpp"
#include "graph_capture.cuh"
#include "pdl.cuh"

namespace eaas::runtime::gpu {

namespace {

constexpr const char* kWho = "gpu client step";
#define EAAS_STEPC_CUDA(x) EAAS_GPU_CUDA(kWho, x)

constexpr int kDispatchThreads = 1024;
constexpr std::uint32_t kRouteUnroll = 8;  // routing entries a dispatch thread looks up at a time
// Threads per packing block: the server's blocks are few (kPackBlocks), so each holds many copies in flight.
constexpr int kPackThreads = 512;
// Blocks per server writing its request into the server's GPU: more writers into one GPU at once slow every
// transfer into it (docs/PERF.md, the all-to-all's combine).
constexpr unsigned kPackBlocks = 32;
constexpr std::uint32_t kPackUnroll = 8;   // 16-byte vectors each packing thread has in flight
constexpr std::uint32_t kEntryUnroll = 4;  // routing entries each packing thread has in flight
constexpr int kCombineThreads = 128;
constexpr std::uint64_t kWaitSliceNs = 1'000'000;  // between checks for a revoked slot
// Device stamps per layer (%globaltimer): the dispatch began, the wait began (the requests are committed), the
// last answer was seen, the combine ended.
enum : std::uint32_t { kStampDispatch = 0, kStampWait = 1, kStampAnswered = 2, kStampDone = 3, kStamps = 4 };

// What the device reads, uploaded before every forward (one copy), in this order, each part 64-byte
// aligned: head, state[cap], server[cap], nrep[experts], route[experts × rcap]; then, at table_layout::bytes,
// the forward's tokens (room for max_tokens).
struct dev_head {
  std::uint32_t servers;  // entries of server[] in use
  std::uint32_t failed;   // 0; 1 once a server failed or a table entry was missing (nothing is sent after)
  std::uint32_t reserved[14];
};
static_assert(std::is_trivially_copyable_v<dev_head> && sizeof(dev_head) == 64);

struct dev_state {
  std::uint64_t seq;       // the last request seq sent (the device counter)
  std::uint32_t fail;      // step_fail
  std::uint32_t layer;     // the layer that failed
  std::uint32_t detail;    // slot_error or status
  std::uint32_t requests;  // sent in this forward
  std::uint32_t direct;    // of those, packed straight into the server's slot (direct_payload)
  std::uint32_t reserved;
};
static_assert(std::is_trivially_copyable_v<dev_state> && sizeof(dev_state) == 32);

struct dev_server {
  device_endpoint ep;
  remote_view slots;
  std::uint64_t slot_offset, sig_offset, slot_bytes, grant;
  unsigned char* result;
  std::uint64_t result_bytes;
  std::uint32_t max_tokens;
  std::uint32_t reserved;
};
static_assert(std::is_trivially_copyable_v<dev_server> && sizeof(dev_server) == 136 && alignof(dev_server) == 8);

struct dev_route {
  std::int32_t server;  // index into server[]
  std::uint32_t local;  // the server's local expert id
};
static_assert(sizeof(dev_route) == 8);

// One server's request in the current layer (device only; rewritten by every layer's dispatch).
struct dev_job {
  std::uint64_t seq;      // 0: no request this layer
  std::uint32_t tokens;   // distinct tokens for it
  int put_result;         // grid_put's result word (0: ok)
  unsigned int arrivals;  // grid_put's arrival counter
  std::uint32_t reserved;
};
static_assert(sizeof(dev_job) == 24);

constexpr std::size_t align64(std::size_t n) { return (n + 63) & ~std::size_t{63}; }

struct table_layout {
  std::size_t state, server, nrep, route, bytes;
};

table_layout table_for(std::uint32_t cap, std::uint32_t rcap, std::uint32_t experts) {
  table_layout t{};
  t.state = align64(sizeof(dev_head));
  t.server = t.state + align64(sizeof(dev_state) * cap);
  t.nrep = t.server + align64(sizeof(dev_server) * cap);
  t.route = t.nrep + align64(sizeof(std::uint32_t) * experts);
  t.bytes = t.route + align64(sizeof(dev_route) * std::size_t{experts} * rcap);
  return t;
}

struct dev_tables {
  dev_head* head;
  dev_state* state;
  const dev_server* server;
  const std::uint32_t* nrep;
  const dev_route* route;
};

__device__ __forceinline__ std::uint32_t load_flag(const std::uint32_t* p) {
  return cuda::atomic_ref<std::uint32_t, cuda::thread_scope_device>(*const_cast<std::uint32_t*>(p))
      .load(cuda::std::memory_order_relaxed);
}
__device__ __forceinline__ void raise_flag(std::uint32_t* p) {
  cuda::atomic_ref<std::uint32_t, cuda::thread_scope_device>(*p).store(1, cuda::std::memory_order_relaxed);
}

__device__ __forceinline__ void fail_server(const dev_tables& tb, std::uint32_t s, step_fail f, std::uint32_t layer,
                                            std::uint32_t detail) {
  dev_state& st = tb.state[s];
  if (st.fail == 0) {  // the first failure is the one reported (one thread per server writes it)
    st.fail = static_cast<std::uint32_t>(f);
    st.layer = layer;
    st.detail = detail;
  }
  raise_flag(&tb.head->failed);
}

// Where server s's request payload (everything after the header) is written: straight into its slot, mapped here
// (peer_pointer, nvlink). Null where that is not so (not nvlink, or the slot's view fails its checks): a request
// can then not be delivered at all (grid_put puts over nvlink only, and its put would fail the same check), and
// k_dispatch reports it undelivered without sending. k_dispatch and k_pack both ask, with the same arguments, so
// they agree.
__device__ __forceinline__ unsigned char* direct_payload(const dev_server& sv, const slot_layout& l) {
  return static_cast<unsigned char*>(peer_pointer(sv.ep, sv.slots, sv.slot_offset, l.end));
}

// Block s, for server s, with block 0 stamping the layer's start: first the layer's routing, each entry (t, k)
// going to replica (t + e) mod nrep[e] of expert e; the block whose server holds that replica records it
// (asg_server, asg_local), and block 0 records an entry with no valid replica (-1, and the forward fails: the
// host checked that every expert has a server, so that is a router bug, not a server's). Then server s's
// tokens in order (row_of[s × T + t]: its row, or -1; tok[s × T + row] = t), whether it gets a request this
// layer, and its seq. Every block reads the whole routing: one kernel instead of an assignment kernel and a
// scan kernel that would meet through a buffer of marks. A request that cannot be packed straight into the
// server's slot is not sent: its put_result says why (k_wait reports it undelivered).
__global__ void __launch_bounds__(kDispatchThreads)
    k_dispatch(dev_tables tb, dev_job* jobs, const std::uint32_t* ids, std::uint32_t tokens, std::uint32_t hidden,
               std::uint32_t topk, std::uint32_t experts, std::uint32_t rcap, std::uint32_t layer,
               std::int32_t* asg_server, std::uint32_t* asg_local, std::int32_t* row_of, std::int32_t* tok,
               std::uint64_t* stamp) {
  pdl_enter();
  const std::uint32_t s = blockIdx.x, servers = tb.head->servers;
  if (s == 0 && threadIdx.x == 0) {
    stamp[kStampDispatch] = eaas::now_ns();
    stamp[kStampAnswered] = 0;  // k_wait's blocks raise it to their answer's time
  }
  // Thread 0's reads for the request's decision (after the scan), issued here so that they travel with the
  // routing's instead of after the scan: this kernel writes none of them before the decision (but block 0's flag
  // for a bad entry, which every block sees itself as `bad`). s is below the table's capacity: in bounds.
  std::uint32_t was_failed = 0, st_fail = 0, max_tokens = 0;
  std::uint64_t st_seq = 0, slot_bytes = 0, result_bytes = 0;
  if (threadIdx.x == 0) {
    was_failed = load_flag(&tb.head->failed);
    st_fail = tb.state[s].fail;
    st_seq = tb.state[s].seq;
    max_tokens = tb.server[s].max_tokens;
    slot_bytes = tb.server[s].slot_bytes;
    result_bytes = tb.server[s].result_bytes;
  }
  if (s >= servers) return;  // block-uniform
  __shared__ std::int32_t s_warp[kDispatchThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  std::int32_t* rows = row_of + std::size_t{s} * tokens;
  std::int32_t* list = tok + std::size_t{s} * tokens;
  std::int32_t carry = 0;
  int bad = 0;  // an entry with no valid replica (every block sees every entry)
  for (std::uint32_t base = 0; base < tokens; base += kDispatchThreads) {
    const std::uint32_t t = base + tid;
    std::int32_t v = 0;
    // The token's entries kRouteUnroll at a time, each step's loads (ids, then replica counts, then routes)
    // issued together: three dependent round trips per step, not per entry.
    for (std::uint32_t k0 = 0; t < tokens && k0 < topk; k0 += kRouteUnroll) {
      std::uint32_t e[kRouteUnroll], n[kRouteUnroll];
      dev_route r[kRouteUnroll];
#pragma unroll
      for (std::uint32_t u = 0; u < kRouteUnroll; ++u) e[u] = k0 + u < topk ? ids[std::size_t{t} * topk + k0 + u] : 0;
#pragma unroll
      for (std::uint32_t u = 0; u < kRouteUnroll; ++u) n[u] = k0 + u < topk && e[u] < experts ? tb.nrep[e[u]] : 0;
#pragma unroll
      for (std::uint32_t u = 0; u < kRouteUnroll; ++u)
        r[u] = n[u] != 0 && n[u] <= rcap ? tb.route[std::size_t{e[u]} * rcap + (t + e[u]) % n[u]] : dev_route{-1, 0};
#pragma unroll
      for (std::uint32_t u = 0; u < kRouteUnroll; ++u) {
        if (k0 + u >= topk) continue;
        const std::size_t i = std::size_t{t} * topk + k0 + u;
        if (r[u].server < 0 || static_cast<std::uint32_t>(r[u].server) >= servers) {
          bad = 1;
          if (s == 0) {
            asg_server[i] = -1;
            raise_flag(&tb.head->failed);
          }
        } else if (static_cast<std::uint32_t>(r[u].server) == s) {
          asg_server[i] = r[u].server;
          asg_local[i] = r[u].local;
          v = 1;
        }
      }
    }
    std::int32_t inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const std::int32_t u = __shfl_up_sync(0xffffffffu, inc, o);
      if (lane >= o) inc += u;
    }
    if (lane == 31) s_warp[warp] = inc;
    __syncthreads();
    std::int32_t before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kDispatchThreads / 32; ++w) {
      before += w < warp ? s_warp[w] : 0;
      total += s_warp[w];
    }
    const std::int32_t row = carry + before + inc - v;
    if (t < tokens) {
      rows[t] = v ? row : -1;
      if (v) list[row] = static_cast<std::int32_t>(t);
    }
    carry += total;
    __syncthreads();  // s_warp is rewritten by the next pass
  }
  // No server gets a request in a layer with a bad entry (as the flag block 0 raises says; this block cannot
  // wait for block 0's store, but it has seen the same entries).
  if (__syncthreads_or(bad) != 0) carry = 0;
  if (tid != 0) return;
  dev_job& j = jobs[s];
  j.seq = 0;
  j.tokens = static_cast<std::uint32_t>(carry);
  j.put_result = 0;
  j.arrivals = 0;
  if (carry == 0) return;       // no request
  if (was_failed != 0) return;  // this forward is recomputed on the host anyway
  if (st_fail != 0) return;
  const dev_server& sv = tb.server[s];
  const auto n = static_cast<std::uint32_t>(carry);
  if (n > max_tokens) {
    fail_server(tb, s, step_fail::overflow, layer, n);
    return;
  }
  const slot_layout l = layout_for(n, hidden, topk, dtype::bf16);
  if (l.end > slot_bytes || kOutputs + std::uint64_t{n} * hidden * 4 > result_bytes) {
    fail_server(tb, s, step_fail::exceeds_slot, layer, n);
    return;
  }
  const std::uint64_t seq = st_seq + 1;
  tb.state[s].seq = seq;
  tb.state[s].requests++;
  if (direct_payload(sv, l) != nullptr)
    tb.state[s].direct++;
  else  // not sent; k_wait reports it (not_delivered)
    j.put_result =
        static_cast<int>(sv.ep.transport != transport_kind::nvlink ? status::unsupported : status::invalid_argument);
  j.seq = seq;
}

// Blocks (s, y): server s's request: the header (block y 0) in its staging buffer, the rows split over the
// blocks (bf16 activations, then the token's k entries: the local id where the entry went to s, else kNoExpert)
// straight into the server's slot over NVLink (direct_payload). The slot's previous request was answered before this
// forward went on, so the server reads nothing there until the request is committed, by the server's last block
// to finish here (grid_put_signal with the header alone as its head).
__global__ void __launch_bounds__(kPackThreads)
    k_pack(dev_tables tb, dev_job* jobs, const std::int32_t* tok, const std::int32_t* asg_server,
           const std::uint32_t* asg_local, const float* weights, const __nv_bfloat16* normed, std::uint32_t tokens,
           std::uint32_t hidden, std::uint32_t topk, std::uint32_t layer, unsigned char* staging,
           std::uint64_t stage_stride) {
  pdl_enter();
  const std::uint32_t s = blockIdx.x;
  // The server count, the job and the server's view read together (one round trip, not three): s is below the
  // table's capacity, so the job and the view are in bounds even for a block past the servers in use.
  const std::uint32_t servers = tb.head->servers;
  dev_job& jb = jobs[s];
  const std::uint64_t seq = jb.seq;
  const int undelivered = jb.put_result;
  const std::uint32_t n = jb.tokens;
  const slot_layout l = layout_for(n, hidden, topk, dtype::bf16);
  unsigned char* const out = direct_payload(tb.server[s], l);  // not null for a request: k_dispatch checked it
  if (s >= servers) return;
  // Uniform over the server's blocks: written by k_dispatch (only the commit below changes put_result, after every
  // block of the server has read it).
  if (seq == 0 || undelivered != 0 || out == nullptr) return;
  unsigned char* st = staging + std::uint64_t{s} * stage_stride;
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    slot_header h{};
    h.magic = kSlotMagic;
    h.version = kSlotVersion;
    h.type = static_cast<std::uint16_t>(dtype::bf16);
    h.seq = seq;
    h.layer = layer;
    h.tokens = n;
    h.hidden = hidden;
    h.topk = topk;
    h.payload_bytes = l.end - sizeof(slot_header);
    h.grant = tb.server[s].grant;
    *reinterpret_cast<slot_header*>(st) = h;
  }
  const unsigned ny = gridDim.y;
  const std::int32_t* list = tok + std::size_t{s} * tokens;
  auto* ids_out = reinterpret_cast<std::uint16_t*>(out + l.expert_ids);
  auto* w_out = reinterpret_cast<float*>(out + l.weights);
  // The rows as one flat range of 16-byte vectors over the server's blocks, kPackUnroll per thread at a time,
  // every load issued before any store: one vector in flight per thread left the copy latency-bound (2 MiB at
  // Qwen3 x 512 tokens from at most 32 blocks; 128 threads per block still took 31 us there, 163 us for the
  // 16 MiB of 4096 tokens: H200 x1, docs/PERF.md session 11).
  const std::uint32_t vecs = hidden / 8;  // 16-byte vectors of bf16 per row (hidden % 8 == 0)
  const std::uint64_t total = std::uint64_t{n} * vecs, stride = std::uint64_t{ny} * blockDim.x;
  auto* act = reinterpret_cast<uint4*>(out + l.activations);
  for (std::uint64_t q0 = std::uint64_t{blockIdx.y} * blockDim.x + threadIdx.x; q0 < total;
       q0 += kPackUnroll * stride) {
    uint4 v[kPackUnroll];
#pragma unroll
    for (std::uint32_t u = 0; u < kPackUnroll; ++u) {
      const std::uint64_t q = q0 + u * stride;
      if (q < total) {
        const auto r = static_cast<std::uint32_t>(q / vecs);
        const auto t = static_cast<std::uint32_t>(list[r]);
        v[u] = reinterpret_cast<const uint4*>(normed + std::size_t{t} * hidden)[q - std::uint64_t{r} * vecs];
      }
    }
#pragma unroll
    for (std::uint32_t u = 0; u < kPackUnroll; ++u) {
      const std::uint64_t q = q0 + u * stride;
      if (q < total) act[q] = v[u];
    }
  }
  // Each row's k entries: the local id where the entry went to s, else kNoExpert; kEntryUnroll per thread at a
  // time, each step's loads (the token, then its entry's server, local id and weight) issued together.
  const std::uint64_t entries = std::uint64_t{n} * topk;
  for (std::uint64_t q0 = std::uint64_t{blockIdx.y} * blockDim.x + threadIdx.x; q0 < entries;
       q0 += kEntryUnroll * stride) {
    std::size_t ent[kEntryUnroll];
#pragma unroll
    for (std::uint32_t u = 0; u < kEntryUnroll; ++u) {
      const std::uint64_t q = q0 + u * stride;
      ent[u] = q < entries ? std::size_t(list[q / topk]) * topk + q % topk : 0;
    }
    std::int32_t srv[kEntryUnroll];
    std::uint32_t loc[kEntryUnroll];
    float wt[kEntryUnroll];
#pragma unroll
    for (std::uint32_t u = 0; u < kEntryUnroll; ++u) {
      if (q0 + u * stride >= entries) continue;
      srv[u] = asg_server[ent[u]];
      loc[u] = asg_local[ent[u]];
      wt[u] = weights[ent[u]];
    }
#pragma unroll
    for (std::uint32_t u = 0; u < kEntryUnroll; ++u) {
      const std::uint64_t q = q0 + u * stride;
      if (q >= entries) continue;
      const bool mine = srv[u] == static_cast<std::int32_t>(s);
      ids_out[q] = mine ? static_cast<std::uint16_t>(loc[u]) : kNoExpert;
      w_out[q] = mine ? wt[u] : 0.0f;
    }
  }
  // The commit: each block's stores, a system-scope fence and its arrival; the last of the server's blocks to
  // arrive writes the header (from staging, where block 0 put it), its commit word last, then the signal
  // (grid_put.cuh).
  const dev_server& sv = tb.server[s];
  const grid_put g{.ep = sv.ep,
                   .dst = sv.slots,
                   .dst_offset = sv.slot_offset,
                   .src = st,
                   .bytes = sizeof(slot_header),
                   .sig = sv.slots,
                   .sig_offset = sv.sig_offset,
                   .value = seq,
                   .arrivals = &jb.arrivals,
                   .result = &jb.put_result,
                   .head = sizeof(slot_header),
                   .commit = slot_commit(seq, sv.grant)};
  grid_put_signal(g, blockIdx.y, ny);
}

// Block s (thread 0): waits for server s's answer (bounded), checks its header. The acquire of the
// wait orders this thread's reads of the header after the server's writes; the combine (a later kernel)
// reads the rows after this kernel ended. It spins: it lets the combine's blocks in only once its answer is
// there (pdl.cuh), so that they are made resident while it checks the header and the kernel drains.
__global__ void k_wait(dev_tables tb, const dev_job* jobs, std::uint32_t layer, std::uint64_t timeout_ns,
                       std::uint64_t* stamp) {
  pdl_wait();
  const std::uint32_t s = blockIdx.x;
  if (s == 0 && threadIdx.x == 0) stamp[kStampWait] = eaas::now_ns();
  if (s >= tb.head->servers || threadIdx.x != 0) return;
  const dev_job j = jobs[s];
  if (j.seq == 0) return;
  const dev_server& sv = tb.server[s];
  if (j.put_result != 0) {
    const auto st = static_cast<status>(j.put_result);
    fail_server(
        tb, s,
        st == status::peer_unreachable || st == status::not_connected ? step_fail::peer_gone : step_fail::not_delivered,
        layer, static_cast<std::uint32_t>(j.put_result));
    return;
  }
  const auto* sig = reinterpret_cast<const std::uint64_t*>(sv.result + kResultSig);
  const auto* welcome_sig = reinterpret_cast<const std::uint64_t*>(sv.result + kWelcomeSig);
  const auto* grant = reinterpret_cast<const std::uint64_t*>(sv.result + kWelcome + offsetof(server_welcome, grant));
  const std::uint64_t start = eaas::now_ns();
  for (;;) {
    const status st = wait_signal(sv.ep, sig, cmp_op::ge, j.seq, timeout{kWaitSliceNs});
    if (st == status::ok) {
      atomicMax(reinterpret_cast<unsigned long long*>(stamp + kStampAnswered),
                static_cast<unsigned long long>(eaas::now_ns()));
      pdl_release();
      break;
    }
    if (st != status::timeout) {
      fail_server(tb, s, st == status::aborted ? step_fail::aborted : step_fail::peer_gone, layer,
                  static_cast<std::uint32_t>(st));
      return;
    }
    if (::eaas::detail::load_relaxed(welcome_sig) == kRevoked || ::eaas::detail::load_relaxed(grant) != sv.grant) {
      fail_server(tb, s, step_fail::revoked, layer, 0);
      return;
    }
    if (eaas::now_ns() - start >= timeout_ns) {
      fail_server(tb, s, step_fail::timeout, layer, 0);
      return;
    }
  }
  const auto* rh = reinterpret_cast<const volatile response_header*>(sv.result + kResponse);
  if (rh->magic != kSlotMagic || rh->version != kSlotVersion || rh->seq != j.seq) {
    fail_server(tb, s, step_fail::bad_answer, layer, 0);
    return;
  }
  if (rh->error != 0) {
    fail_server(tb, s, step_fail::refused, layer, rh->error);
    return;
  }
  if (rh->tokens != j.tokens || rh->type != static_cast<std::uint16_t>(dtype::f32))
    fail_server(tb, s, step_fail::bad_answer, layer, rh->tokens);
}

// Block t: x[t] += Σ over the servers that answered this layer, in table order, of their row for t (summed per
// group of kCombineThreads servers). The last block to finish stamps the layer's end (ticket: a device word, 0
// again after); in the forward's last layer it then writes the forward's summary into the host's mapped pinned
// buffer: the table's head and states (head_bytes from tb.head), then every layer's stamps (stamp_words from
// `stamps`). No copy follows the forward.
__global__ void __launch_bounds__(kCombineThreads)
    k_combine(dev_tables tb, const dev_job* jobs, const std::int32_t* row_of, std::uint32_t tokens,
              std::uint32_t hidden, float* x, unsigned int* ticket, std::uint64_t* stamp, unsigned char* summary,
              std::uint32_t head_bytes, const std::uint64_t* stamps, std::uint32_t stamp_words) {
  __shared__ const float* s_rows[kCombineThreads];
  __shared__ int s_count[kCombineThreads / 32];
  pdl_enter();
  const std::uint32_t t = blockIdx.x, servers = tb.head->servers;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  // A thread per server reads its job, state, row for t and result region together (one round trip, not four in
  // a row); the rows that count are listed in table order, then summed.
  for (std::uint32_t s0 = 0; s0 < servers; s0 += kCombineThreads) {
    const std::uint32_t s = s0 + static_cast<std::uint32_t>(tid);
    const float* row = nullptr;
    if (s < servers) {
      const std::uint64_t seq = jobs[s].seq;
      const std::uint32_t fail = tb.state[s].fail;
      const std::int32_t r = row_of[std::size_t{s} * tokens + t];
      const unsigned char* result = tb.server[s].result;
      if (seq != 0 && fail == 0 && r >= 0)
        row = reinterpret_cast<const float*>(result + kOutputs) + std::size_t(r) * hidden;
    }
    const unsigned listed_here = __ballot_sync(0xffffffffu, row != nullptr);
    if (lane == 0) s_count[warp] = __popc(listed_here);
    __syncthreads();
    int before = 0, listed = 0;
#pragma unroll
    for (int w = 0; w < kCombineThreads / 32; ++w) {
      before += w < warp ? s_count[w] : 0;
      listed += s_count[w];
    }
    if (row != nullptr) s_rows[before + __popc(listed_here & ((1u << lane) - 1))] = row;
    __syncthreads();
    if (listed != 0)  // block-uniform
      add_rows([&](std::uint32_t i) { return s_rows[i]; }, static_cast<std::uint32_t>(listed), hidden,
               x + std::size_t{t} * hidden);
    __syncthreads();  // s_rows and s_count are rewritten by the next group
  }
  __shared__ int s_last;
  if (threadIdx.x == 0) {
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device> done(*ticket);
    s_last = done.fetch_add(1, cuda::std::memory_order_relaxed) + 1 == gridDim.x ? 1 : 0;
    if (s_last != 0) {
      done.store(0, cuda::std::memory_order_relaxed);
      *stamp = eaas::now_ns();
    }
  }
  __syncthreads();
  if (s_last == 0 || summary == nullptr) return;
  // Written by earlier kernels (and this block's thread 0): read from L2.
  const auto* from = reinterpret_cast<const unsigned int*>(tb.head);
  auto* to = reinterpret_cast<unsigned int*>(summary);
  for (std::uint32_t w = threadIdx.x; w < head_bytes / 4; w += blockDim.x) to[w] = __ldcg(from + w);
  auto* to_stamps = reinterpret_cast<unsigned long long*>(summary + head_bytes);
  for (std::uint32_t w = threadIdx.x; w < stamp_words; w += blockDim.x)
    to_stamps[w] = __ldcg(reinterpret_cast<const unsigned long long*>(stamps) + w);
}

class step_impl final : public client_step {
 public:
  explicit step_impl(const client_step_config& c) : cfg_(c) {}
  ~step_impl() override {
    // Every free here, the buffers' too, while no other step object (or client) of this process captures.
    std::lock_guard g(capture_mutex());
    cudaSetDevice(cfg_.device);
    drop_graph();
    if (stream_ != nullptr) {
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
    }
    cudaFreeHost(table_host_);
    cudaFreeHost(summary_host_);
    cudaFreeHost(back_host_);
    dense_.reset();
    for (device_buffer* b : {&table_, &jobs_, &ticket_, &row_of_, &tok_, &staging_, &x_, &normed_, &ids_, &weights_,
                             &asg_server_, &asg_local_, &stamps_})
      release(*b);
  }

  status init() {
    const model_shape& sh = cfg_.shape;
    EAAS_CHECK(check_shape(sh));
    if (cfg_.max_tokens == 0 || cfg_.max_tokens > (1u << 20) || sh.hidden % 8 != 0 ||
        std::uint64_t{cfg_.max_tokens} * sh.topk > (1u << 30))
      return EAAS_GPU_FAIL(status::invalid_argument,
                           "gpu client step: max_tokens must be 1 .. 2^20 (and max_tokens x topk at most 2^30), hidden "
                           "a multiple of 8");
    if (cfg_.weights == nullptr) return EAAS_GPU_FAIL(status::invalid_argument, "gpu client step: no dense weights");
    EAAS_STEPC_CUDA(cudaSetDevice(cfg_.device));
    EAAS_CHECK(dense_gpu::create(cfg_.device, sh, cfg_.dense, *cfg_.weights, cfg_.max_tokens, dense_));
    cfg_.weights = nullptr;  // the caller's, read only here
    EAAS_STEPC_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    pdl_ = cfg_.pdl && pdl_supported(cfg_.device);
    const std::size_t T = cfg_.max_tokens, H = sh.hidden, K = sh.topk, L = sh.layers;
    EAAS_CHECK(x_.alloc(T * H * 4));
    EAAS_CHECK(normed_.alloc(T * H * 2));
    EAAS_CHECK(ids_.alloc(L * T * K * 4));
    EAAS_CHECK(weights_.alloc(L * T * K * 4));
    EAAS_CHECK(asg_server_.alloc(T * K * 4));
    EAAS_CHECK(asg_local_.alloc(T * K * 4));
    EAAS_CHECK(stamps_.alloc(L * kStamps * 8));
    EAAS_CHECK(ticket_.alloc(4));
    if (cfg_.host_output) {  // the hidden states and each layer's routing, read back after every forward
      back_bytes_ = T * H * 4 + 2 * L * T * K * 4;
      EAAS_STEPC_CUDA(cudaMallocHost(&back_host_, back_bytes_));
    }
    stage_stride_ = 256;                       // each server's request header: the commit's source
    EAAS_STEPC_CUDA(cudaDeviceSynchronize());  // the zero fills ran on the legacy stream
    return status::ok;
  }

  std::uint32_t captures() const override { return captures_; }
  std::uint32_t capture_retries() const override { return capture_retries_ + uncaptured_; }
  const float* device_out() const override { return x_.as<float>(); }

  status forward(std::span<const std::uint32_t> tokens, std::span<step_server> servers, step_result& r) override {
    const std::uint64_t called = eaas::now_ns();
    const model_shape& sh = cfg_.shape;
    const auto T = static_cast<std::uint32_t>(tokens.size());
    if (T == 0 || T > cfg_.max_tokens)
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu client step: " + std::to_string(T) + " tokens (1 .. " +
                                                         std::to_string(cfg_.max_tokens) + ")");
    if (servers.empty() || servers.size() > (1u << 16))
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu client step: 1 .. 65536 servers");
    const auto S = static_cast<std::uint32_t>(servers.size());
    // Each expert's hosts, in the order of `servers`.
    hosts_.resize(sh.experts);
    for (auto& h : hosts_) h.clear();  // keeps their capacity: no allocation per forward
    for (std::uint32_t s = 0; s < S; ++s)
      for (const auto& [e, local] : servers[s].experts)
        if (e < sh.experts) hosts_[e].push_back({static_cast<std::int32_t>(s), local});
    std::uint32_t R = 1;
    for (std::uint32_t e = 0; e < sh.experts; ++e) {
      if (hosts_[e].empty())
        return EAAS_GPU_FAIL(status::invalid_argument,
                             "gpu client step: expert " + std::to_string(e) + " has no server");
      R = std::max<std::uint32_t>(R, static_cast<std::uint32_t>(hosts_[e].size()));
    }
    EAAS_STEPC_CUDA(cudaSetDevice(cfg_.device));
    // Both take capture_mutex() when they have work to do; a forward that reuses its buffers and graph takes
    // no lock.
    EAAS_CHECK(fit(S, R));
    // Captured before this forward's copies are queued (capture records only what follows it). A capture that
    // fails even when begun again (spoilt twice by another thread's CUDA call outside capture_mutex(), e.g. a
    // link's IPC mapping) does not fail the forward: its kernels run uncaptured this once, and the next forward
    // captures again (exec_ stays null). A real CUDA failure then shows in the uncaptured launches.
    bool replay = cfg_.graph;
    r.captured = false;
    if (cfg_.graph && (exec_ == nullptr || graph_tokens_ != T)) {
      r.captured = true;
      if (const status st = capture(T); st != status::ok) {
        if (st != status::internal_error) return st;
        replay = false;
        uncaptured_++;
      }
    }
    // The tables, and the tokens after them, through the pinned mirror.
    const table_layout tl = table_for(cap_, rcap_, sh.experts);
    std::memset(table_host_, 0, tl.bytes);
    auto* head = reinterpret_cast<dev_head*>(table_host_);
    head->servers = S;
    auto* state = reinterpret_cast<dev_state*>(table_host_ + tl.state);
    auto* server = reinterpret_cast<dev_server*>(table_host_ + tl.server);
    auto* nrep = reinterpret_cast<std::uint32_t*>(table_host_ + tl.nrep);
    auto* route = reinterpret_cast<dev_route*>(table_host_ + tl.route);
    for (std::uint32_t s = 0; s < S; ++s) {
      const step_server& v = servers[s];
      state[s].seq = v.seq;
      server[s] = dev_server{.ep = v.ep,
                             .slots = v.slots,
                             .slot_offset = v.slot_offset,
                             .sig_offset = v.sig_offset,
                             .slot_bytes = v.slot_bytes,
                             .grant = v.grant,
                             .result = static_cast<unsigned char*>(v.result),
                             .result_bytes = v.result_bytes,
                             .max_tokens = v.max_tokens,
                             .reserved = 0};
    }
    for (std::uint32_t e = 0; e < sh.experts; ++e) {
      nrep[e] = static_cast<std::uint32_t>(hosts_[e].size());
      for (std::size_t k = 0; k < hosts_[e].size(); ++k)
        route[std::size_t{e} * rcap_ + k] = {hosts_[e][k].first, hosts_[e][k].second};
    }
    auto* tok_host = reinterpret_cast<std::uint32_t*>(table_host_ + tl.bytes);
    std::memcpy(tok_host, tokens.data(), std::size_t{T} * 4);
    // One copy: the tokens sit right after the table on the device too.
    EAAS_STEPC_CUDA(
        cudaMemcpyAsync(table_.p, table_host_, tl.bytes + std::size_t{T} * 4, cudaMemcpyHostToDevice, stream_));
    if (replay) {
      EAAS_STEPC_CUDA(cudaGraphLaunch(exec_, stream_));
    } else {
      EAAS_CHECK(enqueue(T));
    }
    const std::uint64_t queued = eaas::now_ns();
    // Back: the head, states and stamps are in summary_host_ once the forward completed (its last kernel wrote
    // them); with host_output the hidden states and routing are copied.
    const std::size_t H = sh.hidden, K = sh.topk, L = sh.layers, TM = cfg_.max_tokens;
    const bool full = cfg_.host_output;
    unsigned char* b = back_host_;
    if (full) {
      EAAS_STEPC_CUDA(cudaMemcpyAsync(b, x_.p, T * H * 4, cudaMemcpyDeviceToHost, stream_));
      for (std::size_t l = 0; l < L; ++l) {
        EAAS_STEPC_CUDA(cudaMemcpyAsync(b + T * H * 4 + l * T * K * 4, ids_.as<char>() + l * TM * K * 4, T * K * 4,
                                        cudaMemcpyDeviceToHost, stream_));
        EAAS_STEPC_CUDA(cudaMemcpyAsync(b + T * H * 4 + (L + l) * T * K * 4, weights_.as<char>() + l * TM * K * 4,
                                        T * K * 4, cudaMemcpyDeviceToHost, stream_));
      }
    }
    const std::uint64_t waiting = eaas::now_ns();
    EAAS_STEPC_CUDA(cudaStreamSynchronize(stream_));
    r.wait_ns = eaas::now_ns() - waiting;

    if (full) {
      r.out.resize(T * H);
      std::memcpy(r.out.data(), b, T * H * 4);
      r.layers.resize(L);
      for (std::size_t l = 0; l < L; ++l) {
        r.layers[l].ids.resize(T * K);
        r.layers[l].weights.resize(T * K);
        std::memcpy(r.layers[l].ids.data(), b + T * H * 4 + l * T * K * 4, T * K * 4);
        std::memcpy(r.layers[l].weights.data(), b + T * H * 4 + (L + l) * T * K * 4, T * K * 4);
      }
    } else {
      r.out.clear();
      r.layers.clear();
    }
    const auto* done_head = reinterpret_cast<const dev_head*>(summary_host_);
    const auto* done_state = reinterpret_cast<const dev_state*>(summary_host_ + tl.state);
    r.layer_ns.resize(L);
    r.phases.resize(L);
    const auto span = [](std::uint64_t from, std::uint64_t to) { return from != 0 && to > from ? to - from : 0; };
    std::uint64_t first = 0, prev_done = 0;
    for (std::size_t l = 0; l < L; ++l) {
      std::uint64_t st[kStamps];
      std::memcpy(st, summary_host_ + tl.server + l * kStamps * 8, sizeof(st));
      r.layer_ns[l] = span(st[kStampDispatch], st[kStampDone]);
      // No answer seen (no request in this layer): the whole layer is sending and combining.
      const std::uint64_t answered = st[kStampAnswered] != 0 ? st[kStampAnswered] : st[kStampWait];
      r.phases[l] = layer_phases{.send_ns = span(st[kStampDispatch], st[kStampWait]),
                                 .round_ns = span(st[kStampWait], answered),
                                 .combine_ns = span(answered, st[kStampDone]),
                                 .dense_ns = span(prev_done, st[kStampDispatch])};
      if (l == 0) first = st[kStampDispatch];
      prev_done = st[kStampDone];
    }
    r.device_ns = span(first, prev_done);
    r.outcomes.resize(S);
    bool any = false;
    for (std::uint32_t s = 0; s < S; ++s) {
      step_outcome& o = r.outcomes[s];
      const dev_state& d = done_state[s];
      o.fail = static_cast<step_fail>(d.fail);
      o.layer = d.layer;
      o.detail = d.detail;
      o.seq = d.seq;
      o.requests = d.requests;
      o.direct_requests = d.direct;
      servers[s].seq = o.seq;
      any = any || o.fail != step_fail::none;
    }
    r.complete = done_head->failed == 0 && !any;
    r.prepare_ns = queued - called;
    r.wall_ns = eaas::now_ns() - called;
    return status::ok;
  }

 private:
  // Buffers for S servers and R replicas per expert; grown (and the graph dropped) when they do not fit.
  status fit(std::uint32_t S, std::uint32_t R) {
    if (S <= cap_ && R <= rcap_) return status::ok;
    // cudaFree and device-wide syncs would invalidate a capture another thread makes (double batching runs
    // two step objects in one process; the client's connector allocates result regions): one at a time.
    std::lock_guard g(capture_mutex());
    drop_graph();
    if (stream_ != nullptr) EAAS_STEPC_CUDA(cudaStreamSynchronize(stream_));  // nothing in flight uses them
    // The new capacities count only once every buffer has them: after a failed allocation the next forward
    // tries again instead of using buffers sized for less (or none).
    const std::uint32_t cap = std::max({S, 2 * cap_, 4u}), rcap = std::max({R, rcap_, 2u});
    cap_ = 0;
    rcap_ = 0;
    const std::size_t T = cfg_.max_tokens;
    const table_layout tl = table_for(cap, rcap, cfg_.shape.experts);
    EAAS_CHECK(realloc(table_, tl.bytes + T * 4));  // the table, then the tokens
    if (table_host_ != nullptr) EAAS_STEPC_CUDA(cudaFreeHost(table_host_));
    table_host_ = nullptr;
    EAAS_STEPC_CUDA(cudaMallocHost(&table_host_, tl.bytes + T * 4));
    if (summary_host_ != nullptr) EAAS_STEPC_CUDA(cudaFreeHost(summary_host_));
    summary_host_ = nullptr;
    const std::size_t summary_bytes = tl.server + std::size_t{cfg_.shape.layers} * kStamps * 8;
    EAAS_STEPC_CUDA(cudaHostAlloc(&summary_host_, summary_bytes, cudaHostAllocMapped));
    std::memset(summary_host_, 0, summary_bytes);
    EAAS_STEPC_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&summary_dev_), summary_host_, 0));
    EAAS_CHECK(realloc(jobs_, sizeof(dev_job) * cap));
    EAAS_CHECK(realloc(row_of_, std::size_t{cap} * T * 4));
    EAAS_CHECK(realloc(tok_, std::size_t{cap} * T * 4));
    EAAS_CHECK(realloc(staging_, std::size_t{cap} * stage_stride_));
    // device_buffer zeroes on the legacy stream, which stream_ (non-blocking) is not ordered after.
    EAAS_STEPC_CUDA(cudaDeviceSynchronize());
    cap_ = cap;
    rcap_ = rcap;
    return status::ok;
  }

  static status realloc(device_buffer& b, std::size_t bytes) {
    EAAS_STEPC_CUDA(release(b));
    return b.alloc(bytes);
  }

  static cudaError_t release(device_buffer& b) {
    const cudaError_t e = b.p != nullptr ? cudaFree(b.p) : cudaSuccess;
    b.p = nullptr;
    b.bytes = 0;
    return e;
  }

  void drop_graph() {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    exec_ = nullptr;
    graph_tokens_ = 0;
  }

  status capture(std::uint32_t T) {
    {
      std::lock_guard g(capture_mutex());  // the old graph's memory is freed (capture_graph takes it again)
      drop_graph();
    }
    const auto one_forward = [this, T] { return enqueue(T); };
    EAAS_CHECK(capture_graph(kWho, stream_, one_forward, exec_, &capture_retries_));  // takes capture_mutex()
    graph_tokens_ = T;
    captures_++;
    return status::ok;
  }

  dev_tables tables() const {
    const table_layout tl = table_for(cap_, rcap_, cfg_.shape.experts);
    auto* base = table_.as<unsigned char>();
    return dev_tables{.head = reinterpret_cast<dev_head*>(base),
                      .state = reinterpret_cast<dev_state*>(base + tl.state),
                      .server = reinterpret_cast<const dev_server*>(base + tl.server),
                      .nrep = reinterpret_cast<const std::uint32_t*>(base + tl.nrep),
                      .route = reinterpret_cast<const dev_route*>(base + tl.route)};
  }

  // The forward of T tokens as work on stream_: no host synchronisation, capturable.
  status enqueue(std::uint32_t T) {
    const model_shape& sh = cfg_.shape;
    const std::uint32_t H = sh.hidden, K = sh.topk;
    const std::size_t TM = cfg_.max_tokens;
    const dev_tables tb = tables();
    auto* x = x_.as<float>();
    auto* normed = normed_.as<__nv_bfloat16>();
    auto* jobs = jobs_.as<dev_job>();
    auto* stamps = stamps_.as<std::uint64_t>();
    const table_layout tl = table_for(cap_, rcap_, sh.experts);
    EAAS_CHECK(
        dense_->embed(reinterpret_cast<const std::uint32_t*>(table_.as<unsigned char>() + tl.bytes), T, x, stream_));
    for (std::uint32_t l = 0; l < sh.layers; ++l) {
      std::uint32_t* ids = ids_.as<std::uint32_t>() + l * TM * K;
      float* w = weights_.as<float>() + l * TM * K;
      EAAS_CHECK(dense_->attention(l, T, x, normed, stream_));
      EAAS_CHECK(dense_->route(l, T, normed, ids, w, stream_));
      // The layer's round as one chain of launches (pdl.cuh).
      const bool p = pdl_;
      auto* asg_server = asg_server_.as<std::int32_t>();
      auto* asg_local = asg_local_.as<std::uint32_t>();
      auto* row_of = row_of_.as<std::int32_t>();
      auto* tok = tok_.as<std::int32_t>();
      auto* staging = staging_.as<unsigned char>();
      EAAS_STEPC_CUDA(launch(stream_, p, k_dispatch, cap_, kDispatchThreads, 0, tb, jobs, ids, T, H, K, sh.experts,
                             rcap_, l, asg_server, asg_local, row_of, tok, stamps + kStamps * l));
      EAAS_STEPC_CUDA(launch(stream_, p, k_pack, dim3(cap_, std::min(kPackBlocks, T)), kPackThreads, 0, tb, jobs, tok,
                             asg_server, asg_local, w, normed, T, H, K, l, staging, stage_stride_));
      EAAS_STEPC_CUDA(
          launch(stream_, p, k_wait, cap_, 32, 0, tb, jobs, l, cfg_.request_timeout_ns, stamps + kStamps * l));
      EAAS_STEPC_CUDA(launch(stream_, p, k_combine, T, kCombineThreads, 0, tb, jobs, row_of, T, H, x,
                             ticket_.as<unsigned int>(), stamps + kStamps * l + kStampDone,
                             l + 1 == sh.layers ? summary_dev_ : nullptr, static_cast<std::uint32_t>(tl.server), stamps,
                             sh.layers * kStamps));
      EAAS_STEPC_CUDA(cudaGetLastError());
    }
    return status::ok;
  }

  client_step_config cfg_;
  std::unique_ptr<dense_gpu> dense_;
  cudaStream_t stream_ = nullptr;
  std::uint32_t cap_ = 0, rcap_ = 0;
  std::uint64_t stage_stride_ = 0;
  bool pdl_ = false;  // cfg_.pdl where the device supports it
  device_buffer table_, jobs_, row_of_, tok_, staging_;
  device_buffer ticket_;  // k_combine's
  device_buffer x_, normed_, ids_, weights_, asg_server_, asg_local_, stamps_;
  unsigned char* table_host_ = nullptr;  // pinned: the table, then the tokens
  // Pinned and mapped: a forward's summary (the table's head and states, then the stamps), written by its last
  // kernel; summary_dev_ is its device address.
  unsigned char* summary_host_ = nullptr;
  unsigned char* summary_dev_ = nullptr;
  unsigned char* back_host_ = nullptr;  // pinned, with host_output: the hidden states and routing read back
  std::size_t back_bytes_ = 0;
  std::vector<std::vector<std::pair<std::int32_t, std::uint32_t>>> hosts_;
  cudaGraphExec_t exec_ = nullptr;
  std::uint32_t graph_tokens_ = 0, captures_ = 0, capture_retries_ = 0, uncaptured_ = 0;
};

}  // namespace

status client_step::create(const client_step_config& cfg, std::unique_ptr<client_step>& out) {
  auto s = std::make_unique<step_impl>(cfg);
  {
    std::lock_guard g(capture_mutex());  // its allocations and syncs: never during another thread's capture
    EAAS_CHECK(s->init());
  }
  out = std::move(s);
  return status::ok;
}

status make_client_step(const client_step_config& cfg, std::unique_ptr<client_step>& out) {
  return client_step::create(cfg, out);
}

}  // namespace eaas::runtime::gpu
