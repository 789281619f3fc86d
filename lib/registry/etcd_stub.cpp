// Built when libcurl is not available: the etcd backend says so instead of being silently absent.
#include "log.hpp"
#include "registry/backends.hpp"

namespace eaas::detail {

status open_etcd(const registry_options&, std::string_view, std::unique_ptr<registry>&) {
  return EAAS_FAIL(status::unsupported, "etcd backend: eaas was built without libcurl");
}

}  // namespace eaas::detail
