#pragma once

// Collects watch events from a registry watch callback; tests wait on conditions over them.

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "eaas/host/registry.hpp"

namespace eaas::regtest {

struct collector {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<watch_event> events;

  /// The callback to pass to watch_prefix.
  std::function<void(const watch_event&)> fn() {
    return [this](const watch_event& e) {
      std::lock_guard lock(mu);
      events.push_back(e);
      cv.notify_all();
    };
  }
  /// Waits until `p(events)` holds; false at the limit.
  template <class Pred>
  bool wait(Pred p, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, limit, [&] { return p(events); });
  }
  bool wait_size(std::size_t n, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
    return wait([n](const std::vector<watch_event>& ev) { return ev.size() >= n; }, limit);
  }
  std::vector<watch_event> snapshot() {
    std::lock_guard lock(mu);
    return events;
  }
};

/// "put /k@12; expire /j@13; ..." for failure messages.
inline std::string describe(const std::vector<watch_event>& ev) {
  std::string s;
  for (const auto& e : ev)
    s += std::string(format_as(e.type)) + " " + e.record.key + "@" + std::to_string(e.record.mod_revision) + "; ";
  return s;
}

}  // namespace eaas::regtest
