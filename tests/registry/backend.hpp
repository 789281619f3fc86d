#pragma once

// The registry backend a conformance-test binary runs against: the embedded server (always), or a
// real etcd on loopback (the etcd build of the same tests; its binary exits 77 when etcd is absent).

#include <memory>
#include <string>

#include "eaas/host/error.hpp"
#include "eaas/host/registry.hpp"

namespace eaas::regtest {

class backend {
 public:
  virtual ~backend() = default;
  virtual std::string name() const = 0;
  virtual registry_options options() const = 0;
  /// Stops the registry abruptly and starts it again on the same address.
  virtual status restart() = 0;
  /// Whether state survives restart() (etcd persists; the embedded registry starts empty).
  virtual bool persistent() const = 0;
};

/// Starts the backend this binary was built for.
status start_backend(std::unique_ptr<backend>& out);

}  // namespace eaas::regtest
