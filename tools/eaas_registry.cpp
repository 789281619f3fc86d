// eaas-registry: run the embedded registry, and look inside any registry (embedded or etcd).
//
//   eaas-registry serve [--bind 127.0.0.1] [--port 23790] [--token T]
//   eaas-registry [--endpoint URL] [--token T] list PREFIX | get KEY | put KEY VALUE | rm KEY | watch PREFIX

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <string>
#include <thread>

#include "eaas/eaas.hpp"

namespace {

std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }

int fail(const char* what, eaas::status s) {
  std::fprintf(stderr, "eaas-registry: %s: %s (%s)\n", what, eaas::status_name(s),
               std::string(eaas::last_error()).c_str());
  return 1;
}

// Values are often binary handles: print printable ones as they are, others as hex.
std::string show(const std::string& v) {
  for (unsigned char c : v)
    if (c < 0x20 || c > 0x7e) return "hex:" + eaas::handle_to_text(std::as_bytes(std::span(v.data(), v.size())));
  return v;
}

void print(const eaas::kv_record& r) {
  std::printf("%s\t%s\tlease=%llx\trev=%lld\n", r.key.c_str(), show(r.value).c_str(),
              static_cast<unsigned long long>(r.lease), static_cast<long long>(r.mod_revision));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eaas-registry: the embedded registry server and a client for any registry"};
  app.require_subcommand(1);
  app.fallthrough();  // --endpoint and --token may also follow the subcommand
  std::string endpoint = "embedded://127.0.0.1:23790", token, bind = "127.0.0.1", key, value;
  std::uint16_t port = 23790;
  app.add_option("--endpoint", endpoint, "registry to talk to: embedded://HOST:PORT or etcd://HOST:PORT");
  app.add_option("--token", token, "shared token (serve: required from clients; others: presented)");
  auto* serve = app.add_subcommand("serve", "run the embedded registry until SIGINT/SIGTERM");
  serve->add_option("--bind", bind, "address to listen on (loopback unless you mean otherwise)");
  serve->add_option("--port", port, "port (0: any free one, printed)");
  auto* list = app.add_subcommand("list", "records under a prefix");
  list->add_option("prefix", key)->required();
  auto* get = app.add_subcommand("get", "one record");
  get->add_option("key", key)->required();
  auto* put = app.add_subcommand("put", "set a record (no lease)");
  put->add_option("key", key)->required();
  put->add_option("value", value)->required();
  auto* rm = app.add_subcommand("rm", "delete a record");
  rm->add_option("key", key)->required();
  auto* watch = app.add_subcommand("watch", "print changes under a prefix until SIGINT");
  watch->add_option("prefix", key)->required();
  CLI11_PARSE(app, argc, argv);
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);

  if (serve->parsed()) {
    std::unique_ptr<eaas::registry_server> srv;
    if (auto s = eaas::registry_server::start({.bind = bind, .port = port, .token = token}, srv); s != eaas::status::ok)
      return fail("serve", s);
    std::printf("eaas-registry: serving on %s:%u%s\n", bind.c_str(), srv->port(),
                token.empty() ? "" : " (token required)");
    std::fflush(stdout);
    while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    return 0;
  }

  eaas::registry_options o;
  o.endpoint = endpoint;
  o.token = token;
  std::unique_ptr<eaas::registry> reg;
  if (auto s = eaas::registry::open(o, reg); s != eaas::status::ok) return fail("open", s);
  if (list->parsed()) {
    std::vector<eaas::kv_record> recs;
    std::int64_t rev = 0;
    if (auto s = reg->list(key, recs, rev); s != eaas::status::ok) return fail("list", s);
    for (const auto& r : recs) print(r);
    std::printf("# %zu record(s) at revision %lld\n", recs.size(), static_cast<long long>(rev));
    return 0;
  }
  if (get->parsed()) {
    eaas::kv_record r;
    if (auto s = reg->get(key, r); s != eaas::status::ok) return fail("get", s);
    print(r);
    return 0;
  }
  if (put->parsed()) {
    if (auto s = reg->put(key, value, 0); s != eaas::status::ok) return fail("put", s);
    return 0;
  }
  if (rm->parsed()) {
    if (auto s = reg->remove(key); s != eaas::status::ok) return fail("rm", s);
    return 0;
  }
  // watch: the current records, then every change.
  std::vector<eaas::kv_record> recs;
  std::int64_t rev = 0;
  if (auto s = reg->list(key, recs, rev); s != eaas::status::ok) return fail("list", s);
  for (const auto& r : recs) print(r);
  std::unique_ptr<eaas::watch> w;
  auto s = reg->watch_prefix(
      key, rev,
      [](const eaas::watch_event& e) {
        std::printf("%s\t", eaas::format_as(e.type));
        print(e.record);
        std::fflush(stdout);
      },
      w);
  if (s != eaas::status::ok) return fail("watch", s);
  while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  return 0;
}
