#pragma once

/// The control plane: a registry of records with leases and watches, behind one interface with two
/// backends — an embedded registry (a small server that needs nothing installed, serving every
/// process of one host over loopback TCP) and etcd v3 (through its JSON gateway) for many hosts.
/// Peers find each other here and exchange connection and region handles; a lapsed lease removes a
/// dead process's records and every watcher sees it.
///
/// Semantics follow etcd's: every change gets the next store revision; a watch delivers the changes
/// under a prefix in revision order, starting after a revision the caller names (list, then watch
/// from the list's revision: no gap, no duplicate). Deleting a key because its lease ended (expired
/// or revoked) is reported as `expire`, a plain delete as `remove`.
///
/// Everything that comes from the network is validated (sizes, encodings) and the client survives a
/// registry restart: calls fail with `peer_unreachable` meanwhile, watches reconnect by themselves
/// and resynchronise (a list diffed against what they delivered), and `lease_keeper` grants a new
/// lease and re-puts its records.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "eaas/common/status.hpp"

namespace eaas {

/// Largest key and value the registry accepts (larger ones are refused with invalid_argument, and
/// a backend that sends one is treated as corrupt).
inline constexpr std::size_t kMaxKeyBytes = 1024;
inline constexpr std::size_t kMaxValueBytes = 64 * 1024;

/// Where the registry is and how to talk to it.
struct registry_options {
  /// `embedded://HOST:PORT` (the eaas registry server) or `etcd://HOST:PORT` (etcd's client URL).
  std::string endpoint = "embedded://127.0.0.1:23790";
  /// Shared secret: the embedded server refuses clients without it (when it has one); for etcd it is
  /// sent as the `Authorization` header (an etcd auth token).
  std::string token;
  /// Bound on every request, including connecting.
  std::uint64_t request_timeout_ns = 2'000'000'000ull;
};

/// A key and its value as stored.
struct kv_record {
  std::string key;
  std::string value;
  std::int64_t lease = 0;            ///< 0: no lease
  std::int64_t create_revision = 0;  ///< revision of the put that created the key
  std::int64_t mod_revision = 0;     ///< revision of its last change
};

enum class watch_event_type : std::uint8_t {
  put = 0,     ///< created or changed
  remove = 1,  ///< deleted by a client
  expire = 2,  ///< deleted because its lease ended (a process went silent, or revoked its lease)
};
constexpr const char* format_as(watch_event_type t) {
  return t == watch_event_type::put ? "put" : t == watch_event_type::remove ? "remove" : "expire";
}

struct watch_event {
  watch_event_type type;
  kv_record record;  ///< for remove/expire: the key and the revision of the deletion
};

/// A running watch; events stop once it is cancelled or destroyed.
class watch {
 public:
  virtual ~watch() = default;
  /// Stops delivery; no callback runs after it returns (unless called from the callback itself).
  virtual void cancel() noexcept = 0;
};

/// A registry client. Thread-safe. Statuses: `peer_unreachable` (registry down / unreachable,
/// request timed out), `not_found`, `permission_denied` (token), `invalid_argument`
/// (key/value too large, empty key), `invalid_handle` (a malformed answer from the backend).
class registry {
 public:
  /// Connects to the registry named by `options.endpoint`.
  static status open(const registry_options& options, std::unique_ptr<registry>& out);

  virtual ~registry() = default;

  /// A lease of `ttl_seconds` (1 .. 3600); its keys disappear `ttl_seconds` after the last keep-alive.
  virtual status grant_lease(std::uint32_t ttl_seconds, std::int64_t& lease) = 0;
  /// Refreshes a lease; `not_found` once it has ended.
  virtual status keep_alive(std::int64_t lease) = 0;
  /// Ends a lease now, deleting its keys (watchers see `expire`).
  virtual status revoke_lease(std::int64_t lease) = 0;

  /// Sets `key` to `value`, attached to `lease` (0: none).
  virtual status put(std::string_view key, std::string_view value, std::int64_t lease) = 0;
  /// Reads one key; `not_found` when absent.
  virtual status get(std::string_view key, kv_record& out) = 0;
  /// Every key with this prefix, in key order, and the store revision they were read at.
  virtual status list(std::string_view prefix, std::vector<kv_record>& out, std::int64_t& revision) = 0;
  /// Deletes a key; `not_found` when absent.
  virtual status remove(std::string_view key) = 0;
  /// Sets `key` only if its mod_revision equals `expected_revision` (0: only if absent).
  /// `swapped` says whether it did; the status is ok either way.
  virtual status compare_and_swap(std::string_view key, std::int64_t expected_revision, std::string_view value,
                                  std::int64_t lease, bool& swapped) = 0;

  /// Delivers every change under `prefix` after `after_revision`, in order, on a background thread.
  virtual status watch_prefix(std::string_view prefix, std::int64_t after_revision,
                              std::function<void(const watch_event&)> on_event, std::unique_ptr<watch>& out) = 0;

 protected:
  registry() = default;
};

/// Keeps a set of records alive under one lease: refreshes it every ttl/3 from a background thread,
/// and when the lease is lost (registry restarted, process paused too long) grants a new one and puts
/// the records again. Destroying it revokes the lease (the records disappear at once).
class lease_keeper {
 public:
  /// Grants the first lease and puts `records` (key, value) under it.
  static status start(registry& reg, std::uint32_t ttl_seconds,
                      std::vector<std::pair<std::string, std::string>> records, std::unique_ptr<lease_keeper>& out);
  virtual ~lease_keeper() = default;
  /// Adds or replaces a record under the lease.
  virtual status set(std::string key, std::string value) = 0;
  /// The current lease (changes after a re-registration).
  virtual std::int64_t lease() const noexcept = 0;
  /// How many times the records were re-registered under a new lease.
  virtual std::uint64_t reregistrations() const noexcept = 0;

 protected:
  lease_keeper() = default;
};

/// The embedded registry server: leases, revisions and watches as etcd has them, in memory, on a
/// loopback TCP port. `eaas-registry serve` runs one; tests and demos embed one.
class registry_server {
 public:
  struct options {
    std::string bind = "127.0.0.1";  ///< loopback unless configured
    std::uint16_t port = 23790;      ///< 0: pick a free port
    std::string token;               ///< when set, clients must present it
  };
  static status start(const options& opts, std::unique_ptr<registry_server>& out);
  virtual ~registry_server() = default;
  /// The port it listens on.
  virtual std::uint16_t port() const noexcept = 0;
  /// Stops serving; connected clients see the registry go away.
  virtual void stop() noexcept = 0;

 protected:
  registry_server() = default;
};

}  // namespace eaas
