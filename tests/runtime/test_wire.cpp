// The runtime wire's read_after_acquire (wire.hpp), over every wire present: the host wire always, the gpu
// wire where there is a CUDA device. The region is filled with random words through the wire itself, so
// that the expected bytes come from another path than the one under test.

#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <vector>

#include "../common/require_ok.hpp"
#include "eaas/eaas.hpp"
#include "wire.hpp"

using namespace eaas;
using namespace eaas::runtime;

namespace {

void check_read_after_acquire(wire& io, context& ctx) {
  constexpr std::size_t kBytes = 4096;
  std::unique_ptr<memory_region> r;
  REQUIRE_OK(ctx.allocate(kBytes, io.kind(), r));
  REQUIRE(r->size() >= kBytes);
  std::mt19937_64 rng(20261128);
  std::vector<std::uint64_t> words(kBytes / 8);
  for (std::size_t i = 0; i < words.size(); ++i) {
    words[i] = rng();
    REQUIRE_OK(io.store_word(*r, i * 8, words[i]));
  }
  const auto* expect = reinterpret_cast<const unsigned char*>(words.data());
  constexpr unsigned char kPoison = 0xA5;

  struct span {
    std::uint64_t word, offset, bytes;
  };
  // A header with its commit word; 16-, 8- and 1-byte aligned copies; the last byte filled; none.
  for (const span s : {span{56, 0, 64}, span{0, 16, 4080}, span{4088, 8, 24}, span{1000, 1000, 2000}, span{8, 3, 77},
                       span{64, 4095, 1}, span{64, 100, 0}}) {
    CAPTURE(s.word);
    CAPTURE(s.offset);
    CAPTURE(s.bytes);
    std::vector<unsigned char> dst(s.bytes + 16, kPoison);
    std::uint64_t w = ~words[s.word / 8];
    REQUIRE_OK(io.read_after_acquire(*r, s.word, s.offset, dst.data(), s.bytes, &w));
    CHECK(w == words[s.word / 8]);
    CHECK(std::memcmp(dst.data(), expect + s.offset, s.bytes) == 0);
    bool tail_untouched = true;
    for (std::size_t i = s.bytes; i < dst.size(); ++i) tail_untouched = tail_untouched && dst[i] == kPoison;
    CHECK(tail_untouched);
  }

  // Refused, with nothing written: a word not aligned or outside, a span outside (or wrapping around).
  const std::uint64_t end = r->size();
  for (const span s : {span{4, 0, 8}, span{end, 0, 8}, span{end - 4, 0, 8}, span{0, end - 4, 8}, span{0, end + 1, 0},
                       span{0, ~std::uint64_t{0} - 3, 8}}) {
    CAPTURE(s.word);
    CAPTURE(s.offset);
    CAPTURE(s.bytes);
    std::vector<unsigned char> dst(16, kPoison);
    std::uint64_t w = 12345;
    CHECK(io.read_after_acquire(*r, s.word, s.offset, dst.data(), s.bytes, &w) == status::invalid_argument);
    CHECK(w == 12345);
    CHECK(dst == std::vector<unsigned char>(16, kPoison));
  }
}

}  // namespace

TEST_CASE("runtime: read_after_acquire gives the word and exactly the bytes asked for, on every wire present") {
  {
    std::unique_ptr<context> ctx;
    REQUIRE_OK(context::create({.name = "wire-host"}, ctx));
    check_read_after_acquire(*make_host_wire(), *ctx);
  }
  if (cuda_device_count() == 0) {
    MESSAGE("no CUDA device: the gpu wire is not checked here");
    return;
  }
  std::unique_ptr<context> ctx;
  REQUIRE_OK(context::create({.name = "wire-gpu", .cuda_device = 0}, ctx));
  std::unique_ptr<wire> io;
  REQUIRE_OK(make_gpu_wire(0, io));
  check_read_after_acquire(*io, *ctx);
}
