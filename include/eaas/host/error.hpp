#pragma once

#include <string>
#include <string_view>

#include "eaas/common/status.hpp"

namespace eaas {

/// The sentence that explains the most recent failure returned to this thread by the host library
/// ("shm: region handle belongs to context 7f3a..., this endpoint connects to 91c2..."). Empty when
/// nothing failed yet. Valid until the next eaas call on this thread.
std::string_view last_error() noexcept;

namespace detail {
/// Records a failure for `last_error()` and the debug log; returns `s` so call sites can
/// `return fail(...)`. Used by EAAS_CHECK and inside the library.
status record_failure(status s, const char* file, int line, std::string_view what) noexcept;
/// What EAAS_CHECK calls: keeps the sentence of the failure that produced `s`, adds the site to
/// the debug log.
status propagate_failure(status s, const char* file, int line, const char* expr) noexcept;
}  // namespace detail

}  // namespace eaas

/// Evaluates `expr` (a status); on anything but ok records where it failed and returns it from the
/// enclosing function (which must return eaas::status).
#define EAAS_CHECK(expr)                                                                  \
  do {                                                                                    \
    if (const ::eaas::status eaas_check_s_ = (expr); eaas_check_s_ != ::eaas::status::ok) \
      return ::eaas::detail::propagate_failure(eaas_check_s_, __FILE__, __LINE__, #expr); \
  } while (0)
