#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "eaas/common/macros.hpp"

namespace eaas {

/// The transports. The numbers travel in handles: never renumber.
enum class transport_kind : std::uint8_t {
  none = 0,
  shm = 1,     ///< processes on one host, CPU memory, POSIX shared memory (memfd)
  nvlink = 2,  ///< GPUs of one host: CUDA IPC peer memory
  ibgda = 3,   ///< GPUs across hosts: GPU-driven mlx5 RDMA
};

EAAS_HOST_DEVICE constexpr const char* transport_name(transport_kind t) {
  switch (t) {
    case transport_kind::none:
      return "none";
    case transport_kind::shm:
      return "shm";
    case transport_kind::nvlink:
      return "nvlink";
    case transport_kind::ibgda:
      return "ibgda";
  }
  return "unknown";
}
constexpr const char* format_as(transport_kind t) { return transport_name(t); }

/// What a signal does to the remote 64-bit word.
enum class signal_op : std::uint8_t {
  set = 0,  ///< word = value
  add = 1,  ///< word += value (atomic)
};

/// Comparison of a waited-on signal word against a value.
enum class cmp_op : std::uint8_t { eq = 0, ne, gt, ge, lt, le };

EAAS_HOST_DEVICE constexpr bool compare(std::uint64_t word, cmp_op op, std::uint64_t value) {
  switch (op) {
    case cmp_op::eq:
      return word == value;
    case cmp_op::ne:
      return word != value;
    case cmp_op::gt:
      return word > value;
    case cmp_op::ge:
      return word >= value;
    case cmp_op::lt:
      return word < value;
    case cmp_op::le:
      return word <= value;
  }
  return false;
}

/// Cooperation tags: which threads call an op together. Every thread of the group calls with the
/// same arguments. On the host (shm) only `coop_thread` exists; the others return `unsupported`.
struct coop_thread {};
struct coop_warp {};
struct coop_block {};

template <class T>
inline constexpr bool is_coop_v =
    std::is_same_v<T, coop_thread> || std::is_same_v<T, coop_warp> || std::is_same_v<T, coop_block>;

/// An absolute point in time on the clock of the execution space that waits on it (host: steady
/// clock; device: %globaltimer), in nanoseconds. Build one where it is used, with `deadline_after`.
struct deadline {
  std::uint64_t ns;
};

/// A relative bound on a wait, in nanoseconds. The clock is first read only if the awaited value is
/// not already there, so a wait that succeeds at once costs no clock read.
struct timeout {
  std::uint64_t ns;
};

/// Alignment every signal / atomic word must have.
inline constexpr std::size_t kSignalAlign = 8;

}  // namespace eaas
