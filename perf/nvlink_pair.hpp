#pragma once

// eaas-pingpong and eaas-bw over NVLink (`--transport nvlink`): two processes, one GPU each (both on
// GPU 0 where the machine has one, time-sliced), kernels on both sides issuing the ops. Plain C++
// header; implemented in nvlink_pair.cu (GPU builds only).
//
// The server is driven by the client: the client's kernel puts a phase description into the server's
// region and signals it; the server's host polls that word (between phases, never while timing) and
// launches the matching kernel (an echo loop, a sink, a stream).

#include <cstddef>
#include <string>
#include <vector>

namespace eaas::perf {

struct nvlink_pair_options {
  std::string role;                ///< "server" or "client"
  std::string rendezvous;          ///< directory where the two sides exchange handles
  int gpu = -1;                    ///< this side's CUDA device; -1: client 0, server 1 (0 on a one-GPU machine)
  int server_gpu = -1;             ///< client: the server's device, for the report (-1: the default)
  std::vector<std::size_t> sizes;  ///< client: message sizes
  std::size_t max_size = 0;        ///< largest message (both sides size their regions by it)
  std::size_t iters = 0;           ///< timed messages per size (0: the tool's default)
  std::size_t warmup = 200;
  bool baseline = true;  ///< ping-pong: raw-flag floor; bw: copy engine
  std::string json;
  // ping-pong
  std::string scope = "thread";  ///< thread (1 thread), warp (32), block (512)
  bool graph = false;            ///< also time messages as nodes of a replayed CUDA graph
  // bandwidth
  unsigned blocks = 16;  ///< blocks that split each message
  bool bidir = false;
};

/// The default CUDA device of a role (client 0; server 1 where there are two GPUs, else 0).
int nvlink_default_gpu(const std::string& role);

/// Each returns the process's exit code (0 ok); failures print what failed and exit through die().
int run_nvlink_pingpong(const nvlink_pair_options& o);
int run_nvlink_bw(const nvlink_pair_options& o);
/// The server side of both tools (what it runs is decided by the client, phase by phase).
int run_nvlink_server(const nvlink_pair_options& o);

}  // namespace eaas::perf
