#include "backend.hpp"

namespace eaas::regtest {

namespace {

class embedded_backend final : public backend {
 public:
  status start() {
    registry_server::options o;
    o.port = 0;
    EAAS_CHECK(registry_server::start(o, server_));
    port_ = server_->port();
    return status::ok;
  }
  std::string name() const override { return "embedded"; }
  registry_options options() const override {
    registry_options o;
    o.endpoint = "embedded://127.0.0.1:" + std::to_string(port_);
    return o;
  }
  status restart() override {
    server_->stop();
    server_.reset();
    registry_server::options o;
    o.port = port_;
    return registry_server::start(o, server_);
  }
  bool persistent() const override { return false; }

 private:
  std::unique_ptr<registry_server> server_;
  std::uint16_t port_ = 0;
};

}  // namespace

status start_backend(std::unique_ptr<backend>& out) {
  auto b = std::make_unique<embedded_backend>();
  EAAS_CHECK(b->start());
  out = std::move(b);
  return status::ok;
}

}  // namespace eaas::regtest
