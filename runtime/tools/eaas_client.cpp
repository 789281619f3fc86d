// eaas-client: an attention client. Runs forward passes of random tokens through the model, sending
// every MoE layer to the expert servers it finds in the registry; with --verify it checks each output
// against the monolithic in-process reference. Prints JSON lines: progress, then a result.
//
//   eaas-client --id c0 --registry embedded://127.0.0.1:23790 --model tiny --tokens 32 --steps 50 --verify
//
// By default it is closed-loop: the next forward starts when the last one ends. With --trace it is
// open-loop: forwards are scheduled so that the offered tokens/s follow a traffic trace (the diurnal day
// of runtime/src/autoscale.hpp compressed into --period-s seconds, or a CSV), each forward's latency is
// measured from its scheduled start (a forward that starts late has queued), and it prints a `window`
// line per trace window (p50/p99 latency, forwards over --slo-ms) besides progress and result.
//
//   eaas-client --id c0 ... --tokens 16 --trace diurnal --period-s 30 --peak-tps 2000 --slo-ms 200

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "autoscale.hpp"
#include "client.hpp"
#include "eaas/runtime/safetensors.hpp"
#include "micro_batch.hpp"
#include "tool_common.hpp"
#if EAAS_CLIENT_DEVICE_STEP
#include "gpu/client_step.hpp"
#endif

using namespace eaas;
using namespace eaas::runtime;
using json = nlohmann::json;

namespace {

/// A sum of nanoseconds over `n` samples as a mean in microseconds (0 without samples).
double mean_us(std::uint64_t sum_ns, std::uint64_t n) { return n != 0 ? double(sum_ns) * 1e-3 / double(n) : 0.0; }

/// max over tokens of ||a - b||_inf / ||b||_inf.
double rel_error(const std::vector<float>& a, const std::vector<float>& b, std::size_t hidden) {
  double worst = 0;
  for (std::size_t t = 0; t < b.size() / hidden; ++t) {
    double num = 0, den = 0;
    for (std::size_t j = 0; j < hidden; ++j) {
      num = std::max(num, double(std::fabs(a[t * hidden + j] - b[t * hidden + j])));
      den = std::max(den, double(std::fabs(b[t * hidden + j])));
    }
    worst = std::max(worst, den > 0 ? num / den : num);
  }
  return worst;
}

void emit(const json& j) {
  const std::string s = j.dump() + "\n";
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
}

/// --trace: what the client offers over time.
struct trace_args {
  std::string trace;  // empty: closed loop
  double period_s = 60, peak_tps = 0, trough = 0.25, tick_s = 0, noise = 0.03, window_s = 0, slo_ms = 1000, start_h = 0;
  std::uint64_t seed = 1;

  void add(CLI::App& app) {
    app.add_option("--trace", trace,
                   "open loop: offer tokens/s following a trace, 'diurnal' or a CSV of seconds,tokens_per_s "
                   "(default: closed loop)");
    app.add_option("--period-s", period_s, "with --trace: seconds the trace is compressed into (one day)")
        ->capture_default_str();
    app.add_option("--peak-tps", peak_tps, "with --trace: this client's peak tokens/s (a CSV is scaled to it)");
    app.add_option("--trough", trough, "with --trace diurnal: the trough as a fraction of the peak")
        ->capture_default_str();
    app.add_option("--trace-tick-s", tick_s, "with --trace diurnal: seconds per trace step (default period / 96)");
    app.add_option("--trace-noise", noise, "with --trace diurnal: relative noise per step")->capture_default_str();
    app.add_option("--trace-seed", seed, "with --trace diurnal: noise seed")->capture_default_str();
    app.add_option("--day-start-h", start_h,
                   "with --trace diurnal: the hour the day starts at (4: from trough to trough, both ramps whole)")
        ->capture_default_str();
    app.add_option("--window-s", window_s, "with --trace: seconds per reported window (default period / 24)");
    app.add_option("--slo-ms", slo_ms, "with --trace: a forward slower than this (from its scheduled start) misses")
        ->capture_default_str();
  }
  /// The trace in seconds from the start of the run; false (with a message) if it cannot be built.
  bool build(std::vector<trace_sample>& out) const {
    if (!(period_s > 0) || !(slo_ms > 0) || !(trough >= 0 && trough <= 1) || !(noise >= 0)) {
      std::fprintf(stderr, "eaas-client: --trace needs --period-s > 0, --slo-ms > 0, 0 <= --trough <= 1\n");
      return false;
    }
    if (trace == "diurnal") {
      if (!(peak_tps > 0)) {
        std::fprintf(stderr, "eaas-client: --trace diurnal needs --peak-tps > 0\n");
        return false;
      }
      out = diurnal_trace(peak_tps, trough, tick_s > 0 ? tick_s : period_s / 96, seed, period_s, noise, start_h);
      return true;
    }
    if (!load_trace_csv(trace, out)) {
      std::fprintf(stderr, "eaas-client: %s: not a CSV of increasing seconds,tokens_per_s\n", trace.c_str());
      return false;
    }
    // Compressed into the period, and scaled to the peak where one is given.
    const double span = trace_span(out), origin = out.front().t_s,
                 top = std::max_element(out.begin(), out.end(), [](auto&a, auto&b) { return a.tps < b.tps; })->tps;
    for (auto& x : out) {
      x.t_s = (x.t_s - origin) * period_s / (span - origin);
      if (peak_tps > 0 && top > 0) x.tps *= peak_tps / top;
    }
    return true;
  }
};

/// The scheduled start of the forward after one scheduled at `t` (seconds into the trace), so that
/// `tokens` per forward make the trace's rate; beyond `end` where the trace offers nothing more.
double next_start(const std::vector<trace_sample>& tr, double t, std::uint32_t tokens, double end) {
  for (;;) {
    auto it = std::upper_bound(tr.begin(), tr.end(), t, [](double x, const trace_sample& s) { return x < s.t_s; });
    if (it == tr.begin()) return tr.front().t_s;
    const double rate = std::prev(it)->tps;
    if (rate > 0) return t + double(tokens) / rate;
    if (it == tr.end()) return end;  // nothing offered until the end
    t = it->t_s;                     // nothing offered in this step: the next step's start
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eaas-client: an attention client of the eaas MoE reference runtime"};
  client_options o;
  tool::model_args model;
  std::string endpoint = "embedded://127.0.0.1:23790";
  std::uint32_t tokens = 32, steps = 20, replicas = 1, attention_cost = 1;
  std::uint64_t input_seed = 0;
  double wait_s = 30, timeout_ms = 2000;
  bool verify = false;
  app.add_option("--id", o.id, "client id, unique in the namespace")->required();
  app.add_option("--registry", endpoint, "registry: embedded://HOST:PORT or etcd://HOST:PORT")->capture_default_str();
  app.add_option("--token", o.registry.token, "registry token");
  app.add_option("--ns", o.ns, "registry namespace")->capture_default_str();
  app.add_option("--ttl", o.ttl_seconds, "lease TTL, seconds")->capture_default_str();
  model.add(app);
  app.add_option("--tokens", tokens, "tokens per forward pass")->capture_default_str();
  app.add_option("--steps", steps, "forward passes")->capture_default_str();
  double duration_s = 0;
  app.add_option("--duration", duration_s, "run forward passes for this many seconds instead of --steps");
  app.add_option("--attention-cost", attention_cost, "dense hidden×hidden GEMMs per layer (attention stand-in)")
      ->capture_default_str();
  app.add_option("--replicas", replicas, "wait until every expert has this many servers")->capture_default_str();
  app.add_option("--wait", wait_s, "seconds to wait for the servers")->capture_default_str();
  app.add_option("--request-timeout-ms", timeout_ms, "a server silent this long is dropped")->capture_default_str();
  app.add_option("--input-seed", input_seed, "seed of the random tokens (default: from --id)");
  app.add_flag("--verify", verify, "check every output against the monolithic reference");
  double tolerance = 1e-5;
  app.add_option("--tolerance", tolerance, "with --verify: report steps off the reference by more than this")
      ->capture_default_str();
  app.add_option("--gpu", o.gpu, "receive answers in this CUDA device's memory (GPU servers of this host)")
      ->capture_default_str();
  auto* device_step = app.add_flag("--device-step", o.device_step,
                                   "with --gpu: the whole forward on the GPU (dense part, dispatch, wait and "
                                   "combine as kernels; a forward a server fails is computed again on the host)");
  std::string micro = "1";
  app.add_option("--micro-batches", micro,
                 "1, 2 (double batching: two halves at once, one's dense part overlapping the other's round trip) or "
                 "auto (both timed on the first forwards, the faster kept)")
      ->check(CLI::IsMember({"1", "2", "auto"}))
      ->capture_default_str();
  app.add_flag("--graph", o.graph, "with --device-step: capture the forward once in a CUDA graph, replay it")
      ->needs(device_step);
  bool no_pdl = false;
  app.add_flag("--no-pdl", no_pdl,
               "with --device-step: plain launches instead of programmatic dependent launch in each layer's round "
               "(the ablation)")
      ->needs(device_step);
  tool::checkpoint_args ckpt;
  ckpt.add(app, "routers (and, with --verify, the reference's experts)");
  trace_args ta;
  ta.add(app);
  CLI11_PARSE(app, argc, argv);
  std::vector<trace_sample> trace;
  if (!ta.trace.empty() && !ta.build(trace)) return 2;
  if (o.device_step && o.gpu < 0) {
    std::fprintf(stderr, "eaas-client: --device-step needs --gpu\n");
    return 2;
  }
  if (o.device_step) {
#if EAAS_CLIENT_DEVICE_STEP
    o.make_device_step = gpu::make_client_step;
#else
    std::fprintf(stderr, "eaas-client: --device-step: this eaas was built without CUDA\n");
    return 2;
#endif
  }

  o.registry.endpoint = endpoint;
  if (status s = model.resolve(o.shape); s != status::ok) return tool::fail("eaas-client", "model", s);
  o.seed = model.seed;
  o.dense.attention_cost = attention_cost;
  o.max_tokens = tokens;
  o.request_timeout_ns = static_cast<std::uint64_t>(timeout_ms * 1e6);
  // Without --verify nothing here reads the answers: on the device path they stay on the GPU, as in a serving
  // engine (no read-back of tokens x hidden x 4 bytes per forward).
  o.host_output = verify || !o.device_step;
  o.pdl = !no_pdl;
  if (input_seed == 0) input_seed = std::hash<std::string>{}(o.id);

  checkpoint ck;
  std::unique_ptr<hf_naming> naming;
  if (!ckpt.open("eaas-client", ck, naming)) return 1;
  if (naming) {
    o.load_router = [&ck, &naming, shape = o.shape](std::uint32_t layer, router_weights& r) {
      return load_router(ck, *naming, shape, layer, r);
    };
  }
  std::unique_ptr<attention_client> cl;
  const micro_batching mb = micro == "2"      ? micro_batching::two
                            : micro == "auto" ? micro_batching::automatic
                                              : micro_batching::one;
  if (status s = start_micro_batched(o, mb, cl); s != status::ok) return tool::fail("eaas-client", "start", s);
  if (status s = cl->wait_for_experts(replicas, static_cast<std::uint64_t>(wait_s * 1e9)); s != status::ok)
    return tool::fail("eaas-client", "waiting for servers", s);
  std::unique_ptr<reference_model> ref;
  if (verify) {
    ref = std::make_unique<reference_model>(o.shape, o.seed, o.dense);
    if (naming) {
      const model_shape shape = o.shape;
      const status s = ref->load(o.load_router, [&](std::uint32_t layer, std::uint32_t e, expert_weights& w) {
        return load_expert(ck, *naming, shape, layer, e, w);
      });
      if (s != status::ok) return tool::fail("eaas-client", "loading the reference's weights", s);
    }
  }

  std::mt19937_64 rng(input_seed);
  std::vector<std::uint32_t> ids(tokens);
  std::vector<float> out, want;
  std::vector<double> layer_us, step_us;
  double worst = 0, busy_s = 0, ref_s = 0;
  std::uint32_t verified = 0;
  std::uint64_t disagreements = 0;  // (token, layer) pairs where the reference's own router chose otherwise
  auto last_progress = std::chrono::steady_clock::now();
  if (duration_s > 0) steps = ~0u;  // until the time is up
  const auto t_end = std::chrono::steady_clock::now() + std::chrono::microseconds(static_cast<long>(duration_s * 1e6));
  std::uint32_t done = 0, timed = 0;
  double first_us = 0;
  // One forward: timed into the rates (except the first, which allocates, links and, with --graph,
  // captures), failovers reported, checked against the reference with --verify.
  std::uint64_t forward_end_ns = 0;  // when the last forward returned (before its check against the reference)
  auto one_forward = [&](std::uint32_t step, double& us) -> status {
    done = step + 1;
    for (auto& t : ids) t = static_cast<std::uint32_t>(rng());
    const auto t0 = std::chrono::steady_clock::now();
    EAAS_CHECK(cl->forward(ids, out));
    forward_end_ns = eaas::now_ns();
    us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (step == 0) first_us = us;
    if (step > 0 || steps == 1) {
      step_us.push_back(us);
      busy_s += us * 1e-6;
      ++timed;
      for (auto ns : cl->last_moe_ns()) layer_us.push_back(double(ns) * 1e-3);
    }
    for (const auto& f : cl->take_failovers())
      emit({{"type", "failover"},
            {"id", o.id},
            {"server", f.server},
            {"why", f.why},
            {"layer", f.layer},
            {"sent_ns", f.sent_ns},
            {"detected_ns", f.detected_ns},
            {"done_ns", f.done_ns}});
    if (ref) {
      const auto r0 = std::chrono::steady_clock::now();
      ref->forward(ids, want, &cl->last_routing(), &disagreements);
      ref_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - r0).count();
      const double err = rel_error(out, want, o.shape.hidden);
      if (err > tolerance)
        std::fprintf(stderr, "eaas-client %s: step %u differs from the reference by %.3g (relative)\n", o.id.c_str(),
                     step, err);
      worst = std::max(worst, err);
      verified++;
    }
    return status::ok;
  };
  auto progress = [&](std::uint32_t step, std::uint32_t of) {
    emit({{"type", "progress"},
          {"id", o.id},
          {"step", step},
          {"steps", of},
          {"tokens_per_s", busy_s > 0 ? double(tokens) * timed / busy_s : 0.0},
          {"max_rel_err", worst}});
  };
  json trace_result;
  if (!trace.empty()) {
    // Open loop. A warm-up forward first (not part of the trace), then forward k starts at its scheduled
    // time, or at once if the one before ended later: its latency counts from the schedule. Forwards still
    // unstarted a quarter period after the trace ended are counted as unserved (misses).
    double us = 0;
    if (status s = one_forward(0, us); s != status::ok) return tool::fail("eaas-client", "forward", s);
    const double period = ta.period_s, window_s = ta.window_s > 0 ? ta.window_s : period / 24;
    const auto windows = static_cast<std::size_t>(std::ceil(period / window_s));
    std::vector<std::vector<double>> lat_ms(windows);
    std::vector<std::uint32_t> offered(windows, 0);
    std::vector<double> all_ms;
    std::uint64_t over = 0, unserved = 0;
    const std::uint64_t t0 = eaas::now_ns();
    auto at = [&](double t_s) { return t0 + static_cast<std::uint64_t>(t_s * 1e9); };
    const std::uint64_t give_up = at(period * 1.25);
    std::size_t reported = 0;
    auto report = [&](std::size_t w) {
      std::uint32_t late = 0;
      for (double x : lat_ms[w]) late += x > ta.slo_ms ? 1 : 0;
      emit({{"type", "window"},
            {"id", o.id},
            {"window", w},
            {"t_s", double(w) * window_s},
            {"offered_tps", double(offered[w]) * tokens / window_s},
            {"forwards", offered[w]},
            {"served", lat_ms[w].size()},
            {"over_slo", late + (offered[w] - lat_ms[w].size())},
            {"p50_ms", tool::percentile(lat_ms[w], 50)},
            {"p99_ms", tool::percentile(lat_ms[w], 99)}});
    };
    std::uint32_t step = 1;
    for (double sched = next_start(trace, -1, tokens, period); sched < period;
         sched = next_start(trace, sched, tokens, period)) {
      const auto w = std::min(windows - 1, static_cast<std::size_t>(sched / window_s));
      offered[w]++;
      for (; reported < w; ++reported) report(reported);
      if (eaas::now_ns() > give_up) {
        unserved++;
        continue;
      }
      while (eaas::now_ns() < at(sched))
        std::this_thread::sleep_for(
            std::chrono::nanoseconds(std::min<std::uint64_t>(at(sched) - eaas::now_ns(), 1'000'000)));
      if (status s = one_forward(step++, us); s != status::ok) return tool::fail("eaas-client", "forward", s);
      // Up to the forward's end: with --verify the reference's time only delays the forwards after it.
      const double ms = double(forward_end_ns - at(sched)) * 1e-6;
      lat_ms[w].push_back(ms);
      all_ms.push_back(ms);
      over += ms > ta.slo_ms ? 1 : 0;
      const auto now = std::chrono::steady_clock::now();
      if (now - last_progress > std::chrono::milliseconds(250)) {
        last_progress = now;
        progress(step, 0);
      }
    }
    const std::uint64_t trace_end_ns = eaas::now_ns();
    for (; reported < windows; ++reported) report(reported);
    progress(step, 0);
    json ws = json::array();
    for (std::size_t w = 0; w < windows; ++w) {
      std::uint32_t late = 0;
      for (double x : lat_ms[w]) late += x > ta.slo_ms ? 1 : 0;
      ws.push_back({{"t_s", double(w) * window_s},
                    {"offered_tps", double(offered[w]) * tokens / window_s},
                    {"forwards", offered[w]},
                    {"over_slo", late + (offered[w] - lat_ms[w].size())},
                    {"p50_ms", tool::percentile(lat_ms[w], 50)},
                    {"p99_ms", tool::percentile(lat_ms[w], 99)}});
    }
    const std::uint64_t forwards = all_ms.size() + unserved;
    trace_result = {{"trace", ta.trace},
                    {"period_s", period},
                    {"window_s", window_s},
                    {"slo_ms", ta.slo_ms},
                    {"start_ns", t0},
                    {"end_ns", trace_end_ns},
                    {"forwards", forwards},
                    {"unserved", unserved},
                    {"over_slo", over + unserved},
                    {"miss_fraction", forwards ? double(over + unserved) / double(forwards) : 0.0},
                    {"latency_ms",
                     {{"p50", tool::percentile(all_ms, 50)},
                      {"p99", tool::percentile(all_ms, 99)},
                      {"max", all_ms.empty() ? 0.0 : *std::max_element(all_ms.begin(), all_ms.end())}}},
                    {"windows", ws}};
  }
  for (std::uint32_t step = 0; trace.empty() && step < steps; ++step) {
    if (duration_s > 0 && step > 0 && std::chrono::steady_clock::now() >= t_end) break;
    double us = 0;
    if (status s = one_forward(step, us); s != status::ok) return tool::fail("eaas-client", "forward", s);
    const auto now = std::chrono::steady_clock::now();
    if (now - last_progress > std::chrono::milliseconds(250) || step + 1 == steps || (duration_s > 0 && now >= t_end)) {
      last_progress = now;
      progress(step + 1, duration_s > 0 ? 0u : steps);
    }
  }
  const client_stats st = cl->stats();
  emit({{"type", "result"},
        {"id", o.id},
        {"tokens", tokens},
        {"steps", done},
        {"layers", o.shape.layers},
        {"tokens_per_s", busy_s > 0 ? double(tokens) * timed / busy_s : 0.0},
        {"first_step_us", first_us},
        {"step_us",
         {{"p50", tool::percentile(step_us, 50)},
          {"p90", tool::percentile(step_us, 90)},
          {"p99", tool::percentile(step_us, 99)},
          {"max", step_us.empty() ? 0.0 : *std::max_element(step_us.begin(), step_us.end())}}},
        {"moe_layer_us",
         {{"p50", tool::percentile(layer_us, 50)},
          {"p90", tool::percentile(layer_us, 90)},
          {"p99", tool::percentile(layer_us, 99)}}},
        {"layer_us_samples", layer_us},
        {"verified_steps", verified},
        // The monolithic reference's own speed in this process (same machine, same run): the baseline.
        {"reference_tokens_per_s", ref_s > 0 ? double(tokens) * verified / ref_s : 0.0},
        {"max_rel_err", worst},
        {"routing_disagreements", disagreements},
        {"dropped_servers", st.dropped_servers},
        {"resent_entries", st.resent_entries},
        {"device_forwards", st.device_forwards},
        {"fallback_forwards", st.fallback_forwards},
        {"graph_captures", st.graph_captures},
        {"capture_retries", st.capture_retries},
        {"micro_batches", st.micro_batches},
        {"requests", st.requests},
        {"direct_requests", st.direct_requests},
        {"device_layer_us",
         {{"send", mean_us(st.device_send_ns, st.device_layers)},
          {"round", mean_us(st.device_round_ns, st.device_layers)},
          {"combine", mean_us(st.device_combine_ns, st.device_layers)},
          {"dense", mean_us(st.device_dense_ns, st.device_dense_layers)}}},
        // Per device forward (each half is one with two micro-batches): on the device from the first dispatch;
        // then, over those that captured no graph, the client's forward call, the step's, its preparation before
        // the forward was queued and its wait for the forward.
        {"device_forward_us",
         {{"device", mean_us(st.device_forward_ns, st.device_forwards)},
          {"client_call", mean_us(st.device_call_ns, st.device_timed_forwards)},
          {"step_call", mean_us(st.device_wall_ns, st.device_timed_forwards)},
          {"prepare", mean_us(st.device_prepare_ns, st.device_timed_forwards)},
          {"wait", mean_us(st.device_wait_ns, st.device_timed_forwards)}}},
        {"trace", trace_result}});
  return 0;
}
