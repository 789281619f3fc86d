#include "registry/net.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "eaas/device/ops.hpp"
#include "log.hpp"

namespace eaas::detail::net {

namespace {

status resolve(const std::string& host, std::uint16_t port, sockaddr_storage& addr, socklen_t& len) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string p = std::to_string(port);
  if (const int rc = ::getaddrinfo(host.c_str(), p.c_str(), &hints, &res); rc != 0 || res == nullptr)
    return EAAS_FAIL(status::invalid_argument, "registry: cannot resolve '{}': {}", host, ::gai_strerror(rc));
  std::memcpy(&addr, res->ai_addr, res->ai_addrlen);
  len = res->ai_addrlen;
  ::freeaddrinfo(res);
  return status::ok;
}

}  // namespace

void set_nonblocking(int fd) { ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK); }

void close_fd(int& fd) noexcept {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

status listen_on(const std::string& host, std::uint16_t port, int& fd, std::uint16_t& bound_port) {
  sockaddr_storage addr{};
  socklen_t len = 0;
  EAAS_CHECK(resolve(host, port, addr, len));
  fd = ::socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return EAAS_FAIL(status::no_resource, "registry: socket(): {}", std::strerror(errno));
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0 || ::listen(fd, SOMAXCONN) != 0) {
    const int e = errno;
    close_fd(fd);
    return EAAS_FAIL(e == EADDRINUSE ? status::no_resource : status::internal_error,
                     "registry: cannot listen on {}:{}: {}", host, port, std::strerror(e));
  }
  sockaddr_storage got{};
  socklen_t got_len = sizeof(got);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&got), &got_len);
  bound_port = ntohs(got.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&got)->sin6_port
                                               : reinterpret_cast<sockaddr_in*>(&got)->sin_port);
  set_nonblocking(fd);
  return status::ok;
}

status connect_to(const std::string& host, std::uint16_t port, std::uint64_t timeout_ns, int& fd) {
  sockaddr_storage addr{};
  socklen_t len = 0;
  EAAS_CHECK(resolve(host, port, addr, len));
  fd = ::socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return EAAS_FAIL(status::no_resource, "registry: socket(): {}", std::strerror(errno));
  set_nonblocking(fd);
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), len);
  if (rc != 0 && errno == EINPROGRESS) {
    pollfd p{fd, POLLOUT, 0};
    rc = ::poll(&p, 1, static_cast<int>(timeout_ns / 1'000'000 + 1));
    int err = 0;
    socklen_t el = sizeof(err);
    if (rc == 1) ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
    rc = (rc == 1 && err == 0) ? 0 : -1;
    if (rc != 0) errno = rc == 0 ? 0 : (err != 0 ? err : ETIMEDOUT);
  }
  if (rc != 0) {
    const int e = errno;
    close_fd(fd);
    return EAAS_FAIL(status::peer_unreachable, "registry: cannot connect to {}:{}: {}", host, port, std::strerror(e));
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return status::ok;
}

status write_all(int fd, const std::byte* data, std::size_t n, std::uint64_t timeout_ns) {
  const std::uint64_t until = now_ns() + timeout_ns;
  while (n > 0) {
    const ssize_t w = ::send(fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      data += w;
      n -= static_cast<std::size_t>(w);
      continue;
    }
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
      return EAAS_FAIL(status::peer_unreachable, "registry: connection lost: {}", std::strerror(errno));
    const std::uint64_t now = now_ns();
    if (now >= until) return EAAS_FAIL(status::peer_unreachable, "registry: write timed out");
    pollfd p{fd, POLLOUT, 0};
    ::poll(&p, 1, static_cast<int>((until - now) / 1'000'000 + 1));
  }
  return status::ok;
}

}  // namespace eaas::detail::net
