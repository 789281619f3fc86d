#pragma once

// A real etcd on loopback for tests (not shipped): free ports, a fresh data directory, quiet logs
// (in the data directory's etcd.log), fast raft ticks so that a 1 s lease is a 1 s lease.
//
// The child must not outlive the test process: it is started through `setpriv --pdeathsig KILL`
// (util-linux) when that exists, so the kernel kills etcd when the thread that started it dies
// (crash or abort included). The destructor kills it in any case. Start and restart it from the
// test's main thread (PR_SET_PDEATHSIG follows the starting thread, not the process).

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "eaas/common/status.hpp"

namespace eaas::test {

class etcd_process {
 public:
  /// Whether an etcd binary exists: $EAAS_ETCD, `etcd` on PATH, or /usr/bin/etcd.
  static bool available();
  /// Starts etcd on 127.0.0.1 (free client and peer ports) with a new data directory under /tmp and
  /// waits (up to 10 s) until it answers /health. On failure the reason is in last_error().
  static status start(std::unique_ptr<etcd_process>& out);

  ~etcd_process();
  etcd_process(const etcd_process&) = delete;
  etcd_process& operator=(const etcd_process&) = delete;

  /// "etcd://127.0.0.1:PORT", for registry_options::endpoint.
  std::string endpoint() const;
  /// "127.0.0.1:PORT".
  std::string host_port() const;
  std::uint16_t client_port() const noexcept { return client_port_; }
  /// The directory that holds etcd's data and its log (removed by the destructor).
  const std::string& directory() const noexcept { return dir_; }
  bool running() const noexcept { return pid_ > 0; }

  /// SIGKILL, then reaps it. No-op when not running.
  void kill9() noexcept;
  /// Starts etcd again on the same ports and data directory: it recovers its keys, revisions and
  /// leases (etcd restarts every lease's TTL on recovery, so a killed etcd's leases live on).
  status restart();

  /// One HTTP/1.0 request to etcd's client port (test setup: auth, compaction): POST `body` to `path`
  /// (GET when `body` is empty), with `token` as the Authorization header when non-empty.
  status http(std::string_view path, std::string_view body, std::string& answer, int& http_status,
              std::string_view token = {}) const;

 private:
  etcd_process() = default;
  status spawn();
  status wait_ready(int timeout_ms);
  std::string log_tail() const;

  std::string binary_;
  std::string dir_;
  std::uint16_t client_port_ = 0;
  std::uint16_t peer_port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace eaas::test
