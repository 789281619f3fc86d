#pragma once

// The NCCL baseline of eaas-alltoall --transport nvlink: grouped ncclSend/ncclRecv of the same
// messages (dispatch: header + rows per pair; combine: the answers back) among the same processes.

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>
#include <nlohmann/json.hpp>

#include "alltoall.hpp"
#include "alltoall_kernels.hpp"

namespace eaas::perf::a2a {

class nccl_baseline {
 public:
  /// Joins the communicator of all M + N ranks on `device`; rank 0 publishes the unique id in the
  /// rendezvous directory, the others wait for it there.
  nccl_baseline(const options& o, const plan& p, int device);
  ~nccl_baseline();
  nccl_baseline(const nccl_baseline&) = delete;
  nccl_baseline& operator=(const nccl_baseline&) = delete;

  /// Checked round, warm-up, timed rounds (batches queued behind `gate`, as eaas' rounds), checked
  /// round. Adds the nccl_* keys to `out`.
  void run(batch_gate& gate, nlohmann::json& out);

 private:
  const options& o_;
  const plan& p_;
  int device_;
  ncclComm_t comm_ = nullptr;
};

}  // namespace eaas::perf::a2a
