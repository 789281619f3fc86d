#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "log.hpp"

namespace eaas {

namespace {
thread_local std::string t_last_error;
thread_local status t_last_status = status::ok;

detail::log_level read_level() noexcept {
  const char* v = std::getenv("EAAS_LOG");
  if (v == nullptr) return detail::log_level::warn;
  if (std::strcmp(v, "error") == 0) return detail::log_level::error;
  if (std::strcmp(v, "info") == 0) return detail::log_level::info;
  if (std::strcmp(v, "debug") == 0) return detail::log_level::debug;
  return detail::log_level::warn;
}
}  // namespace

std::string_view last_error() noexcept { return t_last_error; }

namespace detail {

log_level current_log_level() noexcept {
  static const log_level level = read_level();
  return level;
}

void log_line(log_level level, std::string_view msg) noexcept {
  static constexpr const char* kNames[] = {"error", "warn", "info", "debug"};
  std::fprintf(stderr, "[eaas %s] %.*s\n", kNames[static_cast<int>(level)], static_cast<int>(msg.size()), msg.data());
}

status record_failure(status s, const char* file, int line, std::string_view what) noexcept {
  try {
    t_last_error.assign(what);
    t_last_status = s;
    log(log_level::debug, "{} at {}:{}: {}", status_name(s), file, line, what);
  } catch (...) {
  }
  return s;
}

status propagate_failure(status s, const char* file, int line, const char* expr) noexcept {
  // The innermost failure explains the most: keep its sentence when it reported this same status.
  if (t_last_status == s && !t_last_error.empty()) {
    log(log_level::debug, "{} propagated at {}:{} by {}", status_name(s), file, line, expr);
    return s;
  }
  return record_failure(s, file, line, expr);
}

}  // namespace detail
}  // namespace eaas
