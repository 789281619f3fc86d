#pragma once

// Small blocking/non-blocking TCP helpers for the embedded registry (private).

#include <cstddef>
#include <cstdint>
#include <string>

#include "eaas/common/status.hpp"

namespace eaas::detail::net {

/// A listening socket on host:port (port 0: any free port); `bound_port` gets the actual port.
status listen_on(const std::string& host, std::uint16_t port, int& fd, std::uint16_t& bound_port);
/// Connects within `timeout_ns`; the socket is left blocking with send/receive timeouts unset.
status connect_to(const std::string& host, std::uint16_t port, std::uint64_t timeout_ns, int& fd);
/// Writes everything, waiting at most `timeout_ns` for the socket to drain.
status write_all(int fd, const std::byte* data, std::size_t n, std::uint64_t timeout_ns);
void set_nonblocking(int fd);
void close_fd(int& fd) noexcept;

}  // namespace eaas::detail::net
