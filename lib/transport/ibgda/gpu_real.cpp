// gpu_api over the CUDA runtime (driver entry points fetched through it, so libcuda is not linked).

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <cstdint>
#include <map>
#include <string>

#include "transport/ibgda/verbs_api.hpp"

namespace eaas::detail::ibgda {

namespace {

template <class F>
F driver_entry(const char* name) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q{};
  if (cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<F>(p);
}

using get_attr_fn = CUresult (*)(int*, CUdevice_attribute, CUdevice);
using get_handle_fn = CUresult (*)(void*, CUdeviceptr, size_t, CUmemRangeHandleType, unsigned long long);
using set_attr_fn = CUresult (*)(const void*, CUpointer_attribute, CUdeviceptr);

constexpr std::size_t kAlign = 1 << 16;  // GPU page

class real_gpu final : public gpu_api {
 public:
  explicit real_gpu(int device) : device_(device) {}
  ~real_gpu() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  int alloc(std::size_t bytes, void*& ptr) override {
    if (const cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) return e;
    void* raw = nullptr;
    if (const cudaError_t e = cudaMalloc(&raw, bytes + kAlign); e != cudaSuccess) return e;
    const auto a = (reinterpret_cast<std::uintptr_t>(raw) + kAlign - 1) & ~(kAlign - 1);
    ptr = reinterpret_cast<void*>(a);
    if (const cudaError_t e = cudaMemset(raw, 0, bytes + kAlign); e != cudaSuccess) {
      cudaFree(raw);
      return e;
    }
    // The NIC reads these buffers: memory operations on them must not be reordered by the driver.
    if (auto set = driver_entry<set_attr_fn>("cuPointerSetAttribute")) {
      const int one = 1;
      set(&one, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, reinterpret_cast<CUdeviceptr>(raw));
    }
    raw_[ptr] = raw;
    return cudaDeviceSynchronize();
  }
  void free(void* ptr) override {
    auto it = raw_.find(ptr);
    if (it == raw_.end()) return;
    cudaFree(it->second);
    raw_.erase(it);
  }
  int copy_to_device(void* dst, const void* src, std::size_t bytes) override {
    return cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
  }
  int live_write(void* dst, const void* src, std::size_t bytes) override {
    return live_copy(dst, src, bytes, cudaMemcpyHostToDevice);
  }
  int live_read(void* dst, const void* src, std::size_t bytes) override {
    return live_copy(dst, src, bytes, cudaMemcpyDeviceToHost);
  }
  bool dma_buf_supported() override {
    auto get = driver_entry<get_attr_fn>("cuDeviceGetAttribute");
    int v = 0;
    return get != nullptr && get(&v, CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED, device_) == CUDA_SUCCESS && v != 0;
  }
  int dmabuf_fd(void* ptr, std::size_t bytes, int& fd) override {
    auto get = driver_entry<get_handle_fn>("cuMemGetHandleForAddressRange");
    if (get == nullptr) return cudaErrorNotSupported;
    int h = -1;
    const CUresult r = get(&h, reinterpret_cast<CUdeviceptr>(ptr), bytes, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
    if (r != CUDA_SUCCESS) return static_cast<int>(r);
    fd = h;
    return 0;
  }
  void close_fd(int fd) override { ::close(fd); }
  int map_io(void* host, std::size_t bytes, void*& device_ptr) override {
    const cudaError_t e =
        cudaHostRegister(host, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped | cudaHostRegisterIoMemory);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return e;
    }
    if (const cudaError_t g = cudaHostGetDevicePointer(&device_ptr, host, 0); g != cudaSuccess) {
      cudaHostUnregister(host);
      return g;
    }
    return 0;
  }
  void unmap_io(void* host) override { cudaHostUnregister(host); }
  std::string error_name(int code) override {
    return std::string(cudaGetErrorName(static_cast<cudaError_t>(code))) + " (" + std::to_string(code) + ")";
  }

 private:
  // cudaMemcpy would wait behind every kernel of the legacy default stream (a persistent kernel
  // that polls this endpoint never ends): copy on a non-blocking stream instead.
  int live_copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
    if (stream_ == nullptr) {
      if (const cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) return e;
      if (const cudaError_t e = cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking); e != cudaSuccess) {
        stream_ = nullptr;
        return e;
      }
    }
    if (const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, stream_); e != cudaSuccess) return e;
    return cudaStreamSynchronize(stream_);
  }
  int device_;
  cudaStream_t stream_ = nullptr;
  std::map<void*, void*> raw_;
};

}  // namespace

std::unique_ptr<gpu_api> make_real_gpu(int cuda_device) { return std::make_unique<real_gpu>(cuda_device); }

}  // namespace eaas::detail::ibgda
