#pragma once

// Private logging and failure helpers of the host library (fmt stays inside lib/).

#include <fmt/format.h>

#include <string_view>

#include "eaas/host/error.hpp"
#include "eaas/host/format.hpp"

namespace eaas::detail {

enum class log_level : int { error = 0, warn = 1, info = 2, debug = 3 };

/// Level from EAAS_LOG (error|warn|info|debug), read once; default warn.
log_level current_log_level() noexcept;
void log_line(log_level level, std::string_view msg) noexcept;

template <class... Args>
void log(log_level level, fmt::format_string<Args...> f, Args&&... args) noexcept {
  if (static_cast<int>(level) > static_cast<int>(current_log_level())) return;
  try {
    log_line(level, fmt::format(f, std::forward<Args>(args)...));
  } catch (...) {
  }
}

/// Formats the reason, records it for last_error() and returns `s`.
template <class... Args>
status fail_at(const char* file, int line, status s, fmt::format_string<Args...> f, Args&&... args) noexcept {
  try {
    return record_failure(s, file, line, fmt::format(f, std::forward<Args>(args)...));
  } catch (...) {
    return record_failure(s, file, line, "(message formatting failed)");
  }
}

}  // namespace eaas::detail

#define EAAS_FAIL(s, ...) ::eaas::detail::fail_at(__FILE__, __LINE__, (s), __VA_ARGS__)
