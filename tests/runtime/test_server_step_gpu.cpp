// The expert server's GPU-resident poll round (eaas-server --device-step, gpu/server_step.hpp) against
// real processes: device-path and host-path clients checked against the fp32 reference, answers bit for
// bit those of a host-path server and of a device-step server without kernel shrinking, the malicious
// client's error answers, servers SIGKILLed under load, and one captured graph replayed while clients link
// and leave. Exits 77 (ctest: skipped) where there is no CUDA device.

#define DOCTEST_CONFIG_IMPLEMENT
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <thread>

#include "../common/doctest_main.hpp"
#include "../common/require_ok.hpp"
#include "client.hpp"
#include "eaas/eaas.hpp"
#include "gpu/client_step.hpp"
#include "gpu_cluster.hpp"
#include "procs.hpp"
#include "reference.hpp"
#include "wire.hpp"

using namespace eaas;
using namespace eaas::runtime;
using eaas::test::gpu_cluster;
using eaas::test::proc;
using eaas::test::random_tokens;
using eaas::test::rel_err;
using json = nlohmann::json;

namespace {

const model_shape kShape{.hidden = 256, .inter = 192, .experts = 12, .topk = 3, .layers = 3};
constexpr std::uint64_t kSeed = 11;

std::vector<std::string> shape_flags(std::vector<std::string> more) {
  std::vector<std::string> a = {"--hidden",  std::to_string(kShape.hidden),  "--inter", std::to_string(kShape.inter),
                                "--experts", std::to_string(kShape.experts), "--topk",  std::to_string(kShape.topk),
                                "--layers",  std::to_string(kShape.layers),  "--gpu"};
  a.insert(a.end(), more.begin(), more.end());
  return a;
}

// One forward, checked against the reference on the routing the client used; its output in `got`.
double checked_forward(attention_client& c, const reference_model& ref, const std::vector<std::uint32_t>& toks,
                       std::vector<float>& got) {
  got.assign(toks.size() * kShape.hidden, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> want;
  REQUIRE_OK(c.forward(toks, got));
  REQUIRE(c.last_routing().size() == kShape.layers);
  ref.forward(toks, want, &c.last_routing());
  const double err = rel_err(got, want, kShape.hidden);
  CHECK(err <= 1e-2);
  return err;
}

// The server's "stats" line after a graceful stop.
json stop_and_stats(proc& p) {
  ::kill(p.sp.pid, SIGTERM);
  json st = p.next("stats", 30000);
  CHECK(p.wait() == 0);
  return st;
}

void check_demo_clients(const json& j, bool device_clients) {
  REQUIRE(j["clients"].size() >= 1);
  for (const auto& [id, c] : j["clients"].items()) {
    CAPTURE(id);
    CHECK(c.value("steps", 0) > 0);
    CHECK(c.value("verified_steps", -1) == c.value("steps", 0));  // every step checked
    CHECK(c.value("max_rel_err", 1.0) <= 1e-2);                   // bf16 experts: within the tolerance,
    CHECK(c.value("max_rel_err", 0.0) > 1e-5);                    // and not the fp32 path
    if (device_clients) CHECK(c.value("device_forwards", 0) == c.value("steps", 0));
  }
}

}  // namespace

TEST_CASE("GPU server step: device-step servers serve device-path and host-path clients within 1e-2 of fp32") {
  for (const bool device_clients : {true, false}) {
    CAPTURE(device_clients);
    std::vector<std::string> a = shape_flags({"--servers", "3", "--clients", "2", "--replicas", "2", "--tokens", "40",
                                              "--steps", "8", "--server-device-step"});
    if (device_clients) a.insert(a.end(), {"--device-step", "--graph"});
    int rc = -1;
    const json j = test::demo_summary(EAAS_DEMO_BIN, a, rc);
    CHECK(rc == 0);
    REQUIRE(j.is_object());
    CHECK(j.value("ok", false));
    CHECK(j.value("device", "") == "gpu");
    check_demo_clients(j, device_clients);
  }
}

TEST_CASE("GPU server step: answers are the host path's, bit for bit (fp32 and bf16 requests, shrinking on and off)") {
  // Three single-server clusters on the same weights: a host-path server, a device-step server that writes its
  // answers straight into the clients' result regions (--device-direct-answers: its puts carry the header
  // alone), and one without kernel shrinking (every local expert of a served layer computed, empty ones on a
  // padding row) that puts its staged answers with 3 blocks instead of up to 32 (--device-put-blocks), launches
  // each round only after reading the last one back and launches its kernels plainly (--device-no-pipeline
  // --device-no-pdl), as its device-path client does (pdl false) where the others use programmatic dependent
  // launch. The same forwards through each (one server: its answer is the whole MoE output) must give the
  // same bits, and each server must account for every request exactly once (pipelined or not).
  gpu_cluster host_cl("sstepbh", kShape, kSeed), dev_cl("sstepbd", kShape, kSeed), pad_cl("sstepbp", kShape, kSeed);
  host_cl.add("h", 0, {});
  dev_cl.add("d", 0, {"--device-step", "--device-direct-answers"});
  pad_cl.add("p", 0,
             {"--device-step", "--device-no-shrink", "--device-put-blocks", "3", "--device-no-pipeline", "--device-no-pdl"});
  const reference_model ref(kShape, kSeed, {});
  constexpr std::uint64_t kSteps = 5;
  for (const bool device_clients : {false, true}) {  // host-path clients send fp32 rows, device-path bf16
    CAPTURE(device_clients);
    auto ch = host_cl.client("ch", {.device_step = device_clients, .max_tokens = 48});
    auto cd = dev_cl.client("cd", {.device_step = device_clients, .max_tokens = 48});
    auto cp = pad_cl.client("cp", {.device_step = device_clients, .max_tokens = 48, .pdl = false});
    REQUIRE_OK(ch->wait_for_experts(1, 60'000'000'000ull));
    REQUIRE_OK(cd->wait_for_experts(1, 60'000'000'000ull));
    REQUIRE_OK(cp->wait_for_experts(1, 60'000'000'000ull));
    double worst = 0;
    for (std::uint64_t step = 0; step < kSteps; ++step) {
      CAPTURE(step);
      // 2 tokens (6 pairs over 12 experts): at least 6 empty experts per layer, padded without shrinking.
      const auto toks = random_tokens(step == 2 ? 5 : step == 4 ? 2 : 40, 1000 + step);
      std::vector<float> from_host, from_dev, from_pad;
      (void)checked_forward(*ch, ref, toks, from_host);
      worst = std::max(worst, checked_forward(*cd, ref, toks, from_dev));
      (void)checked_forward(*cp, ref, toks, from_pad);
      REQUIRE(from_host.size() == from_dev.size());
      REQUIRE(from_pad.size() == from_dev.size());
      CHECK(std::memcmp(from_host.data(), from_dev.data(), from_host.size() * 4) == 0);
      CHECK(std::memcmp(from_pad.data(), from_dev.data(), from_pad.size() * 4) == 0);
      std::size_t differ = 0, differ_pad = 0;
      for (std::size_t i = 0; i < from_host.size(); ++i) {
        differ += from_host[i] != from_dev[i] ? 1 : 0;
        differ_pad += from_pad[i] != from_dev[i] ? 1 : 0;
      }
      CHECK(differ == 0);
      CHECK(differ_pad == 0);
    }
    CHECK(worst > 1e-5);  // the GPU experts (bf16) ran
    if (device_clients) {
      CHECK(cd->stats().device_forwards == kSteps);
      CHECK(cp->stats().device_forwards == kSteps);
      // Every device-path request was packed straight into the server's slot (not through staging).
      CHECK(cd->stats().requests > 0);
      CHECK(cd->stats().direct_requests == cd->stats().requests);
      CHECK(cp->stats().direct_requests == cp->stats().requests);
    } else {
      CHECK(cd->stats().direct_requests == 0);
    }
    CHECK(cd->stats().dropped_servers == 0);
    CHECK(cp->stats().dropped_servers == 0);
  }
  const json st = stop_and_stats(*dev_cl.servers[0]);
  REQUIRE(st.is_object());
  CHECK(st.value("graph_captures", 0) == 1);
  CHECK(st.value("refused", -1) == 0);
  CHECK(st.value("requests", 0) == 2 * kSteps * kShape.layers);  // one per forward and layer: none lost or doubled
  CHECK(st.value("device_rounds", 0) >= st.value("batches", 0));
  CHECK(st.value("padded_rows", -1) == 0);  // shrinking: no padding
  CHECK(st.value("direct_answers", -1) == st.value("requests", 0));  // every answer written straight in
  const json sp = stop_and_stats(*pad_cl.servers[0]);
  REQUIRE(sp.is_object());
  CHECK(sp.value("graph_captures", 0) == 1);
  CHECK(sp.value("refused", -1) == 0);
  CHECK(sp.value("requests", 0) == 2 * kSteps * kShape.layers);
  CHECK(sp.value("direct_answers", -1) == 0);  // staged answers, put with 3 blocks
  // The 2-token forwards alone: per client mode and layer, at least experts - 2 * topk padded groups.
  CHECK(sp.value("padded_rows", 0) >= 2 * kShape.layers * (kShape.experts - 2 * kShape.topk));
}

TEST_CASE("GPU server step: a malicious client gets the same error answers from a device-step server") {
  gpu_cluster cl("sstepevil", kShape, kSeed);
  cl.add("s", 0, {"--device-step"});
  const auto v = test::run_evil(
      EAAS_EVIL_BIN, {cl.endpoint, cl.ns, "s", std::to_string(kShape.hidden), std::to_string(kShape.inter),
                      std::to_string(kShape.experts), std::to_string(kShape.topk), std::to_string(kShape.layers),
                      std::to_string(kSeed), std::to_string(runtime::cuda_device_count() - 1)});
  REQUIRE(v.reported);
  CHECK(v.cases > 300);
  CHECK(v.failures == 0);
  CHECK(v.exit_code == 0);
  // Then still serves an honest client, right.
  const reference_model ref(kShape, kSeed, {});
  auto c = cl.client("c", {});
  REQUIRE_OK(c->wait_for_experts(1, 60'000'000'000ull));
  std::vector<float> got;
  for (std::uint64_t step = 0; step < 3; ++step) (void)checked_forward(*c, ref, random_tokens(24, step), got);
  CHECK(c->stats().device_forwards == 3);
  CHECK(c->stats().fallback_forwards == 0);
  c.reset();
  const json st = stop_and_stats(*cl.servers[0]);
  REQUIRE(st.is_object());
  CHECK(st.value("requests", 0) > 300);  // every case but the stranger's was answered (the evil client checked how)
  CHECK(st.value("refused", 0) >= 14);   // the targeted malformed requests at least
  CHECK(st.value("ignored", 0) >= 1);    // the stranger's grant was not answered
  CHECK(st.value("graph_captures", 0) == 1);
}

TEST_CASE("GPU server step: one graph, replayed while clients link and leave (a freed slot is reused)") {
  gpu_cluster cl("sstepll", kShape, kSeed);
  proc& srv = cl.add("s", 0, {"--device-step", "--max-clients", "2"});
  const auto served_from = std::chrono::steady_clock::now();
  const reference_model ref(kShape, kSeed, {});
  std::vector<float> got;
  double worst = 0;
  auto a = cl.client("a", {});
  REQUIRE_OK(a->wait_for_experts(1, 60'000'000'000ull));
  for (std::uint64_t step = 0; step < 3; ++step)
    worst = std::max(worst, checked_forward(*a, ref, random_tokens(24, step), got));
  {
    auto b = cl.client("b", {.device_step = false});  // a host-path client in the second slot
    REQUIRE_OK(b->wait_for_experts(1, 60'000'000'000ull));
    for (std::uint64_t step = 0; step < 3; ++step) {
      worst = std::max(worst, checked_forward(*a, ref, random_tokens(24, 10 + step), got));
      worst = std::max(worst, checked_forward(*b, ref, random_tokens(17, 20 + step), got));
    }
    CHECK(b->stats().dropped_servers == 0);
  }  // b leaves: its slot is freed
  bool left = false;
  for (json e; !left && (e = srv.next("client", 20000)).is_object();)
    left = e.value("event", "") == "left" && e.value("client", "") == "b";
  CHECK(left);
  // c takes b's slot (both slots again in use; the server zeroed its signal word when it welcomed c).
  auto c = cl.client("c", {});
  REQUIRE_OK(c->wait_for_experts(1, 60'000'000'000ull));
  for (std::uint64_t step = 0; step < 3; ++step) {
    worst = std::max(worst, checked_forward(*c, ref, random_tokens(24, 30 + step), got));
    worst = std::max(worst, checked_forward(*a, ref, random_tokens(9, 40 + step), got));
  }
  CHECK(worst > 1e-5);
  CHECK(a->stats().dropped_servers == 0);
  CHECK(c->stats().dropped_servers == 0);
  CHECK(a->stats().fallback_forwards == 0);
  CHECK(c->stats().device_forwards == 3);
  a.reset();
  c.reset();
  const double served_us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - served_from).count();
  const json st = stop_and_stats(srv);
  REQUIRE(st.is_object());
  CHECK(st.value("graph_captures", 0) == 1);  // never captured again
  CHECK(st.value("refused", -1) == 0);
  CHECK(st.value("requests", 0) >= (3 + 3 + 3 + 3 + 3) * kShape.layers);  // one per layer and forward at least
  // The rounds' device stamps: every answering round spent time validating, computing and answering. compute_ms
  // is the device's time from each request seen to its answers done: it covers those phases, and since rounds
  // never overlap on the GPU (pipelined or not) it stays within the time the server served (all its answering
  // rounds ended before the clients left).
  const json ru = st.value("round_us", json::object());
  const double batches = st.value("batches", 0.0);
  REQUIRE(batches > 0);
  CHECK(ru.value("front", 0.0) > 0);
  CHECK(ru.value("gemm", 0.0) > 0);
  CHECK(ru.value("back", 0.0) > 0);
  CHECK(ru.value("gap", 0.0) > 0);
  REQUIRE(ru.contains("window"));  // the default window: clients a and c may have waited for each other
  const double phases_us = (ru.value("front", 0.0) + ru.value("gemm", 0.0) + ru.value("back", 0.0)) * batches;
  const double compute_us = st.value("compute_ms", 0.0) * 1e3;
  // (compute_ms is printed to 0.1 ms, the means to 0.1 us: hence the 60 us of slack.)
  CHECK(compute_us >= phases_us * 0.99 - 60.0);
  CHECK(compute_us <= (phases_us + ru.value("window", 0.0) * batches) * 1.01 + 60.0);
  CHECK(compute_us < served_us);
  // (No "ignored" count is expected: welcome() zeroes a slot's signal word before handing it to c.)
}

TEST_CASE("GPU server step: device-step servers SIGKILLed every 0.5 s and replaced; clients fail over") {
  for (const bool device_clients : {false, true}) {
    CAPTURE(device_clients);
    std::vector<std::string> a =
        shape_flags({"--servers", "3", "--clients", "2", "--replicas", "2", "--tokens", "24", "--duration", "3",
                     "--kill-every", "0.5", "--request-timeout-ms", "2000", "--server-device-step"});
    if (device_clients) a.insert(a.end(), {"--device-step", "--graph"});
    int rc = -1;
    const json j = test::demo_summary(EAAS_DEMO_BIN, a, rc);
    CHECK(rc == 0);
    REQUIRE(j.is_object());
    CHECK(j.value("ok", false));
    REQUIRE(j["kills"].size() >= 2);
    std::size_t joined = 0;
    for (const auto& k : j["kills"]) joined += k.value("join_ms", -1.0) >= 0.0 ? 1 : 0;
    CHECK(joined >= 1);  // replacements (device-step servers too) took traffic
    REQUIRE(j["clients"].size() == 2);
    for (const auto& [id, c] : j["clients"].items()) {
      CAPTURE(id);
      CHECK(c.value("steps", 0) > 0);
      CHECK(c.value("verified_steps", -1) == c.value("steps", 0));
      CHECK(c.value("max_rel_err", 1.0) <= 1e-2);
    }
  }
}

int main(int argc, char** argv) {
  return eaas::test::run_tests(argc, argv, [] {
    return runtime::cuda_device_count() == 0 ? "no CUDA device: skipping the GPU server step tests" : nullptr;
  });
}

TEST_CASE("GPU server step: clients in step share a round; a stopped client delays at most two rounds") {
  // A batch window far longer than anything the test does between requests, so that the round counts are
  // exact: a waited-for client always comes (or never does) within it. Every forward has 20 tokens, so that
  // the clients' graphs are captured in their first forwards only (on H200 x2, last forwards of 24 tokens, which
  // both clients recapture under one process-wide lock, gave 10 rounds instead of 9; the capture is the likely
  // cause, not an established one).
  constexpr double kWindowS = 1.0;
  gpu_cluster cl("sstepbw", kShape, kSeed);
  // A poll of 1.5 s: a request never lands between a poll's deadline and the validation (it would be served
  // without the window).
  proc& srv = cl.add("s", 0, {"--device-step", "--max-clients", "2", "--device-batch-window-us", "1000000",
                              "--device-poll-us", "1500000"});
  const reference_model ref(kShape, kSeed, {});
  std::vector<float> got_a, got_b;
  auto a = cl.client("a", {});
  auto b = cl.client("b", {});
  REQUIRE_OK(a->wait_for_experts(1, 60'000'000'000ull));
  REQUIRE_OK(b->wait_for_experts(1, 60'000'000'000ull));
  const auto seconds_of = [&](attention_client& c, const std::vector<std::uint32_t>& toks, std::vector<float>& got) {
    const auto t0 = std::chrono::steady_clock::now();
    checked_forward(c, ref, toks, got);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  // a alone: nobody else was ever served, so no round waits (3 rounds, one per layer). (First forwards also
  // load modules and capture, so only lower bounds are asserted on them.)
  seconds_of(*a, random_tokens(20, 1), got_a);
  // b alone: a was served in the last two rounds that saw a request, so b's first two rounds each wait the
  // whole window for a; its third does not (3 rounds).
  const double b_alone = seconds_of(*b, random_tokens(20, 2), got_b);
  CHECK(b_alone >= 2 * kWindowS);
  // Both at once, b starting 0.1 s after a: a's first request waits for b (served in the last round), and from
  // then on they are in step (3 rounds for 6 requests). a's forward takes at least the 0.1 s it waited for b.
  double a_both = 0;
  std::thread ta([&] { a_both = seconds_of(*a, random_tokens(20, 3), got_a); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const double b_both = seconds_of(*b, random_tokens(20, 4), got_b);
  ta.join();
  CHECK(a_both >= 0.1);
  CHECK(a_both < kWindowS);
  CHECK(b_both < kWindowS / 2);  // it never waited a window
  a.reset();
  b.reset();
  const json st = stop_and_stats(srv);
  REQUIRE(st.is_object());
  CHECK(st.value("requests", 0) == 3 + 3 + 6);
  CHECK(st.value("batches", 0) == 3 + 3 + 3);  // answering rounds: the last forward's six requests took three
  CHECK(st.value("tokens", 0) == 3 * (20 + 20 + 20 + 20));
  CHECK(st.value("refused", -1) == 0);
}
