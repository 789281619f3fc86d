// A GPU test peer in its own process: eaas-gpu-peer DEVICE PAYLOAD_BYTES MESSAGES
// Bootstraps over pipes like tests/mp/peer.cpp (prints "C <hex>" and "R <hex>", reads the driver's
// two lines), connects over nvlink, then a kernel echoes MESSAGES payloads: wait for signal i in its
// own region, put_signal the payload back into the driver's region with signal i.
// Region layout (both sides): signal word at 0, payload at 4096.

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include "eaas/eaas.hpp"

using namespace eaas;

namespace {

__global__ void echo(device_endpoint ep, remote_view driver, std::uint64_t* my_sig, const unsigned char* my_payload,
                     std::size_t n, std::uint64_t messages, status* out) {
  status s = status::ok;
  for (std::uint64_t i = 1; i <= messages && s == status::ok; ++i) {
    s = wait_signal(ep, my_sig, cmp_op::ge, i, timeout{30'000'000'000ull});
    if (s == status::ok) s = put_signal(coop_block{}, ep, driver, 4096, my_payload, n, driver, 0, i, signal_op::set);
  }
  if (threadIdx.x == 0) *out = s;
}

int die(const char* what) {
  std::fprintf(stderr, "eaas-gpu-peer: %s: %s\n", what, std::string(last_error()).c_str());
  return 2;
}

bool read_handle(char tag, handle_bytes& out) {
  std::string line;
  return std::getline(std::cin, line) && line.size() > 2 && line[0] == tag &&
         handle_from_text(std::string_view(line).substr(2), out) == status::ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const int device = std::atoi(argv[1]);
  const std::size_t n = std::strtoull(argv[2], nullptr, 10);
  const std::uint64_t messages = std::strtoull(argv[3], nullptr, 10);
  std::unique_ptr<context> ctx;
  if (context::create({.name = "gpu-peer", .cuda_device = device}, ctx) != status::ok) return die("context");
  std::unique_ptr<memory_region> mine;
  if (ctx->allocate(4096 + n, memory_kind::device, mine) != status::ok) return die("allocate");
  handle_bytes ch, rh;
  if (ctx->connection_handle(ch) != status::ok || mine->export_handle(rh) != status::ok) return die("handles");
  std::cout << "C " << handle_to_text(ch) << "\nR " << handle_to_text(rh) << std::endl;
  handle_bytes dch, drh;
  if (!read_handle('C', dch) || !read_handle('R', drh)) return die("bootstrap");
  std::unique_ptr<endpoint> ep;
  if (ctx->connect(dch, ep) != status::ok) return die("connect");
  std::unique_ptr<remote_region> driver;
  if (ep->import_region(drh, driver) != status::ok) return die("import");
  status* out = nullptr;
  if (cudaMalloc(reinterpret_cast<void**>(&out), sizeof(status)) != cudaSuccess) return 2;
  auto* base = static_cast<unsigned char*>(mine->data());
  echo<<<1, 256>>>(ep->view(), driver->view(), reinterpret_cast<std::uint64_t*>(base), base + 4096, n, messages, out);
  if (cudaDeviceSynchronize() != cudaSuccess) return 3;
  status s = status::internal_error;
  cudaMemcpy(&s, out, sizeof(s), cudaMemcpyDeviceToHost);
  if (s != status::ok) {
    std::fprintf(stderr, "eaas-gpu-peer: echo kernel ended with %s\n", status_name(s));
    return 4;
  }
  return 0;
}
