// The gpu wire (wire.hpp): regions in this process's GPU, ops as small kernels on it.
//
// Each call takes a lane (a stream with its staging buffer and result words) from a pool, so that the
// client's connector thread (waiting for a welcome) and its forward pass (waiting for answers) do not
// queue behind each other; a call returns when its work on the stream has finished.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <cuda/atomic>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_fail.cuh"
#include "eaas/device/grid_put.cuh"
#include "wire.hpp"

namespace eaas::runtime {
namespace {

#define EAAS_WIRE_CUDA(x) EAAS_GPU_CUDA("gpu wire", x)

// In a call that holds a lane `l`: a failed CUDA call also marks the lane as not reusable.
#define EAAS_LANE_CUDA(x)                                                                                           \
  do {                                                                                                              \
    if (const cudaError_t e_ = (x); e_ != cudaSuccess) {                                                            \
      l->poisoned = true;                                                                                           \
      return EAAS_GPU_FAIL(status::internal_error, std::string("gpu wire: ") + #x + ": " + cudaGetErrorString(e_)); \
    }                                                                                                               \
  } while (0)

struct wait_out {
  int status;
  int pad;
  unsigned long long seen;
};

__global__ void k_put_signal(grid_put j) { grid_put_signal(j, blockIdx.x, gridDim.x); }

__global__ void k_signal(device_endpoint ep, remote_view sig, std::uint64_t offset, std::uint64_t value, int* result) {
  status s = signal(coop_thread{}, ep, sig, offset, value, signal_op::set);
  if (s == status::ok) s = quiet(coop_thread{}, ep);
  *result = static_cast<int>(s);
}

__global__ void k_wait(device_endpoint ep, const std::uint64_t* word, cmp_op cmp, std::uint64_t value,
                       std::uint64_t timeout_ns, wait_out* out) {
  std::uint64_t seen = 0;
  const status s = wait_signal(ep, word, cmp, value, timeout{timeout_ns}, &seen);
  out->status = static_cast<int>(s);
  out->seen = seen;
}

// read_after_acquire: the word at kWordAt of the lane's page-locked buffer, the bytes from kBytesAt.
constexpr std::size_t kWordAt = 0, kBytesAt = 16;
constexpr int kAcquireThreads = 1024;

// One block: thread 0 loads the word with acquire, the barrier orders every thread's reads after that
// load (as the device step's front does for a slot), and the copy goes straight into mapped host memory, so that
// no copy engine (outside the memory model) reads the slot. One block, so that one load orders every
// byte (blocks loading the word each could see different values); a full one, so that a routing array of
// thousands of tokens (4096 × top-8: 192 KiB) takes a dozen rounds of 16-byte loads.
__global__ void k_read_after_acquire(const unsigned char* region, std::uint64_t word_offset, std::uint64_t offset,
                                     std::uint64_t bytes, unsigned char* out) {
  if (threadIdx.x == 0) {
    auto* w = reinterpret_cast<std::uint64_t*>(const_cast<unsigned char*>(region) + word_offset);
    *reinterpret_cast<std::uint64_t*>(out + kWordAt) =
        cuda::atomic_ref<std::uint64_t, cuda::thread_scope_system>(*w).load(cuda::std::memory_order_acquire);
  }
  __syncthreads();
  const unsigned char* src = region + offset;
  unsigned char* dst = out + kBytesAt;
  if ((reinterpret_cast<std::uintptr_t>(src) | bytes) % 16 == 0) {
    for (std::uint64_t i = threadIdx.x; i < bytes / 16; i += blockDim.x)
      reinterpret_cast<uint4*>(dst)[i] = __ldcg(reinterpret_cast<const uint4*>(src) + i);
  } else if ((reinterpret_cast<std::uintptr_t>(src) | bytes) % 8 == 0) {
    for (std::uint64_t i = threadIdx.x; i < bytes / 8; i += blockDim.x)
      reinterpret_cast<unsigned long long*>(dst)[i] = __ldcg(reinterpret_cast<const unsigned long long*>(src) + i);
  } else {
    for (std::uint64_t i = threadIdx.x; i < bytes; i += blockDim.x) dst[i] = __ldcg(src + i);
  }
}

struct lane {
  cudaStream_t stream = nullptr;
  unsigned char* staging = nullptr;  // device
  std::size_t capacity = 0;
  unsigned char* pinned = nullptr;      // page-locked host memory: copies at full PCIe speed, not through
  std::size_t pinned_capacity = 0;      // the driver's pageable bounce path
  unsigned char* pinned_dev = nullptr;  // the same memory, as kernels address it (mapped)
  unsigned int* arrivals = nullptr;     // device (the base of the words allocation)
  int* result = nullptr;                // device
  wait_out* wout = nullptr;             // device
  bool poisoned = false;                // a CUDA call failed mid-way: not given back to the pool
  // Outgrown buffers, freed with the lane: cudaFree / cudaFreeHost synchronise the whole device, so
  // freeing them while another lane's wait kernel spins would stall this call for that wait.
  std::vector<void*> old_device, old_host;
  ~lane() {
    if (stream) cudaStreamDestroy(stream);
    cudaFree(staging);
    cudaFree(arrivals);
    cudaFreeHost(pinned);
    for (void* p : old_device) cudaFree(p);
    for (void* p : old_host) cudaFreeHost(p);
  }
};

// Longest single wait kernel: a longer wait is several, so that no kernel of this wire holds the GPU
// for long (see lane::old_device).
constexpr std::uint64_t kWaitSliceNs = 20'000'000ull;

bool inside(const memory_region& r, std::uint64_t offset, std::uint64_t bytes) {
  return offset <= r.size() && bytes <= r.size() - offset;
}

class gpu_wire final : public wire {
 public:
  explicit gpu_wire(int device) : device_(device) {}

  memory_kind kind() const noexcept override { return memory_kind::device; }
  int device() const noexcept override { return device_; }
  transport_kind transport() const noexcept override { return transport_kind::nvlink; }

  status read(const memory_region& r, std::uint64_t offset, void* dst, std::size_t bytes) override {
    if (!inside(r, offset, bytes)) return EAAS_GPU_FAIL(status::invalid_argument, "gpu wire: read outside its region");
    if (bytes == 0) return status::ok;
    held l(*this);
    if (!l.ok()) return l.error;
    const auto* from = static_cast<const unsigned char*>(r.data()) + offset;
    if (!bounced(bytes)) {
      EAAS_LANE_CUDA(cudaMemcpyAsync(dst, from, bytes, cudaMemcpyDeviceToHost, l->stream));
      EAAS_LANE_CUDA(cudaStreamSynchronize(l->stream));
      return status::ok;
    }
    EAAS_CHECK(pinned(*l, bytes));
    EAAS_LANE_CUDA(cudaMemcpyAsync(l->pinned, from, bytes, cudaMemcpyDeviceToHost, l->stream));
    EAAS_LANE_CUDA(cudaStreamSynchronize(l->stream));
    std::memcpy(dst, l->pinned, bytes);
    return status::ok;
  }

  status load_words(const memory_region& r, std::uint64_t offset, std::uint64_t stride, std::uint32_t count,
                    std::uint64_t* out) override {
    if (count == 0) return status::ok;
    if (offset % 8 != 0 || stride % 8 != 0 || stride == 0 || !inside(r, offset, stride * (count - 1) + 8))
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu wire: words outside their region");
    // One copy of the span (signal words are packed 64 bytes apart at the start of a region).
    std::lock_guard g(words_mu_);
    words_.resize((stride * (count - 1) + 8 + 7) / 8);
    EAAS_CHECK(read(r, offset, words_.data(), stride * (count - 1) + 8));
    for (std::uint32_t i = 0; i < count; ++i) out[i] = words_[i * (stride / 8)];
    return status::ok;
  }

  status read_after_acquire(const memory_region& r, std::uint64_t word_offset, std::uint64_t offset, void* dst,
                            std::size_t bytes, std::uint64_t* word) override {
    if (word_offset % 8 != 0 || !inside(r, word_offset, 8) || !inside(r, offset, bytes))
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu wire: an acquired read outside its region");
    held l(*this);
    if (!l.ok()) return l.error;
    // At least 64 KiB, so that a server's headers and routing arrays do not grow it call by call.
    EAAS_CHECK(pinned(*l, std::max<std::size_t>(kBytesAt + bytes, 64u << 10)));
    k_read_after_acquire<<<1, kAcquireThreads, 0, l->stream>>>(static_cast<const unsigned char*>(r.data()), word_offset,
                                                               offset, bytes, l->pinned_dev);
    EAAS_LANE_CUDA(cudaGetLastError());
    EAAS_LANE_CUDA(cudaStreamSynchronize(l->stream));
    std::memcpy(word, l->pinned + kWordAt, 8);
    if (bytes) std::memcpy(dst, l->pinned + kBytesAt, bytes);
    return status::ok;
  }

  status store_word(memory_region& r, std::uint64_t offset, std::uint64_t value) override {
    if (offset % 8 != 0 || !inside(r, offset, 8))
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu wire: word outside its region");
    held l(*this);
    if (!l.ok()) return l.error;
    EAAS_LANE_CUDA(
        cudaMemcpyAsync(static_cast<unsigned char*>(r.data()) + offset, &value, 8, cudaMemcpyHostToDevice, l->stream));
    EAAS_LANE_CUDA(cudaStreamSynchronize(l->stream));
    return status::ok;
  }

  status put_signal(const endpoint& ep, const remote_view& dst, std::uint64_t dst_offset, const void* src,
                    std::size_t bytes, const remote_view& sig, std::uint64_t sig_offset, std::uint64_t value,
                    std::size_t head) override {
    EAAS_CHECK(check_ep(ep));
    std::uint64_t commit = 0;  // the head's last word, written by the kernel's last block after everything else
    if (head != 0) {
      if (head % 8 != 0 || head > bytes || dst_offset % 8 != 0)
        return EAAS_GPU_FAIL(status::invalid_argument, "gpu wire: a head that is not whole words of the put");
      std::memcpy(&commit, static_cast<const unsigned char*>(src) + head - 8, 8);
    }
    held l(*this);
    if (!l.ok()) return l.error;
    if (l->capacity < bytes) {
      unsigned char* grown = nullptr;
      EAAS_LANE_CUDA(cudaMalloc(&grown, bytes));
      if (l->staging) l->old_device.push_back(l->staging);
      l->staging = grown;
      l->capacity = bytes;
    }
    if (bounced(bytes)) {
      EAAS_CHECK(pinned(*l, bytes));
      std::memcpy(l->pinned, src, bytes);
      EAAS_LANE_CUDA(cudaMemcpyAsync(l->staging, l->pinned, bytes, cudaMemcpyHostToDevice, l->stream));
    } else if (bytes) {
      EAAS_LANE_CUDA(cudaMemcpyAsync(l->staging, src, bytes, cudaMemcpyHostToDevice, l->stream));
    }
    EAAS_LANE_CUDA(cudaMemsetAsync(l->result, 0, sizeof(int), l->stream));
    const grid_put j{.ep = ep.view(),
                     .dst = dst,
                     .dst_offset = dst_offset,
                     .src = l->staging,
                     .bytes = bytes,
                     .sig = sig,
                     .sig_offset = sig_offset,
                     .value = value,
                     .arrivals = l->arrivals,
                     .result = l->result,
                     .head = head,
                     .commit = commit};
    k_put_signal<<<grid_put_blocks(bytes, 32), 256, 0, l->stream>>>(j);
    EAAS_LANE_CUDA(cudaGetLastError());
    return finish(l);
  }

  status signal(const endpoint& ep, const remote_view& sig, std::uint64_t sig_offset, std::uint64_t value) override {
    EAAS_CHECK(check_ep(ep));
    held l(*this);
    if (!l.ok()) return l.error;
    k_signal<<<1, 1, 0, l->stream>>>(ep.view(), sig, sig_offset, value, l->result);
    EAAS_LANE_CUDA(cudaGetLastError());
    return finish(l);
  }

  status wait(const endpoint& ep, const memory_region& r, std::uint64_t offset, cmp_op cmp, std::uint64_t value,
              std::uint64_t until_ns, std::uint64_t* seen) override {
    EAAS_CHECK(check_ep(ep));
    if (offset % 8 != 0 || !inside(r, offset, 8))
      return EAAS_GPU_FAIL(status::invalid_argument, "gpu wire: wait on a word outside its region");
    held l(*this);
    if (!l.ok()) return l.error;
    const auto* word = reinterpret_cast<const std::uint64_t*>(static_cast<const unsigned char*>(r.data()) + offset);
    for (;;) {
      const std::uint64_t now = eaas::now_ns();
      const std::uint64_t left = until_ns > now ? until_ns - now : 0;
      k_wait<<<1, 1, 0, l->stream>>>(ep.view(), word, cmp, value, left < kWaitSliceNs ? left : kWaitSliceNs, l->wout);
      EAAS_LANE_CUDA(cudaGetLastError());
      wait_out o{};
      EAAS_LANE_CUDA(cudaMemcpyAsync(&o, l->wout, sizeof(o), cudaMemcpyDeviceToHost, l->stream));
      EAAS_LANE_CUDA(cudaStreamSynchronize(l->stream));
      const auto st = static_cast<status>(o.status);
      if (st != status::timeout || eaas::now_ns() >= until_ns) {
        if (seen) *seen = o.seen;
        return st;
      }
    }
  }

  status init() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || device_ < 0 || device_ >= n)
      return EAAS_GPU_FAIL(status::unsupported, "GPU " + std::to_string(device_) + " asked for, but this host has " +
                                                    std::to_string(n) + " GPUs");
    return status::ok;
  }

 private:
  // A lane taken from the pool for one call (made when none is free), given back at scope exit.
  struct held {
    gpu_wire& w;
    std::unique_ptr<lane> l;
    status error = status::ok;
    explicit held(gpu_wire& owner) : w(owner) {
      if (cudaSetDevice(w.device_) != cudaSuccess) {
        error = EAAS_GPU_FAIL(status::internal_error, "gpu wire: cudaSetDevice failed");
        return;
      }
      {
        std::lock_guard g(w.mu_);
        if (!w.free_.empty()) {
          l = std::move(w.free_.back());
          w.free_.pop_back();
          return;
        }
      }
      error = make(l);
    }
    ~held() {
      if (!l || l->poisoned) return;  // a poisoned lane is destroyed, not reused
      std::lock_guard g(w.mu_);
      w.free_.push_back(std::move(l));
    }
    bool ok() const { return error == status::ok && l != nullptr; }
    lane* operator->() { return l.get(); }
    lane& operator*() { return *l; }
  };

  static status make(std::unique_ptr<lane>& out) {
    auto l = std::make_unique<lane>();
    EAAS_WIRE_CUDA(cudaStreamCreateWithFlags(&l->stream, cudaStreamNonBlocking));
    // One allocation for the small device words: arrivals, result, wait output. Zeroed on the lane's
    // own stream (a non-blocking stream is not ordered after the legacy default one) before first use.
    unsigned char* words = nullptr;
    EAAS_WIRE_CUDA(cudaMalloc(&words, 64));
    l->arrivals = reinterpret_cast<unsigned int*>(words);  // owned by the lane from here (freed with it)
    l->result = reinterpret_cast<int*>(words + 16);
    l->wout = reinterpret_cast<wait_out*>(words + 32);
    EAAS_WIRE_CUDA(cudaMemsetAsync(words, 0, 64, l->stream));
    EAAS_WIRE_CUDA(cudaStreamSynchronize(l->stream));
    out = std::move(l);
    return status::ok;
  }

  // Copies from 16 KiB to 1 MiB go through the lane's page-locked buffer (one memcpy on the host, then
  // a copy at full PCIe speed); smaller and larger ones straight from / to the caller's memory (the
  // driver pipelines large pageable copies through its own buffers, overlapping the host's memcpy; one
  // memcpy here does not). Measured on H200 x2, Qwen3 layer: 128 tokens (0.5 / 1 MiB each way) 1.36 ->
  // 1.17 ms per MoE round trip with the bounce; 512 tokens (2 / 4 MiB) slower with it.
  static bool bounced(std::size_t bytes) { return bytes > (16u << 10) && bytes <= (1u << 20); }

  static status pinned(lane& l, std::size_t bytes) {
    if (l.pinned_capacity >= bytes) return status::ok;
    unsigned char* grown = nullptr;
    EAAS_WIRE_CUDA(cudaMallocHost(&grown, bytes));
    void* mapped = nullptr;
    if (const cudaError_t e = cudaHostGetDevicePointer(&mapped, grown, 0); e != cudaSuccess) {
      cudaFreeHost(grown);
      return EAAS_GPU_FAIL(status::internal_error,
                           std::string("gpu wire: cudaHostGetDevicePointer: ") + cudaGetErrorString(e));
    }
    if (l.pinned) l.old_host.push_back(l.pinned);
    l.pinned = grown;
    l.pinned_dev = static_cast<unsigned char*>(mapped);
    l.pinned_capacity = bytes;
    return status::ok;
  }

  static status check_ep(const endpoint& ep) {
    if (ep.transport() != transport_kind::nvlink)
      return EAAS_GPU_FAIL(status::unsupported,
                           std::string("gpu wire: the peer is reached over ") +
                               std::string(transport_name(ep.transport())) +
                               ", not nvlink (both ends of a GPU link must run on GPUs of this host)");
    return status::ok;
  }

  status finish(held& l) {
    int r = 0;
    EAAS_LANE_CUDA(cudaMemcpyAsync(&r, l->result, sizeof(r), cudaMemcpyDeviceToHost, l->stream));
    EAAS_LANE_CUDA(cudaStreamSynchronize(l->stream));
    return static_cast<status>(r);
  }

  int device_;
  std::mutex mu_;
  std::vector<std::unique_ptr<lane>> free_;
  std::mutex words_mu_;
  std::vector<std::uint64_t> words_;
};

}  // namespace

int cuda_device_count() noexcept {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

status make_gpu_wire(int cuda_device, std::unique_ptr<wire>& out) {
  auto w = std::make_unique<gpu_wire>(cuda_device);
  EAAS_CHECK(w->init());
  out = std::move(w);
  return status::ok;
}

}  // namespace eaas::runtime
