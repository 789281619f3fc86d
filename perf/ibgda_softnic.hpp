#pragma once

// The ibgda posting path measured on a GPU against the software NIC (tests/ibgda/soft_nic), for
// `eaas-pingpong --transport ibgda --soft-nic`. The NIC is a host thread that reads the SQ ring,
// doorbell record and UAR word from host memory mapped into the GPU: latencies measured through it
// are the model's and PCIe's, not a NIC's. What this measures for real is the GPU side:
//   (a) the posting rate -- WQEs per second that warps posting on one QP achieve (reserve + build +
//       publish + doorbell), with doorbell batching off (a doorbell per WQE) and on; "burst" rows
//       post at most one ring with the NIC paused (no wait for completions), "sustained" rows post
//       many rings while the NIC drains them;
//   (b) an n-byte put with local completion (post + poll its CQE), in perftest's columns.
// Every result is validated (bytes moved, every WQE executed once, no model violation) before or
// after it is timed.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "eaas/common/status.hpp"

namespace eaas::perf {

/// What `run_ibgda_softnic` measures and where it writes.
struct ibgda_softnic_options {
  std::vector<std::size_t> sizes{8};           ///< (b): put payload sizes in bytes (1 .. 1 MiB)
  std::size_t iterations = 10000;              ///< (b): samples per size; (a) sustained: WQEs per posting thread
  std::size_t warmup = 1000;                   ///< (b): untimed samples first; (a) sustained: untimed WQEs per poster
  std::vector<std::uint32_t> warps{1, 4, 16};  ///< (a): one row set per count of posting warps
  std::uint32_t lanes = 1;                     ///< (a): posting lanes per warp (1: lane 0 posts for its warp; up to 32)
  std::uint32_t blocks = 1;                    ///< (a): the warps are spread over this many blocks
  std::uint32_t post_bytes = 8;                ///< (a): payload of each posted WRITE
  std::uint32_t sq_size = 1024;                ///< (a): ring size (power of two, <= 32768)
  std::uint32_t db_batch = 16;                 ///< (a): doorbell batch of the "batching on" rows ("off" is 1)
  std::uint32_t signal_period = 16;            ///< (a): a CQE every this many WQEs
  std::uint32_t burst_reps = 20;               ///< (a): burst rows: repetitions (the median is reported)
  std::string json_path;                       ///< where the JSON results go; empty: none
  int cuda_device = 0;
};

/// Runs (a) and (b) on `o.cuda_device`, prints the tables to stdout (lines starting with '#' say
/// what they are) and writes JSON when asked. Returns ok; invalid_argument for options it cannot run;
/// internal_error (message on stderr) when CUDA fails or a result does not validate. No GPU:
/// unsupported with a message.
status run_ibgda_softnic(const ibgda_softnic_options& o);

}  // namespace eaas::perf
