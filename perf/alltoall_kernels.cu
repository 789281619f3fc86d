#include <cstdio>
#include <cuda/atomic>

#include "alltoall_kernels.hpp"
#include "eaas/device/ops.hpp"

namespace eaas::perf::a2a {

namespace {

__device__ __forceinline__ void record_failure(int* failure, status s) {
  if (s != status::ok) atomicCAS(failure, 0, static_cast<int>(s));
}

__device__ __forceinline__ bool failed(const int* failure) {
  return cuda::atomic_ref<int, cuda::thread_scope_device>(*const_cast<int*>(failure))
             .load(cuda::std::memory_order_relaxed) != 0;
}

// Every peer's signal >= seq, waited for by the calling thread.
__device__ status wait_all(const round_args& a) {
  status s = status::ok;
  for (std::uint32_t p = 0; p < a.npeers && s == status::ok; ++p)
    s = wait_signal(a.peers[p].ep, a.peers[p].local_sig, cmp_op::ge, a.seq, timeout{a.timeout_ns});
  return s;
}

// The warp has put `n` items of peer `p` (stores straight into the peer's GPU memory over NVLink).
// Who signals the peer, and why the peer then sees every row (PTX memory model):
//   1. __syncwarp orders every lane's stores before lane 0's next operations (the barrier is
//      morally strong at CTA scope), as in the library's own coop_warp signal.
//   2. lane 0's fence.acq_rel.sys (fence_release) is cumulative: the warp's stores are ordered
//      before everything lane 0 does after it, at system scope, the scope the peer reads at.
//   3. the arrival is an acq_rel fetch_add on a device-scope counter; the fetch_adds of one round form a
//      release sequence, so the lane that completes the count (old + n == seq * items) has
//      acquired every other warp's release from step 2, and with it all of their stores.
//   4. that lane signals with st.release.sys (the coop_thread signal), again cumulative, so the
//      signal is ordered after every row of every warp; the peer's wait_signal (ld.acquire.sys)
//      that sees the value therefore sees all rows. Exactly one lane completes each peer's count
//      per round, so each peer gets one signal per round.
// This relies on the nvlink bodies (puts are this warp's stores, fences are fence.sys), not on the
// op contract alone, which orders one caller's ops only; a transport whose puts complete later
// (ibgda) would need a quiet before the arrival.
__device__ void arrive(const round_args& a, std::uint32_t p, std::uint32_t n, unsigned lane) {
  __syncwarp();
  if (lane != 0) return;
  const peer_desc& d = a.peers[p];
  detail::fence_release();
  const unsigned long long old = cuda::atomic_ref<unsigned long long, cuda::thread_scope_device>(a.arrivals[p])
                                     .fetch_add(n, cuda::std::memory_order_acq_rel);
  if (old + n == a.seq * std::uint64_t{d.items}) {
    record_failure(a.failure, signal(coop_thread{}, d.ep, d.region, d.sig_offset, a.seq, signal_op::set));
    atomicMax(&a.stamps[2], static_cast<unsigned long long>(now_ns()));
  }
}

__global__ void __launch_bounds__(kRoundThreads) round_kernel(round_args a) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warps = blockDim.x / 32u;
  const unsigned gw = blockIdx.x * warps + threadIdx.x / 32u, nw = gridDim.x * warps;
  // Thread 0 of each block waits for the senders (one poller per block, not per warp); its acquire and
  // the block barrier order the block's work after what the peers put before signalling.
  __shared__ unsigned block_status;
  if (threadIdx.x == 0) {
    atomicMin(&a.stamps[0], static_cast<unsigned long long>(now_ns()));
    // An earlier round failed: do not wait out another deadline.
    status s = failed(a.failure) ? status::aborted : status::ok;
    if (s == status::ok && a.wait_before && (a.send || blockIdx.x == 0)) {
      s = wait_all(a);
      const unsigned long long t = now_ns();
      if (blockIdx.x == 0) a.stamps[1] = t;
      atomicMax(&a.stamps[3], t);
    }
    block_status = static_cast<unsigned>(s);
  }
  __syncthreads();
  if (block_status != 0) {
    if (threadIdx.x == 0) record_failure(a.failure, static_cast<status>(block_status));
    return;
  }

  if (a.send) {
    // Contiguous share of the flat item list: a warp touches few peers, so it arrives a few times.
    const std::uint32_t begin = static_cast<std::uint32_t>(std::uint64_t{a.items} * gw / nw);
    const std::uint32_t end = static_cast<std::uint32_t>(std::uint64_t{a.items} * (gw + 1) / nw);
    std::uint32_t p = 0;
    while (p + 1 < a.npeers && a.peers[p + 1].first_item <= begin) ++p;
    std::uint32_t done = 0;
    for (std::uint32_t k = begin; k < end; ++k) {
      while (k >= a.peers[p].first_item + a.peers[p].items) {
        if (done != 0) arrive(a, p, done, lane);
        done = 0;
        ++p;
      }
      const peer_desc& d = a.peers[p];
      const std::uint32_t j = k - d.first_item;
      status s = status::ok;
      if (j == 0) {
        if (d.hdr != nullptr) s = put(coop_warp{}, d.ep, d.region, d.hdr_offset, d.hdr, d.hdr_bytes);
      } else {
        const std::uint32_t r0 = (j - 1) * a.rows_per_item;
        const std::uint32_t n = min(a.rows_per_item, d.rows - r0);
        s = put(coop_warp{}, d.ep, d.region, d.rows_offset + r0 * a.row, a.src + a.src_offset[k], n * a.row);
      }
      if (s != status::ok) {
        if (lane == 0) record_failure(a.failure, s);
        return;
      }
      ++done;
    }
    if (done != 0) arrive(a, p, done, lane);
  }

  if (a.wait_after && gw == 0 && lane == 0) {
    record_failure(a.failure, wait_all(a));
    const unsigned long long t = now_ns();
    a.stamps[1] = t;
    atomicMax(&a.stamps[3], t);
  }
}

__global__ void gate_kernel(gate_args a) {
  if (failed(a.failure)) return;
  status s = wait_signal(a.ctx, a.flag, cmp_op::ge, a.value, timeout{a.timeout_ns});
  auto tell = [&] {
    for (std::uint32_t p = 0; p < a.npeers && s == status::ok; ++p)
      s = signal(coop_thread{}, a.peers[p].ep, a.peers[p].region, a.peer_gate_offset, a.value, signal_op::set);
  };
  if (a.signal_first) tell();
  for (std::uint32_t p = 0; p < a.npeers && s == status::ok; ++p)
    s = wait_signal(a.peers[p].ep, a.my_gate + p, cmp_op::ge, a.value, timeout{a.timeout_ns});
  if (!a.signal_first) tell();
  record_failure(a.failure, s);
}

status launched(const char* what) {
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
    std::fprintf(stderr, "eaas-alltoall: launching %s: %s\n", what, cudaGetErrorString(e));
    return status::internal_error;
  }
  return status::ok;
}

}  // namespace

status launch_round(const round_args& args, unsigned blocks, cudaStream_t stream) {
  round_kernel<<<blocks, kRoundThreads, 0, stream>>>(args);
  return launched("the round kernel");
}

status launch_gate(const gate_args& args, cudaStream_t stream) {
  gate_kernel<<<1, 1, 0, stream>>>(args);
  return launched("the gate kernel");
}

}  // namespace eaas::perf::a2a
