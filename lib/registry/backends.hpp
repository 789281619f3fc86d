#pragma once

// Registry backends (private). registry::open picks one by the endpoint's scheme.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "eaas/host/registry.hpp"

namespace eaas::detail {

/// Splits "HOST:PORT" (IPv4, or [IPv6]) into its parts; invalid_argument with the reason otherwise.
status parse_host_port(std::string_view text, std::string& host, std::uint16_t& port);

/// The embedded registry's client (embedded_client.cpp).
status open_embedded(const registry_options& options, std::string_view host_port, std::unique_ptr<registry>& out);

/// etcd v3 through its JSON gateway, with libcurl (etcd.cpp). Returns unsupported when eaas was built
/// without libcurl.
status open_etcd(const registry_options& options, std::string_view host_port, std::unique_ptr<registry>& out);

/// Checks a key and value against kMaxKeyBytes / kMaxValueBytes (non-empty key).
status check_key_value(std::string_view key, std::string_view value);

}  // namespace eaas::detail
