// registry::open (backend by URL scheme), argument checks, and lease_keeper.

#include <atomic>
#include <charconv>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "log.hpp"
#include "registry/backends.hpp"

namespace eaas {
namespace detail {

status parse_host_port(std::string_view text, std::string& host, std::uint16_t& port) {
  std::string_view h, p;
  if (!text.empty() && text.front() == '[') {
    const auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return EAAS_FAIL(status::invalid_argument, "registry: '{}' is not [IPV6]:PORT", text);
    h = text.substr(1, close - 1);
    p = text.substr(close + 2);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos || colon == 0)
      return EAAS_FAIL(status::invalid_argument, "registry: '{}' is not HOST:PORT", text);
    h = text.substr(0, colon);
    p = text.substr(colon + 1);
  }
  unsigned v = 0;
  const auto [ptr, ec] = std::from_chars(p.data(), p.data() + p.size(), v);
  if (ec != std::errc{} || ptr != p.data() + p.size() || v == 0 || v > 65535)
    return EAAS_FAIL(status::invalid_argument, "registry: port '{}' is not 1..65535", p);
  host = std::string(h);
  port = static_cast<std::uint16_t>(v);
  return status::ok;
}

status check_key_value(std::string_view key, std::string_view value) {
  if (key.empty() || key.size() > kMaxKeyBytes)
    return EAAS_FAIL(status::invalid_argument, "registry: key of {} bytes (1..{} allowed)", key.size(), kMaxKeyBytes);
  if (value.size() > kMaxValueBytes)
    return EAAS_FAIL(status::invalid_argument, "registry: value of {} bytes (at most {})", value.size(),
                     kMaxValueBytes);
  return status::ok;
}

namespace {

class keeper_impl final : public lease_keeper {
 public:
  keeper_impl(registry& reg, std::uint32_t ttl) : reg_(reg), ttl_(ttl) {}
  ~keeper_impl() override {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    if (lease_ != 0) (void)reg_.revoke_lease(lease_);
  }

  status begin(std::vector<std::pair<std::string, std::string>> records) {
    for (auto& [k, v] : records) {
      EAAS_CHECK(check_key_value(k, v));
      records_[k] = v;
    }
    EAAS_CHECK(register_all());
    thread_ = std::thread([this] { run(); });
    return status::ok;
  }

  status set(std::string key, std::string value) override {
    EAAS_CHECK(check_key_value(key, value));
    std::lock_guard lock(mu_);
    records_[key] = value;
    return reg_.put(key, value, lease_);
  }
  std::int64_t lease() const noexcept override { return lease_.load(); }
  std::uint64_t reregistrations() const noexcept override { return reregistrations_.load(); }

 private:
  status register_all() {
    std::int64_t lease = 0;
    EAAS_CHECK(reg_.grant_lease(ttl_, lease));
    std::lock_guard lock(mu_);
    for (const auto& [k, v] : records_) {
      if (status s = reg_.put(k, v, lease); s != status::ok) {
        (void)reg_.revoke_lease(lease);
        return s;
      }
    }
    lease_ = lease;
    return status::ok;
  }

  void run() {
    // Refresh at a third of the TTL; after a failure retry sooner, and once the registry answers
    // again but no longer knows the lease, register everything under a new one.
    const auto period = std::chrono::milliseconds(ttl_ * 1000 / 3);
    auto wait = period;
    for (;;) {
      {
        std::unique_lock lock(mu_);
        if (cv_.wait_for(lock, wait, [&] { return stop_; })) return;
      }
      const status s = reg_.keep_alive(lease_);
      if (s == status::ok) {
        wait = period;
        continue;
      }
      if (s == status::not_found && register_all() == status::ok) {
        ++reregistrations_;
        log(log_level::info, "lease_keeper: lease lost; records re-registered under lease {:x}", lease_.load());
        wait = period;
        continue;
      }
      wait = std::chrono::milliseconds(100);
    }
  }

  registry& reg_;
  std::uint32_t ttl_;
  std::atomic<std::int64_t> lease_{0};
  std::atomic<std::uint64_t> reregistrations_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::map<std::string, std::string> records_;
  std::thread thread_;
};

}  // namespace
}  // namespace detail

status registry::open(const registry_options& options, std::unique_ptr<registry>& out) {
  const std::string_view ep = options.endpoint;
  constexpr std::string_view kEmbedded = "embedded://", kEtcd = "etcd://";
  if (ep.starts_with(kEmbedded)) return detail::open_embedded(options, ep.substr(kEmbedded.size()), out);
  if (ep.starts_with(kEtcd)) return detail::open_etcd(options, ep.substr(kEtcd.size()), out);
  return EAAS_FAIL(status::invalid_argument,
                   "registry: endpoint '{}' is neither embedded://HOST:PORT nor etcd://HOST:PORT", ep);
}

status lease_keeper::start(registry& reg, std::uint32_t ttl_seconds,
                           std::vector<std::pair<std::string, std::string>> records,
                           std::unique_ptr<lease_keeper>& out) {
  try {
    if (ttl_seconds == 0 || ttl_seconds > 3600)
      return EAAS_FAIL(status::invalid_argument, "lease_keeper: TTL {} s is outside 1..3600", ttl_seconds);
    auto k = std::make_unique<detail::keeper_impl>(reg, ttl_seconds);
    EAAS_CHECK(k->begin(std::move(records)));
    out = std::move(k);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "lease_keeper: out of memory");
  } catch (const std::system_error& e) {
    return EAAS_FAIL(status::internal_error, "lease_keeper: {}", e.what());
  }
}

}  // namespace eaas
