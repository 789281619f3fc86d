#pragma once

// Liveness monitor (private): watches peer processes through pidfds (poll readable = exited) and
// flips the state words of their endpoints to peer_dead. Falls back to polling /proc where pidfds
// are unavailable.

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

namespace eaas::detail {

class peer_monitor {
 public:
  peer_monitor();
  ~peer_monitor();
  peer_monitor(const peer_monitor&) = delete;
  peer_monitor& operator=(const peer_monitor&) = delete;

  /// Sets `*state` to peer_dead (if still connected) once process (pid, start_time) is gone.
  /// Returns false if the process is already gone (nothing registered).
  bool watch(pid_t pid, std::uint64_t start_time, std::uint32_t* state);
  void unwatch(pid_t pid, std::uint32_t* state);

 private:
  struct peer {
    std::uint64_t start_time = 0;
    int pidfd = -1;  // -1: polled through /proc
    std::vector<std::uint32_t*> states;
  };
  void run();
  void mark_dead_locked(std::map<pid_t, peer>::iterator it);

  std::mutex mu_;
  std::map<pid_t, peer> peers_;
  int epoll_fd_ = -1;
  int wake_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace eaas::detail
