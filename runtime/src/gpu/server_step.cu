// The expert server's poll round on its GPU: poll, validate, regroup, compute, answer (server_step.hpp).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <cuda/atomic>
#include <string>
#include <vector>

#include "cuda_fail.cuh"
#include "eaas/device/grid_put.cuh"
#include "eaas/runtime/grouped_gemm.hpp"
#include "graph_capture.cuh"
#include "pdl.cuh"
#include "server_step.hpp"

namespace eaas::runtime::gpu {
namespace {

constexpr const char* kWho = "gpu server step";
#define EAAS_SSTEP_CUDA(x) EAAS_GPU_CUDA(kWho, x)

constexpr int kFrontThreads = 512;
// At most: the slots are walked with the grid's stride (a block's share is at most kFrontThreads slots: max_clients
// is at most 4096). All of them must be resident at once (the gate): a few SMs hold them.
constexpr unsigned kFrontBlocks = 32;
constexpr std::uint32_t kHistExperts = 2048;  // local experts counted in shared memory first (more: global atomics)
constexpr int kPlaceThreads = 128;
constexpr unsigned kPlaceWarps = kPlaceThreads / 32;
constexpr unsigned kPlaceBlocks = 2048;   // a warp per pair, walked with a stride: empty rounds cost one wave
constexpr std::uint32_t kCopyUnroll = 8;  // loads a thread has in flight in a copy (all issued before any store)
constexpr int kCombineThreads = 256;
constexpr unsigned kCombineBlocks = 1024;
constexpr int kPutThreads = 256;

// The round's words for syncing blocks of one kernel (each 0 between rounds: its last user resets it).
enum : std::uint32_t {
  kGate = 0,         // the front's block 0 sets it once the poll has ended; the others wait for it
  kFrontTicket = 1,  // the front's blocks done with their slots; the last one scans
  kBackTicket = 2,   // the blocks done with the combine (direct answers) or the answers; the last one summarises
  kSyncWords = 4
};

// The answer's layout: the staging copy of a slot's answer is the result region from kResponse on.
static_assert(kResponse + sizeof(response_header) == kOutputs);

constexpr std::size_t align64(std::size_t n) { return (n + 63) & ~std::size_t{63}; }

// What every kernel of a round reads (by value; the pointers are fixed for the object's life).
struct round_args {
  const unsigned char* slots;  // the slots region: signal words at i * 64, slot i at slots_base + i * slot_stride
  std::uint64_t slots_base, slot_stride;
  const server_slot_config* cfg;  // [clients]
  server_slot_state* st;          // [clients]: the slots' state, kept across rounds (the summary copies it out)
  server_round_head* head;
  std::uint32_t* pairs;       // [local]
  std::uint32_t head_words;   // the words of head and pairs (zeroed by the poll)
  slot_header* hdr;           // [clients]: private copies of the served requests' headers
  std::uint16_t* ids;         // [clients × max_tokens × topk]: private copies of the routing
  float* wts;                 // same
  std::int32_t* rank;         // same: each entry's rank in its group (-1: none)
  std::int32_t* counts;       // [groups]
  std::int32_t* offsets;      // [groups + 1]
  std::uint32_t* layer_live;  // [layers]: nonzero where a request was served (without shrinking)
  std::uint32_t* tok_base;    // [clients]: the served requests' first token in the round
  std::uint32_t* tok_slot;    // [clients × max_tokens]: each token's slot
  std::int32_t* tok_rows;     // [clients × max_tokens × topk]: each (token, k)'s row (-1: none)
  std::int32_t* pad_row;      // [groups]: without shrinking, each group's padding row (-1: none)
  float* row_weight;          // [max_rows]
  __nv_bfloat16* x;           // [max_rows × hidden]
  const float* y;             // [max_rows × hidden]
  unsigned char* staging;     // [clients × stage_stride]: each slot's answer (response header, outputs)
  std::uint64_t stage_stride;
  // [clients]: where a served request's outputs go straight into the client's result region (peer_pointer at
  // kOutputs, nvlink; with direct_answers only), or 0: into staging, and the answer's put copies them.
  unsigned long long* direct;
  unsigned int* arrivals;  // [clients]
  unsigned int* sync;      // [kSyncWords]
  std::uint32_t clients, max_tokens, hidden, topk, layers, local, groups, max_rows;
  std::uint32_t pad;  // 1: no kernel shrinking (the ablation): a served layer's empty groups get a padding row
  std::uint64_t poll_ns;
  std::uint64_t batch_window_ns;
  std::uint32_t direct_answers;  // server_step_config::direct_answers
  std::uint32_t* round_no;  // rounds that served a request so far (the scan counts them); this one is *round_no + 1
  // The round's summary goes straight to the host: head and pairs (head_words words), then the slots' states,
  // into the pinned buffer of this launch's parity (launches so far, *launch_no, the host's count too).
  unsigned char* summary[2];
  std::uint32_t* launch_no;
};

__device__ __forceinline__ std::uint64_t sig_word(const round_args& a, std::uint32_t i) {
  auto* w = reinterpret_cast<std::uint64_t*>(const_cast<unsigned char*>(a.slots) + std::uint64_t{i} * 64);
  return cuda::atomic_ref<std::uint64_t, cuda::thread_scope_system>(*w).load(cuda::std::memory_order_acquire);
}

__device__ __forceinline__ const unsigned char* slot_at(const round_args& a, std::uint32_t i) {
  return a.slots + a.slots_base + std::uint64_t{i} * a.slot_stride;
}

__device__ __forceinline__ cuda::atomic_ref<unsigned int, cuda::thread_scope_device> sync_word(const round_args& a,
                                                                                               std::uint32_t w) {
  return cuda::atomic_ref<unsigned int, cuda::thread_scope_device>(a.sync[w]);
}

// Thread 0's arrival at `ticket` after the block's writes (a fence of `scope`, then an acq_rel add); true, for
// every thread of the block, in the last of `blocks` blocks to arrive, which then sees every block's writes.
// Every thread calls it.
template <cuda::thread_scope Scope>
__device__ bool last_to_arrive(const round_args& a, std::uint32_t ticket, unsigned blocks) {
  __shared__ int s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    cuda::atomic_thread_fence(cuda::std::memory_order_release, Scope);
    s_last = sync_word(a, ticket).fetch_add(1, cuda::std::memory_order_acq_rel) + 1 == blocks ? 1 : 0;
  }
  __syncthreads();
  return s_last != 0;
}

// Exclusive scan of `v` over the block (blockDim.x a multiple of 32); `total` gets the block's sum.
// Every thread calls it; s_warp holds 32 entries.
__device__ std::int32_t block_scan(std::int32_t v, std::int32_t* s_warp, std::int32_t& total) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  std::int32_t inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const std::int32_t u = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += u;
  }
  if (lane == 31) s_warp[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    std::int32_t w = lane < nwarps ? s_warp[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const std::int32_t u = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += u;
    }
    if (lane < nwarps) s_warp[lane] = w;
  }
  __syncthreads();
  const std::int32_t before = warp > 0 ? s_warp[warp - 1] : 0;
  total = s_warp[nwarps - 1];
  __syncthreads();  // s_warp is rewritten by the next call
  return before + inc - v;
}

// A slot whose word holds a request not taken yet (differs from last_sig and from ignored_sig).
__device__ __forceinline__ bool has_request(const round_args& a, std::uint32_t i) {
  const std::uint64_t v = sig_word(a, i);
  return v != a.st[i].last_sig && v != a.st[i].ignored_sig;
}

// Block 0 of the front. First it zeroes the round's head, pair counts and group counts (and the served-layer
// flags without shrinking), which the round before has written out in its summary. Then it waits until a used
// slot's word differs from its last_sig (and from its ignored_sig), or poll_ns passed; then, with a batch
// window, until every used slot served in the last two rounds that served anything has a request too, or the
// window (from the first request seen) passed. (A request that lands after the deadline and before its slot is
// validated is still served, without the window: it only loses batching for that round.) Every thread calls
// it; every return is block-uniform.
__device__ void poll(const round_args& a, std::uint64_t& s_until) {
  for (std::uint32_t w = threadIdx.x; w < a.head_words; w += blockDim.x)
    reinterpret_cast<std::uint32_t*>(a.head)[w] = 0;
  for (std::uint32_t g = threadIdx.x; g < a.groups; g += blockDim.x) a.counts[g] = 0;
  if (a.pad != 0)
    for (std::uint32_t l = threadIdx.x; l < a.layers; l += blockDim.x) a.layer_live[l] = 0;
  __syncthreads();
  if (threadIdx.x == 0) {
    const std::uint64_t t = eaas::now_ns();
    a.head->stamp_poll = t;
    s_until = t + a.poll_ns;
  }
  __syncthreads();
  const std::uint64_t until = s_until;
  const std::uint32_t round = *a.round_no + 1;  // this round's number, if it serves anything
  // A used slot served in one of the last two rounds that served anything: the batch window waits for it.
  const auto recent = [&](std::uint32_t i) {
    const std::uint32_t served = a.st[i].served_round;
    return a.cfg[i].used != 0 && served != 0 && round - served <= 2;
  };
  bool missing = false;
  for (;;) {
    int found = 0, absent = 0;
    // A word still holding a value no new request explained (a foreign write already ignored) does not
    // end the wait (it would end every round's at once); the validation still looks at it, so an owner's
    // request that happens to carry the same value waits for the deadline at most. The same pass sees
    // whether the window would wait for anyone.
    for (std::uint32_t i = threadIdx.x; i < a.clients; i += blockDim.x) {
      const bool has = a.cfg[i].used != 0 && has_request(a, i);
      if (has) found = 1;
      if (!has && a.batch_window_ns != 0 && recent(i)) absent = 1;
    }
    const int expired = threadIdx.x == 0 && eaas::now_ns() >= until ? 1 : 0;
    if (__syncthreads_or(found) != 0) {
      missing = __syncthreads_or(absent) != 0;
      break;
    }
    if (__syncthreads_or(expired) != 0) return;
    __nanosleep(100);
  }
  if (threadIdx.x == 0) {
    const std::uint64_t t = eaas::now_ns();
    a.head->stamp_seen = t;
    s_until = t + a.batch_window_ns;
  }
  __syncthreads();
  if (a.batch_window_ns == 0 || !missing) return;  // block-uniform; nobody to wait for: window_ns stays 0
  const std::uint64_t seen = s_until - a.batch_window_ns, window_end = s_until;
  for (;;) {
    int waiting = 0;
    for (std::uint32_t i = threadIdx.x; i < a.clients; i += blockDim.x)
      if (recent(i) && !has_request(a, i)) waiting = 1;
    const int expired = threadIdx.x == 0 && eaas::now_ns() >= window_end ? 1 : 0;
    const int done = __syncthreads_or(waiting) == 0 ? 1 : 0;
    if (done != 0 || __syncthreads_or(expired) != 0) {
      if (threadIdx.x == 0) {
        const std::uint64_t waited = eaas::now_ns() - seen;
        a.head->window_ns = waited > 0xFFFFFFFFull ? 0xFFFFFFFFu : static_cast<std::uint32_t>(waited);
      }
      return;
    }
    __nanosleep(100);
  }
}

struct front_smem {
  slot_header h;
  slot_limits lim;
  std::uint64_t until;
  std::uint32_t go, bad, n;
  std::uint32_t list[kFrontThreads];  // the block's slots with a new word
  std::int32_t warp[32];
  std::int32_t hist[kHistExperts];  // per local expert: entries of the slot's request, then their group's base
};

// Slot i's new request, if any, read and checked as the host path's read_request does, then counted: its
// (layer, local expert) groups' rows, each entry's rank in its group. The whole block calls it.
__device__ void take_slot(const round_args& a, std::uint32_t i, front_smem& s) {
  server_slot_state& st = a.st[i];
  const bool hist = a.local <= kHistExperts;
  if (threadIdx.x == 0) {
    s.go = 0;
    s.bad = 0xFFFFFFFFu;
    st.verdict = static_cast<std::uint32_t>(slot_verdict::none);
    st.error = 0;
    st.tokens = 0;
    st.put_result = 0;
    st.direct = 0;
    const server_slot_config& c = a.cfg[i];
    // The config's flag and the cursor are read before the word (plain loads, then the acquire): the three
    // travel together, not one after the other. The word is in the server's own slots region, used or not.
    const bool used = c.used != 0;
    const std::uint64_t last = st.last_sig;
    const std::uint64_t word = sig_word(a, i);
    const std::uint64_t v = used ? word : last;
    if (v != last) {
      // The commit word with acquire (slot.hpp), then a private copy, each word read once (the peer may be
      // writing the slot again): a committed request's header, routing and rows (read by this block after
      // the barrier below, and by later kernels) are then all the owner wrote before its commit.
      const auto* src = reinterpret_cast<const unsigned long long*>(slot_at(a, i));
      auto* commit_word =
          reinterpret_cast<std::uint64_t*>(const_cast<unsigned char*>(slot_at(a, i)) + offsetof(slot_header, commit));
      const std::uint64_t committed = cuda::atomic_ref<std::uint64_t, cuda::thread_scope_system>(*commit_word)
                                          .load(cuda::std::memory_order_acquire);
      unsigned long long w[sizeof(slot_header) / 8];
#pragma unroll
      for (std::size_t k = 0; k < sizeof(slot_header) / 8; ++k) w[k] = __ldcg(src + k);
      slot_header h;
      memcpy(&h, w, sizeof(h));
      slot_cursor cur{last, st.expected, st.ignored_sig};
      const slot_look look = look_at_slot(cur, v, committed, h, c.grant);
      st.last_sig = cur.last_sig;
      st.ignored_sig = cur.ignored_sig;
      // A former holder's write: not consumed, never answered (the host counts it).
      if (look == slot_look::foreign) st.verdict = static_cast<std::uint32_t>(slot_verdict::ignored);
      if (look == slot_look::take) {
        const slot_limits lim{.slot_bytes = a.slot_stride,
                              .hidden = a.hidden,
                              .layers = a.layers,
                              .max_tokens = c.max_tokens < a.max_tokens ? c.max_tokens : a.max_tokens,
                              .max_topk = a.topk,
                              .local_experts = a.local,
                              .expected_seq = st.expected};
        const slot_error err = validate_request(h, lim);
        if (h.seq == st.expected) st.expected++;  // consumed, answered or refused
        st.seq = h.seq;
        if (err != slot_error::none) {
          st.verdict = static_cast<std::uint32_t>(slot_verdict::refused);
          st.error = static_cast<std::uint32_t>(err);
        } else {
          s.go = 1;
        }
        s.h = h;
        s.lim = lim;
      }
    }
  }
  if (hist)
    for (std::uint32_t e = threadIdx.x; e < a.local; e += blockDim.x) s.hist[e] = 0;
  __syncthreads();
  if (s.go != 0) {  // block-uniform
    const slot_header h = s.h;
    const slot_limits lim = s.lim;
    // Checked above: tokens <= max_tokens, topk <= this->topk, the layout inside the slot.
    const slot_layout l = layout_for(h.tokens, h.hidden, h.topk, static_cast<dtype>(h.type));
    const std::uint32_t n = h.tokens * h.topk;
    const std::size_t base = std::size_t{i} * a.max_tokens * a.topk;
    std::uint16_t* ids = a.ids + base;
    float* wts = a.wts + base;
    std::int32_t* rank = a.rank + base;
    const auto* id_src = reinterpret_cast<const unsigned short*>(slot_at(a, i) + l.expert_ids);
    const auto* w_src = reinterpret_cast<const float*>(slot_at(a, i) + l.weights);
    // The routing copied, kCopyUnroll entries per thread at a time (the slot's words are an HBM round trip
    // away); with the shared histogram, each entry's rank among the slot's entries of its expert, counted as
    // it is copied (a request refused below leaves ranks nothing reads).
    for (std::uint32_t j0 = threadIdx.x; j0 < n; j0 += kCopyUnroll * blockDim.x) {
      std::uint16_t idv[kCopyUnroll];
      float wv[kCopyUnroll];
#pragma unroll
      for (std::uint32_t u = 0; u < kCopyUnroll; ++u) {
        const std::uint32_t j = j0 + u * blockDim.x;
        if (j < n) {
          idv[u] = __ldcg(id_src + j);
          wv[u] = __ldcg(w_src + j);
        }
      }
#pragma unroll
      for (std::uint32_t u = 0; u < kCopyUnroll; ++u) {
        const std::uint32_t j = j0 + u * blockDim.x;
        if (j < n) {
          ids[j] = idv[u];
          wts[j] = wv[u];
          if (hist) rank[j] = idv[u] < a.local ? atomicAdd(&s.hist[idv[u]], 1) : -1;
        }
      }
    }
    __syncthreads();
    // validate_routing token by token (one token's entries are its own); the host's sequential check
    // reports the first failing token's first error, so the lowest failing token wins here.
    slot_header one = h;
    one.tokens = 1;
    for (std::uint32_t t = threadIdx.x; t < h.tokens; t += blockDim.x)
      if (validate_routing(one, lim, ids + std::size_t{t} * h.topk, wts + std::size_t{t} * h.topk) != slot_error::none)
        atomicMin(&s.bad, t);
    __syncthreads();
    if (s.bad == 0xFFFFFFFFu) {  // block-uniform: served; its rows counted into the round's groups
      std::int32_t* counts = a.counts + std::size_t{h.layer} * a.local;
      if (hist) {
        for (std::uint32_t e = threadIdx.x; e < a.local; e += blockDim.x) {
          const std::int32_t c = s.hist[e];
          if (c == 0) continue;
          s.hist[e] = atomicAdd(counts + e, c);
          atomicAdd(a.pairs + e, static_cast<std::uint32_t>(c));
        }
        __syncthreads();
        for (std::uint32_t j = threadIdx.x; j < n; j += blockDim.x) {
          const std::int32_t r = rank[j];
          if (r >= 0) rank[j] = r + s.hist[ids[j]];
        }
      } else {
        for (std::uint32_t j = threadIdx.x; j < n; j += blockDim.x) {
          const std::uint32_t e = ids[j];
          if (e >= a.local) {  // kNoExpert (validate_routing let nothing else through)
            rank[j] = -1;
            continue;
          }
          rank[j] = atomicAdd(counts + e, 1);
          atomicAdd(a.pairs + e, 1u);
        }
      }
      if (a.pad != 0 && threadIdx.x == 0) a.layer_live[h.layer] = 1;
    }
    if (threadIdx.x == 0) {
      if (s.bad != 0xFFFFFFFFu) {
        const std::size_t t = s.bad;
        st.verdict = static_cast<std::uint32_t>(slot_verdict::refused);
        st.error = static_cast<std::uint32_t>(validate_routing(one, lim, ids + t * h.topk, wts + t * h.topk));
      } else {
        st.verdict = static_cast<std::uint32_t>(slot_verdict::served);
        st.served_round = *a.round_no + 1;  // this round's number (the scan counts it: it serves a request)
        st.tokens = h.tokens;
        st.layer = h.layer;
        a.hdr[i] = h;
      }
    }
  }
  if (threadIdx.x == 0) {
    const auto verdict = static_cast<slot_verdict>(st.verdict);
    if (verdict == slot_verdict::served || verdict == slot_verdict::refused) {
      a.direct[i] = 0;
      if (verdict == slot_verdict::served && a.direct_answers != 0)
        a.direct[i] = reinterpret_cast<unsigned long long>(
            peer_pointer(a.cfg[i].ep, a.cfg[i].result, kOutputs, std::uint64_t{st.tokens} * a.hidden * 4));
      st.direct = a.direct[i] != 0 ? 1u : 0u;
      response_header rh{};
      rh.magic = kSlotMagic;
      rh.version = kSlotVersion;
      rh.type = static_cast<std::uint16_t>(dtype::f32);
      rh.seq = st.seq;
      rh.error = st.error;
      rh.tokens = verdict == slot_verdict::served ? st.tokens : 0;
      *reinterpret_cast<response_header*>(a.staging + std::size_t{i} * a.stage_stride) = rh;
    }
  }
  __syncthreads();  // s is reused for the next slot
}

// Run by the front's last block, once every slot is taken: the served requests' first tokens (slot order), the
// groups' offsets, the active groups. Without shrinking (pad), every empty group of a layer that served a
// request gets one padding row (a zero activation row, zeroed by the placement, with weight 0, in no token's
// rows: computed, never combined nor answered), so the grouped GEMM visits every local expert of that layer, as a
// grouped GEMM over a fixed expert list would. What the other blocks wrote is read from L2 (__ldcg): this SM's L1 may
// hold older copies.
__device__ void scan(const round_args& a, std::int32_t* s_warp) {
  std::int32_t carry = 0, total = 0;
  for (std::uint32_t b = 0; b < a.clients; b += blockDim.x) {
    const std::uint32_t i = b + threadIdx.x;
    const std::int32_t v = i < a.clients && __ldcg(&a.st[i].verdict) == static_cast<std::uint32_t>(slot_verdict::served)
                               ? static_cast<std::int32_t>(__ldcg(&a.st[i].tokens))
                               : 0;
    const std::int32_t ex = block_scan(v, s_warp, total);
    if (i < a.clients) a.tok_base[i] = static_cast<std::uint32_t>(carry + ex);
    carry += total;
  }
  const std::int32_t tokens = carry;
  std::int32_t rows = 0, active = 0, padded = 0;
  for (std::uint32_t b = 0; b < a.groups; b += blockDim.x) {
    const std::uint32_t g = b + threadIdx.x;
    const std::int32_t c = g < a.groups ? __ldcg(a.counts + g) : 0;
    const std::int32_t pad = a.pad != 0 && g < a.groups && c == 0 && __ldcg(a.layer_live + g / a.local) != 0 ? 1 : 0;
    const std::int32_t ex = block_scan(c + pad, s_warp, total);
    if (g < a.groups) a.offsets[g] = rows + ex;
    if (a.pad != 0 && g < a.groups) {
      a.pad_row[g] = pad != 0 ? rows + ex : -1;  // zeroed by the placement
      if (pad != 0) a.row_weight[rows + ex] = 0.0f;
    }
    rows += total;
    (void)block_scan(c > 0 ? 1 : 0, s_warp, total);
    active += total;
    if (a.pad != 0) {  // block-uniform
      (void)block_scan(pad, s_warp, total);
      padded += total;
    }
  }
  if (threadIdx.x == 0) {
    if (tokens > 0) ++*a.round_no;  // a round that serves something (the poll's recency counts these)
    a.offsets[a.groups] = rows;
    a.head->tokens = static_cast<std::uint32_t>(tokens);
    a.head->rows = static_cast<std::uint32_t>(rows - padded);
    a.head->active_groups = static_cast<std::uint32_t>(active);
    a.head->padded_rows = static_cast<std::uint32_t>(padded);
  }
}

// The round's front, one kernel: block 0 polls (above) while the others wait at the gate; then every block
// takes its slots (validation and counting, one slot at a time, the slots walked with the grid's stride); the
// last block to finish scans. It spins: it lets the placement's blocks in only once the poll has ended (pdl.cuh).
// The gate needs every block resident at once: at most kFrontBlocks blocks, which a few SMs hold; should another
// process's kernels fill the GPU meanwhile, block 0 starts once they retire (its waiters hold too little to keep
// it out).
__global__ void __launch_bounds__(kFrontThreads) k_front(round_args a) {
  pdl_wait();
  __shared__ front_smem s;
  if (blockIdx.x == 0) {
    poll(a, s.until);
    __syncthreads();  // the zeroed head and counts, before the gate opens
    if (threadIdx.x == 0) {
      __threadfence();
      sync_word(a, kGate).store(1, cuda::std::memory_order_release);
    }
  } else if (threadIdx.x == 0) {
    while (sync_word(a, kGate).load(cuda::std::memory_order_acquire) == 0) __nanosleep(100);
  }
  __syncthreads();
  pdl_release();
  // The block's share of the slots, one thread each: a slot whose word has not changed only has its last
  // round's outcome cleared; the block then takes the others one at a time (take_slot reads the word again).
  if (threadIdx.x == 0) s.n = 0;
  __syncthreads();
  if (const std::uint32_t i = blockIdx.x + threadIdx.x * gridDim.x; i < a.clients) {
    server_slot_state& st = a.st[i];
    const bool used = a.cfg[i].used != 0;  // plain loads before the word's acquire: one round trip for the three
    const std::uint64_t last = st.last_sig;
    if (const std::uint64_t word = sig_word(a, i); used && word != last) {
      s.list[atomicAdd(&s.n, 1u)] = i;
    } else {
      st.verdict = static_cast<std::uint32_t>(slot_verdict::none);
      st.error = 0;
      st.tokens = 0;
      st.put_result = 0;
      st.direct = 0;
    }
  }
  __syncthreads();
  for (std::uint32_t q = 0; q < s.n; ++q) take_slot(a, s.list[q], s);
  if (!last_to_arrive<cuda::thread_scope_device>(a, kFrontTicket, gridDim.x)) return;
  scan(a, s.warp);
  if (threadIdx.x == 0) {
    sync_word(a, kGate).store(0, cuda::std::memory_order_relaxed);  // every block has passed it
    sync_word(a, kFrontTicket).store(0, cuda::std::memory_order_relaxed);
  }
}

// The slot holding the round's token g: the last slot whose first token is at most g (the slots before and
// after it in the scan that served nothing have no tokens).
__device__ __forceinline__ std::uint32_t slot_of(const round_args& a, std::uint32_t g) {
  std::uint32_t lo = 0, hi = a.clients;
  while (hi - lo > 1) {
    const std::uint32_t mid = (lo + hi) / 2;
    if (a.tok_base[mid] <= g)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// out[j] = convert(in[j]) for j < vecs by the 32 lanes of a warp (this one is `lane`), kCopyUnroll 16-byte loads
// per lane in flight (all issued before any store); `in` is read from L2 (a peer wrote it).
template <class In, class Out, class Convert>
__device__ __forceinline__ void warp_copy(const In* in, Out* out, std::uint32_t vecs, std::uint32_t lane,
                                          Convert convert) {
  for (std::uint32_t j0 = lane; j0 < vecs; j0 += 32 * kCopyUnroll) {
    In v[kCopyUnroll];
#pragma unroll
    for (std::uint32_t u = 0; u < kCopyUnroll; ++u)
      if (j0 + 32 * u < vecs) v[u] = __ldcg(in + j0 + 32 * u);
#pragma unroll
    for (std::uint32_t u = 0; u < kCopyUnroll; ++u)
      if (j0 + 32 * u < vecs) out[j0 + 32 * u] = convert(v[u]);
  }
}

// Each (token, k) pair of the served requests gets its row (or -1), its row its router weight and its activation
// row (bf16; an f32 row is converted as expert_step does), each token its slot. A warp per pair, the pairs walked
// with the grid's stride; the warp's lanes copy the row, kCopyUnroll 16-byte vectors each in flight. Without
// shrinking, the padding rows are zeroed (a warp per group).
__global__ void __launch_bounds__(kPlaceThreads) k_place(round_args a) {
  pdl_enter();
  if (blockIdx.x == 0 && threadIdx.x == 0) a.head->stamp_place = eaas::now_ns();
  const std::uint32_t K = a.topk, h = a.hidden, lane = threadIdx.x & 31;
  const std::uint64_t pairs = std::uint64_t{a.head->tokens} * K;
  const std::uint64_t warps = std::uint64_t{gridDim.x} * (blockDim.x / 32);
  const std::uint64_t first = std::uint64_t{blockIdx.x} * (blockDim.x / 32) + threadIdx.x / 32;
  if (a.pad != 0) {  // grid-uniform
    for (std::uint64_t g = first; g < a.groups; g += warps) {
      const std::int32_t row = a.pad_row[g];
      if (row < 0) continue;
      auto* out = reinterpret_cast<uint4*>(a.x + std::size_t(row) * h);
      for (std::uint32_t j = lane; j < h / 8; j += 32) out[j] = make_uint4(0, 0, 0, 0);
    }
  }
  for (std::uint64_t p = first; p < pairs; p += warps) {
    const auto g = static_cast<std::uint32_t>(p / K), k = static_cast<std::uint32_t>(p % K);
    const std::uint32_t i = slot_of(a, g);
    const slot_header& hd = a.hdr[i];
    const std::uint32_t t = g - a.tok_base[i];
    std::int32_t row = -1;
    const unsigned char* src = nullptr;
    if (k < hd.topk) {
      const std::size_t e_at = std::size_t{i} * a.max_tokens * K + std::size_t{t} * hd.topk + k;
      const std::int32_t r = a.rank[e_at];
      const std::uint32_t e = a.ids[e_at];
      if (r >= 0 && e < a.local) {
        const std::int64_t at = std::int64_t{a.offsets[hd.layer * a.local + e]} + r;
        if (at >= 0 && at < std::int64_t{a.max_rows}) {
          row = static_cast<std::int32_t>(at);
          const std::uint64_t row_bytes =
              std::uint64_t{h} * (hd.type == static_cast<std::uint16_t>(dtype::bf16) ? 2 : 4);
          src = slot_at(a, i) + sizeof(slot_header) + t * row_bytes;  // layout_for's activations
          if (lane == 0) a.row_weight[row] = a.wts[e_at];
        }
      }
    }
    if (lane == 0) {
      if (k == 0) a.tok_slot[g] = i;
      a.tok_rows[std::size_t{g} * K + k] = row;
    }
    if (row < 0) continue;  // warp-uniform
    __nv_bfloat16* dst = a.x + std::size_t(row) * h;
    if (hd.type == static_cast<std::uint16_t>(dtype::bf16))
      warp_copy(reinterpret_cast<const uint4*>(src), reinterpret_cast<uint4*>(dst), h / 8, lane,
                [](const uint4& v) { return v; });
    else  // f32 rows converted as expert_step does
      warp_copy(reinterpret_cast<const float4*>(src), reinterpret_cast<uint2*>(dst), h / 4, lane, [](const float4& v) {
        const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
        uint2 packed;
        memcpy(&packed.x, &lo, 4);
        memcpy(&packed.y, &hi, 4);
        return packed;
      });
  }
}

// After every answer, by one whole block: the round's last stamp, then the round's summary (head, pairs, the
// slots' states) written into the host's pinned buffer for this launch, so that no copy follows the round on the
// stream (the next round's poll starts right after). The host reads it once the event after the round
// completed. What other blocks of the kernel wrote is read from L2.
__device__ void summarize(const round_args& a) {
  // The served requests that get no answer (the grouped GEMM refused its plan): their put_result says why.
  if (a.head->gemm_error != 0)
    for (std::uint32_t i = threadIdx.x; i < a.clients; i += blockDim.x)
      if (a.st[i].verdict == static_cast<std::uint32_t>(slot_verdict::served))
        atomicCAS(&a.st[i].put_result, 0, static_cast<int>(status::internal_error));
  __syncthreads();
  __shared__ unsigned char* s_to;
  if (threadIdx.x == 0) {
    a.head->stamp_done = eaas::now_ns();
    const std::uint32_t n = *a.launch_no;
    *a.launch_no = n + 1;
    s_to = a.summary[n & 1];
  }
  __syncthreads();  // the stamp (global memory) is visible to the block after the barrier
  auto* to = reinterpret_cast<uint4*>(s_to);
  const auto* head = reinterpret_cast<const uint4*>(a.head);
  const std::uint32_t head_vecs = a.head_words / 4, state_vecs = a.clients * sizeof(server_slot_state) / 16;
  for (std::uint32_t i = threadIdx.x; i < head_vecs; i += blockDim.x) to[i] = __ldcg(head + i);
  const auto* st = reinterpret_cast<const uint4*>(a.st);
  for (std::uint32_t i = threadIdx.x; i < state_vecs; i += blockDim.x) to[head_vecs + i] = __ldcg(st + i);
}

// Slot i's answer as a grid_put (its staging copy: response header, then the outputs unless the combine wrote
// them straight into the client's region), or false when it has none. A served request whose GEMM did not run
// (the plan was refused) gets no answer (summarize() marks its put_result).
__device__ bool answer_of(const round_args& a, std::uint32_t i, grid_put& j) {
  server_slot_state& st = a.st[i];
  const auto verdict = static_cast<slot_verdict>(st.verdict);
  std::uint64_t bytes = sizeof(response_header);
  if (verdict == slot_verdict::served) {
    if (a.head->gemm_error != 0) return false;
    if (a.direct[i] == 0) bytes += std::uint64_t{st.tokens} * a.hidden * 4;
  } else if (verdict != slot_verdict::refused) {
    return false;
  }
  const server_slot_config& c = a.cfg[i];
  j = grid_put{.ep = c.ep,
               .dst = c.result,
               .dst_offset = kResponse,
               .src = a.staging + std::size_t{i} * a.stage_stride,
               .bytes = bytes,
               .sig = c.result,
               .sig_offset = kResultSig,
               .value = st.seq,
               .arrivals = a.arrivals + i,
               .result = &st.put_result};
  return true;
}

// Each token's answer row = the sum of its rows of y in k order (expert_step's order): straight into the
// client's result region where the slot has a direct pointer (the NVLink writes overlap the reads of y), else
// into its slot's staging after the response header. Nothing is written when the grouped GEMM refused its plan
// (no answer goes out then). With direct answers the last of the blocks that combined a token (block 0 alone
// when none did) then answers every slot (a response header and the signal per slot, one thread each; a slot
// that got no direct pointer is put whole by the block) and writes the round's summary: no kernel follows the
// combine in the round.
__global__ void __launch_bounds__(kCombineThreads) k_combine(round_args a) {
  pdl_enter();
  if (blockIdx.x == 0 && threadIdx.x == 0) a.head->stamp_combine = eaas::now_ns();
  if (a.head->gemm_error == 0) {
    const std::uint32_t tokens = a.head->tokens, h = a.hidden, K = a.topk;
    for (std::uint32_t g = blockIdx.x; g < tokens; g += gridDim.x) {
      const std::uint32_t i = a.tok_slot[g];
      if (i >= a.clients) continue;  // cannot happen: every served token was given its slot
      const std::uint32_t t = g - a.tok_base[i];
      const std::int32_t* rows = a.tok_rows + std::size_t{g} * K;
      unsigned char* const base = a.direct[i] != 0
                                      ? reinterpret_cast<unsigned char*>(a.direct[i])
                                      : a.staging + std::size_t{i} * a.stage_stride + sizeof(response_header);
      float4* out = reinterpret_cast<float4*>(base + std::size_t{t} * h * 4);
      for (std::uint32_t j = threadIdx.x; j < h / 4; j += blockDim.x) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (std::uint32_t k = 0; k < K; ++k) {
          const std::int32_t r = rows[k];
          if (r < 0) continue;
          const float4 v = reinterpret_cast<const float4*>(a.y + std::size_t(r) * h)[j];
          acc.x += v.x;
          acc.y += v.y;
          acc.z += v.z;
          acc.w += v.w;
        }
        out[j] = acc;
      }
    }
  }
  if (a.direct_answers == 0) return;  // grid-uniform: k_answer puts the staged answers
  // The blocks that combined a token (block 0 at least), each after its stores to peers, a system-scope fence
  // and the arrival (last_to_arrive): the last block has acquired every block's release, and its signals
  // (st.release.sys, cumulative) publish them. The others wrote nothing: no fence, no arrival.
  const unsigned arrivers = a.head->gemm_error == 0 ? max(1u, min(gridDim.x, a.head->tokens)) : 1u;
  if (blockIdx.x >= arrivers) return;  // block-uniform
  if (!last_to_arrive<cuda::thread_scope_system>(a, kBackTicket, arrivers)) return;
  __shared__ int s_whole;
  if (threadIdx.x == 0) s_whole = 0;
  __syncthreads();
  for (std::uint32_t i = threadIdx.x; i < a.clients; i += blockDim.x) {
    grid_put j;
    if (!answer_of(a, i, j)) continue;
    if (j.ep.transport != transport_kind::nvlink) {  // grid_put's transports (the server links no other)
      atomicCAS(j.result, 0, static_cast<int>(status::unsupported));
      continue;
    }
    if (j.bytes != sizeof(response_header)) {  // outputs in staging: put by the whole block below
      s_whole = 1;
      continue;
    }
    __threadfence_system();
    status s = put_signal(coop_thread{}, j.ep, j.dst, j.dst_offset, j.src, j.bytes, j.sig, j.sig_offset, j.value,
                          signal_op::set);
    if (s == status::ok) s = quiet(coop_thread{}, j.ep);
    if (s != status::ok) atomicCAS(j.result, 0, static_cast<int>(s));
  }
  __syncthreads();
  if (s_whole != 0) {  // block-uniform
    for (std::uint32_t i = 0; i < a.clients; ++i) {
      grid_put j;
      if (answer_of(a, i, j) && j.bytes != sizeof(response_header)) grid_put_signal(j, 0, 1);
      __syncthreads();
    }
  }
  __syncthreads();
  summarize(a);
  if (threadIdx.x == 0) sync_word(a, kBackTicket).store(0, cuda::std::memory_order_relaxed);
}

// Staged answers. Block (x, i): slot i's answer, if it has one: put and signalled from gridDim.x blocks. The
// last block to finish writes the round's summary: the blocks of the slots with an answer arrive (block (0, 0)
// too where no slot has one), the others return at once.
__global__ void __launch_bounds__(kPutThreads) k_answer(round_args a) {
  pdl_enter();
  grid_put j;
  const bool mine = answer_of(a, blockIdx.y, j);
  if (!mine && (blockIdx.x | blockIdx.y) != 0) return;  // block-uniform: neither puts nor arrives (below)
  if (mine) grid_put_signal(j, blockIdx.x, gridDim.x);
  __shared__ unsigned s_answers;  // slots with an answer (each block counts them: a few loads)
  if (threadIdx.x == 0) s_answers = 0;
  __syncthreads();
  for (std::uint32_t i = threadIdx.x; i < a.clients; i += blockDim.x) {
    grid_put unused;
    if (answer_of(a, i, unused)) atomicAdd(&s_answers, 1u);
  }
  __syncthreads();
  const unsigned answers = s_answers;
  if (!(mine || (answers == 0 && blockIdx.x == 0 && blockIdx.y == 0))) return;  // block-uniform
  if (!last_to_arrive<cuda::thread_scope_device>(a, kBackTicket, answers == 0 ? 1u : answers * gridDim.x)) return;
  summarize(a);
  if (threadIdx.x == 0) sync_word(a, kBackTicket).store(0, cuda::std::memory_order_relaxed);
}

template <class T>
struct dev_buf {
  T* p = nullptr;
  status alloc(std::size_t count) {
    EAAS_SSTEP_CUDA(cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(count, 1) * sizeof(T)));
    EAAS_SSTEP_CUDA(cudaMemset(p, 0, std::max<std::size_t>(count, 1) * sizeof(T)));
    return status::ok;
  }
  ~dev_buf() { cudaFree(p); }
};

class step_impl final : public server_step {
 public:
  explicit step_impl(const server_step_config& c) : cfg_(c) {}
  ~step_impl() override {
    cudaSetDevice(cfg_.device);
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    for (launched_round& r : rounds_) {
      if (r.done != nullptr) cudaEventDestroy(r.done);
      cudaFreeHost(r.back);
      cudaFreeHost(r.up);
    }
  }

  status init(const expert_step& experts) {
    const model_shape& sh = cfg_.shape;
    const std::uint32_t C = cfg_.max_clients, T = cfg_.max_tokens, K = sh.topk, E = cfg_.local_experts;
    if (sh.hidden == 0 || sh.hidden % kGroupedSwigluAlign != 0 || sh.inter == 0 ||
        sh.inter % kGroupedSwigluAlign != 0 || K == 0 || sh.layers == 0)
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu server step: hidden and inter must be multiples of 32");
    if (C == 0 || T == 0 || E == 0 || E > 0xFFFFu || std::uint64_t{C} * T * K > (1u << 30) ||
        std::uint64_t{sh.layers} * E > kGroupedSwigluMaxExperts)
      return EAAS_GPU_FAIL(status::invalid_argument,
                           "gpu server step: clients x tokens x topk must be 1 .. 2^30, local experts 1 .. 65535");
    if (C > kFrontBlocks * kFrontThreads)
      return EAAS_GPU_FAIL(status::invalid_argument,
                           "gpu server step: at most " + std::to_string(kFrontBlocks * kFrontThreads) + " clients");
    if (cfg_.put_blocks == 0 || cfg_.put_blocks > 1024)
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu server step: put_blocks must be 1 .. 1024");
    const slots_geometry geo = slots_geometry_for(C, T, sh.hidden, K);
    if (cfg_.slots == nullptr || cfg_.slots_bytes < geo.bytes || reinterpret_cast<std::uintptr_t>(cfg_.slots) % 16 != 0)
      return EAAS_GPU_FAIL(status::invalid_argument,
                           "gpu server step: the slots region is smaller than its geometry, or not 16-byte aligned");
    const expert_weights_device w = experts.device_weights();
    groups_ = sh.layers * E;
    if (w.gate == nullptr || w.up == nullptr || w.down == nullptr || w.groups != groups_)
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu server step: the experts' weights do not match the shape");
    // Without shrinking, at most min(layers, clients) layers are served in a round, each padded to E groups.
    max_rows_ = static_cast<std::uint32_t>(std::uint64_t{C} * T * std::min(K, E) +
                                           (cfg_.shrink ? 0 : std::uint64_t{std::min(sh.layers, C)} * E));
    stage_stride_ = (sizeof(response_header) + std::uint64_t{T} * sh.hidden * 4 + 255) & ~std::uint64_t{255};
    pairs_at_ = align64(sizeof(server_round_head));
    states_at_ = pairs_at_ + align64(std::size_t{E} * 4);
    back_bytes_ = states_at_ + sizeof(server_slot_state) * C;

    EAAS_SSTEP_CUDA(cudaSetDevice(cfg_.device));
    EAAS_SSTEP_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    const std::size_t CTK = std::size_t{C} * T * K;
    EAAS_CHECK(cfg_dev_.alloc(C));
    EAAS_CHECK(back_.alloc(states_at_));
    EAAS_CHECK(st_.alloc(C));
    EAAS_CHECK(hdr_.alloc(C));
    EAAS_CHECK(ids_.alloc(CTK));
    EAAS_CHECK(wts_.alloc(CTK));
    EAAS_CHECK(rank_.alloc(CTK));
    EAAS_CHECK(counts_.alloc(groups_));
    EAAS_CHECK(offsets_.alloc(groups_ + 1));
    EAAS_CHECK(layer_live_.alloc(sh.layers));
    EAAS_CHECK(tok_base_.alloc(C));
    EAAS_CHECK(tok_slot_.alloc(std::size_t{C} * T));
    EAAS_CHECK(tok_rows_.alloc(CTK));
    EAAS_CHECK(pad_row_.alloc(groups_));
    EAAS_CHECK(row_weight_.alloc(max_rows_));
    EAAS_CHECK(x_.alloc(std::size_t{max_rows_} * sh.hidden));
    EAAS_CHECK(y_.alloc(std::size_t{max_rows_} * sh.hidden));
    EAAS_CHECK(staging_.alloc(std::size_t{C} * stage_stride_));
    EAAS_CHECK(arrivals_.alloc(C));
    EAAS_CHECK(sync_.alloc(kSyncWords));
    EAAS_CHECK(round_no_.alloc(1));
    EAAS_CHECK(launch_no_.alloc(1));
    EAAS_CHECK(direct_.alloc(C));
    gshape_ = {.experts = groups_, .hidden = sh.hidden, .inter = sh.inter, .max_rows = max_rows_};
    ws_bytes_ = grouped_swiglu_workspace_bytes(gshape_);
    EAAS_CHECK(ws_.alloc((ws_bytes_ + 15) / 16));
    // Per launch, alternating (two rounds are in flight at most): the pinned uploads of the slots set before
    // it, its summary (written by its last kernel: mapped memory), the event after it, the slots' epochs at
    // its launch.
    pdl_ = cfg_.pdl && pdl_supported(cfg_.device);
    for (launched_round& r : rounds_) {
      EAAS_SSTEP_CUDA(cudaMallocHost(&r.up, (sizeof(server_slot_config) + sizeof(server_slot_state)) * C));
      EAAS_SSTEP_CUDA(cudaHostAlloc(&r.back, back_bytes_, cudaHostAllocMapped));
      std::memset(r.back, 0, back_bytes_);
      EAAS_SSTEP_CUDA(cudaEventCreateWithFlags(&r.done, cudaEventDisableTiming));
      r.epochs.assign(C, 0);
    }
    set_cfg_.assign(C, server_slot_config{});
    set_st_.assign(C, server_slot_state{});
    pending_.assign(C, 0);
    epochs_.assign(C, 0);
    auto* back = back_.p;
    args_ = round_args{.slots = static_cast<const unsigned char*>(cfg_.slots),
                       .slots_base = geo.slots_base,
                       .slot_stride = geo.slot_stride,
                       .cfg = cfg_dev_.p,
                       .st = st_.p,
                       .head = reinterpret_cast<server_round_head*>(back),
                       .pairs = reinterpret_cast<std::uint32_t*>(back + pairs_at_),
                       .head_words = static_cast<std::uint32_t>(states_at_ / 4),
                       .hdr = hdr_.p,
                       .ids = ids_.p,
                       .wts = wts_.p,
                       .rank = rank_.p,
                       .counts = counts_.p,
                       .offsets = offsets_.p,
                       .layer_live = layer_live_.p,
                       .tok_base = tok_base_.p,
                       .tok_slot = tok_slot_.p,
                       .tok_rows = tok_rows_.p,
                       .pad_row = pad_row_.p,
                       .row_weight = row_weight_.p,
                       .x = x_.p,
                       .y = y_.p,
                       .staging = staging_.p,
                       .stage_stride = stage_stride_,
                       .direct = direct_.p,
                       .arrivals = arrivals_.p,
                       .sync = sync_.p,
                       .clients = C,
                       .max_tokens = T,
                       .hidden = sh.hidden,
                       .topk = K,
                       .layers = sh.layers,
                       .local = E,
                       .groups = groups_,
                       .max_rows = max_rows_,
                       .pad = cfg_.shrink ? 0u : 1u,
                       .poll_ns = cfg_.poll_ns,
                       .batch_window_ns = cfg_.batch_window_ns,
                       .direct_answers = cfg_.direct_answers ? 1u : 0u,
                       .round_no = round_no_.p,
                       .summary = {nullptr, nullptr},
                       .launch_no = launch_no_.p};
    for (int b = 0; b < 2; ++b)
      EAAS_SSTEP_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&args_.summary[b]), rounds_[b].back, 0));
    gemm_ = grouped_swiglu_args{.x = x_.p,
                                .offsets = offsets_.p,
                                .row_weight = row_weight_.p,
                                .gate = w.gate,
                                .up = w.up,
                                .down = w.down,
                                .y = y_.p,
                                .workspace = ws_.p,
                                .error = &args_.head->gemm_error,
                                .layout = w.layout};
    EAAS_CHECK(grouped_swiglu_check(gshape_, gemm_, ws_bytes_));
    EAAS_SSTEP_CUDA(cudaDeviceSynchronize());  // the zero fills ran on the legacy stream
    // One eager round with every slot unused, before any capture: this module's kernels and the grouped GEMM
    // (whose launch limits are queried on first use) are then never first used inside a capture.
    EAAS_CHECK(enqueue());
    EAAS_SSTEP_CUDA(cudaStreamSynchronize(stream_));
    // That round counted itself: the first launched round is number 0 again (summary parity).
    EAAS_SSTEP_CUDA(cudaMemset(launch_no_.p, 0, sizeof(std::uint32_t)));
    EAAS_SSTEP_CUDA(cudaDeviceSynchronize());
    return status::ok;
  }

  void set_slot(std::uint32_t i, const server_slot_config& c, const server_slot_state& s) override {
    if (i >= cfg_.max_clients) return;
    server_slot_state st{};
    st.last_sig = s.last_sig;
    st.expected = s.expected;
    st.ignored_sig = s.ignored_sig;
    set_cfg_[i] = c;
    set_st_[i] = st;
    pending_[i] = 1;
    epochs_[i]++;
  }

  status round(std::uint32_t read_slots, server_round_summary& out) override {
    EAAS_SSTEP_CUDA(cudaSetDevice(cfg_.device));
    if (cfg_.pipeline && in_flight_ == 0) EAAS_CHECK(launch_round());
    EAAS_CHECK(launch_round());
    return collect(read_slots, out);
  }

  bool in_flight() const override { return in_flight_ != 0; }
  std::uint64_t launched() const override { return launched_; }
  std::uint64_t collected() const override { return launched_ - in_flight_; }

  status drain(std::uint32_t read_slots, server_round_summary& out) override {
    out = server_round_summary{};
    if (in_flight_ == 0) return status::ok;
    EAAS_SSTEP_CUDA(cudaSetDevice(cfg_.device));
    return collect(read_slots, out);
  }

  std::uint32_t captures() const override { return captures_; }

 private:
  status capture() {
    const auto one_round = [this] { return enqueue(); };
    EAAS_CHECK(capture_graph(kWho, stream_, one_round, exec_));
    captures_++;
    return status::ok;
  }

  // Queues the next round: the slots set since the last launch (uploaded from this launch's pinned buffer,
  // which the host does not touch again before the round after next), the round (which writes its summary
  // into r.back) and its event.
  status launch_round() {
    launched_round& r = rounds_[launched_ % 2];
    const std::uint32_t C = cfg_.max_clients;
    // Captured before this round's copies are queued (the graph holds only the round itself).
    if (cfg_.graph && exec_ == nullptr) EAAS_CHECK(capture());
    for (std::uint32_t i = 0; i < C; ++i) {
      if (pending_[i] == 0) continue;
      pending_[i] = 0;
      auto* at = r.up + (sizeof(server_slot_config) + sizeof(server_slot_state)) * i;
      std::memcpy(at, &set_cfg_[i], sizeof(server_slot_config));
      std::memcpy(at + sizeof(server_slot_config), &set_st_[i], sizeof(server_slot_state));
      EAAS_SSTEP_CUDA(cudaMemcpyAsync(cfg_dev_.p + i, at, sizeof(server_slot_config), cudaMemcpyHostToDevice, stream_));
      EAAS_SSTEP_CUDA(cudaMemcpyAsync(st_.p + i, at + sizeof(server_slot_config), sizeof(server_slot_state),
                                      cudaMemcpyHostToDevice, stream_));
    }
    r.epochs = epochs_;
    if (cfg_.graph) {
      EAAS_SSTEP_CUDA(cudaGraphLaunch(exec_, stream_));
    } else {
      EAAS_CHECK(enqueue());
    }
    EAAS_SSTEP_CUDA(cudaEventRecord(r.done, stream_));  // the round's last kernel wrote its summary into r.back
    launched_++;
    in_flight_++;
    return status::ok;
  }

  // Waits for the oldest round in flight and reports it. A slot set after that round was launched is
  // reported as set (its state, verdict none): what the round did with its previous configuration is moot.
  status collect(std::uint32_t read_slots, server_round_summary& out) {
    launched_round& r = rounds_[(launched_ - in_flight_) % 2];
    EAAS_SSTEP_CUDA(cudaEventSynchronize(r.done));
    in_flight_--;
    auto* slots = reinterpret_cast<server_slot_state*>(r.back + states_at_);
    for (std::uint32_t i = 0; i < cfg_.max_clients; ++i)
      if (r.epochs[i] != epochs_[i]) slots[i] = set_st_[i];
    out.head = reinterpret_cast<const server_round_head*>(r.back);
    out.pairs = {reinterpret_cast<const std::uint32_t*>(r.back + pairs_at_), cfg_.local_experts};
    out.slots = {slots, std::min(read_slots, cfg_.max_clients)};
    return status::ok;
  }

  // One round as work on stream_: no host synchronisation, fixed launch shapes (capturable).
  status enqueue() {
    const std::uint32_t C = cfg_.max_clients;
    const std::uint64_t max_pairs = std::uint64_t{C} * cfg_.max_tokens * cfg_.shape.topk;
    // One chain of launches (pdl.cuh): the front (poll, validation, counts, scan), the placement, the grouped
    // GEMM, the combine (with direct answers, also the answers and the summary), the staged answers' puts.
    const bool p = pdl_;
    EAAS_SSTEP_CUDA(launch(stream_, p, k_front, std::min(C, kFrontBlocks), kFrontThreads, 0, args_));
    EAAS_SSTEP_CUDA(launch(
        stream_, p, k_place,
        static_cast<unsigned>(std::min<std::uint64_t>(kPlaceBlocks, (max_pairs + kPlaceWarps - 1) / kPlaceWarps)),
        kPlaceThreads, 0, args_));
    EAAS_CHECK(grouped_swiglu(gshape_, gemm_, ws_bytes_, stream_));
    EAAS_SSTEP_CUDA(launch(stream_, p, k_combine, std::min<unsigned>(kCombineBlocks, C * cfg_.max_tokens),
                           kCombineThreads, 0, args_));
    if (!cfg_.direct_answers) {
      const std::uint64_t most = sizeof(response_header) + std::uint64_t{cfg_.max_tokens} * cfg_.shape.hidden * 4;
      // The answers' puts launch plainly (pdl.cuh: a few blocks that each move much data must not be placed
      // while the combine still fills the SMs: H200 x1, 4096 tokens, combine + answer took 274 us so, 143 us
      // plain).
      EAAS_SSTEP_CUDA(
          launch(stream_, false, k_answer, dim3(grid_put_blocks(most, cfg_.put_blocks), C), kPutThreads, 0, args_));
    }
    EAAS_SSTEP_CUDA(cudaGetLastError());
    return status::ok;
  }

  server_step_config cfg_;
  std::uint32_t groups_ = 0, max_rows_ = 0;
  std::uint64_t stage_stride_ = 0;
  std::size_t pairs_at_ = 0, states_at_ = 0, back_bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  dev_buf<server_slot_config> cfg_dev_;
  dev_buf<unsigned char> back_;  // head and pairs (zeroed by every round's poll, then summarised)
  dev_buf<server_slot_state> st_;
  dev_buf<slot_header> hdr_;
  dev_buf<std::uint16_t> ids_;
  dev_buf<float> wts_, row_weight_, y_;
  dev_buf<std::int32_t> rank_, counts_, offsets_, tok_rows_, pad_row_;
  dev_buf<std::uint32_t> tok_base_, tok_slot_, layer_live_;
  dev_buf<__nv_bfloat16> x_;
  dev_buf<unsigned char> staging_;
  dev_buf<unsigned long long> direct_;
  dev_buf<unsigned int> arrivals_, sync_;
  dev_buf<std::uint32_t> round_no_, launch_no_;
  dev_buf<uint4> ws_;
  grouped_swiglu_shape gshape_{};
  grouped_swiglu_args gemm_{};
  std::size_t ws_bytes_ = 0;
  round_args args_{};
  bool pdl_ = false;  // cfg_.pdl where the device supports it
  struct launched_round {
    unsigned char* up = nullptr;        // pinned: per slot, configuration and state uploaded before it
    unsigned char* back = nullptr;      // pinned, mapped: its summary (head, pairs, then every slot's state)
    cudaEvent_t done = nullptr;         // after the round (its summary is in `back` once this completed)
    std::vector<std::uint32_t> epochs;  // epochs_ at its launch
  };
  launched_round rounds_[2];
  std::uint64_t launched_ = 0;  // rounds launched; the last in_flight_ of them not yet collected
  std::uint32_t in_flight_ = 0;
  // The host's side of the tables: per slot, the configuration and state last set, whether they wait for the
  // next launch, and how often the slot was set (a round launched before the last set_slot does not report it).
  std::vector<server_slot_config> set_cfg_;
  std::vector<server_slot_state> set_st_;
  std::vector<std::uint8_t> pending_;
  std::vector<std::uint32_t> epochs_;
  cudaGraphExec_t exec_ = nullptr;
  std::uint32_t captures_ = 0;
};

}  // namespace

status server_step::create(const server_step_config& cfg, const expert_step& experts,
                           std::unique_ptr<server_step>& out) {
  auto s = std::make_unique<step_impl>(cfg);
  EAAS_CHECK(s->init(experts));
  out = std::move(s);
  return status::ok;
}

}  // namespace eaas::runtime::gpu
