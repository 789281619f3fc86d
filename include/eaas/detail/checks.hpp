#pragma once

// Endpoint checks shared by the op bodies of every transport.

#include <cstdint>

#include "eaas/common/status.hpp"
#include "eaas/common/views.hpp"
#include "eaas/detail/atomic.hpp"

namespace eaas::detail {

EAAS_HOST_DEVICE status check_endpoint(const device_endpoint& ep) {
  if (EAAS_UNLIKELY(ep.magic != kEndpointViewMagic || ep.state == nullptr)) return status::invalid_argument;
  const auto st = static_cast<endpoint_state>(load_relaxed(ep.state));
  if (EAAS_LIKELY(st == endpoint_state::connected)) return status::ok;
  return st == endpoint_state::closed ? status::not_connected : status::peer_unreachable;
}

// What non-blocking ops check. On the host the state word is in this process's cache; on the device
// it lives in mapped host memory, a PCIe round trip (~1 µs) away, so device ops check only the view
// and leave the state to quiet and wait_signal.
EAAS_HOST_DEVICE status check_endpoint_fast(const device_endpoint& ep) {
#if EAAS_DEVICE_CODE
  if (EAAS_UNLIKELY(ep.magic != kEndpointViewMagic || ep.state == nullptr)) return status::invalid_argument;
  return status::ok;
#else
  return check_endpoint(ep);
#endif
}

// How often a wait reads the abort flag and endpoint state: every check on the host (cached
// words), every 20 µs on the device (words in host memory).
inline constexpr std::uint64_t kFlagPeriodNs = EAAS_DEVICE_CODE ? 20'000 : 0;

}  // namespace eaas::detail
