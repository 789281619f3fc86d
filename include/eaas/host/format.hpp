#pragma once

/// fmt support for eaas enums: `fmt::format("{}", status)`. fmt ≥ 10 finds `format_as` by itself;
/// this header adds formatters for older fmt (Debian 12 ships 9.1). Opt-in: include it where you
/// format; eaas never makes fmt a dependency of its public headers.

#include <fmt/format.h>

#include "eaas/common/status.hpp"
#include "eaas/common/types.hpp"

#if FMT_VERSION < 100000
template <>
struct fmt::formatter<eaas::status> : fmt::formatter<fmt::string_view> {
  template <class FormatContext>
  auto format(eaas::status s, FormatContext& ctx) const {
    return fmt::formatter<fmt::string_view>::format(eaas::status_name(s), ctx);
  }
};
template <>
struct fmt::formatter<eaas::transport_kind> : fmt::formatter<fmt::string_view> {
  template <class FormatContext>
  auto format(eaas::transport_kind t, FormatContext& ctx) const {
    return fmt::formatter<fmt::string_view>::format(eaas::transport_name(t), ctx);
  }
};
#endif
