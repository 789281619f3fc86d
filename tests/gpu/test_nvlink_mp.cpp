// nvlink between separately started processes: a driver (this test) and eaas-gpu-peer, on two GPUs
// and on one shared GPU; then the peer is SIGKILLed while the driver's kernel waits on it.

#include <cuda_runtime_api.h>
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../../perf/pattern.hpp"
#include "../common/require_ok.hpp"
#include "../common/spawn.hpp"
#include "eaas/eaas.hpp"
#include "kernels.hpp"
#include "nvlink_kernels.hpp"

using namespace eaas;
using namespace eaas::gputest;

namespace {

constexpr std::size_t kPayload = 256 * 1024;

struct gpu_peer {
  pid_t pid = -1;
  std::unique_ptr<endpoint> ep;
  std::unique_ptr<remote_region> rr;

  gpu_peer(context& ctx, const handle_bytes& my_conn, const handle_bytes& my_region, int device,
           std::uint64_t messages) {
    test::spawned child;
    REQUIRE(test::spawn_with_pipes(
        EAAS_GPU_PEER, {std::to_string(device), std::to_string(kPayload), std::to_string(messages)}, child));
    pid = child.pid;
    handle_bytes ch, rh;
    REQUIRE(test::read_handle_line(child.from, 'C', ch));
    REQUIRE(test::read_handle_line(child.from, 'R', rh));
    REQUIRE_OK(ctx.connect(ch, ep));
    CHECK(ep->transport() == transport_kind::nvlink);
    REQUIRE_OK(ep->import_region(rh, rr));
    std::fprintf(child.to, "C %s\nR %s\n", handle_to_text(my_conn).c_str(), handle_to_text(my_region).c_str());
    std::fclose(child.to);
    std::fclose(child.from);
  }
  ~gpu_peer() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
  int wait_exit() {
    int st = 0;
    ::waitpid(pid, &st, 0);
    pid = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
  }
};

}  // namespace

TEST_CASE("nvlink across processes: echoes are exact on two GPUs and on one shared GPU; a killed peer ends waits") {
  const int gpus = device_count();
  std::vector<std::pair<int, int>> pairs{{0, 0}};
  if (gpus > 1) pairs.emplace_back(0, 1);
  for (auto [mine, theirs] : pairs) {
    CAPTURE(mine);
    CAPTURE(theirs);
    std::unique_ptr<context> ctx;
    REQUIRE_OK(context::create({.name = "driver", .cuda_device = mine}, ctx));
    std::unique_ptr<memory_region> region;
    REQUIRE_OK(ctx->allocate(4096 + kPayload, memory_kind::device, region));
    handle_bytes conn, rh;
    REQUIRE_OK(ctx->connection_handle(conn));
    REQUIRE_OK(region->export_handle(rh));
    auto* base = static_cast<unsigned char*>(region->data());
    unsigned char* src = nullptr;
    REQUIRE(cudaSetDevice(mine) == cudaSuccess);
    REQUIRE(cudaMalloc(reinterpret_cast<void**>(&src), kPayload) == cudaSuccess);
    std::vector<unsigned char> pattern(kPayload), back(kPayload);

    constexpr std::uint64_t kMessages = 20;
    {
      gpu_peer peer(*ctx, conn, rh, theirs, kMessages);
      for (std::uint64_t i = 1; i <= kMessages; ++i) {
        perf::fill_pattern(1000 * i + theirs, pattern.data(), kPayload);
        REQUIRE(cudaMemcpy(src, pattern.data(), kPayload, cudaMemcpyHostToDevice) == cudaSuccess);
        REQUIRE(cudaMemset(base + 4096, 0, kPayload) == cudaSuccess);
        status r = status::internal_error;
        REQUIRE_OK(launch_put_signal(mine, scope::block, peer.ep->view(), peer.rr->view(), 4096, src, kPayload,
                                     peer.rr->view(), 0, i, signal_op::set, r));
        REQUIRE(r == status::ok);
        REQUIRE_OK(launch_wait(mine, peer.ep->view(), reinterpret_cast<std::uint64_t*>(base), i, 10'000'000'000ull, r));
        REQUIRE(r == status::ok);
        REQUIRE(cudaMemcpy(back.data(), base + 4096, kPayload, cudaMemcpyDeviceToHost) == cudaSuccess);
        CHECK(std::memcmp(back.data(), pattern.data(), kPayload) == 0);
      }
      CHECK(peer.wait_exit() == 0);
    }
    {
      // The peer waits for a message that never comes; we kill it while our kernel waits for it.
      gpu_peer peer(*ctx, conn, rh, theirs, 1);
      const pid_t victim = peer.pid;
      status r = status::internal_error;
      std::thread killer([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        ::kill(victim, SIGKILL);
      });
      const auto t0 = std::chrono::steady_clock::now();
      REQUIRE_OK(
          launch_wait(mine, peer.ep->view(), reinterpret_cast<std::uint64_t*>(base), ~0ull, 20'000'000'000ull, r));
      const auto waited = std::chrono::steady_clock::now() - t0;
      killer.join();
      CHECK(r == status::peer_unreachable);
      CHECK(waited < std::chrono::seconds(5));
      CHECK(peer.ep->state() == endpoint_state::peer_dead);
      // The survivor works on: a new peer on the same GPU answers.
      peer.wait_exit();
      gpu_peer next(*ctx, conn, rh, theirs, 1);
      perf::fill_pattern(77, pattern.data(), kPayload);
      REQUIRE(cudaMemcpy(src, pattern.data(), kPayload, cudaMemcpyHostToDevice) == cudaSuccess);
      REQUIRE(cudaMemset(base, 0, 8) == cudaSuccess);
      REQUIRE_OK(launch_put_signal(mine, scope::warp, next.ep->view(), next.rr->view(), 4096, src, kPayload,
                                   next.rr->view(), 0, 1, signal_op::set, r));
      REQUIRE_OK(launch_wait(mine, next.ep->view(), reinterpret_cast<std::uint64_t*>(base), 1, 10'000'000'000ull, r));
      CHECK(r == status::ok);
      REQUIRE(cudaMemcpy(back.data(), base + 4096, kPayload, cudaMemcpyDeviceToHost) == cudaSuccess);
      CHECK(std::memcmp(back.data(), pattern.data(), kPayload) == 0);
      CHECK(next.wait_exit() == 0);
    }
    REQUIRE(cudaFree(src) == cudaSuccess);
  }
}
