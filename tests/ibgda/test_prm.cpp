// Our PRM field encoder (lib/transport/ibgda/prm.hpp) against rdma-core's own DEVX helpers
// (_devx_set / _devx_get / _devx_set64 from mlx5dv.h, static inline): the same bit convention,
// byte for byte, for random fields and values; and every field of every command we send, written
// by rdma-core's helper at our offset, reads back through ours.

#include <doctest/doctest.h>
#include <infiniband/mlx5dv.h>

#include <array>
#include <cstring>
#include <random>

#include "transport/ibgda/prm.hpp"

namespace prm = eaas::detail::ibgda::prm;

TEST_CASE("ibgda prm: set/get agree with rdma-core's _devx_set/_devx_get/_devx_set64 byte for byte") {
  std::mt19937_64 rng(11);
  for (int i = 0; i < 50000; ++i) {
    std::array<std::byte, 272> ours{}, theirs{};
    for (std::size_t k = 0; k < ours.size(); ++k) ours[k] = theirs[k] = static_cast<std::byte>(rng());
    const std::uint64_t v = rng();
    prm::field f{};
    if (rng() % 8 == 0) {
      f = prm::field{static_cast<std::uint32_t>(rng() % (272 * 8 / 64)) * 64, 64};
      _devx_set64(theirs.data(), v, f.bit);
    } else {
      const std::uint32_t width = 1 + rng() % 32;
      const std::uint32_t word = rng() % (272 / 4);
      const std::uint32_t in_word = rng() % (33 - width);
      f = prm::field{word * 32 + in_word, width};
      _devx_set(theirs.data(), static_cast<std::uint32_t>(v), f.bit, f.width);
    }
    REQUIRE(prm::valid(f, 272));
    prm::set(ours, f, v);
    CAPTURE(f.bit);
    CAPTURE(f.width);
    REQUIRE(std::memcmp(ours.data(), theirs.data(), ours.size()) == 0);
    const std::uint64_t want =
        f.width == 64 ? _devx_get64(theirs.data(), f.bit) : _devx_get(theirs.data(), f.bit, f.width);
    REQUIRE(prm::get(ours, f) == want);
  }
}

TEST_CASE("ibgda prm: the command fields written by rdma-core's helper read back through ours") {
  const prm::field fields[] = {prm::cmd::opcode,
                               prm::modify_qp_in::qpn,
                               prm::create_qp_in::wq_umem_id,
                               prm::create_qp_in::wq_umem_valid,
                               prm::at(prm::create_qp_in::kQpc, prm::qpc::cqn_snd),
                               prm::at(prm::create_qp_in::kQpc, prm::qpc::log_sq_size),
                               prm::at(prm::create_qp_in::kQpc, prm::qpc::dbr_umem_id),
                               prm::at(prm::create_qp_in::kQpc + prm::qpc::kPrimaryPath, prm::ads::ack_timeout),
                               prm::at(prm::create_cq_in::kCqc, prm::cqc::c_eqn),
                               prm::at(prm::create_cq_in::kCqc, prm::cqc::uar_page)};
  std::mt19937 rng(3);
  for (const auto f : fields) {
    std::array<std::byte, 272> b{};
    const std::uint32_t v = rng() & ((f.width == 32) ? ~0u : (1u << f.width) - 1);
    _devx_set(b.data(), v, f.bit, f.width);
    CHECK(prm::get(b, f) == v);
  }
  // The 64-bit fields start on a 64-bit boundary, as _devx_set64 requires.
  for (const auto f : {prm::create_cq_in::cq_umem_offset, prm::at(prm::create_cq_in::kCqc, prm::cqc::dbr_addr),
                       prm::create_qp_in::wq_umem_offset, prm::at(prm::create_qp_in::kQpc, prm::qpc::dbr_addr)}) {
    CHECK(f.bit % 64 == 0);
    std::array<std::byte, 272> b{};
    _devx_set64(b.data(), 0x0123456789abcdefull, f.bit);
    CHECK(prm::get(b, f) == 0x0123456789abcdefull);
  }
}
