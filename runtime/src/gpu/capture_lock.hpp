#pragma once

// One lock per process between CUDA graph captures and the GPU memory calls that can spoil them. A stream
// capture is thread-local (graph_capture.cuh), but cudaFree, cudaMalloc with its zero fill and device sync,
// and opening or closing another process's memory (cudaIpc*) synchronise implicitly, and one of those on
// another thread while a stream captures can invalidate the capture. Double batching runs two device-step
// clients in one process, each with a connector thread that allocates and frees per-server result regions:
// they all take turns here.
//
// Plain C++ (no CUDA): taken by code built without CUDA too; defined in capture_lock.cpp (eaas_moe).

#include <mutex>

namespace eaas::runtime::gpu {

/// Held by capture_graph for a whole capture (begin to instantiate), and by whoever allocates or frees GPU
/// memory while another thread of this process may be capturing: the client step (its buffers) and the
/// attention client (its result regions and links, client.cpp). A leaf lock: take it with no other runtime
/// lock held and no runtime lock under it (the library's own, inside an allocation or free, never wait for
/// it); hold it for the CUDA calls only, never across a network or registry call. Not recursive:
/// capture_graph takes it itself. Those calls may wait for GPU work in flight (an allocation's device sync,
/// cudaFree), e.g. the other half's forward under double batching: a join can then delay that half's next
/// capture by up to one forward. Bounded, never a deadlock (every wait on the GPU has a deadline).
std::mutex& capture_mutex();

}  // namespace eaas::runtime::gpu
