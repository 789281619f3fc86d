// eaas-registry-bench: control-plane timings. Handshake = directory::link from a client to a server
// (record read, connect, region imports, link request, acknowledgement), measured many times with a
// fresh client identity each; offline detection = a lease of TTL seconds left to lapse, until a
// watcher sees it expire. Baseline in the same run: one registry round trip (get), the floor of any
// registry-mediated step.
//
//   eaas-registry-bench                      (starts an embedded registry on a free loopback port)
//   eaas-registry-bench --endpoint etcd://127.0.0.1:2379

#include <CLI/CLI.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <mutex>

#include "driver.hpp"

using namespace eaas;
using namespace eaas::perf;

namespace {

double us_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string endpoint, json;
  int iters = 200, expiries = 3;
  std::uint32_t ttl = 2;
  CLI::App app{"eaas-registry-bench: handshake and liveness timings of the control plane"};
  app.add_option("--endpoint", endpoint, "registry (default: an embedded one started here)");
  app.add_option("-n,--iters", iters, "handshakes to time");
  app.add_option("--expiries", expiries, "lease expiries to time");
  app.add_option("--ttl", ttl, "lease TTL for the expiry measurement, seconds");
  app.add_option("--json", json, "write results as JSON to this file");
  CLI11_PARSE(app, argc, argv);

  std::unique_ptr<registry_server> server;
  if (endpoint.empty()) {
    EAAS_PERF_CHECK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, server));
    endpoint = "embedded://127.0.0.1:" + std::to_string(server->port());
  }
  registry_options ro;
  ro.endpoint = endpoint;
  const std::string ns = "bench" + std::to_string(::getpid());

  // The server side: a context, a region, a directory that accepts links.
  std::unique_ptr<context> sctx;
  std::unique_ptr<memory_region> sregion;
  std::unique_ptr<registry> sreg;
  EAAS_PERF_CHECK(context::create({.name = "server"}, sctx));
  EAAS_PERF_CHECK(sctx->allocate(1 << 20, sregion));
  EAAS_PERF_CHECK(registry::open(ro, sreg));
  peer_record srec;
  srec.id = "server-0";
  srec.role = "server";
  EAAS_PERF_CHECK(sctx->connection_handle(srec.connection));
  handle_bytes h;
  EAAS_PERF_CHECK(sregion->export_handle(h));
  srec.regions.emplace_back("slots", h);
  std::unique_ptr<directory> sdir;
  EAAS_PERF_CHECK(directory::start(*sreg, *sctx, ns, srec, 10, sdir));
  std::mutex mu;
  std::vector<peer_link> accepted;
  sdir->on_link([&](peer_link&& l) {
    std::lock_guard lock(mu);
    accepted.push_back(std::move(l));
  });

  // Floor: one registry round trip.
  std::vector<double> rtt;
  for (int i = 0; i < 1000; ++i) {
    kv_record r;
    const auto t0 = std::chrono::steady_clock::now();
    EAAS_PERF_CHECK(sreg->get("/eaas/" + ns + "/peers/server-0", r));
    rtt.push_back(us_since(t0));
  }

  // Handshakes: a new client (context, registry session, directory) each time, as a joining peer.
  std::vector<double> hs;
  for (int i = 0; i < iters; ++i) {
    std::unique_ptr<context> cctx;
    std::unique_ptr<registry> creg;
    std::unique_ptr<directory> cdir;
    EAAS_PERF_CHECK(context::create({.name = "client"}, cctx));
    EAAS_PERF_CHECK(registry::open(ro, creg));
    peer_record crec;
    crec.id = "client-" + std::to_string(i);
    crec.role = "client";
    EAAS_PERF_CHECK(cctx->connection_handle(crec.connection));
    EAAS_PERF_CHECK(directory::start(*creg, *cctx, ns, crec, 10, cdir));
    peer_link link;
    const auto t0 = std::chrono::steady_clock::now();
    EAAS_PERF_CHECK(cdir->link("server-0", {}, 5'000'000'000ull, link));
    hs.push_back(us_since(t0));
    if (link.region("slots") == nullptr || link.region("slots")->size() != (1u << 20))
      die("handshake imported the wrong region", status::internal_error);
  }

  // Offline detection: a lease left to lapse, timed from its last keep-alive to the watcher's event.
  std::vector<double> offline_ms;
  for (int i = 0; i < expiries; ++i) {
    std::condition_variable cv;
    bool gone = false;
    std::unique_ptr<watch> w;
    const std::string key = "/eaas/" + ns + "/expiry/" + std::to_string(i);
    std::int64_t lease = 0;
    EAAS_PERF_CHECK(sreg->grant_lease(ttl, lease));
    EAAS_PERF_CHECK(sreg->put(key, "x", lease));
    kv_record r;
    EAAS_PERF_CHECK(sreg->get(key, r));
    EAAS_PERF_CHECK(sreg->watch_prefix(
        key, r.mod_revision,
        [&](const watch_event& e) {
          if (e.type == watch_event_type::expire) {
            std::lock_guard lock(mu);
            gone = true;
            cv.notify_all();
          }
        },
        w));
    EAAS_PERF_CHECK(sreg->keep_alive(lease));
    const auto t0 = std::chrono::steady_clock::now();
    std::unique_lock lock(mu);
    if (!cv.wait_for(lock, std::chrono::seconds(ttl + 10), [&] { return gone; }))
      die("lease never expired", status::timeout);
    offline_ms.push_back(us_since(t0) / 1e3);
  }

  const latency_stats r = summarize(rtt), s = summarize(hs), o = summarize(offline_ms);
  std::printf("# eaas-registry-bench: %s\n", endpoint.c_str());
  std::printf("# registry round trip (get), us:\n");
  print_latency_header({});
  print_latency_row(0, r, {});
  std::printf("# handshake (directory::link: read record, connect, import, request, acknowledgement), us:\n");
  print_latency_row(0, s, {});
  std::printf("# handshake / round trip (t_typical): %.1fx\n", s.t_typical / r.t_typical);
  std::printf("# offline detection after the last keep-alive, TTL %u s, ms: min %.0f typical %.0f max %.0f\n", ttl,
              o.t_min, o.t_typical, o.t_max);
  if (!json.empty()) {
    std::ofstream f(json);
    f << nlohmann::json{{"tool", "eaas-registry-bench"},
                        {"endpoint", endpoint},
                        {"date", today_utc()},
                        {"round_trip_us", to_json(0, r)},
                        {"handshake_us", to_json(0, s)},
                        {"offline_ms", to_json(0, o)},
                        {"ttl_s", ttl}}
             .dump(2)
      << "\n";
  }
  return 0;
}
