#include <set>
#include <string>

#include "eaas/host/format.hpp"
#include "fixture.hpp"

TEST_CASE("status names are distinct and fmt prints them") {
  std::set<std::string> names;
  for (std::uint32_t i = 0; i <= static_cast<std::uint32_t>(eaas::kLastStatus); ++i) {
    const auto s = static_cast<eaas::status>(i);
    const std::string name = eaas::status_name(s);
    CHECK(name != "unknown_status");
    CHECK(names.insert(name).second);
    CHECK(fmt::format("{}", s) == name);
  }
  CHECK(std::string(eaas::status_name(static_cast<eaas::status>(999))) == "unknown_status");
  CHECK(fmt::format("{}", eaas::status::peer_unreachable) == "peer_unreachable");
  CHECK(eaas::is_error(eaas::status::timeout));
  CHECK_FALSE(eaas::is_error(eaas::status::in_progress));
  CHECK_FALSE(eaas::is_error(eaas::status::ok));
}

namespace {
eaas::status inner() {
  return eaas::detail::record_failure(eaas::status::no_resource, __FILE__, __LINE__, "the reason");
}
eaas::status outer() {
  EAAS_CHECK(inner());
  return eaas::status::ok;
}
}  // namespace

TEST_CASE("EAAS_CHECK propagates the status and keeps the innermost reason") {
  CHECK(outer() == eaas::status::no_resource);
  CHECK(std::string(eaas::last_error()) == "the reason");
  // A status that nobody explained gets the failing expression as its reason.
  auto bare = []() -> eaas::status {
    EAAS_CHECK(eaas::status::timeout);
    return eaas::status::ok;
  };
  CHECK(bare() == eaas::status::timeout);
  CHECK(std::string(eaas::last_error()).find("status::timeout") != std::string::npos);
}

TEST_CASE("compare implements every cmp_op") {
  using eaas::cmp_op;
  CHECK(eaas::compare(3, cmp_op::eq, 3));
  CHECK_FALSE(eaas::compare(3, cmp_op::eq, 4));
  CHECK(eaas::compare(3, cmp_op::ne, 4));
  CHECK(eaas::compare(5, cmp_op::gt, 4));
  CHECK_FALSE(eaas::compare(4, cmp_op::gt, 4));
  CHECK(eaas::compare(4, cmp_op::ge, 4));
  CHECK(eaas::compare(3, cmp_op::lt, 4));
  CHECK_FALSE(eaas::compare(4, cmp_op::lt, 4));
  CHECK(eaas::compare(4, cmp_op::le, 4));
  CHECK_FALSE(eaas::compare(5, cmp_op::le, 4));
}

TEST_CASE("deadline_after saturates instead of wrapping") {
  const auto d = eaas::deadline_after(~std::uint64_t{0});
  CHECK(d.ns == ~std::uint64_t{0});
  const auto before = eaas::now_ns();
  const auto d2 = eaas::deadline_after(1'000'000);
  CHECK(d2.ns >= before + 1'000'000);
}
