#include "monitor.hpp"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

#include "eaas/common/views.hpp"
#include "eaas/detail/atomic.hpp"
#include "log.hpp"
#include "process.hpp"

namespace eaas::detail {

namespace {

int open_pidfd(pid_t pid) {
#if defined(SYS_pidfd_open)
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
#else
  (void)pid;
  errno = ENOSYS;
  return -1;
#endif
}

void mark(std::uint32_t* state) {
  std::atomic_ref<std::uint32_t> w(*state);
  auto expected = static_cast<std::uint32_t>(endpoint_state::connected);
  w.compare_exchange_strong(expected, static_cast<std::uint32_t>(endpoint_state::peer_dead), std::memory_order_acq_rel);
}

constexpr int kPollFallbackMs = 50;

}  // namespace

peer_monitor::peer_monitor() {
  epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (epoll_fd_ >= 0 && wake_fd_ >= 0) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = ~std::uint64_t{0};
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);
  }
  thread_ = std::thread([this] { run(); });
}

peer_monitor::~peer_monitor() {
  stop_.store(true);
  if (wake_fd_ >= 0) {
    const std::uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof(one));
  }
  if (thread_.joinable()) thread_.join();
  for (auto& [pid, p] : peers_)
    if (p.pidfd >= 0) ::close(p.pidfd);
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

bool peer_monitor::watch(pid_t pid, std::uint64_t start_time, std::uint32_t* state) {
  std::lock_guard lock(mu_);
  auto it = peers_.find(pid);
  if (it != peers_.end() && it->second.start_time != start_time) {
    // The pid was reused: the old process is gone.
    mark_dead_locked(it);
    it = peers_.end();
  }
  if (it == peers_.end()) {
    peer p;
    p.start_time = start_time;
    p.pidfd = open_pidfd(pid);
    // The pidfd names whatever process holds `pid` now: check it is the one in the handle.
    if (!process_alive(pid, start_time)) {
      if (p.pidfd >= 0) ::close(p.pidfd);
      return false;
    }
    if (p.pidfd >= 0 && epoll_fd_ >= 0) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = static_cast<std::uint64_t>(pid);
      if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, p.pidfd, &ev) != 0) {
        ::close(p.pidfd);
        p.pidfd = -1;
      }
    } else if (p.pidfd < 0) {
      log(log_level::info, "monitor: pidfd_open({}) failed (errno {}); polling /proc every {} ms", pid, errno,
          kPollFallbackMs);
    }
    it = peers_.emplace(pid, std::move(p)).first;
  }
  it->second.states.push_back(state);
  return true;
}

void peer_monitor::unwatch(pid_t pid, std::uint32_t* state) {
  std::lock_guard lock(mu_);
  auto it = peers_.find(pid);
  if (it == peers_.end()) return;
  auto& v = it->second.states;
  std::erase(v, state);
  if (v.empty()) {
    if (it->second.pidfd >= 0) ::close(it->second.pidfd);  // closing removes it from the epoll set
    peers_.erase(it);
  }
}

void peer_monitor::mark_dead_locked(std::map<pid_t, peer>::iterator it) {
  log(log_level::info, "monitor: peer process {} exited; {} endpoint(s) marked peer_dead", it->first,
      it->second.states.size());
  for (std::uint32_t* s : it->second.states) mark(s);
  if (it->second.pidfd >= 0) ::close(it->second.pidfd);
  peers_.erase(it);
}

void peer_monitor::run() {
  epoll_event events[16];
  while (!stop_.load()) {
    const int n = epoll_fd_ >= 0 ? ::epoll_wait(epoll_fd_, events, 16, kPollFallbackMs) : -1;
    if (n < 0 && epoll_fd_ < 0) ::usleep(kPollFallbackMs * 1000);
    std::lock_guard lock(mu_);
    for (int i = 0; i < n; ++i) {
      if (events[i].data.u64 == ~std::uint64_t{0}) {
        std::uint64_t drain;
        [[maybe_unused]] ssize_t r = ::read(wake_fd_, &drain, sizeof(drain));
        continue;
      }
      auto it = peers_.find(static_cast<pid_t>(events[i].data.u64));
      if (it != peers_.end() && it->second.pidfd >= 0) mark_dead_locked(it);
    }
    for (auto it = peers_.begin(); it != peers_.end();) {
      auto next = std::next(it);
      if (it->second.pidfd < 0 && !process_alive(it->first, it->second.start_time)) mark_dead_locked(it);
      it = next;
    }
  }
}

}  // namespace eaas::detail
