#include "backend.hpp"
#include "etcd_process.hpp"

namespace eaas::regtest {

namespace {

class etcd_backend final : public backend {
 public:
  status start() { return test::etcd_process::start(etcd_); }
  std::string name() const override { return "etcd"; }
  registry_options options() const override {
    registry_options o;
    o.endpoint = etcd_->endpoint();
    return o;
  }
  status restart() override {
    etcd_->kill9();
    return etcd_->restart();
  }
  bool persistent() const override { return true; }

 private:
  std::unique_ptr<test::etcd_process> etcd_;
};

}  // namespace

status start_backend(std::unique_ptr<backend>& out) {
  auto b = std::make_unique<etcd_backend>();
  EAAS_CHECK(b->start());
  out = std::move(b);
  return status::ok;
}

}  // namespace eaas::regtest
