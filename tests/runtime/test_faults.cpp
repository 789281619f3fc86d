// Fault injection on the CPU runtime, with real processes: servers SIGKILLed every 0.7 s while clients
// run (replication 2) and replacements join, graceful leaves, a SIGKILLed client, a registry restart.
// Every client checks every output against the monolithic reference; nothing may be lost or wrong.

#include <doctest/doctest.h>

#include <fstream>
#include <thread>

#include "../common/require_ok.hpp"
#include "eaas/eaas.hpp"
#include "eaas/runtime/slot.hpp"
#include "procs.hpp"

using namespace eaas;
using eaas::test::proc;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

const runtime::model_shape kShape{.hidden = 64, .inter = 96, .experts = 12, .topk = 3, .layers = 3};

json run_demo(std::vector<std::string> args) {
  args.insert(args.end(), {"--cpu", "--hidden", "64", "--inter", "96", "--experts", "12", "--topk", "3", "--layers",
                           "3", "--tokens", "24"});
  int rc = -1;
  json j = test::demo_summary(EAAS_DEMO_BIN, args, rc);
  CHECK(rc == 0);
  REQUIRE(j.is_object());
  return j;
}

}  // namespace

TEST_CASE("faults: servers SIGKILLed every 0.5 s and replaced; every token exact, stalls bounded") {
  // Clients run for 3 s (not a step count: a Release build is far faster than a sanitizer build).
  const json j = run_demo({"--servers", "3", "--clients", "2", "--replicas", "2", "--duration", "3", "--kill-every",
                           "0.5", "--request-timeout-ms", "2000"});
  CHECK(j.value("ok", false));
  CHECK(j.value("max_rel_err", 1.0) <= 1e-5);
  REQUIRE(j["kills"].size() >= 2);
  int failovers = 0;
  for (const auto& k : j["kills"]) {
    failovers += k.value("client_failovers", 0);
    // From the kill to the replicas' answers: bounded by the detection path (peer death), far below
    // the request timeout that would otherwise end the wait.
    CHECK(k.value("stall_ms", 0.0) < 2000.0);
    // The replacement took traffic, without any client restarting.
    CHECK(k.value("join_ms", -1.0) >= 0.0);
  }
  CHECK(failovers >= 1);  // some kill hit a request in flight, and it was re-sent
  for (const auto& [id, c] : j["clients"].items()) {
    CHECK(c.value("steps", 0) > 0);
    CHECK(c.value("verified_steps", -1) == c.value("steps", 0));  // every step checked
  }
}

TEST_CASE("faults: servers that leave gracefully lose nothing (no request needs a replica)") {
  const json j = run_demo({"--servers", "3", "--clients", "2", "--replicas", "2", "--duration", "3", "--kill-every",
                           "0.5", "--kill-signal", "TERM"});
  CHECK(j.value("ok", false));
  CHECK(j.value("max_rel_err", 1.0) <= 1e-5);
  REQUIRE(j["kills"].size() >= 2);
  for (const auto& k : j["kills"]) CHECK(k.value("client_failovers", -1) == 0);
  for (const auto& [id, c] : j["clients"].items()) CHECK(c.value("resent_entries", -1) == 0);
}

TEST_CASE("eaas-demo above 512 tokens: each server's slots are sized for the clients there are, outputs exact") {
  // Servers size every client slot for their most tokens; at large batches the demo asks for the slots its
  // clients need (two spare) instead of the server's default 16.
  std::vector<std::string> args = {"--cpu",  "--hidden",  "64",       "--inter", "96",       "--experts", "12",
                                   "--topk", "3",         "--layers", "2",       "--tokens", "600",       "--servers",
                                   "2",      "--clients", "2",        "--steps", "2"};
  int rc = -1;
  const json j = test::demo_summary(EAAS_DEMO_BIN, args, rc);
  CHECK(rc == 0);
  REQUIRE(j.is_object());
  CHECK(j.value("ok", false));
  CHECK(j.value("max_rel_err", 1.0) <= 1e-5);
  const json slots = j["servers"].value("slots", json::object());
  REQUIRE(slots.size() == 2);
  const auto geo = runtime::slots_geometry_for(4, 600, 64, 3);
  for (const auto& [id, s] : slots.items()) {
    CAPTURE(id);
    CHECK(s.value("slots", 0u) == 4u);  // 2 clients + 2 spare
    CHECK(s.value("max_tokens", 0u) == 600u);
    CHECK(s.value("slots_bytes", 0ull) == geo.bytes);
    CHECK(geo.bytes < runtime::slots_geometry_for(16, 600, 64, 3).bytes / 3);
  }
}

TEST_CASE("faults: a SIGKILLed client's slot is released; a new client then works") {
  std::unique_ptr<registry_server> reg;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
  const std::string ns = "fk" + std::to_string(::getpid());
  proc server, victim, next;
  auto a = test::shape_args(endpoint, ns, kShape);
  a.insert(a.end(), {"--id", "s", "--max-clients", "1"});  // one slot: the next client needs the victim's
  REQUIRE(server.start(EAAS_SERVER_BIN, a));
  REQUIRE(server.next("ready").is_object());
  auto c = test::shape_args(endpoint, ns, kShape);
  c.insert(c.end(), {"--id", "victim", "--tokens", "8", "--steps", "100000"});
  REQUIRE(victim.start(EAAS_CLIENT_BIN, c));
  const json linked = server.next("client");
  REQUIRE(linked.value("event", "") == "linked");
  REQUIRE(victim.next("progress").is_object());  // it is running
  const auto t0 = std::chrono::steady_clock::now();
  ::kill(victim.sp.pid, SIGKILL);
  const json left = server.next("client", 10000);
  const auto took = std::chrono::steady_clock::now() - t0;
  REQUIRE(left.value("event", "") == "left");
  CHECK(left.value("client", "") == "victim");
  CHECK(took < 3s);  // TTL 2 s + 1 s at the latest; the endpoint's liveness monitor is usually first
  MESSAGE("slot released ", std::chrono::duration_cast<std::chrono::milliseconds>(took).count(), " ms after SIGKILL (",
          left.value("why", ""), ")");
  auto d = test::shape_args(endpoint, ns, kShape);
  d.insert(d.end(), {"--id", "next", "--tokens", "8", "--steps", "5", "--verify"});
  REQUIRE(next.start(EAAS_CLIENT_BIN, d));
  const json r = next.next("result");
  CHECK(r.value("verified_steps", 0) == 5);
  CHECK(r.value("max_rel_err", 1.0) <= 1e-5);
  CHECK(next.wait() == 0);
}

TEST_CASE("faults: a registry restart stops nobody; servers re-register and a new server is found") {
  std::unique_ptr<registry_server> reg;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
  const std::uint16_t port = reg->port();
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(port);
  const std::string ns = "fr" + std::to_string(::getpid());
  proc servers[3], clients[2], late;
  for (int i = 0; i < 2; ++i) {
    auto a = test::shape_args(endpoint, ns, kShape);
    a.insert(a.end(), {"--id", "s" + std::to_string(i), "--placement", std::to_string(i) + "/2/2"});
    REQUIRE(servers[i].start(EAAS_SERVER_BIN, a));
    REQUIRE(servers[i].next("ready").is_object());
  }
  for (int i = 0; i < 2; ++i) {
    auto c = test::shape_args(endpoint, ns, kShape);
    c.insert(c.end(),
             {"--id", "c" + std::to_string(i), "--tokens", "16", "--steps", "100000", "--replicas", "2", "--verify"});
    REQUIRE(clients[i].start(EAAS_CLIENT_BIN, c));
    REQUIRE(clients[i].next("progress").is_object());
  }
  // The registry goes away and comes back, empty, on the same port.
  reg->stop();
  reg.reset();
  std::this_thread::sleep_for(300ms);
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = port, .token = ""}, reg));
  // A server that joins now is found by the clients through their re-established watches; then s0
  // dies, so its share must move to the newcomer or to s1.
  auto a = test::shape_args(endpoint, ns, kShape);
  a.insert(a.end(), {"--id", "s2", "--placement", "0/2/2"});
  REQUIRE(servers[2].start(EAAS_SERVER_BIN, a));
  REQUIRE(servers[2].next("ready").is_object());
  for (int i = 0; i < 2; ++i) CHECK(servers[2].next("client", 10000).value("event", "") == "linked");
  ::kill(servers[0].sp.pid, SIGKILL);
  for (auto& c : clients) {
    // Still running and still exact after the restart, the join and the kill: progress lines keep
    // coming for another second with rising steps (lines buffered before the kill are read first, so at
    // least the last ones of this second were written after it).
    const auto until = std::chrono::steady_clock::now() + 1s;
    int step = -1, last = -1;
    json p;
    while (std::chrono::steady_clock::now() < until) {
      p = c.next("progress", 5000);
      REQUIRE(p.is_object());
      step = p.value("step", 0);
      CHECK(step > last);
      last = step;
      CHECK(p.value("max_rel_err", 1.0) <= 1e-5);
    }
    ::kill(c.sp.pid, SIGKILL);
    c.wait();
  }
  ::kill(servers[2].sp.pid, SIGTERM);
  const json st = servers[2].next("stats", 10000);
  CHECK(st.value("tokens", 0) > 0);  // the newcomer served
}

TEST_CASE("elasticity: eaas-autoscale run adds servers under load and removes them when it ends") {
  std::unique_ptr<registry_server> reg;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
  const std::string ns = "as" + std::to_string(::getpid());
  proc scaler, client;
  // Capacity far below what one client offers: it must grow to the maximum, one server at a time.
  REQUIRE(scaler.start(EAAS_AUTOSCALE_BIN, {"run",
                                            "--registry",
                                            endpoint,
                                            "--ns",
                                            ns,
                                            "--capacity",
                                            "300",
                                            "--min-servers",
                                            "1",
                                            "--max-servers",
                                            "3",
                                            "--experts-per-server",
                                            "12",
                                            "--tick-ms",
                                            "250",
                                            "--up-ticks",
                                            "2",
                                            "--down-ticks",
                                            "4",
                                            "--cooldown-ticks",
                                            "2",
                                            "--seed",
                                            "11",
                                            "--hidden",
                                            std::to_string(kShape.hidden),
                                            "--inter",
                                            std::to_string(kShape.inter),
                                            "--experts",
                                            std::to_string(kShape.experts),
                                            "--topk",
                                            std::to_string(kShape.topk),
                                            "--layers",
                                            std::to_string(kShape.layers)}));
  const json first = scaler.next("scale", 10000);
  REQUIRE(first.value("action", "") == "add");
  CHECK(first.value("why", "").find("minimum") != std::string::npos);
  auto c = test::shape_args(endpoint, ns, kShape);
  c.insert(c.end(), {"--id", "c", "--tokens", "16", "--steps", "100000", "--verify"});
  REQUIRE(client.start(EAAS_CLIENT_BIN, c));
  for (int i = 0; i < 2; ++i) {
    const json up = scaler.next("scale", 15000);
    REQUIRE(up.value("action", "") == "add");
    CHECK(up.value("ok", false));
    CHECK(up.value("servers", 0) == i + 1);  // one at a time
    CHECK(up.value("offered_tps", 0.0) > 300.0);
  }
  // The client stays exact while servers join.
  std::this_thread::sleep_for(1s);
  for (int i = 0; i < 3; ++i) {
    const json p = client.next("progress", 5000);
    REQUIRE(p.is_object());
    CHECK(p.value("max_rel_err", 1.0) <= 1e-5);
  }
  ::kill(client.sp.pid, SIGKILL);
  client.wait();
  // No load: back down to the minimum, one graceful leave at a time.
  for (int i = 0; i < 2; ++i) {
    const json down = scaler.next("scale", 20000);
    REQUIRE(down.value("action", "") == "remove");
    CHECK(down.value("ok", false));
    CHECK(down.value("servers", 0) == 3 - i);
  }
  ::kill(scaler.sp.pid, SIGTERM);
  CHECK(scaler.wait() == 0);
}

TEST_CASE("elasticity: a compressed diurnal day under eaas-autoscale, open-loop clients, server-seconds accounted") {
  // A 30 s day from trough to trough; the autoscaler is told a server takes 1000 tokens/s (an input
  // here, far below what this machine computes, so that the trace's 600 .. 3000 tokens/s need 1 .. 4
  // servers whatever the machine's load). No timing goal: the fleet must follow the ramps, every output
  // must be exact, and the server-seconds must be the integral of the reported timeline.
  const double period = 30;
  const json j = run_demo({"--servers",
                           "1",
                           "--clients",
                           "2",
                           "--trace",
                           "diurnal",
                           "--period-s",
                           "30",
                           "--day-start-h",
                           "4",
                           "--trough",
                           "0.2",
                           "--peak-tps",
                           "3000",
                           "--slo-ms",
                           "500",
                           "--autoscale",
                           "--capacity",
                           "1000",
                           "--max-servers",
                           "4",
                           "--autoscale-arg=--tick-ms",
                           "--autoscale-arg=250",
                           "--autoscale-arg=--down-ticks",
                           "--autoscale-arg=4",
                           "--autoscale-arg=--low",
                           "--autoscale-arg=0.65"});
  CHECK(j.value("ok", false));
  CHECK(j.value("max_rel_err", 1.0) <= 1e-5);
  REQUIRE(j["clients"].size() == 2);
  std::uint64_t forwards = 0;
  for (const auto& [id, c] : j["clients"].items()) {
    CHECK(c.value("verified_steps", -1) == c.value("steps", 0));  // every forward checked
    CHECK(c.value("steps", 0) > 100);
    forwards += c["trace"].value("forwards", 0ull);
  }
  // The trace offered what it should: 30 s of a day averaging (0.2 + 0.8 / 2) × 3000 tokens/s, 24 per
  // forward (run_demo's --tokens).
  CHECK(forwards > 0.8 * period * 0.6 * 3000 / 24);
  CHECK(forwards < 1.2 * period * 0.6 * 3000 / 24);
  const json& tr = j["trace"];
  CHECK(tr.value("forwards", 0ull) == forwards);
  std::uint64_t in_windows = 0;
  for (const auto& w : tr["windows"]) in_windows += w.value("forwards", 0ull);
  CHECK(in_windows == forwards);

  const json& sv = j["servers"];
  const json& tl = sv["timeline"];
  REQUIRE(tl.is_array());
  REQUIRE(tl.size() >= 3);
  const double span = sv.value("interval_s", 0.0);
  CHECK(span > period * 0.9);  // from the first client's trace start to the last one's end
  CHECK(span < period * 1.3);
  // The integral of the step function it reports, computed here, is the server-seconds it reports.
  double integral = 0;
  bool up_early = false, down_late = false;
  int most = 0;
  for (std::size_t i = 0; i < tl.size(); ++i) {
    const double t = tl[i][0].get<double>(), next = i + 1 < tl.size() ? tl[i + 1][0].get<double>() : span;
    const int n = tl[i][1].get<int>();
    CHECK(next >= t);
    CHECK(n >= 0);
    CHECK(n <= 4);
    integral += n * (next - t);
    most = std::max(most, n);
    if (i > 0 && n > tl[i - 1][1].get<int>() && t < period / 2) up_early = true;   // added on the ramp up
    if (i > 0 && n < tl[i - 1][1].get<int>() && t > period / 2) down_late = true;  // removed on the ramp down
  }
  CHECK(sv.value("server_seconds", 0.0) == doctest::Approx(integral).epsilon(1e-9));
  CHECK(sv.value("max_servers", 0) == most);
  CHECK(sv.value("mean_servers", 0.0) == doctest::Approx(integral / span).epsilon(1e-9));
  CHECK(up_early);
  CHECK(down_late);
  CHECK(sv.value("adds", 0) >= 2);  // the minimum, then at least one for the load
  CHECK(sv.value("removes", 0) >= 1);
  CHECK(most >= 2);
}

namespace {

/// Reads progress lines for `for_ms`: they must keep coming, steps increasing, outputs exact.
void expect_progress(proc& c, int for_ms) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(for_ms);
  int last = -1;
  while (std::chrono::steady_clock::now() < until) {
    const json p = c.next("progress", 8000);
    REQUIRE(p.is_object());
    CHECK(p.value("step", 0) > last);
    last = p.value("step", 0);
    CHECK(p.value("max_rel_err", 1.0) <= 1e-5);
  }
}

}  // namespace

TEST_CASE("faults: a client paused past its lease gets its slot back; a paused server is linked again") {
  std::unique_ptr<registry_server> reg;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
  const std::string ns = "fp" + std::to_string(::getpid());
  proc server, client;
  auto a = test::shape_args(endpoint, ns, kShape);
  a.insert(a.end(), {"--id", "s", "--max-clients", "1"});
  REQUIRE(server.start(EAAS_SERVER_BIN, a));
  REQUIRE(server.next("ready").is_object());
  auto c = test::shape_args(endpoint, ns, kShape);
  c.insert(c.end(), {"--id", "c", "--tokens", "8", "--steps", "100000", "--verify", "--request-timeout-ms", "500"});
  REQUIRE(client.start(EAAS_CLIENT_BIN, c));
  REQUIRE(client.next("progress", 10000).is_object());
  // The client stops for longer than its 2 s lease: the server frees (and revokes) its slot. Resumed, it
  // must notice, link again and go on exactly.
  REQUIRE(server.next("client", 10000).value("event", "") == "linked");
  ::kill(client.sp.pid, SIGSTOP);
  REQUIRE(server.next("client", 10000).value("event", "") == "left");
  ::kill(client.sp.pid, SIGCONT);
  expect_progress(client, 2000);
  // The server stops for longer than the client's request timeout: the client drops it, and links to it
  // again once it answers (it never left the registry).
  ::kill(server.sp.pid, SIGSTOP);
  std::this_thread::sleep_for(1200ms);
  ::kill(server.sp.pid, SIGCONT);
  expect_progress(client, 2500);
  ::kill(client.sp.pid, SIGKILL);
  client.wait();
}

TEST_CASE("faults: a batch larger than a server takes is split over rounds, not treated as a failure") {
  std::unique_ptr<registry_server> reg;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
  const std::string ns = "fs" + std::to_string(::getpid());
  proc server, client;
  auto a = test::shape_args(endpoint, ns, kShape);
  a.insert(a.end(), {"--id", "small", "--max-tokens", "5"});
  REQUIRE(server.start(EAAS_SERVER_BIN, a));
  REQUIRE(server.next("ready").is_object());
  auto c = test::shape_args(endpoint, ns, kShape);
  c.insert(c.end(), {"--id", "c", "--tokens", "23", "--steps", "4", "--verify"});
  REQUIRE(client.start(EAAS_CLIENT_BIN, c));
  const json r = client.next("result", 20000);
  CHECK(r.value("verified_steps", 0) == 4);
  CHECK(r.value("max_rel_err", 1.0) <= 1e-5);
  CHECK(r.value("dropped_servers", 1) == 0);
  CHECK(client.wait() == 0);
  ::kill(server.sp.pid, SIGTERM);
  const json st = server.next("stats", 10000);
  CHECK(st.value("requests", 0) >= 4 * 3 * 5);  // 23 tokens in requests of at most 5, per layer and step
  CHECK(st.value("refused", 1) == 0);
}

TEST_CASE("elasticity: forged load records neither crash eaas-autoscale nor make it signal a process") {
  std::unique_ptr<registry_server> reg;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
  const std::string ns = "af" + std::to_string(::getpid());
  proc bystander, scaler;
  REQUIRE(bystander.start("/bin/sleep", {"30"}));
  std::unique_ptr<registry> r;
  registry_options ro;
  ro.endpoint = endpoint;
  REQUIRE_OK(registry::open(ro, r));
  const std::string pre = "/eaas/" + ns + "/load/";
  // Wrong types everywhere, then a well-formed record that names the bystander's pid.
  REQUIRE_OK(r->put(pre + "bad1", R"({"v":"1","experts":[0],"expert_tps":[1]})", 0));
  REQUIRE_OK(r->put(pre + "bad2", R"({"v":1,"experts":[0],"expert_tps":["x"],"pid":"x","queue":"deep"})", 0));
  REQUIRE_OK(r->put(pre + "bad3", R"({"v":1,"experts":[99999],"expert_tps":[1]})", 0));
  REQUIRE_OK(r->put(pre + "forged",
                    R"({"v":1,"experts":[],"expert_tps":[],"queue":0,"pid":)" + std::to_string(bystander.sp.pid) + "}",
                    0));
  REQUIRE_OK(r->put(pre + "forged2", R"({"v":1,"experts":[],"expert_tps":[],"queue":0,"pid":1})", 0));
  REQUIRE(scaler.start(EAAS_AUTOSCALE_BIN, {"run",  "--registry",       endpoint, "--ns",      ns,    "--capacity",
                                            "1000", "--min-servers",    "0",      "--tick-ms", "100", "--down-ticks",
                                            "2",    "--cooldown-ticks", "1",      "--hidden",  "64",  "--inter",
                                            "96",   "--experts",        "12",     "--topk",    "3",   "--layers",
                                            "3"}));
  const json d = scaler.next("scale", 10000);
  REQUIRE(d.value("action", "") == "remove");
  CHECK(d.value("server", "").rfind("forged", 0) == 0);
  CHECK_FALSE(d.value("ok", true));  // not one of its own servers: nothing signalled
  std::this_thread::sleep_for(300ms);
  CHECK(::kill(bystander.sp.pid, 0) == 0);  // the bystander lives
  CHECK(::kill(scaler.sp.pid, 0) == 0);     // and so does the autoscaler
  ::kill(scaler.sp.pid, SIGTERM);
  CHECK(scaler.wait() == 0);
}
