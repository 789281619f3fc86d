#pragma once

// The seam between the ibgda host side and the outside world: a thin table of the rdma-core calls
// (verbs_api) and of the CUDA calls (gpu_api) the bring-up makes. The real tables
// (verbs_real.cpp, gpu_real.cpp) forward one call each and return the errno / CUDA error; every
// decision — what to create, in which order, with which PRM fields, what to do on failure — lives
// above this seam, so that tests drive the whole bring-up against fakes that record the commands.
//
// Handles are opaque pointers (ibv_context*, ibv_pd*, mlx5dv_devx_obj*, ... in the real table).
// Every int-returning call returns 0 or a positive errno (gpu_api: 0 or a CUDA error code).

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace eaas::detail::ibgda {

/// Link layer of a port.
enum class link_layer : std::uint8_t { infiniband = 1, ethernet = 2 };

/// What a GID table entry is for (verbs' ibv_gid_type).
enum class gid_type : std::uint8_t { ib = 0, roce_v1 = 1, roce_v2 = 2 };

using gid_bytes = std::array<std::uint8_t, 16>;

/// One RDMA device as rdma-core lists it.
struct nic_info {
  std::string name;        ///< "mlx5_0"
  bool mlx5 = false;       ///< mlx5dv_is_supported
  std::string pci_bus_id;  ///< "0000:3b:00.0" (from sysfs), empty when unknown
};

struct device_attr {
  int ports = 0;                    ///< phys_port_cnt
  int max_qp_rd_atom = 0;           ///< outstanding RDMA READ / atomic responses per QP
  bool atomic_host_endian = false;  ///< atomic_cap == IBV_ATOMIC_HCA (atomics in host endianness)
};

struct port_attr {
  bool active = false;  ///< IBV_PORT_ACTIVE
  link_layer layer = link_layer::infiniband;
  std::uint8_t active_mtu = 0;  ///< ibv_mtu: 1 = 256 .. 5 = 4096
  std::uint16_t lid = 0;
  int gid_table_len = 0;
};

struct gid_entry {
  int index = -1;
  gid_type type = gid_type::ib;
  gid_bytes gid{};
};

/// A UAR (doorbell page).
enum class uar_kind : std::uint8_t { nc_dedicated, bf, nc };
struct uar_info {
  std::uint32_t page_id = 0;
  void* reg_addr = nullptr;   ///< the doorbell register (host mapping)
  void* base_addr = nullptr;  ///< the page (host mapping)
};

/// What a RoCE packet to a peer GID needs that the QP context carries (resolved by the kernel).
struct roce_path {
  std::array<std::uint8_t, 6> rmac{};
  std::uint16_t udp_sport = 0;
};

struct mr_keys {
  std::uint32_t lkey = 0;
  std::uint32_t rkey = 0;
};

/// rdma-core, one call per method.
class verbs_api {
 public:
  virtual ~verbs_api() = default;
  /// ibv_get_device_list + mlx5dv_is_supported (+ the PCI address from sysfs).
  virtual int list_devices(std::vector<nic_info>& out) = 0;
  /// mlx5dv_open_device with MLX5DV_CONTEXT_FLAGS_DEVX.
  virtual int open_devx(const std::string& name, void*& ctx) = 0;
  virtual void close_device(void* ctx) = 0;
  /// ibv_query_device.
  virtual int query_device(void* ctx, device_attr& out) = 0;
  /// ibv_query_port.
  virtual int query_port(void* ctx, int port, port_attr& out) = 0;
  /// ibv_query_gid_ex (the entry's type included); nonzero for an empty entry.
  virtual int query_gid(void* ctx, int port, int index, gid_entry& out) = 0;
  /// ibv_alloc_pd + mlx5dv_init_obj(PD) for its number.
  virtual int alloc_pd(void* ctx, void*& pd, std::uint32_t& pdn) = 0;
  virtual void dealloc_pd(void* pd) = 0;
  /// mlx5dv_devx_query_eqn for vector 0.
  virtual int query_eqn(void* ctx, std::uint32_t& eqn) = 0;
  /// mlx5dv_devx_alloc_uar.
  virtual int alloc_uar(void* ctx, uar_kind kind, void*& uar, uar_info& out) = 0;
  virtual void free_uar(void* uar) = 0;
  /// mlx5dv_devx_umem_reg_ex with the dma-buf fd when `dmabuf_fd` >= 0, else mlx5dv_devx_umem_reg.
  virtual int umem_reg(void* ctx, void* addr, std::size_t size, int dmabuf_fd, void*& umem, std::uint32_t& id) = 0;
  virtual int umem_dereg(void* umem) = 0;
  /// mlx5dv_devx_obj_create / _modify / _destroy.
  virtual int devx_create(void* ctx, std::span<const std::byte> in, std::span<std::byte> out, void*& obj) = 0;
  virtual int devx_modify(void* obj, std::span<const std::byte> in, std::span<std::byte> out) = 0;
  virtual int devx_destroy(void* obj) = 0;
  /// ibv_create_ah to `dgid` + mlx5dv_init_obj(AH) for the resolved MAC and UDP source port, then
  /// ibv_destroy_ah.
  virtual int resolve_roce(void* pd, int port, int sgid_index, const gid_bytes& dgid, std::uint8_t traffic_class,
                           roce_path& out) = 0;
  /// ibv_reg_dmabuf_mr (dmabuf_fd >= 0: `offset` into the dma-buf, `iova` = addr) or ibv_reg_mr.
  /// Access: local write, remote read / write / atomic (+ relaxed ordering when asked).
  virtual int reg_mr(void* pd, void* addr, std::size_t size, int dmabuf_fd, std::uint64_t offset, bool relaxed,
                     void*& mr, mr_keys& out) = 0;
  virtual int dereg_mr(void* mr) = 0;
};

/// CUDA, one call per method. Error codes are CUDA's (cudaError_t / CUresult); 0 is success.
class gpu_api {
 public:
  virtual ~gpu_api() = default;
  /// Device memory of `bytes`, aligned to 64 KiB, zero-filled, with SYNC_MEMOPS set.
  virtual int alloc(std::size_t bytes, void*& ptr) = 0;
  virtual void free(void* ptr) = 0;
  /// cudaMemcpy host → device.
  virtual int copy_to_device(void* dst, const void* src, std::size_t bytes) = 0;
  /// Small copies into / out of device memory that running kernels (and the NIC) may be using: on a
  /// stream of their own that does not wait for other work (cudaStreamNonBlocking), finished when
  /// the call returns. A copy of one aligned 4- or 8-byte word is single-copy atomic. Used by a
  /// host that posts on a QP whose ring lives in GPU memory (the close notice).
  virtual int live_write(void* dst, const void* src, std::size_t bytes) = 0;
  virtual int live_read(void* dst, const void* src, std::size_t bytes) = 0;
  /// cuDeviceGetAttribute(CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED).
  virtual bool dma_buf_supported() = 0;
  /// cuMemGetHandleForAddressRange(DMA_BUF_FD): a file descriptor the caller closes with close_fd.
  virtual int dmabuf_fd(void* ptr, std::size_t bytes, int& fd) = 0;
  virtual void close_fd(int fd) = 0;
  /// cudaHostRegister(Portable | Mapped | IoMemory) + cudaHostGetDevicePointer: `host` as the GPU
  /// sees it. Needs root or PeerMappingOverride=1 (else cudaErrorNotPermitted, 800).
  virtual int map_io(void* host, std::size_t bytes, void*& device_ptr) = 0;
  virtual void unmap_io(void* host) = 0;
  /// "cudaErrorNotPermitted" for 800, and so on.
  virtual std::string error_name(int code) = 0;
};

/// cudaErrorNotPermitted: what cudaHostRegister(IoMemory) returns without root or PeerMappingOverride=1.
inline constexpr int kCudaErrorNotPermitted = 800;

/// The tables over rdma-core and CUDA; null when this build lacks one.
std::unique_ptr<verbs_api> make_real_verbs();
std::unique_ptr<gpu_api> make_real_gpu(int cuda_device);

}  // namespace eaas::detail::ibgda
