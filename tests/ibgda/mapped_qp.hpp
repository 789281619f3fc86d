#pragma once

// Host side of running the ibgda device code from GPU kernels against the software NIC (tests and
// the soft-NIC benchmark only). Everything the NIC thread touches -- SQ ring, doorbell record, UAR
// word, collapsed CQ, data regions -- is host memory mapped into the GPU (cudaHostAllocMapped), so
// the host thread sees the GPU's stores; the posters' counters (`qp_state`) live in GPU memory,
// where the posting threads share them. Needs the CUDA runtime (include from .cu files or link
// CUDA::cudart).
//
// The soft NIC checks lkeys / rkeys against [addr, len) regions registered by address, and the
// device code hands it device addresses: that works because a mapped allocation's device pointer
// equals its host pointer under unified addressing, which `mapped_buffer::allocate` checks.

#include <cuda_runtime.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <utility>

#include "eaas/common/mlx5.hpp"
#include "eaas/common/status.hpp"
#include "eaas/detail/ibgda/qp.hpp"

namespace eaas::test {

/// ok, or internal_error after printing `what` and the CUDA error.
inline status cuda_check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return status::ok;
  std::fprintf(stderr, "%s: CUDA error %d (%s)\n", what, static_cast<int>(e), cudaGetErrorString(e));
  return status::internal_error;
}

/// Number of CUDA devices (0 without a driver or a device).
inline int cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

/// Zeroed, page-aligned host memory mapped into every GPU, with device address == host address.
class mapped_buffer {
 public:
  mapped_buffer() = default;
  mapped_buffer(const mapped_buffer&) = delete;
  mapped_buffer& operator=(const mapped_buffer&) = delete;
  mapped_buffer(mapped_buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  mapped_buffer& operator=(mapped_buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~mapped_buffer() {
    if (p_ != nullptr) (void)cudaFreeHost(p_);
  }

  status allocate(std::size_t bytes) {
    void* h = nullptr;
    if (status s = cuda_check(cudaHostAlloc(&h, bytes, cudaHostAllocMapped | cudaHostAllocPortable), "cudaHostAlloc");
        s != status::ok)
      return s;
    void* d = nullptr;
    if (status s = cuda_check(cudaHostGetDevicePointer(&d, h, 0), "cudaHostGetDevicePointer"); s != status::ok) {
      (void)cudaFreeHost(h);
      return s;
    }
    if (d != h) {  // the soft NIC would see other addresses than the kernels hand it
      std::fprintf(stderr, "mapped memory: device pointer %p differs from host pointer %p (no unified addressing)\n", d,
                   h);
      (void)cudaFreeHost(h);
      return status::unsupported;
    }
    std::memset(h, 0, bytes);
    if (p_ != nullptr) (void)cudaFreeHost(p_);
    p_ = h;
    n_ = bytes;
    return status::ok;
  }

  template <class T = std::uint8_t>
  T* get() const {
    return static_cast<T*>(p_);
  }
  std::uint64_t addr(std::size_t offset = 0) const { return reinterpret_cast<std::uint64_t>(p_) + offset; }
  std::size_t size() const { return n_; }

 private:
  void* p_ = nullptr;
  std::size_t n_ = 0;
};

/// Shape of a QP made by `mapped_qp::create`.
struct mapped_qp_options {
  std::uint32_t sq_size = 64;
  std::uint32_t db_batch = 1;
  std::uint32_t signal_period = 1;
  std::uint32_t qpn = 0x1234a;
};

/// One send queue for the soft NIC: ring, doorbell record, UAR word and CQ in mapped host memory;
/// the posters' `qp_state` in GPU memory. Attach `initial()` to the NIC before starting it.
class mapped_qp {
 public:
  mapped_qp() = default;
  mapped_qp(const mapped_qp&) = delete;
  mapped_qp& operator=(const mapped_qp&) = delete;
  ~mapped_qp() {
    if (dev_ != nullptr) (void)cudaFree(dev_);
  }

  /// `lkey` and `scratch_laddr` belong to a region registered with the NIC.
  status create(const mapped_qp_options& o, std::uint32_t lkey, std::uint64_t scratch_laddr) {
    namespace ib = detail::ibgda;
    if (status s = ring_.allocate(std::size_t{o.sq_size} * sizeof(mlx5::send_wqebb)); s != status::ok) return s;
    if (status s = ctl_.allocate(4096); s != status::ok) return s;
    std::memset(ring_.get(), 0xff, ring_.size());  // never a valid WQE index of the first lap
    auto* cq = reinterpret_cast<mlx5::cqe64*>(ctl_.get() + kCqOffset);
    ib::reset_cq(cq, 1);
    ib::qp_config c;
    c.sq = ring_.get<mlx5::send_wqebb>();
    c.sq_size = o.sq_size;
    c.sq_dbrec = reinterpret_cast<std::uint32_t*>(ctl_.get() + kDbrecOffset) + mlx5::kSendDbr;
    c.uar_db = reinterpret_cast<std::uint64_t*>(ctl_.get() + kUarOffset);
    c.cq = cq;
    c.cq_size = 1;
    c.qpn = o.qpn;
    c.lkey = lkey;
    c.scratch_laddr = scratch_laddr;
    c.db_batch = o.db_batch;
    c.signal_period = o.signal_period;
    if (status s = ib::make_qp_state(c, &init_); s != status::ok) return s;
    if (dev_ == nullptr) {
      if (status s = cuda_check(cudaMalloc(&dev_, sizeof(ib::qp_state)), "cudaMalloc(qp_state)"); s != status::ok)
        return s;
    }
    return cuda_check(cudaMemcpy(dev_, &init_, sizeof init_, cudaMemcpyHostToDevice), "cudaMemcpy(qp_state)");
  }

  /// The state as created (pointers for soft_nic::attach).
  const detail::ibgda::qp_state& initial() const { return init_; }
  /// The posters' shared state, in GPU memory.
  detail::ibgda::qp_state* device_state() const { return dev_; }
  /// The posters' state as it is now (copy from the GPU; call when no kernel runs).
  status read_state(detail::ibgda::qp_state* out) const {
    return cuda_check(cudaMemcpy(out, dev_, sizeof *out, cudaMemcpyDeviceToHost), "cudaMemcpy(qp_state back)");
  }

 private:
  static constexpr std::size_t kDbrecOffset = 0, kUarOffset = 64, kCqOffset = 128;
  mapped_buffer ring_, ctl_;
  detail::ibgda::qp_state init_{};
  detail::ibgda::qp_state* dev_ = nullptr;
};

/// Waits for `stream` with a host-side bound: every device wait here has a deadline, so a kernel
/// still running after `limit_s` is a bug. It cannot be stopped; the process exits (no hang).
inline status wait_stream_or_exit(cudaStream_t stream, double limit_s, const char* what) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(limit_s);
  for (;;) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return status::ok;
    if (e != cudaErrorNotReady) return cuda_check(e, what);
    if (std::chrono::steady_clock::now() > until) {
      std::fprintf(stderr, "%s: kernel still running after %.0f s although every device wait is bounded; exiting\n",
                   what, limit_s);
      std::fflush(stderr);
      std::_Exit(3);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

}  // namespace eaas::test
