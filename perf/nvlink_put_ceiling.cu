// eaas-nvlink-put-ceiling: how close SM-driven copies over NVLink come to the copy engine (issue #3's
// ">= 95 % of cudaMemcpyPeerAsync" target), over many ways of writing the copy loop: blocks, threads,
// unrolling, cache hints on the loads and stores, per-warp and interleaved layouts, work stealing, a
// store-only kernel with no loads at all, and the pull direction (kernels on GPU 1 reading GPU 0).
// A study, not part of the library: the library's put is copy<coop_block> in detail/ldst_device.cuh,
// whose loop is the "base" row here. Results and their reading: docs/PERF.md.
//
// Run:   eaas-nvlink-put-ceiling [trials=5] [reps=10]   (needs two GPUs with peer access)
//
// Every variant copies n bytes from a GPU-0 buffer into a GPU-1 buffer (peer access, plain device
// pointers). "push" kernels run on GPU 0 (remote stores), "pull" kernels run on GPU 1 (remote loads).
// Timing: cudaEvents on the launching stream around `reps` back-to-back launches after 2 warm-ups.
// Per size and trial: CE push/pull, then every variant, then CE push/pull again. A variant's GB/s is
// the median over trials; %CE is relative to the mean of all CE-push measurements of that size
// (pull rows too). GB/s = 1e9 bytes/s. Each variant is verified once per size (destination zeroed,
// one launch, device-side compare of [0, n) against the pattern and of a 64 KiB guard after n
// against zero); #wrong counts mismatching 32-bit words.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CK(x)                                                                                        \
  do {                                                                                               \
    cudaError_t e_ = (x);                                                                            \
    if (e_ != cudaSuccess) {                                                                         \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, __LINE__, \
                   cudaGetErrorString(e_));                                                          \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

namespace {

constexpr std::size_t KiB = 1024, MiB = 1024 * KiB, GiB = 1024 * MiB;
constexpr std::size_t kGuard = 64 * KiB;  // checked to stay zero after the copied range

// ------------------------------------------------------------------------------------------------
// Loads and stores
// ------------------------------------------------------------------------------------------------

enum Ld { LD_PLAIN, LD_NC, LD_NC_NA, LD_NC_NA_256, LD_CS, LD_NC_EF };
enum St { ST_PLAIN, ST_PTX, ST_CS, ST_WT, ST_NA, ST_L1EF, ST_L2EF };

const char* ld_name(Ld l) {
  switch (l) {
    case LD_PLAIN:
      return "plain";
    case LD_NC:
      return "nc";
    case LD_NC_NA:
      return "nc.L1na";
    case LD_NC_NA_256:
      return "nc.L1na.L2:256B";
    case LD_CS:
      return "cs";
    case LD_NC_EF:
      return "nc.L1na.L2ef";
  }
  return "?";
}
const char* st_name(St s) {
  switch (s) {
    case ST_PLAIN:
      return "plain";
    case ST_PTX:
      return "ptx.v4.b32";
    case ST_CS:
      return "cs";
    case ST_WT:
      return "wt";
    case ST_NA:
      return "L1na";
    case ST_L1EF:
      return "L1ef";
    case ST_L2EF:
      return "L2ef";
  }
  return "?";
}

template <Ld L>
__device__ __forceinline__ int4 ld(const int4* p, std::uint64_t pol) {
  int4 v;
  if constexpr (L == LD_PLAIN) {
    v = *p;
  } else if constexpr (L == LD_NC) {
    v = __ldg(p);
  } else if constexpr (L == LD_CS) {
    v = __ldcs(p);
  } else if constexpr (L == LD_NC_NA) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  } else if constexpr (L == LD_NC_NA_256) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  } else {  // LD_NC_EF
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.s32 {%0,%1,%2,%3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(pol));
  }
  return v;
}

template <St S>
__device__ __forceinline__ void st(int4* p, int4 v, std::uint64_t pol) {
  if constexpr (S == ST_PLAIN) {
    *p = v;
  } else if constexpr (S == ST_CS) {
    __stcs(p, v);
  } else if constexpr (S == ST_WT) {
    __stwt(p, v);
  } else if constexpr (S == ST_PTX) {
    asm volatile("st.global.v4.b32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
  } else if constexpr (S == ST_NA) {
    asm volatile("st.global.L1::no_allocate.v4.b32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
  } else if constexpr (S == ST_L1EF) {
    asm volatile("st.global.L1::evict_first.v4.b32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
  } else {  // ST_L2EF
    asm volatile("st.global.L2::cache_hint.v4.b32 [%0], {%1,%2,%3,%4}, %5;" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w), "l"(pol)
                 : "memory");
  }
}

template <Ld L, St S>
__device__ __forceinline__ std::uint64_t make_policy() {
  std::uint64_t pol = 0;
  if constexpr (L == LD_NC_EF || S == ST_L2EF)
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}

// ------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------

struct Args {
  int4* dst;
  const int4* src;
  std::size_t n16;          // message length in 16-byte words
  int tile_log2;            // tile layouts: log2(tile / 16 B)
  std::size_t piece16;      // work stealing: piece length in 16-byte words
  unsigned long long* ctr;  // work stealing: [ticket, blocks done], zero between launches
};

// Who copies what. A "group" (block or warp) walks a virtual index range [0, vlen) with rank/size;
// map() turns a virtual index into a message index.
enum Layout {
  BLK_CHUNK,          // block: contiguous 1/grid of the message (the current scheme)
  BLK_TILE,           // block: tiles b, b+grid, ... of the whole message
  WARP_TILE_IN_BLK,   // block chunk as above, its warps take tiles w, w+nwarps, ... of it
  WARP_CHUNK_IN_BLK,  // block chunk as above, each warp a contiguous 1/nwarps of it
  WARP_CHUNK,         // warp: contiguous 1/(all warps) of the message
  WARP_TILE,          // warp: tiles w, w+allwarps, ... of the whole message
};

const char* layout_name(Layout l) {
  switch (l) {
    case BLK_CHUNK:
      return "blk-chunk";
    case BLK_TILE:
      return "blk-tile";
    case WARP_TILE_IN_BLK:
      return "warp-tile-in-blk";
    case WARP_CHUNK_IN_BLK:
      return "warp-chunk-in-blk";
    case WARP_CHUNK:
      return "warp-chunk";
    case WARP_TILE:
      return "warp-tile";
  }
  return "?";
}

// Contiguous share `o` of `no` of [0, len), shares rounded up to 512 B.
__host__ __device__ __forceinline__ void share(std::size_t len, std::size_t o, std::size_t no, std::size_t& b,
                                               std::size_t& l) {
  std::size_t per = (len + no - 1) / no;
  per = (per + 31) & ~std::size_t(31);
  b = o * per < len ? o * per : len;
  l = per < len - b ? per : len - b;
}

// One group's part of the message: virtual indices [0, vlen) walked with (rank, gsz); map(v) is the
// message index (16-byte words).
template <Layout LY>
struct Plan {
  static constexpr bool warp = LY != BLK_CHUNK && LY != BLK_TILE;
  static constexpr bool in_blk = LY == WARP_TILE_IN_BLK || LY == WARP_CHUNK_IN_BLK;
  static constexpr bool tile = LY == BLK_TILE || LY == WARP_TILE_IN_BLK || LY == WARP_TILE;
  std::size_t base, vlen, rank, gsz, owner, owners, tmask;
  int tl;

  __host__ __device__ __forceinline__ Plan(std::size_t n16, int tile_log2, unsigned blk, unsigned nblk, unsigned tid,
                                           unsigned nthr) {
    base = 0;
    std::size_t len = n16;
    if constexpr (in_blk) share(n16, blk, nblk, base, len);
    if constexpr (warp) {
      rank = tid & 31u;
      gsz = 32;
      if constexpr (in_blk) {
        owner = tid >> 5;
        owners = nthr >> 5;
      } else {
        owner = std::size_t(blk) * (nthr >> 5) + (tid >> 5);
        owners = std::size_t(nblk) * (nthr >> 5);
      }
    } else {
      rank = tid;
      gsz = nthr;
      owner = blk;
      owners = nblk;
    }
    tl = tile_log2;
    tmask = (std::size_t(1) << tl) - 1;
    if constexpr (!tile) {
      std::size_t b, l;
      share(len, owner, owners, b, l);
      base += b;
      vlen = l;
    } else {
      const std::size_t ntiles = (len + tmask) >> tl;
      if (owner >= ntiles) {
        vlen = 0;
      } else {
        vlen = (((ntiles - 1 - owner) / owners) + 1) << tl;
        if ((ntiles - 1) % owners == owner) vlen -= (ntiles << tl) - len;  // owns the partial last tile
      }
    }
  }
  __host__ __device__ __forceinline__ std::size_t map(std::size_t v) const {
    if constexpr (!tile)
      return base + v;
    else
      return base + ((((v >> tl) * owners + owner) << tl) | (v & tmask));
  }
};

template <int U, Ld L, St S, Layout LY, int LB>
__global__ void __launch_bounds__(LB) k_copy(Args a) {
  const std::uint64_t pol = make_policy<L, S>();
  const Plan<LY> p(a.n16, a.tile_log2, blockIdx.x, gridDim.x, threadIdx.x, blockDim.x);
  const std::size_t gsz = p.gsz, vlen = p.vlen;
  auto map = [&](std::size_t v) { return p.map(v); };

  std::size_t i = p.rank;
  for (; i + (U - 1) * gsz < vlen; i += U * gsz) {
    int4 r[U];
#pragma unroll
    for (int j = 0; j < U; ++j) r[j] = ld<L>(a.src + map(i + j * gsz), pol);
#pragma unroll
    for (int j = 0; j < U; ++j) st<S>(a.dst + map(i + j * gsz), r[j], pol);
  }
  for (; i < vlen; i += gsz) st<S>(a.dst + map(i), ld<L>(a.src + map(i), pol), pol);
}

// Work stealing: blocks take pieces of piece16 words through a ticket counter; the next ticket is
// taken while the current piece is copied. The last block to finish resets the counter.
template <int U, Ld L, St S, int LB>
__global__ void __launch_bounds__(LB) k_steal(Args a) {
  __shared__ unsigned long long cur;
  const std::uint64_t pol = make_policy<L, S>();
  const std::size_t np = (a.n16 + a.piece16 - 1) / a.piece16;
  const std::size_t gsz = blockDim.x;
  const bool t0 = threadIdx.x == 0;
  if (t0) cur = atomicAdd(a.ctr, 1ull);
  __syncthreads();
  std::size_t p = cur;
  while (p < np) {
    unsigned long long next = 0;
    if (t0) next = atomicAdd(a.ctr, 1ull);
    const int4* s = a.src + p * a.piece16;
    int4* d = a.dst + p * a.piece16;
    const std::size_t n = min(a.piece16, a.n16 - p * a.piece16);
    std::size_t i = threadIdx.x;
    for (; i + (U - 1) * gsz < n; i += U * gsz) {
      int4 r[U];
#pragma unroll
      for (int j = 0; j < U; ++j) r[j] = ld<L>(s + i + j * gsz, pol);
#pragma unroll
      for (int j = 0; j < U; ++j) st<S>(d + i + j * gsz, r[j], pol);
    }
    for (; i < n; i += gsz) st<S>(d + i, ld<L>(s + i, pol), pol);
    __syncthreads();  // everyone has read `cur`
    if (t0) cur = next;
    __syncthreads();
    p = cur;
  }
  if (t0) __threadfence();  // this block's last ticket precedes its "done"
  if (t0 && atomicAdd(a.ctr + 1, 1ull) == gridDim.x - 1) {
    a.ctr[0] = 0;  // every block has taken its last ticket: nobody touches the counter any more
    a.ctr[1] = 0;
  }
}

__host__ __device__ __forceinline__ std::uint32_t pat(std::size_t i) {
  std::uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull;
  x ^= x >> 29;
  const auto h = static_cast<std::uint32_t>(x ^ (x >> 32));
  return h ? h : 1u;
}

// Diagnostic: store-only, the pattern is generated (no loads), block-chunk layout.
template <int U, int LB>
__global__ void __launch_bounds__(LB) k_write_only(Args a) {
  std::size_t base, vlen;
  share(a.n16, blockIdx.x, gridDim.x, base, vlen);
  const std::size_t gsz = blockDim.x;
  auto gen = [&](std::size_t k) {
    const std::size_t w = 4 * k;
    return make_int4(int(pat(w)), int(pat(w + 1)), int(pat(w + 2)), int(pat(w + 3)));
  };
  std::size_t i = threadIdx.x;
  for (; i + (U - 1) * gsz < vlen; i += U * gsz) {
    int4 r[U];
#pragma unroll
    for (int j = 0; j < U; ++j) r[j] = gen(base + i + j * gsz);
#pragma unroll
    for (int j = 0; j < U; ++j) a.dst[base + i + j * gsz] = r[j];
  }
  for (; i < vlen; i += gsz) a.dst[base + i] = gen(base + i);
}

__global__ void k_fill(std::uint32_t* p, std::size_t nw) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < nw;
       i += std::size_t(gridDim.x) * blockDim.x)
    p[i] = pat(i);
}

__global__ void k_check(const std::uint32_t* d, std::size_t n_words, std::size_t total_words, unsigned long long* bad) {
  unsigned long long c = 0;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total_words;
       i += std::size_t(gridDim.x) * blockDim.x)
    c += d[i] != (i < n_words ? pat(i) : 0u);
  for (int o = 16; o; o >>= 1) c += __shfl_down_sync(0xffffffffu, c, o);
  if ((threadIdx.x & 31) == 0 && c) atomicAdd(bad, c);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

using KernelFn = void (*)(Args);

enum Kind { KIND_KERNEL, KIND_CE };

struct Variant {
  std::string group;
  std::string name;
  int dev;  // launching device: 0 = push, 1 = pull
  Kind kind;
  KernelFn fn;
  int blocks, threads;
  int tile_log2;      // tile layouts
  std::size_t piece;  // work stealing, bytes
  int regs;
};

struct Ctx {
  int4* src0;  // GPU 0
  int4* dst1;  // GPU 1
  unsigned long long* ctr[2];
  unsigned long long* bad1;  // GPU 1
  cudaStream_t s[2];
  cudaEvent_t e0[2], e1[2];
};

void launch(const Ctx& c, const Variant& v, std::size_t n) {
  if (v.kind == KIND_CE) {
    CK(cudaMemcpyPeerAsync(c.dst1, 1, c.src0, 0, n, c.s[v.dev]));
    return;
  }
  Args a{c.dst1, c.src0, n / 16, v.tile_log2, v.piece / 16, c.ctr[v.dev]};
  v.fn<<<v.blocks, v.threads, 0, c.s[v.dev]>>>(a);
}

// Returns elapsed ms for `reps` launches (after 2 warm-ups), or -1 on a launch error.
float time_ms(const Ctx& c, const Variant& v, std::size_t n, int reps) {
  CK(cudaSetDevice(v.dev));
  for (int w = 0; w < 2; ++w) launch(c, v, n);
  CK(cudaEventRecord(c.e0[v.dev], c.s[v.dev]));
  for (int r = 0; r < reps; ++r) launch(c, v, n);
  CK(cudaEventRecord(c.e1[v.dev], c.s[v.dev]));
  if (cudaGetLastError() != cudaSuccess) {
    cudaStreamSynchronize(c.s[v.dev]);
    return -1.f;
  }
  CK(cudaEventSynchronize(c.e1[v.dev]));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, c.e0[v.dev], c.e1[v.dev]));
  return ms;
}

// Zero the destination (and guard), one launch, count wrong words. -1 on a launch error.
long long verify(const Ctx& c, const Variant& v, std::size_t n) {
  CK(cudaSetDevice(1));
  CK(cudaMemsetAsync(c.dst1, 0, n + kGuard, c.s[1]));
  CK(cudaMemsetAsync(c.bad1, 0, sizeof(unsigned long long), c.s[1]));
  CK(cudaStreamSynchronize(c.s[1]));
  CK(cudaSetDevice(v.dev));
  launch(c, v, n);
  if (cudaGetLastError() != cudaSuccess) {
    cudaStreamSynchronize(c.s[v.dev]);
    return -1;
  }
  CK(cudaStreamSynchronize(c.s[v.dev]));
  CK(cudaSetDevice(1));
  k_check<<<1024, 512, 0, c.s[1]>>>(reinterpret_cast<const std::uint32_t*>(c.dst1), n / 4, (n + kGuard) / 4, c.bad1);
  CK(cudaGetLastError());
  unsigned long long bad = 0;
  CK(cudaMemcpyAsync(&bad, c.bad1, sizeof bad, cudaMemcpyDeviceToHost, c.s[1]));
  CK(cudaStreamSynchronize(c.s[1]));
  return static_cast<long long>(bad);
}

struct Builder {
  std::vector<Variant> v;
  std::string group = "";

  void add(KernelFn fn, int dev, const std::string& name, int blocks, int threads, int tl = 0, std::size_t piece = 0) {
    CK(cudaSetDevice(dev));
    cudaFuncAttributes at{};
    CK(cudaFuncGetAttributes(&at, fn));
    if (at.localSizeBytes)
      std::fprintf(stderr, "warning: %s uses %zu B local memory\n", name.c_str(), at.localSizeBytes);
    v.push_back({group, name, dev, KIND_KERNEL, fn, blocks, threads, tl, piece, at.numRegs});
  }
};

std::string cfg(int u, Ld l, St s, Layout ly) {
  return "U" + std::to_string(u) + " ld=" + ld_name(l) + " st=" + st_name(s) + " " + layout_name(ly);
}

int log2_words(std::size_t bytes) {
  int k = 0;
  while ((std::size_t(16) << k) < bytes) ++k;
  return k;
}

std::string kib(std::size_t b) { return b >= MiB ? std::to_string(b / MiB) + "M" : std::to_string(b / KiB) + "K"; }

#define KC(U, L, S, LY, LB) (&k_copy<U, L, S, LY, LB>)

std::vector<Variant> make_variants(int sms) {
  Builder b;
  // 1. baseline scheme, block counts
  b.group = "base";
  for (int bl : {32, 48, 64, 80, 96, 128, sms})
    b.add(KC(4, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 512), 0, "push " + cfg(4, LD_PLAIN, ST_PLAIN, BLK_CHUNK), bl, 512);
  // 2. unroll
  b.group = "unroll";
  for (int bl : {64, sms}) {
    b.add(KC(2, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 512), 0, "push " + cfg(2, LD_PLAIN, ST_PLAIN, BLK_CHUNK), bl, 512);
    b.add(KC(8, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 512), 0, "push " + cfg(8, LD_PLAIN, ST_PLAIN, BLK_CHUNK), bl, 512);
  }
  b.add(KC(16, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 512), 0, "push " + cfg(16, LD_PLAIN, ST_PLAIN, BLK_CHUNK), 64, 512);
  // 3. block shape
  b.group = "threads";
  for (int bl : {64, 128, 2 * sms})
    b.add(KC(4, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 512), 0, "push " + cfg(4, LD_PLAIN, ST_PLAIN, BLK_CHUNK), bl, 256);
  b.add(KC(8, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 512), 0, "push " + cfg(8, LD_PLAIN, ST_PLAIN, BLK_CHUNK), 2 * sms, 256);
  for (int bl : {32, 64})
    b.add(KC(4, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 1024), 0, "push " + cfg(4, LD_PLAIN, ST_PLAIN, BLK_CHUNK), bl, 1024);
  b.add(KC(8, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 1024), 0, "push " + cfg(8, LD_PLAIN, ST_PLAIN, BLK_CHUNK), 64, 1024);
  // 4. cache hints (U4, 64 x 512, block chunk)
  b.group = "hints";
#define HINT(L, S) b.add(KC(4, L, S, BLK_CHUNK, 512), 0, "push " + cfg(4, L, S, BLK_CHUNK), 64, 512)
  HINT(LD_NC, ST_PLAIN);
  HINT(LD_NC_NA, ST_PLAIN);
  HINT(LD_NC_NA_256, ST_PLAIN);
  HINT(LD_CS, ST_PLAIN);
  HINT(LD_NC_EF, ST_PLAIN);
  HINT(LD_PLAIN, ST_PTX);
  HINT(LD_PLAIN, ST_CS);
  HINT(LD_PLAIN, ST_WT);
  HINT(LD_PLAIN, ST_NA);
  HINT(LD_PLAIN, ST_L1EF);
  HINT(LD_PLAIN, ST_L2EF);
  HINT(LD_NC_NA, ST_CS);
  HINT(LD_NC_NA, ST_NA);
  HINT(LD_NC_NA_256, ST_CS);
  HINT(LD_NC_EF, ST_L2EF);
#undef HINT
  b.add(KC(4, LD_NC_NA, ST_CS, BLK_CHUNK, 512), 0, "push " + cfg(4, LD_NC_NA, ST_CS, BLK_CHUNK), sms, 512);
  b.add(KC(8, LD_NC_NA, ST_CS, BLK_CHUNK, 512), 0, "push " + cfg(8, LD_NC_NA, ST_CS, BLK_CHUNK), 64, 512);
  // 5. per-warp contiguous segments
  b.group = "warpseg";
  for (std::size_t t : {8 * KiB, 32 * KiB})
    b.add(KC(4, LD_PLAIN, ST_PLAIN, WARP_TILE_IN_BLK, 512), 0,
          "push " + cfg(4, LD_PLAIN, ST_PLAIN, WARP_TILE_IN_BLK) + " " + kib(t), 64, 512, log2_words(t));
  b.add(KC(8, LD_PLAIN, ST_PLAIN, WARP_TILE_IN_BLK, 512), 0,
        "push " + cfg(8, LD_PLAIN, ST_PLAIN, WARP_TILE_IN_BLK) + " 8K", 64, 512, log2_words(8 * KiB));
  b.add(KC(4, LD_PLAIN, ST_PLAIN, WARP_TILE_IN_BLK, 512), 0,
        "push " + cfg(4, LD_PLAIN, ST_PLAIN, WARP_TILE_IN_BLK) + " 8K", sms, 512, log2_words(8 * KiB));
  b.add(KC(4, LD_PLAIN, ST_PLAIN, WARP_CHUNK_IN_BLK, 512), 0, "push " + cfg(4, LD_PLAIN, ST_PLAIN, WARP_CHUNK_IN_BLK),
        64, 512);
  b.add(KC(4, LD_PLAIN, ST_PLAIN, WARP_CHUNK, 512), 0, "push " + cfg(4, LD_PLAIN, ST_PLAIN, WARP_CHUNK), 64, 512);
  b.add(KC(4, LD_PLAIN, ST_PLAIN, WARP_TILE, 512), 0, "push " + cfg(4, LD_PLAIN, ST_PLAIN, WARP_TILE) + " 8K", 64, 512,
        log2_words(8 * KiB));
  // 6. blocks interleaved over the whole message
  b.group = "interleave";
  for (std::size_t t : {8 * KiB, 64 * KiB, 1 * MiB})
    b.add(KC(4, LD_PLAIN, ST_PLAIN, BLK_TILE, 512), 0, "push " + cfg(4, LD_PLAIN, ST_PLAIN, BLK_TILE) + " " + kib(t),
          64, 512, log2_words(t));
  for (std::size_t t : {8 * KiB, 64 * KiB})
    b.add(KC(4, LD_PLAIN, ST_PLAIN, BLK_TILE, 512), 0, "push " + cfg(4, LD_PLAIN, ST_PLAIN, BLK_TILE) + " " + kib(t),
          sms, 512, log2_words(t));
  // 7. work stealing
  b.group = "steal";
  for (int bl : {64, 96, sms}) b.add(&k_steal<4, LD_PLAIN, ST_PLAIN, 512>, 0, "push U4 steal 2M", bl, 512, 0, 2 * MiB);
  for (int bl : {64, sms}) b.add(&k_steal<4, LD_PLAIN, ST_PLAIN, 512>, 0, "push U4 steal 512K", bl, 512, 0, 512 * KiB);
  // diagnostic: NVLink store ceiling without loads
  b.group = "diag";
  for (int bl : {64, sms}) b.add(&k_write_only<4, 512>, 0, "push U4 write-only (generated, no loads)", bl, 512);
  // 8. pull: kernel on GPU 1 reads GPU 0
  b.group = "pull";
  for (int bl : {32, 64, 96, sms})
    b.add(KC(4, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 512), 1, "pull " + cfg(4, LD_PLAIN, ST_PLAIN, BLK_CHUNK), bl, 512);
  for (int bl : {64, sms})
    b.add(KC(8, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 512), 1, "pull " + cfg(8, LD_PLAIN, ST_PLAIN, BLK_CHUNK), bl, 512);
  b.add(KC(16, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 512), 1, "pull " + cfg(16, LD_PLAIN, ST_PLAIN, BLK_CHUNK), 64, 512);
  b.add(KC(8, LD_PLAIN, ST_PLAIN, BLK_CHUNK, 512), 1, "pull " + cfg(8, LD_PLAIN, ST_PLAIN, BLK_CHUNK), 2 * sms, 256);
  b.add(KC(8, LD_NC_NA, ST_PLAIN, BLK_CHUNK, 512), 1, "pull " + cfg(8, LD_NC_NA, ST_PLAIN, BLK_CHUNK), 64, 512);
  b.add(KC(8, LD_NC_NA, ST_PLAIN, BLK_CHUNK, 512), 1, "pull " + cfg(8, LD_NC_NA, ST_PLAIN, BLK_CHUNK), sms, 512);
  b.add(&k_steal<8, LD_PLAIN, ST_PLAIN, 512>, 1, "pull U8 steal 2M", sms, 512, 0, 2 * MiB);
  return b.v;
}

double median(std::vector<float> x) {
  std::sort(x.begin(), x.end());
  const std::size_t m = x.size() / 2;
  return x.size() % 2 ? x[m] : 0.5 * (x[m - 1] + x[m]);
}

}  // namespace

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  const int reps = argc > 2 ? std::max(1, std::atoi(argv[2])) : 10;

  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 2) {
    std::fprintf(stderr, "eaas-nvlink-put-ceiling: needs 2 GPUs with peer access, found %d\n", ndev);
    return 2;
  }
  int can01 = 0, can10 = 0;
  CK(cudaDeviceCanAccessPeer(&can01, 0, 1));
  CK(cudaDeviceCanAccessPeer(&can10, 1, 0));
  if (!can01 || !can10) {
    std::fprintf(stderr, "eaas-nvlink-put-ceiling: no peer access between GPU 0 and GPU 1 (0->1: %d, 1->0: %d)\n",
                 can01, can10);
    return 2;
  }
  for (int d = 0; d < 2; ++d) {
    CK(cudaSetDevice(d));
    const cudaError_t e = cudaDeviceEnablePeerAccess(1 - d, 0);
    if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) CK(e);
    (void)cudaGetLastError();
  }
  cudaDeviceProp p0{}, p1{};
  CK(cudaGetDeviceProperties(&p0, 0));
  CK(cudaGetDeviceProperties(&p1, 1));
  int rank01 = 0, atom01 = 0;
  CK(cudaDeviceGetP2PAttribute(&rank01, cudaDevP2PAttrPerformanceRank, 0, 1));
  CK(cudaDeviceGetP2PAttribute(&atom01, cudaDevP2PAttrNativeAtomicSupported, 0, 1));
  int rt = 0, drv = 0;
  CK(cudaRuntimeGetVersion(&rt));
  CK(cudaDriverGetVersion(&drv));
  std::printf("# GPU0 %s (%d SMs, bus %02x:%02x)  GPU1 %s (%d SMs, bus %02x:%02x)\n", p0.name, p0.multiProcessorCount,
              p0.pciBusID, p0.pciDeviceID, p1.name, p1.multiProcessorCount, p1.pciBusID, p1.pciDeviceID);
  std::printf("# P2P 0->1 perf rank %d, native atomics %d; runtime %d driver %d; trials %d reps %d\n", rank01, atom01,
              rt, drv, trials, reps);
  std::printf(
      "# GB/s = 1e9 B/s, median over trials; %%CE = vs mean CE push (GPU0 stream) of that size, pull rows too\n");

  const std::vector<std::size_t> sizes = {64 * MiB, 256 * MiB, 1 * GiB};
  const std::size_t cap = sizes.back();

  Ctx c{};
  CK(cudaSetDevice(0));
  CK(cudaMalloc(&c.src0, cap));
  CK(cudaMalloc(&c.ctr[0], 2 * sizeof(unsigned long long)));
  CK(cudaMemset(c.ctr[0], 0, 2 * sizeof(unsigned long long)));
  CK(cudaStreamCreateWithFlags(&c.s[0], cudaStreamNonBlocking));
  CK(cudaEventCreate(&c.e0[0]));
  CK(cudaEventCreate(&c.e1[0]));
  k_fill<<<1024, 512>>>(reinterpret_cast<std::uint32_t*>(c.src0), cap / 4);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  CK(cudaSetDevice(1));
  CK(cudaMalloc(&c.dst1, cap + kGuard));
  CK(cudaMalloc(&c.ctr[1], 2 * sizeof(unsigned long long)));
  CK(cudaMemset(c.ctr[1], 0, 2 * sizeof(unsigned long long)));
  CK(cudaMalloc(&c.bad1, sizeof(unsigned long long)));
  CK(cudaStreamCreateWithFlags(&c.s[1], cudaStreamNonBlocking));
  CK(cudaEventCreate(&c.e0[1]));
  CK(cudaEventCreate(&c.e1[1]));
  CK(cudaDeviceSynchronize());

  const int sms = p0.multiProcessorCount;
  std::vector<Variant> vars = make_variants(sms);
  const Variant ce_push{"ce", "CE push cudaMemcpyPeerAsync (GPU0 stream)", 0, KIND_CE, nullptr, 0, 0, 0, 0, 0};
  const Variant ce_pull{"ce", "CE pull cudaMemcpyPeerAsync (GPU1 stream)", 1, KIND_CE, nullptr, 0, 0, 0, 0, 0};

  struct Best {
    double gbs = 0;
    std::string what;
  };
  std::vector<Best> best_push(sizes.size()), best_pull(sizes.size());

  for (std::size_t si = 0; si < sizes.size(); ++si) {
    const std::size_t n = sizes[si];
    const long long ce_wrong_push = verify(c, ce_push, n), ce_wrong_pull = verify(c, ce_pull, n);
    std::vector<long long> wrong(vars.size());
    for (std::size_t k = 0; k < vars.size(); ++k) wrong[k] = verify(c, vars[k], n);

    std::vector<float> t_ce_push, t_ce_pull;
    std::vector<std::vector<float>> t(vars.size());
    for (int tr = 0; tr < trials; ++tr) {
      t_ce_push.push_back(time_ms(c, ce_push, n, reps));
      t_ce_pull.push_back(time_ms(c, ce_pull, n, reps));
      for (std::size_t k = 0; k < vars.size(); ++k)
        if (wrong[k] >= 0) t[k].push_back(time_ms(c, vars[k], n, reps));
      t_ce_push.push_back(time_ms(c, ce_push, n, reps));
      t_ce_pull.push_back(time_ms(c, ce_pull, n, reps));
    }
    auto gbs = [&](double ms) { return ms > 0 ? double(n) * reps / (ms * 1e-3) / 1e9 : 0.0; };
    double ce_sum = 0, ce_min = 1e30, ce_max = 0;
    for (float ms : t_ce_push) {
      const double g = gbs(ms);
      ce_sum += g;
      ce_min = std::min(ce_min, g);
      ce_max = std::max(ce_max, g);
    }
    const double ce = ce_sum / t_ce_push.size();

    std::printf("\n## size %zu MiB   CE push mean %.1f GB/s (min %.1f, max %.1f over %zu runs)\n", n / MiB, ce, ce_min,
                ce_max, t_ce_push.size());
    std::printf("%-10s %-58s %5s %5s %4s %8s %8s %7s %6s\n", "group", "variant", "blk", "thr", "regs", "size", "GB/s",
                "%CE", "wrong");
    auto row = [&](const std::string& g, const std::string& name, int bl, int th, int regs, double v, long long w) {
      std::printf("%-10s %-58s %5d %5d %4d %7zuM %8.1f %6.1f%% %6lld\n", g.c_str(), name.c_str(), bl, th, regs, n / MiB,
                  v, 100.0 * v / ce, w);
    };
    row("ce", ce_push.name, 0, 0, 0, ce, ce_wrong_push);
    {
      double s = 0;
      for (float ms : t_ce_pull) s += gbs(ms);
      row("ce", ce_pull.name, 0, 0, 0, s / t_ce_pull.size(), ce_wrong_pull);
    }
    for (std::size_t k = 0; k < vars.size(); ++k) {
      const Variant& v = vars[k];
      if (wrong[k] < 0 || std::count(t[k].begin(), t[k].end(), -1.f)) {
        std::printf("%-10s %-58s %5d %5d %4d %7zuM   LAUNCH ERROR\n", v.group.c_str(), v.name.c_str(), v.blocks,
                    v.threads, v.regs, n / MiB);
        continue;
      }
      const double g = gbs(median(t[k]));
      row(v.group, v.name, v.blocks, v.threads, v.regs, g, wrong[k]);
      if (wrong[k] == 0 && v.group != "diag") {
        Best& b = v.dev == 0 ? best_push[si] : best_pull[si];
        if (g > b.gbs) {
          b.gbs = g;
          b.what = v.name + " " + std::to_string(v.blocks) + "x" + std::to_string(v.threads);
        }
      }
    }
    best_push[si].gbs = best_push[si].gbs / ce;  // keep as fraction of CE for the summary
    best_pull[si].gbs = best_pull[si].gbs / ce;
    std::fflush(stdout);
  }

  std::printf("\n## best correct variant per size (%% of CE push)\n");
  for (std::size_t si = 0; si < sizes.size(); ++si) {
    std::printf("%5zu MiB push %6.1f%%  %s\n", sizes[si] / MiB, 100 * best_push[si].gbs, best_push[si].what.c_str());
    std::printf("%5zu MiB pull %6.1f%%  %s\n", sizes[si] / MiB, 100 * best_pull[si].gbs, best_pull[si].what.c_str());
  }

  for (int d = 0; d < 2; ++d) {
    CK(cudaSetDevice(d));
    CK(cudaDeviceSynchronize());
  }
  return 0;
}
