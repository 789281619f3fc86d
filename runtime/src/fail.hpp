#pragma once

// Failure reporting inside the runtime: a status plus a sentence for eaas::last_error(), through
// the library's public error API (the runtime includes only include/eaas/...).

#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "eaas/host/error.hpp"
#include "eaas/host/format.hpp"

namespace eaas::runtime::detail {

template <class... Args>
status fail_at(const char* file, int line, status s, fmt::format_string<Args...> f, Args&&... args) noexcept {
  try {
    return ::eaas::detail::record_failure(s, file, line, fmt::format(f, std::forward<Args>(args)...));
  } catch (...) {
    return ::eaas::detail::record_failure(s, file, line, "(message formatting failed)");
  }
}

}  // namespace eaas::runtime::detail

#define EAAS_RT_FAIL(s, ...) ::eaas::runtime::detail::fail_at(__FILE__, __LINE__, (s), __VA_ARGS__)

namespace eaas::runtime::detail {

/// A line on stderr, prefixed, for events an operator wants to see (a client linked or left, a
/// request refused). Quiet with EAAS_QUIET=1.
template <class... Args>
void note(fmt::format_string<Args...> f, Args&&... args) noexcept {
  static const bool quiet = [] {
    const char* q = std::getenv("EAAS_QUIET");
    return q != nullptr && q[0] == '1';
  }();
  if (quiet) return;
  try {
    std::string line = fmt::format(f, std::forward<Args>(args)...);
    line += '\n';
    std::fwrite(line.data(), 1, line.size(), stderr);
  } catch (...) {
  }
}

}  // namespace eaas::runtime::detail
