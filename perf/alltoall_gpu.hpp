#pragma once

// eaas-alltoall over nvlink: one rank (a process on its own GPU), and the launcher's copy-engine floor.

#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "alltoall.hpp"

namespace eaas::perf::a2a {

/// Runs rank `o.rank` over nvlink: connect, checked round, warm-up, timed rounds, checked round, then the
/// NCCL baseline (when built and `o.nccl`). Calls `report` with the rank's result line while everything
/// (context, regions, communicator) is still alive; exits through die() on any failure.
void run_rank_nvlink(const options& o, const plan& p, const std::function<void(const nlohmann::json&)>& report);

/// The floor, measured here (the launcher, once the ranks are gone): the copy engine moving the bytes of
/// the busiest GPU of each phase (cudaMemcpyPeerAsync from GPU 0 to the first receiver's GPU).
nlohmann::json copy_engine_floor(const options& o, const plan& p);

/// Waits until every rank of the run has reached the barrier named `tag` (files in the rendezvous
/// directory; untimed setup only).
void rank_barrier(const options& o, const std::string& tag);

/// Whether this build has the NCCL baseline.
bool nccl_built();

}  // namespace eaas::perf::a2a
