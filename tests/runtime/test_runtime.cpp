// The MoE runtime: its CPU math against plain loops, placement and presets, and the disaggregated
// forward pass against the monolithic reference — in one process (servers on threads) and as real
// processes (eaas-server, eaas-client, a malicious client).

#include <doctest/doctest.h>
#include <sys/wait.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "../common/require_ok.hpp"
#include "client.hpp"
#include "cpu_math.hpp"
#include "eaas/eaas.hpp"
#include "eaas/runtime/safetensors.hpp"
#include "procs.hpp"
#include "reference.hpp"
#include "server.hpp"
#include "service.hpp"

using namespace eaas;
using namespace eaas::runtime;

namespace {

double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    num = std::max(num, double(std::fabs(a[i] - b[i])));
    den = std::max(den, double(std::fabs(b[i])));
  }
  return num / den;
}

const model_shape kShape{.hidden = 64, .inter = 96, .experts = 12, .topk = 3, .layers = 3};

std::vector<std::uint32_t> random_tokens(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::uint32_t> t(n);
  for (auto& v : t) v = static_cast<std::uint32_t>(rng());
  return t;
}

}  // namespace

TEST_CASE("runtime math: SwiGLU, router and norm against plain loops") {
  const model_shape s{.hidden = 48, .inter = 80, .experts = 10, .topk = 3, .layers = 1};
  const auto w = synthetic_expert(s, 7, 0, 3);
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  const std::size_t rows = 5;
  std::vector<float> x(rows * s.hidden), y(rows * s.hidden);
  for (auto& v : x) v = nd(rng);
  cpu::swiglu_scratch sc;
  cpu::swiglu_rows(w, x.data(), rows, s.hidden, s.inter, y.data(), sc);
  for (std::size_t r = 0; r < rows; ++r) {
    std::vector<double> hmid(s.inter);
    for (std::uint32_t i = 0; i < s.inter; ++i) {
      double g = 0, u = 0;
      for (std::uint32_t j = 0; j < s.hidden; ++j) {
        g += double(w.gate[i * s.hidden + j]) * x[r * s.hidden + j];
        u += double(w.up[i * s.hidden + j]) * x[r * s.hidden + j];
      }
      hmid[i] = g / (1 + std::exp(-g)) * u;
    }
    for (std::uint32_t j = 0; j < s.hidden; ++j) {
      double acc = 0;
      for (std::uint32_t i = 0; i < s.inter; ++i) acc += double(w.down[j * s.inter + i]) * hmid[i];
      CHECK(y[r * s.hidden + j] == doctest::Approx(acc).epsilon(1e-4).scale(1.0));
    }
  }
  // Router: the chosen experts are the largest logits, their weights are their renormalised softmax.
  const auto rw = synthetic_router(s, 7, 0);
  std::vector<std::uint32_t> ids(rows * s.topk);
  std::vector<float> wts(rows * s.topk);
  cpu::route_topk(rw, x.data(), rows, s.hidden, s.experts, s.topk, ids.data(), wts.data());
  for (std::size_t r = 0; r < rows; ++r) {
    std::vector<double> logit(s.experts);
    for (std::uint32_t e = 0; e < s.experts; ++e)
      for (std::uint32_t j = 0; j < s.hidden; ++j) logit[e] += double(rw.gate[e * s.hidden + j]) * x[r * s.hidden + j];
    std::vector<std::uint32_t> order(s.experts);
    std::iota(order.begin(), order.end(), 0u);
    std::sort(order.begin(), order.end(), [&](auto a, auto b) { return logit[a] > logit[b]; });
    double z = 0;
    for (std::uint32_t k = 0; k < s.topk; ++k) z += std::exp(logit[order[k]]);
    float sum = 0;
    for (std::uint32_t k = 0; k < s.topk; ++k) {
      CHECK(ids[r * s.topk + k] == order[k]);
      CHECK(wts[r * s.topk + k] == doctest::Approx(std::exp(logit[order[k]]) / z).epsilon(1e-5));
      sum += wts[r * s.topk + k];
    }
    CHECK(sum == doctest::Approx(1.0f).epsilon(1e-6));
  }
  std::vector<float> n(x.size());
  cpu::rmsnorm(x.data(), n.data(), rows, s.hidden);
  for (std::size_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (std::uint32_t j = 0; j < s.hidden; ++j) ss += double(n[r * s.hidden + j]) * n[r * s.hidden + j];
    CHECK(ss / s.hidden == doctest::Approx(1.0).epsilon(1e-4));
  }
}

TEST_CASE("runtime: synthetic weights depend on exactly (seed, layer, expert)") {
  const auto a = synthetic_expert(kShape, 5, 1, 2), b = synthetic_expert(kShape, 5, 1, 2);
  CHECK(a.gate == b.gate);
  CHECK(a.down == b.down);
  CHECK(synthetic_expert(kShape, 5, 1, 3).gate != a.gate);
  CHECK(synthetic_expert(kShape, 5, 2, 2).gate != a.gate);
  CHECK(synthetic_expert(kShape, 6, 1, 2).gate != a.gate);
  CHECK(a.gate != a.up);
  float mx = 0;
  for (float v : a.gate) mx = std::max(mx, std::fabs(v));
  CHECK(mx <= 1.0f / std::sqrt(float(kShape.hidden)));
  CHECK(mx > 0.9f / std::sqrt(float(kShape.hidden)));
}

TEST_CASE("runtime: placement, id lists, presets and shape checks") {
  for (std::uint32_t n : {1u, 2u, 3u, 5u})
    for (std::uint32_t r = 1; r <= n; ++r) {
      std::vector<int> hosts(16, 0);
      for (std::uint32_t s = 0; s < n; ++s)
        for (auto e : experts_of_server(s, n, 16, r)) hosts[e]++;
      for (int h : hosts) CHECK(h == static_cast<int>(r));
    }
  std::vector<std::uint32_t> ids;
  REQUIRE_OK(parse_id_list("0-3,7,9-10", 16, ids));
  CHECK(ids == std::vector<std::uint32_t>{0, 1, 2, 3, 7, 9, 10});
  for (const char* bad : {"", "3-1", "16", "1,,2", "a", "1-", "-1", "0-16"})
    CHECK(parse_id_list(bad, 16, ids) == status::invalid_argument);
  model_shape s;
  REQUIRE_OK(shape_preset("deepseek-v3", s));
  CHECK(s.hidden == 7168);
  CHECK(s.inter == 2048);
  CHECK(s.experts == 256);
  CHECK(s.topk == 8);
  CHECK(shape_preset("gpt-5", s) == status::not_found);
  CHECK(check_shape({.hidden = 8, .inter = 8, .experts = 4, .topk = 5, .layers = 1}) == status::invalid_argument);
  CHECK(check_shape({.hidden = 8, .inter = 8, .experts = 70000, .topk = 5, .layers = 1}) == status::invalid_argument);
  CHECK(check_shape({.hidden = 0, .inter = 8, .experts = 4, .topk = 1, .layers = 1}) == status::invalid_argument);
}

TEST_CASE("runtime: the reference MoE equals a per-token sum over its experts") {
  const reference_model ref(kShape, 3, {});
  std::mt19937 rng(2);
  std::normal_distribution<float> nd;
  const std::size_t rows = 7;
  std::vector<float> x(rows * kShape.hidden), m;
  for (auto& v : x) v = nd(rng);
  routing r;
  ref.dense().route(1, x, r);
  ref.moe(1, x, r, m);
  cpu::swiglu_scratch sc;
  std::vector<float> y(kShape.hidden);
  for (std::size_t t = 0; t < rows; ++t) {
    std::vector<float> want(kShape.hidden, 0.0f);
    for (std::uint32_t k = 0; k < kShape.topk; ++k) {
      const auto w = synthetic_expert(kShape, 3, 1, r.ids[t * kShape.topk + k]);
      cpu::swiglu_rows(w, x.data() + t * kShape.hidden, 1, kShape.hidden, kShape.inter, y.data(), sc);
      for (std::uint32_t j = 0; j < kShape.hidden; ++j) want[j] += r.weights[t * kShape.topk + k] * y[j];
    }
    const std::vector<float> got(m.begin() + t * kShape.hidden, m.begin() + (t + 1) * kShape.hidden);
    CHECK(rel_err(got, want) < 1e-5);
  }
}

namespace {

/// Servers on threads of this process, around one embedded registry.
struct cluster {
  std::unique_ptr<registry_server> reg;
  std::string endpoint, ns;
  std::vector<std::unique_ptr<expert_server>> servers;
  std::vector<std::unique_ptr<std::atomic<bool>>> stops;
  std::vector<std::thread> threads;

  explicit cluster(const std::string& name) {
    REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
    endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
    ns = name + std::to_string(::getpid());
  }
  void add_server(const std::string& id, std::vector<std::uint32_t> experts) {
    server_options o;
    o.id = id;
    o.registry.endpoint = endpoint;
    o.ns = ns;
    o.shape = kShape;
    o.seed = 11;
    o.experts = std::move(experts);
    o.max_tokens = 64;
    std::unique_ptr<expert_server> s;
    REQUIRE_OK(expert_server::start(o, s));
    stops.push_back(std::make_unique<std::atomic<bool>>(false));
    auto* srv = s.get();
    auto* stop = stops.back().get();
    threads.emplace_back([srv, stop] { (void)srv->serve(*stop); });
    servers.push_back(std::move(s));
  }
  /// Stops server i and destroys it (its lease is revoked: clients see it go offline).
  void kill(std::size_t i) {
    *stops[i] = true;
    threads[i].join();
    servers[i].reset();
  }
  std::unique_ptr<attention_client> client(const std::string& id) {
    client_options o;
    o.id = id;
    o.registry.endpoint = endpoint;
    o.ns = ns;
    o.shape = kShape;
    o.seed = 11;
    o.max_tokens = 64;
    o.request_timeout_ns = 1'000'000'000ull;
    std::unique_ptr<attention_client> c;
    REQUIRE_OK(attention_client::start(o, c));
    return c;
  }
  ~cluster() {
    for (std::size_t i = 0; i < servers.size(); ++i)
      if (servers[i]) kill(i);
  }
};

}  // namespace

TEST_CASE("runtime: a disaggregated forward pass equals the monolithic reference (servers on threads)") {
  cluster cl("rt-eq");
  cl.add_server("a", experts_of_server(0, 3, kShape.experts, 1));
  cl.add_server("b", experts_of_server(1, 3, kShape.experts, 1));
  cl.add_server("c", experts_of_server(2, 3, kShape.experts, 1));
  auto c = cl.client("client");
  REQUIRE_OK(c->wait_for_experts(1, 5'000'000'000ull));
  const reference_model ref(kShape, 11, {});
  std::vector<float> got, want;
  for (std::uint64_t step = 0; step < 5; ++step) {
    const auto toks = random_tokens(1 + step * 13, step);
    REQUIRE_OK(c->forward(toks, got));
    ref.forward(toks, want);
    REQUIRE(got.size() == want.size());
    CHECK(rel_err(got, want) < 1e-5);
    CHECK(c->last_moe_ns().size() == kShape.layers);
  }
  CHECK(c->stats().dropped_servers == 0);
  std::uint64_t tokens = 0;
  for (auto& s : cl.servers) tokens += s->stats().tokens;
  CHECK(tokens > 0);
  // A wrong-sized batch is refused on the client, before anything is sent.
  std::vector<std::uint32_t> none;
  CHECK(c->forward(none, got) == status::invalid_argument);
  CHECK(c->forward(random_tokens(65, 1), got) == status::invalid_argument);
}

TEST_CASE("runtime: a server that leaves mid-run is replaced by its replica; outputs stay exact") {
  cluster cl("rt-fo");
  for (std::uint32_t i = 0; i < 3; ++i)
    cl.add_server("s" + std::to_string(i), experts_of_server(i, 3, kShape.experts, 2));
  auto c = cl.client("client");
  REQUIRE_OK(c->wait_for_experts(2, 5'000'000'000ull));
  const reference_model ref(kShape, 11, {});
  std::vector<float> got, want;
  const auto toks = random_tokens(40, 9);
  ref.forward(toks, want);
  REQUIRE_OK(c->forward(toks, got));
  CHECK(rel_err(got, want) < 1e-5);
  cl.kill(1);  // experts of s1 remain on one replica each
  for (int i = 0; i < 3; ++i) {
    REQUIRE_OK(c->forward(toks, got));
    CHECK(rel_err(got, want) < 1e-5);
  }
  CHECK(c->stats().dropped_servers >= 1);
}

// ---------------------------------------------------------------------------------------------------
// Real processes.

using eaas::test::proc;
using eaas::test::shape_args;

TEST_CASE("runtime processes: clients and servers in separate processes match the reference") {
  std::unique_ptr<registry_server> reg;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
  const std::string ns = "rtmp" + std::to_string(::getpid());
  proc servers[3], clients[2];
  for (int i = 0; i < 3; ++i) {
    auto a = shape_args(endpoint, ns, kShape);
    a.insert(a.end(), {"--id", "s" + std::to_string(i), "--placement", std::to_string(i) + "/3/2"});
    REQUIRE(servers[i].start(EAAS_SERVER_BIN, a));
    REQUIRE(servers[i].next("ready").value("id", "") == "s" + std::to_string(i));
  }
  for (int i = 0; i < 2; ++i) {
    auto a = shape_args(endpoint, ns, kShape);
    a.insert(a.end(),
             {"--id", "c" + std::to_string(i), "--tokens", "24", "--steps", "6", "--replicas", "2", "--verify"});
    REQUIRE(clients[i].start(EAAS_CLIENT_BIN, a));
  }
  for (auto& c : clients) {
    const auto r = c.next("result");
    REQUIRE(r.is_object());
    CHECK(r.value("verified_steps", 0) == 6);
    CHECK(r.value("max_rel_err", 1.0) <= 1e-5);
    CHECK(r.value("tokens_per_s", 0.0) > 0);
    CHECK(c.wait() == 0);
  }
  for (auto& s : servers) {
    ::kill(s.sp.pid, SIGTERM);
    const auto st = s.next("stats");
    CHECK(st.value("tokens", 0) > 0);
    CHECK(st.value("refused", 1) == 0);
    CHECK(s.wait() == 0);
  }
}

TEST_CASE("runtime processes: double batching: two micro-batches at once, and auto, give the reference's outputs") {
  std::unique_ptr<registry_server> reg;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
  const std::string ns = "rtmb" + std::to_string(::getpid());
  proc servers[2], clients[3];
  for (int i = 0; i < 2; ++i) {
    auto a = shape_args(endpoint, ns, kShape);
    a.insert(a.end(), {"--id", "s" + std::to_string(i), "--placement", std::to_string(i) + "/2/2"});
    REQUIRE(servers[i].start(EAAS_SERVER_BIN, a));
    REQUIRE(servers[i].next("ready").value("id", "") == "s" + std::to_string(i));
  }
  constexpr int kSteps = 8;
  const char* modes[3] = {"1", "2", "auto"};
  for (int i = 0; i < 3; ++i) {
    auto a = shape_args(endpoint, ns, kShape);
    a.insert(a.end(), {"--id", std::string("c") + modes[i], "--tokens", "24", "--steps", std::to_string(kSteps),
                       "--replicas", "2", "--verify", "--micro-batches", modes[i]});
    REQUIRE(clients[i].start(EAAS_CLIENT_BIN, a));
  }
  std::uint64_t requests[3] = {};
  for (int i = 0; i < 3; ++i) {
    CAPTURE(modes[i]);
    const auto r = clients[i].next("result");
    REQUIRE(r.is_object());
    CHECK(r.value("verified_steps", 0) == kSteps);
    CHECK(r.value("max_rel_err", 1.0) <= 1e-5);
    requests[i] = r.value("requests", 0ull);
    const auto mb = r.value("micro_batches", 0u);
    if (i == 0) CHECK(mb == 1);
    if (i == 1) CHECK(mb == 2);
    if (i == 2) CHECK((mb == 1 || mb == 2));  // decided after 3 forwards each way
    CHECK(clients[i].wait() == 0);
  }
  // Two micro-batches send each layer's request from two inner clients: more requests than one batch
  // (each half of 24 tokens with top-3 of 12 experts over 2 servers reaches both servers).
  CHECK(requests[0] >= std::uint64_t{kSteps} * kShape.layers);
  CHECK(requests[1] > requests[0]);
  for (auto& s : servers) {
    ::kill(s.sp.pid, SIGTERM);
    const auto st = s.next("stats");
    CHECK(st.value("refused", 1) == 0);
    CHECK(s.wait() == 0);
  }
}

TEST_CASE("runtime processes: a malicious client gets error answers, never an out-of-bounds access") {
  std::unique_ptr<registry_server> reg;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
  const std::string ns = "rtevil" + std::to_string(::getpid());
  proc server, good;
  auto a = shape_args(endpoint, ns, kShape);
  a.insert(a.end(), {"--id", "victim", "--host-experts", "0-5"});
  REQUIRE(server.start(EAAS_SERVER_BIN, a));
  REQUIRE(server.next("ready").is_object());
  const auto v = test::run_evil(EAAS_EVIL_BIN, {endpoint, ns, "victim", std::to_string(kShape.hidden),
                                                std::to_string(kShape.inter), std::to_string(kShape.experts),
                                                std::to_string(kShape.topk), std::to_string(kShape.layers), "11"});
  REQUIRE(v.reported);
  CHECK(v.cases > 300);
  CHECK(v.failures == 0);
  CHECK(v.exit_code == 0);
  // The server survived and still serves an honest client (experts 6.. live on a second server).
  proc other;
  auto b = shape_args(endpoint, ns, kShape);
  b.insert(b.end(), {"--id", "other", "--host-experts", "6-11"});
  REQUIRE(other.start(EAAS_SERVER_BIN, b));
  REQUIRE(other.next("ready").is_object());
  auto c = shape_args(endpoint, ns, kShape);
  c.insert(c.end(), {"--id", "honest", "--tokens", "16", "--steps", "3", "--verify"});
  REQUIRE(good.start(EAAS_CLIENT_BIN, c));
  const auto r = good.next("result");
  CHECK(r.value("max_rel_err", 1.0) <= 1e-5);
  CHECK(good.wait() == 0);
  ::kill(server.sp.pid, SIGTERM);
  const auto st = server.next("stats");
  CHECK(st.value("refused", 0) >= 13);
  CHECK(server.wait() == 0);
}

TEST_CASE("runtime processes: a server loading a DeepSeek-V3-layout safetensors checkpoint serves exact results") {
  // The checkpoint holds the same numbers as the synthetic weights (fp32), under Hugging Face names,
  // MoE layers starting at decoder layer 3; the client's reference uses the synthetic ones.
  const std::string dir = "/tmp/eaas-ckpt-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  std::vector<tensor_to_write> ts;
  const std::vector<std::uint64_t> gu{kShape.inter, kShape.hidden}, dn{kShape.hidden, kShape.inter};
  for (std::uint32_t l = 0; l < kShape.layers; ++l)
    for (std::uint32_t e = 0; e < 6; ++e) {
      const auto w = synthetic_expert(kShape, 11, l, e);
      const std::string p = "model.layers." + std::to_string(l + 3) + ".mlp.experts." + std::to_string(e) + ".";
      ts.push_back({p + "gate_proj.weight", st_dtype::f32, gu, w.gate});
      ts.push_back({p + "up_proj.weight", st_dtype::f32, gu, w.up});
      ts.push_back({p + "down_proj.weight", st_dtype::f32, dn, w.down});
    }
  REQUIRE_OK(write_safetensors(dir + "/model.safetensors", ts));

  std::unique_ptr<registry_server> reg;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
  const std::string ns = "rtck" + std::to_string(::getpid());
  proc from_ckpt, synthetic, client, missing;
  auto a = shape_args(endpoint, ns, kShape);
  a.insert(a.end(), {"--id", "ckpt", "--host-experts", "0-5", "--checkpoint", dir, "--layout", "deepseek-v3"});
  REQUIRE(from_ckpt.start(EAAS_SERVER_BIN, a));
  REQUIRE(from_ckpt.next("ready").is_object());
  // A server asked for an expert the checkpoint lacks refuses to start, naming the tensor.
  auto m = shape_args(endpoint, ns, kShape);
  m.insert(m.end(), {"--id", "missing", "--host-experts", "5-6", "--checkpoint", dir, "--layout", "deepseek-v3"});
  REQUIRE(missing.start(EAAS_SERVER_BIN, m));
  CHECK(missing.wait() == 1);
  auto b = shape_args(endpoint, ns, kShape);
  b.insert(b.end(), {"--id", "synth", "--host-experts", "6-11"});
  REQUIRE(synthetic.start(EAAS_SERVER_BIN, b));
  REQUIRE(synthetic.next("ready").is_object());
  auto c = shape_args(endpoint, ns, kShape);
  c.insert(c.end(), {"--id", "c", "--tokens", "16", "--steps", "4", "--verify"});
  REQUIRE(client.start(EAAS_CLIENT_BIN, c));
  const auto r = client.next("result");
  CHECK(r.value("verified_steps", 0) == 4);
  CHECK(r.value("max_rel_err", 1.0) <= 1e-5);
  CHECK(client.wait() == 0);
  ::kill(from_ckpt.sp.pid, SIGTERM);
  CHECK(from_ckpt.next("stats").value("tokens", 0) > 0);
  std::filesystem::remove_all(dir);
}

TEST_CASE("runtime processes: a sharded bf16 Mixtral checkpoint: servers load experts, clients load routers") {
  // Weights unlike the synthetic ones (another seed), rounded to bf16 on write, in two shards with an
  // index: if any process ignored the checkpoint, the outputs would not match the reference.
  const std::string dir = "/tmp/eaas-mixtral-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  std::vector<tensor_to_write> shard[2];
  const std::vector<std::uint64_t> gu{kShape.inter, kShape.hidden}, dn{kShape.hidden, kShape.inter};
  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", nlohmann::json::object()}};
  for (std::uint32_t l = 0; l < kShape.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".block_sparse_moe.";
    const auto r = synthetic_router(kShape, 99, l);
    shard[l % 2].push_back({p + "gate.weight", st_dtype::bf16, {kShape.experts, kShape.hidden}, r.gate});
    for (std::uint32_t e = 0; e < kShape.experts; ++e) {
      const auto w = synthetic_expert(kShape, 99, l, e);
      const std::string q = p + "experts." + std::to_string(e) + ".";
      shard[l % 2].push_back({q + "w1.weight", st_dtype::bf16, gu, w.gate});
      shard[l % 2].push_back({q + "w3.weight", st_dtype::bf16, gu, w.up});
      shard[l % 2].push_back({q + "w2.weight", st_dtype::bf16, dn, w.down});
    }
  }
  for (int i = 0; i < 2; ++i) {
    const std::string name = "model-0000" + std::to_string(i + 1) + "-of-00002.safetensors";
    REQUIRE_OK(write_safetensors(dir + "/" + name, shard[i]));
    for (const auto& t : shard[i]) index["weight_map"][t.name] = name;
  }
  std::ofstream(dir + "/model.safetensors.index.json") << index.dump();

  std::unique_ptr<registry_server> reg;
  REQUIRE_OK(registry_server::start({.bind = "127.0.0.1", .port = 0, .token = ""}, reg));
  const std::string endpoint = "embedded://127.0.0.1:" + std::to_string(reg->port());
  auto run = [&](const std::string& ns, bool second_from_checkpoint) {
    proc a, b, c;
    auto sa = shape_args(endpoint, ns, kShape);
    sa.insert(sa.end(), {"--id", "a", "--host-experts", "0-5", "--checkpoint", dir});  // layout detected
    REQUIRE(a.start(EAAS_SERVER_BIN, sa));
    REQUIRE(a.next("ready").is_object());
    auto sb = shape_args(endpoint, ns, kShape);
    sb.insert(sb.end(), {"--id", "b", "--host-experts", "6-11"});
    if (second_from_checkpoint) sb.insert(sb.end(), {"--checkpoint", dir, "--layout", "mixtral"});
    REQUIRE(b.start(EAAS_SERVER_BIN, sb));
    REQUIRE(b.next("ready").is_object());
    auto cc = shape_args(endpoint, ns, kShape);
    cc.insert(cc.end(), {"--id", "c", "--tokens", "16", "--steps", "3", "--verify", "--checkpoint", dir});
    REQUIRE(c.start(EAAS_CLIENT_BIN, cc));
    const auto r = c.next("result");
    CHECK(c.wait() == 0);
    return r.value("max_rel_err", 1.0);
  };
  CHECK(run("mx1-" + std::to_string(::getpid()), true) <= 1e-5);
  // Negative control: one server on synthetic weights instead, and the check notices.
  CHECK(run("mx2-" + std::to_string(::getpid()), false) > 1e-3);
  std::filesystem::remove_all(dir);
}
