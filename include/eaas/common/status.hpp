#pragma once

#include <cstdint>

#include "eaas/common/macros.hpp"

namespace eaas {

/// The one result type of every eaas operation, on the host and on the device. `ok` and `in_progress`
/// are not errors; `timeout` is the normal end of a bounded wait that saw nothing. The library never
/// throws across its boundary: every failure is one of these values (on the host, `last_error()` holds
/// a sentence that says what exactly went wrong).
enum class [[nodiscard]] status : std::uint32_t{
    ok = 0,               ///< done
    in_progress,          ///< accepted, not yet complete (complete it with quiet)
    timeout,              ///< a bounded wait reached its deadline
    aborted,              ///< the context's abort flag was raised
    peer_unreachable,     ///< the peer died, left, or cannot be reached from here
    remote_access_error,  ///< the peer refused the access (bad key, bounds, permissions)
    no_resource,          ///< out of memory, descriptors, queue slots, ...
    invalid_argument,     ///< bad input: out of range offset, misaligned atomic, null buffer, ...
    invalid_handle,       ///< a handle that is truncated, corrupted, of another version or kind
    unsupported,          ///< the transport or build cannot do this (e.g. a warp op on the host)
    not_connected,        ///< the endpoint was closed
    internal_error,       ///< an operating-system or driver call failed unexpectedly
    not_found,            ///< no such key, lease or record
    permission_denied,    ///< a token or credential was missing or wrong
};

/// The last status value (for iteration in tests and tables).
inline constexpr status kLastStatus = status::permission_denied;

/// Readable lower-case name of a status ("peer_unreachable"). Never null.
EAAS_HOST_DEVICE constexpr const char* status_name(status s) {
  switch (s) {
    case status::ok:
      return "ok";
    case status::in_progress:
      return "in_progress";
    case status::timeout:
      return "timeout";
    case status::aborted:
      return "aborted";
    case status::peer_unreachable:
      return "peer_unreachable";
    case status::remote_access_error:
      return "remote_access_error";
    case status::no_resource:
      return "no_resource";
    case status::invalid_argument:
      return "invalid_argument";
    case status::invalid_handle:
      return "invalid_handle";
    case status::unsupported:
      return "unsupported";
    case status::not_connected:
      return "not_connected";
    case status::internal_error:
      return "internal_error";
    case status::not_found:
      return "not_found";
    case status::permission_denied:
      return "permission_denied";
  }
  return "unknown_status";
}

/// True for `ok` (and only `ok`).
EAAS_HOST_DEVICE constexpr bool is_ok(status s) { return s == status::ok; }

/// True for statuses that report a failure (everything but ok, in_progress).
EAAS_HOST_DEVICE constexpr bool is_error(status s) { return s != status::ok && s != status::in_progress; }

/// fmt picks this up through ADL (`fmt::format("{}", s)`) without eaas including fmt.
constexpr const char* format_as(status s) { return status_name(s); }

}  // namespace eaas
