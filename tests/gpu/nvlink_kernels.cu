#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include "cuda_check.hpp"
#include "eaas/device/grid_put.cuh"
#include "eaas/device/ops.hpp"
#include "nvlink_kernels.hpp"

namespace eaas::gputest {

namespace {

template <class Coop>
__global__ void put_kernel(device_endpoint ep, remote_view dst, std::uint64_t off, const void* src, std::size_t n,
                           status* out) {
  const status s = put(Coop{}, ep, dst, off, src, n);
  if (threadIdx.x == 0) *out = s;
}
template <class Coop>
__global__ void get_kernel(device_endpoint ep, remote_view src, std::uint64_t off, void* dst, std::size_t n,
                           status* out) {
  const status s = get(Coop{}, ep, src, off, dst, n);
  const status q = quiet(Coop{}, ep);
  if (threadIdx.x == 0) *out = s != status::ok ? s : q;
}
template <class Coop>
__global__ void put_signal_kernel(device_endpoint ep, remote_view dst, std::uint64_t off, const void* src,
                                  std::size_t n, remote_view sig, std::uint64_t sig_off, std::uint64_t value,
                                  signal_op op, status* out) {
  const status s = put_signal(Coop{}, ep, dst, off, src, n, sig, sig_off, value, op);
  const status q = quiet(Coop{}, ep);
  if (threadIdx.x == 0) *out = s != status::ok ? s : q;
}

__global__ void fetch_add_kernel(device_endpoint ep, remote_view t, std::uint64_t off, std::uint64_t* fetched,
                                 status* out) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const status s = fetch_add(coop_thread{}, ep, t, off, 1, &fetched[i]);
  const status q = quiet(coop_thread{}, ep);
  if (s != status::ok || q != status::ok) *out = s != status::ok ? s : q;
}

// Every thread stores words i, i + stride, ... (value word_value(i)) of [off, off + 8 * words) through the
// pointer peer_pointer gives; thread 0 also records what it gives for bad ranges and views.
__global__ void peer_pointer_kernel(device_endpoint ep, remote_view v, std::uint64_t off, std::uint32_t words,
                                    std::uint64_t* probes) {
  auto* p = static_cast<std::uint64_t*>(peer_pointer(ep, v, off, std::uint64_t{words} * 8));
  const unsigned i0 = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
  if (p != nullptr)
    for (unsigned i = i0; i < words; i += stride) p[i] = peer_word_value(i);
  if (i0 != 0) return;
  remote_view forged = v;
  forged.magic ^= 1;
  remote_view other = v;
  other.owner_id ^= 1;
  probes[0] = reinterpret_cast<std::uint64_t>(p);
  probes[1] = reinterpret_cast<std::uint64_t>(peer_pointer(ep, v, v.size - 8, 16));  // one word past the end
  probes[2] = reinterpret_cast<std::uint64_t>(peer_pointer(ep, forged, off, 8));
  probes[3] = reinterpret_cast<std::uint64_t>(peer_pointer(ep, other, off, 8));
  probes[4] = reinterpret_cast<std::uint64_t>(peer_pointer(ep, v, v.size, 0));  // empty, at the end: fine
}

// The sender's group fills the payload words with i (in shared memory), then puts them and signals i.
template <class Coop>
__global__ void order_send(device_endpoint ep, remote_view payload, remote_view sig, std::uint64_t iters,
                           std::uint32_t nwords, status* out) {
  using G = detail::ldst_dev::group<Coop>;
  __shared__ std::uint64_t words[kOrderMaxWords];
  status s = status::ok;
  for (std::uint64_t i = 1; i <= iters && s == status::ok; ++i) {
    G::sync();  // the group's copy of i - 1 has read the words
    for (std::uint32_t w = G::rank(); w < nwords; w += G::size()) words[w] = i;
    G::sync();
    s = put_signal(Coop{}, ep, payload, 0, words, nwords * sizeof(std::uint64_t), sig, 0, i, signal_op::set);
  }
  if (G::rank() == 0) *out = s;
}

__global__ void order_receive(const std::uint64_t* payload, const std::uint64_t* sig, std::uint64_t iters,
                              std::uint32_t nwords, order_result* out) {
  std::uint64_t checks = 0, in_flight = 0, violations = 0, seen = 0;
  const std::uint64_t until = now_ns() + 20'000'000'000ull;
  status s = status::ok;
  while (seen < iters) {
    seen = detail::load_acquire(sig);
    for (std::uint32_t w = 0; w < nwords; ++w) violations += detail::load_relaxed(payload + w) < seen;
    ++checks;
    in_flight += seen > 0 && seen < iters;
    if ((checks & 1023) == 0 && now_ns() > until) {
      s = status::timeout;
      break;
    }
  }
  out->checks = checks;
  out->in_flight = in_flight;
  out->violations = violations;
  out->last = seen;
  out->receiver = s;
}

constexpr std::uint64_t kHeadPoison = 0xDEADBEEFDEADBEEFull;

// Transfer i's source: every word i, but the commit word's source holds the poison.
__global__ void head_fill(std::uint64_t* src, std::uint32_t words, std::uint64_t i) {
  for (std::uint32_t w = blockIdx.x * blockDim.x + threadIdx.x; w < words; w += gridDim.x * blockDim.x)
    src[w] = w == kHeadWords - 1 ? kHeadPoison : i;
}

__global__ void head_put(grid_put j) { grid_put_signal(j, blockIdx.x, gridDim.x); }

// A block: thread 0 reads the commit word with acquire; after the barrier every thread checks its words
// (the barrier orders their loads after the acquire).
__global__ void head_receive(const std::uint64_t* dst, std::uint32_t words, std::uint64_t iters,
                             head_order_result* out) {
  __shared__ std::uint64_t s_seen;
  __shared__ int s_state;  // 0: go on, 1: the last transfer seen, 2: timed out
  std::uint64_t checks = 0, in_flight = 0, violations = 0;
  const std::uint64_t until = now_ns() + 20'000'000'000ull;
  for (;;) {
    if (threadIdx.x == 0) {
      std::uint64_t c = detail::load_acquire(dst + kHeadWords - 1);
      if (c == kHeadPoison) {  // the source's bytes under the commit word were moved
        ++violations;
        c = 0;
      }
      s_seen = c;
      ++checks;
      in_flight += c > 0 && c < iters;
      s_state = c >= iters ? 1 : (checks & 1023) == 0 && now_ns() > until ? 2 : 0;
    }
    __syncthreads();
    const std::uint64_t seen = s_seen;
    const int state = s_state;
    for (std::uint32_t w = threadIdx.x; w < words; w += blockDim.x)
      if (w != kHeadWords - 1) violations += detail::load_relaxed(dst + w) < seen;
    __syncthreads();  // s_seen and s_state are written again
    if (state == 0) continue;
    if (threadIdx.x == 0) {
      out->checks = checks;
      out->in_flight = in_flight;
      out->last = seen;
      out->receiver = state == 1 ? status::ok : status::timeout;
    }
    break;
  }
  atomicAdd(reinterpret_cast<unsigned long long*>(&out->violations), static_cast<unsigned long long>(violations));
}

// Graph ping-pong: the client's sequence lives in device memory, so every replay sends the next one.
__global__ void graph_client(device_endpoint ep, remote_view server, std::uint64_t* my_sig, std::uint64_t* counter,
                             graph_result* out) {
  if (out->client != status::ok) return;  // an earlier replay failed: do not wait again
  const std::uint64_t seq = ++*counter;
  status s = put_signal(coop_thread{}, ep, server, 8, &seq, 8, server, 0, seq, signal_op::set);
  if (s == status::ok) s = wait_signal(ep, my_sig, cmp_op::ge, seq, timeout{2'000'000'000ull});
  if (s != status::ok && out->client == status::ok) out->client = s;
  out->replays_done = seq;
  out->echo = detail::load_acquire(my_sig);
}

__global__ void graph_server(device_endpoint ep, remote_view client, std::uint64_t* my_sig, int replays,
                             graph_result* out) {
  status s = status::ok;
  for (std::uint64_t i = 1; i <= static_cast<std::uint64_t>(replays) && s == status::ok; ++i) {
    s = wait_signal(ep, my_sig, cmp_op::ge, i, timeout{10'000'000'000ull});
    if (s == status::ok) s = signal(coop_thread{}, ep, client, 0, i, signal_op::set);
  }
  out->server = s;
}

__global__ void wait_kernel(device_endpoint ep, const std::uint64_t* sig, std::uint64_t value, std::uint64_t ns,
                            status* out) {
  *out = wait_signal(ep, sig, cmp_op::ge, value, timeout{ns});
}

template <class T>
status fetch(T* dev, T& host) {
  CU(cudaMemcpy(&host, dev, sizeof(T), cudaMemcpyDeviceToHost));
  CU(cudaFree(dev));
  return status::ok;
}

template <class T>
status make(T*& dev, const T& init) {
  CU(cudaMalloc(&dev, sizeof(T)));
  CU(cudaMemcpy(dev, &init, sizeof(T), cudaMemcpyHostToDevice));
  return status::ok;
}

}  // namespace

const char* scope_name(scope s) { return s == scope::thread ? "thread" : s == scope::warp ? "warp" : "block"; }

status launch_put(int device, scope sc, const device_endpoint& ep, const remote_view& dst, std::uint64_t off,
                  const void* src, std::size_t n, status& result) {
  CU(cudaSetDevice(device));
  status* r = nullptr;
  if (status s = make(r, status::internal_error); s != status::ok) return s;
  if (sc == scope::thread) put_kernel<coop_thread><<<1, 1>>>(ep, dst, off, src, n, r);
  if (sc == scope::warp) put_kernel<coop_warp><<<1, 32>>>(ep, dst, off, src, n, r);
  if (sc == scope::block) put_kernel<coop_block><<<1, 256>>>(ep, dst, off, src, n, r);
  CU(cudaGetLastError());
  CU(cudaDeviceSynchronize());
  return fetch(r, result);
}

status launch_get(int device, scope sc, const device_endpoint& ep, const remote_view& src, std::uint64_t off, void* dst,
                  std::size_t n, status& result) {
  CU(cudaSetDevice(device));
  status* r = nullptr;
  if (status s = make(r, status::internal_error); s != status::ok) return s;
  if (sc == scope::thread) get_kernel<coop_thread><<<1, 1>>>(ep, src, off, dst, n, r);
  if (sc == scope::warp) get_kernel<coop_warp><<<1, 32>>>(ep, src, off, dst, n, r);
  if (sc == scope::block) get_kernel<coop_block><<<1, 256>>>(ep, src, off, dst, n, r);
  CU(cudaGetLastError());
  CU(cudaDeviceSynchronize());
  return fetch(r, result);
}

status launch_put_signal(int device, scope sc, const device_endpoint& ep, const remote_view& dst, std::uint64_t off,
                         const void* src, std::size_t n, const remote_view& sig, std::uint64_t sig_off,
                         std::uint64_t value, signal_op op, status& result) {
  CU(cudaSetDevice(device));
  status* r = nullptr;
  if (status s = make(r, status::internal_error); s != status::ok) return s;
  if (sc == scope::thread) put_signal_kernel<coop_thread><<<1, 1>>>(ep, dst, off, src, n, sig, sig_off, value, op, r);
  if (sc == scope::warp) put_signal_kernel<coop_warp><<<1, 32>>>(ep, dst, off, src, n, sig, sig_off, value, op, r);
  if (sc == scope::block) put_signal_kernel<coop_block><<<1, 256>>>(ep, dst, off, src, n, sig, sig_off, value, op, r);
  CU(cudaGetLastError());
  CU(cudaDeviceSynchronize());
  return fetch(r, result);
}

status launch_fetch_add(int device, const device_endpoint& ep, const remote_view& t, std::uint64_t off, int blocks,
                        int threads, std::uint64_t* fetched_dev, status& result) {
  CU(cudaSetDevice(device));
  status* r = nullptr;
  if (status s = make(r, status::ok); s != status::ok) return s;
  fetch_add_kernel<<<blocks, threads>>>(ep, t, off, fetched_dev, r);
  CU(cudaGetLastError());
  CU(cudaDeviceSynchronize());
  return fetch(r, result);
}

status launch_peer_pointer(int device, const device_endpoint& ep, const remote_view& v, std::uint64_t off,
                           std::uint32_t words, unsigned blocks, std::uint64_t (&probes)[5]) {
  CU(cudaSetDevice(device));
  std::uint64_t* dev = nullptr;
  CU(cudaMalloc(reinterpret_cast<void**>(&dev), sizeof(probes)));
  peer_pointer_kernel<<<blocks, 256>>>(ep, v, off, words, dev);
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (e == cudaSuccess) e = cudaMemcpy(probes, dev, sizeof(probes), cudaMemcpyDeviceToHost);
  cudaFree(dev);
  CU(e);
  return status::ok;
}

status run_ordering(int sender_device, const device_endpoint& ep, const remote_view& payload, const remote_view& sig,
                    int receiver_device, const std::uint64_t* local_payload, const std::uint64_t* local_sig,
                    std::uint64_t iters, unsigned threads, order_result& out) {
  if (threads != 1 && threads != 32 && threads % 32 != 0) return status::invalid_argument;
  // A thread puts 32 words; a warp or block puts kOrderMaxWords, so that most of its threads store.
  const std::uint32_t nwords = threads == 1 ? 32 : kOrderMaxWords;
  const auto send = threads == 1    ? order_send<coop_thread>
                    : threads == 32 ? order_send<coop_warp>
                                    : order_send<coop_block>;
  // Everything is allocated and both kernels are loaded before the first launch: cudaMalloc and
  // lazy module loading may wait for running kernels, and these two kernels wait for each other.
  cudaFuncAttributes attr{};
  CU(cudaSetDevice(receiver_device));
  CU(cudaFuncGetAttributes(&attr, order_receive));
  CU(cudaSetDevice(sender_device));
  CU(cudaFuncGetAttributes(&attr, send));
  CU(cudaSetDevice(receiver_device));
  order_result* rr = nullptr;
  if (status s = make(rr, order_result{}); s != status::ok) return s;
  cudaStream_t rs, ss;
  CU(cudaStreamCreateWithFlags(&rs, cudaStreamNonBlocking));
  CU(cudaSetDevice(sender_device));
  status* sr = nullptr;
  if (status s = make(sr, status::internal_error); s != status::ok) return s;
  CU(cudaStreamCreateWithFlags(&ss, cudaStreamNonBlocking));
  CU(cudaSetDevice(receiver_device));
  order_receive<<<1, 1, 0, rs>>>(local_payload, local_sig, iters, nwords, rr);
  CU(cudaGetLastError());
  CU(cudaSetDevice(sender_device));
  send<<<1, threads, 0, ss>>>(ep, payload, sig, iters, nwords, sr);
  CU(cudaGetLastError());
  CU(cudaStreamSynchronize(ss));
  CU(cudaSetDevice(receiver_device));
  CU(cudaStreamSynchronize(rs));
  if (status s = fetch(rr, out); s != status::ok) return s;
  CU(cudaSetDevice(sender_device));
  if (status s = fetch(sr, out.sender); s != status::ok) return s;
  CU(cudaStreamDestroy(ss));
  CU(cudaSetDevice(receiver_device));
  CU(cudaStreamDestroy(rs));
  return status::ok;
}

status run_head_ordering(int sender_device, const device_endpoint& ep, const remote_view& dst, const remote_view& sig,
                         int receiver_device, const std::uint64_t* local_dst, const std::uint64_t* local_sig,
                         std::uint64_t iters, std::uint32_t words, unsigned blocks, head_order_result& out) {
  if (words <= kHeadWords || blocks == 0) return status::invalid_argument;
  // Allocated and loaded before the receiver starts (see run_ordering).
  cudaFuncAttributes attr{};
  CU(cudaSetDevice(receiver_device));
  CU(cudaFuncGetAttributes(&attr, head_receive));
  head_order_result* rr = nullptr;
  if (status s = make(rr, head_order_result{}); s != status::ok) return s;
  cudaStream_t rs, ss;
  CU(cudaStreamCreateWithFlags(&rs, cudaStreamNonBlocking));
  CU(cudaSetDevice(sender_device));
  CU(cudaFuncGetAttributes(&attr, head_fill));
  CU(cudaFuncGetAttributes(&attr, head_put));
  std::uint64_t* src = nullptr;
  unsigned char* words_dev = nullptr;  // arrivals at +0, result at +16
  CU(cudaMalloc(&src, std::size_t{words} * 8));
  CU(cudaMalloc(&words_dev, 64));
  CU(cudaMemset(words_dev, 0, 64));
  CU(cudaStreamCreateWithFlags(&ss, cudaStreamNonBlocking));
  CU(cudaDeviceSynchronize());
  grid_put j{.ep = ep,
             .dst = dst,
             .dst_offset = 0,
             .src = reinterpret_cast<const unsigned char*>(src),
             .bytes = std::uint64_t{words} * 8,
             .sig = sig,
             .sig_offset = 0,
             .value = 0,
             .arrivals = reinterpret_cast<unsigned int*>(words_dev),
             .result = reinterpret_cast<int*>(words_dev + 16),
             .head = kHeadWords * 8,
             .commit = 0};
  CU(cudaSetDevice(receiver_device));
  head_receive<<<1, 256, 0, rs>>>(local_dst, words, iters, rr);
  CU(cudaGetLastError());
  CU(cudaSetDevice(sender_device));
  for (std::uint64_t i = 1; i <= iters; ++i) {
    head_fill<<<4, 256, 0, ss>>>(src, words, i);
    j.value = j.commit = i;
    head_put<<<blocks, 256, 0, ss>>>(j);
  }
  CU(cudaGetLastError());
  CU(cudaStreamSynchronize(ss));
  int put_result = -1;
  CU(cudaMemcpy(&put_result, words_dev + 16, sizeof(int), cudaMemcpyDeviceToHost));
  CU(cudaSetDevice(receiver_device));
  CU(cudaStreamSynchronize(rs));
  if (status s = fetch(rr, out); s != status::ok) return s;
  out.sender = static_cast<status>(put_result);
  // A head of 12 bytes (not whole words): refused, nothing written.
  std::vector<std::uint64_t> before(words + 1), after(words + 1);
  CU(cudaMemcpy(before.data(), local_dst, std::size_t{words} * 8, cudaMemcpyDeviceToHost));
  CU(cudaMemcpy(&before[words], local_sig, 8, cudaMemcpyDeviceToHost));
  out.signal = before[words];
  CU(cudaSetDevice(sender_device));
  CU(cudaMemsetAsync(words_dev + 16, 0, sizeof(int), ss));
  head_fill<<<4, 256, 0, ss>>>(src, words, iters + 1);
  j.value = j.commit = iters + 1;
  j.head = 12;
  head_put<<<blocks, 256, 0, ss>>>(j);
  CU(cudaGetLastError());
  CU(cudaStreamSynchronize(ss));
  CU(cudaMemcpy(&put_result, words_dev + 16, sizeof(int), cudaMemcpyDeviceToHost));
  out.bad_head = static_cast<status>(put_result);
  CU(cudaSetDevice(receiver_device));
  CU(cudaMemcpy(after.data(), local_dst, std::size_t{words} * 8, cudaMemcpyDeviceToHost));
  CU(cudaMemcpy(&after[words], local_sig, 8, cudaMemcpyDeviceToHost));
  out.untouched_by_bad_head = before == after;
  CU(cudaStreamDestroy(rs));
  CU(cudaSetDevice(sender_device));
  CU(cudaStreamDestroy(ss));
  CU(cudaFree(src));
  CU(cudaFree(words_dev));
  return status::ok;
}

status run_graph_pingpong(int client_device, const device_endpoint& to_server, const remote_view& server_region,
                          std::uint64_t* client_sig_local, int server_device, const device_endpoint& to_client,
                          const remote_view& client_region, std::uint64_t* server_sig_local, int replays,
                          graph_result& out) {
  graph_result init{};
  init.client = status::ok;
  // Allocate, load and capture first: the server kernel must not be running while cudaMalloc or
  // lazy module loading may wait for it.
  cudaFuncAttributes attr{};
  CU(cudaSetDevice(server_device));
  CU(cudaFuncGetAttributes(&attr, graph_server));
  graph_result* sres = nullptr;
  if (status s = make(sres, init); s != status::ok) return s;
  cudaStream_t server_stream;
  CU(cudaStreamCreateWithFlags(&server_stream, cudaStreamNonBlocking));
  CU(cudaSetDevice(client_device));
  graph_result* cres = nullptr;
  std::uint64_t* counter = nullptr;
  if (status s = make(cres, init); s != status::ok) return s;
  if (status s = make(counter, std::uint64_t{0}); s != status::ok) return s;
  cudaStream_t cs;
  CU(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CU(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
  graph_client<<<1, 1, 0, cs>>>(to_server, server_region, client_sig_local, counter, cres);
  CU(cudaStreamEndCapture(cs, &graph));
  CU(cudaGraphInstantiate(&exec, graph, 0));

  CU(cudaSetDevice(server_device));
  graph_server<<<1, 1, 0, server_stream>>>(to_client, client_region, server_sig_local, replays, sres);
  CU(cudaGetLastError());
  CU(cudaSetDevice(client_device));
  for (int i = 0; i < replays; ++i) CU(cudaGraphLaunch(exec, cs));
  CU(cudaStreamSynchronize(cs));
  CU(cudaGraphExecDestroy(exec));
  CU(cudaGraphDestroy(graph));
  CU(cudaStreamDestroy(cs));
  graph_result c{};
  if (status s = fetch(cres, c); s != status::ok) return s;
  CU(cudaFree(counter));
  CU(cudaSetDevice(server_device));
  CU(cudaStreamSynchronize(server_stream));
  CU(cudaStreamDestroy(server_stream));
  graph_result sv{};
  if (status s = fetch(sres, sv); s != status::ok) return s;
  out = c;
  out.server = sv.server;
  return status::ok;
}

status launch_wait(int device, const device_endpoint& ep, const std::uint64_t* sig, std::uint64_t value,
                   std::uint64_t ns, status& result) {
  CU(cudaSetDevice(device));
  status* r = nullptr;
  if (status s = make(r, status::internal_error); s != status::ok) return s;
  wait_kernel<<<1, 1>>>(ep, sig, value, ns, r);
  CU(cudaGetLastError());
  CU(cudaDeviceSynchronize());
  return fetch(r, result);
}

}  // namespace eaas::gputest
