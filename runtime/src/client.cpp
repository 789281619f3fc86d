#include "client.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>
#include <utility>

#include "bf16.hpp"
#include "eaas/eaas.hpp"
#include "eaas/runtime/slot.hpp"
#include "fail.hpp"
#include "gpu/capture_lock.hpp"
#include "gpu/client_step.hpp"
#include "wire.hpp"

namespace eaas::runtime {
namespace {

/// Failed rounds one layer may take (each drops the servers that failed it) before the forward fails.
constexpr std::uint32_t kMaxFailedRounds = 8;

/// A server this client talks to.
struct server_conn {
  peer_record rec;
  peer_link link;
  std::unique_ptr<memory_region> result;
  server_welcome w{};
  remote_view slots{};
  std::map<std::uint32_t, std::uint16_t> local;  // global expert id → local id
  std::uint64_t seq = 0;
  // This round's request.
  std::vector<std::uint32_t> tokens;   // tokens sent (indices into the batch)
  std::vector<std::uint16_t> ids;      // tokens × topk local ids
  std::vector<float> weights;          // tokens × topk
  std::vector<std::uint32_t> entries;  // the (t * topk + k) entries it holds this round
  std::vector<unsigned char> staging;
  bool sent = false;
  std::string why;  // why this round failed, when it was not a recorded failure
};

class client_impl final : public attention_client {
 public:
  explicit client_impl(client_options o) : o_(std::move(o)), dense_(o_.shape, o_.seed, o_.dense) {}
  ~client_impl() override {
    {
      std::lock_guard g(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (connector_.joinable()) connector_.join();
    step_.reset();  // before the result regions its kernels read (none runs between forwards)
    watch_.reset();
    {
      const auto g = gpu_lock();
      servers_.clear();
      ready_.clear();
    }
    dir_.reset();
  }

  status init() {
    EAAS_CHECK(check_shape(o_.shape));
    if (o_.max_tokens == 0) return EAAS_RT_FAIL(status::invalid_argument, "client {}: max_tokens is 0", o_.id);
    if (o_.load_router) EAAS_CHECK(dense_.load_routers(o_.load_router));
    if (o_.gpu >= 0)
      EAAS_CHECK(make_gpu_wire(o_.gpu, wire_));
    else
      wire_ = make_host_wire();
    if (o_.graph && !o_.device_step)
      return EAAS_RT_FAIL(status::invalid_argument, "client {}: graph needs device_step", o_.id);
    if (!o_.host_output && !o_.device_step)
      return EAAS_RT_FAIL(status::invalid_argument, "client {}: host_output false needs device_step", o_.id);
    if (o_.device_step) {
      if (o_.gpu < 0)
        return EAAS_RT_FAIL(status::invalid_argument, "client {}: device_step needs a GPU (gpu >= 0)", o_.id);
      if (!o_.make_device_step)
        return EAAS_RT_FAIL(status::unsupported,
                            "client {}: device_step needs make_device_step (gpu::make_client_step, library "
                            "eaas_client_gpu)",
                            o_.id);
      // The dense part's weights are dense_'s, loaded routers included: both paths compute one model.
      const gpu::client_step_config cfg{.device = o_.gpu,
                                        .shape = o_.shape,
                                        .dense = o_.dense,
                                        .weights = &dense_.weights(),
                                        .max_tokens = o_.max_tokens,
                                        .request_timeout_ns = o_.request_timeout_ns,
                                        .graph = o_.graph,
                                        .host_output = o_.host_output,
                                        .pdl = o_.pdl};
      EAAS_CHECK(o_.make_device_step(cfg, step_));
    }
    EAAS_CHECK(context::create({.name = o_.id, .cuda_device = o_.gpu}, ctx_));
    EAAS_CHECK(registry::open(o_.registry, reg_));
    peer_record self;
    self.id = o_.id;
    self.role = "client";
    EAAS_CHECK(ctx_->connection_handle(self.connection));
    EAAS_CHECK(directory::start(*reg_, *ctx_, o_.ns, std::move(self), o_.ttl_seconds, dir_));
    EAAS_CHECK(dir_->watch_peers(
        [this](peer_change c, const peer_record& r) {
          if (r.role != "server") return;
          {
            std::lock_guard g(mu_);
            if (c == peer_change::online) {
              online_[r.id] = r;
            } else {
              online_.erase(r.id);
              gone_.push_back(r.id);
            }
          }
          cv_.notify_all();
        },
        watch_));
    connector_ = std::thread([this] { connect_loop(); });
    return status::ok;
  }

  status wait_for_experts(std::uint32_t replicas, std::uint64_t timeout_ns) override {
    const std::uint64_t until = eaas::now_ns() + timeout_ns;
    for (;;) {
      std::uint32_t short_expert = ~0u, have = 0;
      {
        std::lock_guard g(mu_);
        std::vector<std::uint32_t> count(o_.shape.experts, 0);
        for (const auto& [id, experts] : linked_)
          for (std::uint32_t e : experts)
            if (e < count.size()) count[e]++;
        for (std::uint32_t e = 0; e < count.size(); ++e)
          if (count[e] < replicas) {
            short_expert = e;
            have = count[e];
            break;
          }
      }
      if (short_expert == ~0u) return status::ok;
      if (eaas::now_ns() > until)
        return EAAS_RT_FAIL(status::timeout, "client {}: expert {} has {} of {} servers linked after {} ms", o_.id,
                            short_expert, have, replicas, timeout_ns / 1'000'000);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  status forward(std::span<const std::uint32_t> tokens, std::vector<float>& out) override {
    if (tokens.empty() || tokens.size() > o_.max_tokens)
      return EAAS_RT_FAIL(status::invalid_argument, "client {}: {} tokens (1..{})", o_.id, tokens.size(),
                          o_.max_tokens);
    device_out_ = nullptr;
    if (step_) {
      const std::uint64_t called = eaas::now_ns();
      bool done = false;
      EAAS_CHECK(device_forward(tokens, out, done, called));
      if (done) return status::ok;
    }
    layer_ns_.assign(o_.shape.layers, 0);
    layer_routing_.resize(o_.shape.layers);
    dense_.embed(tokens, out);
    for (std::uint32_t l = 0; l < o_.shape.layers; ++l) {
      dense_.attention(l, out, normed_);
      dense_.route(l, normed_, routing_);
      layer_routing_[l] = routing_;
      const std::uint64_t t0 = eaas::now_ns();
      EAAS_CHECK(moe(l, tokens.size()));
      layer_ns_[l] = eaas::now_ns() - t0;
      for (std::size_t i = 0; i < out.size(); ++i) out[i] += moe_[i];
    }
    std::lock_guard g(stats_mu_);
    stats_.forwards++;
    // Failures of a device-path forward that this host-path forward computed again.
    const std::uint64_t now = eaas::now_ns();
    for (auto& e : device_events_) {
      e.done_ns = now;
      failovers_.push_back(std::move(e));
    }
    device_events_.clear();
    return status::ok;
  }

  const std::vector<std::uint64_t>& last_moe_ns() const override { return layer_ns_; }
  const std::vector<routing>& last_routing() const override { return layer_routing_; }
  const float* device_output() const override { return device_out_; }
  client_stats stats() const override {
    std::lock_guard g(stats_mu_);
    return stats_;
  }
  const dense_model& dense() const override { return dense_; }
  std::vector<failover_event> take_failovers() override {
    std::lock_guard g(stats_mu_);
    return std::exchange(failovers_, {});
  }

 private:
  // One forward on the device path, when every expert has a linked server (else `done` stays false and
  // the host path waits for one). A server failure leaves `done` false too: the servers that failed are
  // dropped as the host path drops them, and the caller computes the forward again on the host path.
  // The request counters come back from the device: c->seq stays the one count both paths use.
  status device_forward(std::span<const std::uint32_t> tokens, std::vector<float>& out, bool& done,
                        std::uint64_t called) {
    done = false;
    refresh();
    // The servers' descriptions, built again only when the set of servers changed (no allocation per forward
    // otherwise); the request counters and endpoint views every forward.
    if (step_gen_ != servers_gen_) {
      step_servers_.clear();
      step_conns_.clear();
      std::vector<bool> covered(o_.shape.experts, false);
      for (auto& [id, c] : servers_) {
        gpu::step_server v;
        v.slots = c->slots;
        v.slot_offset = c->w.slot_offset;
        v.sig_offset = c->w.sig_offset;
        v.slot_bytes = c->w.slot_bytes;
        v.grant = c->w.grant;
        v.max_tokens = c->w.max_tokens;
        v.result = c->result->data();
        v.result_bytes = c->result->size();
        for (const auto& [e, local] : c->local) {
          v.experts.emplace_back(e, local);
          if (e < covered.size()) covered[e] = true;
        }
        step_servers_.push_back(std::move(v));
        step_conns_.push_back(c.get());
      }
      step_covered_ = std::find(covered.begin(), covered.end(), false) == covered.end();
      step_gen_ = servers_gen_;
    }
    if (!step_covered_) return status::ok;
    for (std::size_t i = 0; i < step_conns_.size(); ++i) {
      step_servers_[i].ep = step_conns_[i]->link.ep->view();
      step_servers_[i].seq = step_conns_[i]->seq;
    }
    const std::uint64_t t0 = eaas::now_ns();
    EAAS_CHECK(step_->forward(tokens, step_servers_, step_result_));
    std::uint64_t requests = 0, direct = 0;
    for (std::size_t i = 0; i < step_conns_.size(); ++i) {
      step_conns_[i]->seq = step_servers_[i].seq;
      requests += step_result_.outcomes[i].requests;
      direct += step_result_.outcomes[i].direct_requests;
    }
    {
      std::lock_guard g(stats_mu_);
      stats_.requests += requests;
      stats_.direct_requests += direct;
      stats_.graph_captures = step_->captures();
      stats_.capture_retries = step_->capture_retries();
    }
    if (step_result_.complete) {
      out.swap(step_result_.out);
      if (!o_.host_output) device_out_ = step_->device_out();
      layer_ns_ = step_result_.layer_ns;
      layer_routing_.swap(step_result_.layers);
      std::lock_guard g(stats_mu_);
      stats_.forwards++;
      stats_.device_forwards++;
      for (std::size_t l = 0; l < step_result_.phases.size(); ++l) {
        const gpu::layer_phases& ph = step_result_.phases[l];
        stats_.device_layers++;
        stats_.device_send_ns += ph.send_ns;
        stats_.device_round_ns += ph.round_ns;
        stats_.device_combine_ns += ph.combine_ns;
        if (l != 0) {
          stats_.device_dense_layers++;
          stats_.device_dense_ns += ph.dense_ns;
        }
      }
      stats_.device_forward_ns += step_result_.device_ns;
      if (!step_result_.captured) {
        stats_.device_timed_forwards++;
        stats_.device_wall_ns += step_result_.wall_ns;
        stats_.device_prepare_ns += step_result_.prepare_ns;
        stats_.device_wait_ns += step_result_.wait_ns;
        stats_.device_call_ns += eaas::now_ns() - called;
      }
      done = true;
      return status::ok;
    }
    std::vector<std::tuple<std::string, std::string, std::uint32_t, bool>> failed;  // id, why, layer, revoked
    for (std::size_t i = 0; i < step_conns_.size(); ++i) {
      const gpu::step_outcome& o = step_result_.outcomes[i];
      if (o.fail == gpu::step_fail::none) continue;
      const std::string& id = step_conns_[i]->rec.id;
      std::string why =
          fmt::format("{} in layer {} (device path, request {})", gpu::step_fail_name(o.fail), o.layer, o.seq);
      if (o.fail == gpu::step_fail::refused)
        why += fmt::format(": {}", slot_error_name(static_cast<slot_error>(o.detail)));
      if (o.fail == gpu::step_fail::not_delivered) why += fmt::format(": {}", static_cast<status>(o.detail));
      if (o.fail == gpu::step_fail::overflow) {
        // More tokens for it than it takes per request: not its fault; the host path spreads them.
        detail::note("[{}] server {}: {} tokens in layer {} exceed its max_tokens ({}); host path", o_.id, id, o.detail,
                     o.layer, step_conns_[i]->w.max_tokens);
        continue;
      }
      failed.emplace_back(id, std::move(why), o.layer, o.fail == gpu::step_fail::revoked);
    }
    if (failed.empty()) detail::note("[{}] the device path could not complete a forward; host path", o_.id);
    const std::uint64_t detected = eaas::now_ns();
    for (const auto& [id, why, layer, revoked] : failed) {
      drop(id, why.c_str(), revoked ? 0 : o_.relink_backoff_ns);
      device_events_.push_back({.server = id, .why = why, .layer = layer, .sent_ns = t0, .detected_ns = detected});
    }
    std::lock_guard g(stats_mu_);
    stats_.fallback_forwards++;
    return status::ok;
  }

  /// Forgets a server. While its record stays published it is linked again after `retry_after_ns`
  /// (0: at once, e.g. it revoked our slot; a silent or dead one waits, and goes for good with its lease).
  void drop(const std::string& id, const char* why, std::uint64_t retry_after_ns) {
    auto it = servers_.find(id);
    if (it == servers_.end()) return;
    detail::note("[{}] dropping server {}: {}", o_.id, id, why);
    std::unique_ptr<server_conn> c = std::move(it->second);
    servers_.erase(it);
    servers_gen_++;
    retire(std::move(c));
    {
      std::lock_guard g(mu_);
      claimed_.erase(id);
      retry_at_[id] = eaas::now_ns() + retry_after_ns;
      linked_.erase(id);
    }
    std::lock_guard g(stats_mu_);
    stats_.dropped_servers++;
  }

  // The connector thread: links to servers as they come online, off the data path, so that a joining
  // (or just-killed) server never stalls a forward pass. Failed links are retried while the server
  // stays online.
  void connect_loop() {
    std::unique_lock lk(mu_);
    while (!stopping_) {
      cv_.wait_for(lk, std::chrono::milliseconds(20));
      if (stopping_) break;
      const std::uint64_t now = eaas::now_ns();
      std::vector<peer_record> want;
      for (const auto& [id, r] : online_) {
        const auto retry = retry_at_.find(id);
        if (!claimed_.count(id) && (retry == retry_at_.end() || retry->second <= now)) want.push_back(r);
      }
      for (const auto& r : want) {
        claimed_.insert(r.id);
        lk.unlock();
        std::unique_ptr<server_conn> c;  // what connect() built, also when it failed
        const std::uint64_t t0 = eaas::now_ns();
        const status st = connect(r, c);
        if (eaas::now_ns() - t0 > 100'000'000ull)
          detail::note("[{}] slow link to {}: {} ms ({})", o_.id, r.id, (eaas::now_ns() - t0) / 1000000, st);
        const std::string why = st == status::ok ? "" : std::string(last_error());
        lk.lock();
        if (st == status::ok && online_.count(r.id)) {
          linked_[r.id] = r.experts;
          ready_.push_back(std::move(c));
        } else {
          if (st != status::ok) detail::note("[{}] cannot link to server {}: {}", o_.id, r.id, why);
          claimed_.erase(r.id);
          retry_at_[r.id] = eaas::now_ns() + 250'000'000ull;
        }
        if (c) {  // not kept: freed without mu_ held (the GPU lock comes first)
          lk.unlock();
          retire(std::move(c));
          lk.lock();
        }
        if (stopping_) break;
      }
    }
  }

  // Links to a server: hands it a result region, waits for its welcome, checks it. `c` holds what was built,
  // also on failure: the caller retires it.
  status connect(const peer_record& rec, std::unique_ptr<server_conn>& c) {
    c = std::make_unique<server_conn>();
    c->rec = rec;
    {
      const auto g = gpu_lock();  // the allocation only: the link below waits on the registry and the server
      EAAS_CHECK(ctx_->allocate(result_region_bytes(o_.max_tokens, o_.shape.hidden), wire_->kind(), c->result));
    }
    handle_bytes h;
    EAAS_CHECK(c->result->export_handle(h));
    EAAS_CHECK(dir_->link(rec.id, {{"result", h}}, o_.link_timeout_ns, c->link));
    if (c->link.ep->transport() != wire_->transport())
      return EAAS_RT_FAIL(status::unsupported, "client {}: server {} is reached over {}; this client needs {}", o_.id,
                          rec.id, transport_name(c->link.ep->transport()), transport_name(wire_->transport()));
    std::uint64_t slot1 = 0;
    const status st =
        wire_->wait(*c->link.ep, *c->result, kWelcomeSig, cmp_op::ne, 0, eaas::now_ns() + o_.link_timeout_ns, &slot1);
    if (st != status::ok)
      return EAAS_RT_FAIL(st, "client {}: server {} gave no slot within {} ms ({})", o_.id, rec.id,
                          o_.link_timeout_ns / 1'000'000, st);
    EAAS_CHECK(wire_->read(*c->result, kWelcome, &c->w, sizeof(c->w)));
    const remote_region* slots = c->link.region("slots");
    const server_welcome& w = c->w;
    if (slots == nullptr) return EAAS_RT_FAIL(status::invalid_handle, "server {}: no slots region", rec.id);
    const std::uint64_t size = slots->size();
    if (c->link.record.experts != rec.experts || rec.experts.size() >= kNoExpert ||
        !std::is_sorted(rec.experts.begin(), rec.experts.end()) ||
        std::adjacent_find(rec.experts.begin(), rec.experts.end()) != rec.experts.end())
      return EAAS_RT_FAIL(status::invalid_handle,
                          "server {}: its experts changed while linking, or are not a sorted set of < 65535", rec.id);
    if (w.magic != kSlotMagic || w.version != kSlotVersion || w.slot + 1 != slot1 || w.sig_offset % 8 != 0 ||
        size < 8 || w.sig_offset > size - 8 || w.slot_offset > size || w.slot_bytes > size - w.slot_offset ||
        w.hidden != o_.shape.hidden || w.layers < o_.shape.layers || w.max_topk < o_.shape.topk ||
        w.local_experts != rec.experts.size() || w.max_tokens == 0)
      return EAAS_RT_FAIL(status::invalid_handle,
                          "server {}: its welcome does not fit (slot {}, hidden {}, layers {}, topk {}, experts {})",
                          rec.id, w.slot, w.hidden, w.layers, w.max_topk, w.local_experts);
    c->slots = slots->view();
    for (std::size_t i = 0; i < rec.experts.size(); ++i) c->local[rec.experts[i]] = static_cast<std::uint16_t>(i);
    return status::ok;
  }

  // The GPU lock (gpu/capture_lock.hpp) where this client's result regions are device memory; none otherwise.
  std::unique_lock<std::mutex> gpu_lock() const {
    return o_.gpu >= 0 ? std::unique_lock(gpu::capture_mutex()) : std::unique_lock<std::mutex>();
  }

  // Closes a server's link and frees its result region. On a GPU that unmaps the server's slots (cudaIpc) and
  // frees device memory: under the GPU lock, so that it never overlaps a capture of another device-step
  // client of this process (double batching). The nvlink endpoint's close is local (no network).
  void retire(std::unique_ptr<server_conn> c) {
    if (!c) return;
    const auto g = gpu_lock();
    if (c->link.ep) c->link.ep->close();
    c.reset();
  }

  // Takes the connector's new links; forgets servers that went offline.
  void refresh() {
    std::vector<std::unique_ptr<server_conn>> ready;
    std::vector<std::string> gone;
    {
      std::lock_guard g(mu_);
      ready.swap(ready_);
      gone.swap(gone_);
    }
    for (auto& c : ready) {
      const std::string id = c->rec.id;
      servers_[id] = std::move(c);
      servers_gen_++;
    }
    for (const auto& id : gone) {
      if (servers_.count(id)) drop(id, "its lease ended", 0);
      std::lock_guard g(mu_);
      claimed_.erase(id);  // a server that comes back under this id is a new server
      linked_.erase(id);
      retry_at_.erase(id);
    }
  }

  // The MoE part of one layer: routing_ and normed_ in, moe_ out.
  status moe(std::uint32_t layer, std::size_t rows) {
    const std::uint32_t topk = o_.shape.topk, h = o_.shape.hidden;
    moe_.assign(rows * h, 0.0f);
    std::vector<std::uint32_t> pending(rows * topk);
    for (std::uint32_t i = 0; i < pending.size(); ++i) pending[i] = i;
    std::vector<failover_event> events;
    std::uint32_t failed_rounds = 0;
    for (std::uint32_t round = 0;; ++round) {
      const std::size_t before = pending.size();
      refresh();
      const std::uint64_t round_start = eaas::now_ns();
      if (round > 0) {
        std::lock_guard g(stats_mu_);
        stats_.resent_entries += pending.size();
      }
      // Assign each pending entry to a server hosting its expert, spreading over replicas. An expert
      // with no linked server: wait (bounded) for one to come, re-checking every expert after each refresh
      // (a refresh can also take a host away).
      std::map<std::uint32_t, std::vector<server_conn*>> hosts;
      // Long enough for a dropped server to be linked again (backoff + link) or a replica to come.
      const std::uint64_t wait_until =
          eaas::now_ns() + o_.request_timeout_ns + o_.relink_backoff_ns + o_.link_timeout_ns;
      for (;;) {
        hosts.clear();
        for (auto& [id, c] : servers_)
          for (const auto& [e, local] : c->local) hosts[e].push_back(c.get());
        std::uint32_t missing = ~0u;
        for (std::uint32_t ent : pending)
          if (!hosts.count(routing_.ids[ent])) missing = routing_.ids[ent];
        if (missing == ~0u) break;
        if (eaas::now_ns() > wait_until)
          return EAAS_RT_FAIL(status::peer_unreachable, "client {}: no live server hosts expert {} (layer {})", o_.id,
                              missing, layer);
        std::this_thread::sleep_for(std::chrono::microseconds(500));
        refresh();
      }
      for (auto& [id, c] : servers_) {
        c->entries.clear();
        c->tokens.clear();
        c->sent = false;
      }
      // A server takes at most its max_tokens distinct tokens per request: what does not fit goes to
      // another replica, or waits for the next round (not a failure).
      std::vector<std::uint32_t> deferred;
      for (std::uint32_t ent : pending) {
        const std::uint32_t t = ent / topk, e = routing_.ids[ent];
        const auto& h = hosts.at(e);
        server_conn* chosen = nullptr;
        for (std::size_t k = 0; k < h.size() && chosen == nullptr; ++k) {
          server_conn* c = h[(t + e + k) % h.size()];
          const bool has = !c->tokens.empty() && c->tokens.back() == t;  // entries arrive in token order
          if (has || c->tokens.size() < c->w.max_tokens) chosen = c;
        }
        if (chosen == nullptr) {
          deferred.push_back(ent);
          continue;
        }
        if (chosen->tokens.empty() || chosen->tokens.back() != t) chosen->tokens.push_back(t);
        chosen->entries.push_back(ent);
      }
      pending = std::move(deferred);
      for (auto& [id, c] : servers_)
        if (!c->entries.empty()) send(layer, *c);
      std::vector<std::pair<std::string, std::string>> failed;  // id, why
      std::vector<std::string> revoked;
      const std::uint64_t round_deadline = eaas::now_ns() + o_.request_timeout_ns;  // one bound for the round
      for (auto& [id, c] : servers_) {
        if (c->entries.empty()) continue;
        const std::uint64_t t0 = eaas::now_ns();
        const status st = c->sent ? collect(*c, round_deadline) : status::peer_unreachable;
        if (st != status::ok) {
          pending.insert(pending.end(), c->entries.begin(), c->entries.end());
          if (st == status::not_connected) revoked.push_back(id);
          failed.emplace_back(id, c->why.empty() ? std::string(last_error()) : c->why);
        }
        if (eaas::now_ns() - t0 > 200'000'000ull)
          detail::note("[{}] slow answer from {}: {} ms (round {}, layer {}, {} ms since the round began)", o_.id, id,
                       (eaas::now_ns() - t0) / 1000000, round, layer, (eaas::now_ns() - round_start) / 1000000);
      }
      if (eaas::now_ns() - round_start > 200'000'000ull)
        detail::note("[{}] slow round {} of layer {}: {} ms", o_.id, round, layer,
                     (eaas::now_ns() - round_start) / 1000000);
      for (const auto& [id, why] : failed) {
        const bool was_revoked = std::find(revoked.begin(), revoked.end(), id) != revoked.end();
        drop(id, why.c_str(), was_revoked ? 0 : o_.relink_backoff_ns);
        events.push_back(
            {.server = id, .why = why, .layer = layer, .sent_ns = round_start, .detected_ns = eaas::now_ns()});
      }
      if (pending.empty()) {
        if (!events.empty()) {
          const std::uint64_t now = eaas::now_ns();
          std::lock_guard g(stats_mu_);
          for (auto& e : events) {
            e.done_ns = now;
            failovers_.push_back(std::move(e));
          }
        }
        return status::ok;
      }
      if (failed.empty() && pending.size() == before)
        return EAAS_RT_FAIL(status::internal_error, "client {}: layer {}: {} entries fit no server", o_.id, layer,
                            pending.size());
      if (!failed.empty() && ++failed_rounds >= kMaxFailedRounds)
        return EAAS_RT_FAIL(status::peer_unreachable, "client {}: layer {} failed {} rounds (last: {})", o_.id, layer,
                            failed_rounds, failed.back().second);
    }
  }

  // Builds and writes one request; `sent` says whether it went out.
  void send(std::uint32_t layer, server_conn& c) {
    const std::uint32_t topk = o_.shape.topk, h = o_.shape.hidden;
    c.why.clear();
    std::vector<std::int32_t> row_of(normed_.size() / h, -1);
    for (std::size_t r = 0; r < c.tokens.size(); ++r) row_of[c.tokens[r]] = static_cast<std::int32_t>(r);
    const auto n = static_cast<std::uint32_t>(c.tokens.size());
    c.ids.assign(std::size_t{n} * topk, kNoExpert);
    c.weights.assign(std::size_t{n} * topk, 0.0f);
    for (std::uint32_t ent : c.entries) {
      const std::size_t r = static_cast<std::size_t>(row_of[ent / topk]), k = ent % topk;
      c.ids[r * topk + k] = c.local.at(routing_.ids[ent]);
      c.weights[r * topk + k] = routing_.weights[ent];
    }
    const dtype type = o_.gpu >= 0 ? dtype::bf16 : dtype::f32;  // GPU experts take bf16: half the bytes
    const slot_layout l = layout_for(n, h, topk, type);
    if (l.end > c.w.slot_bytes) {
      (void)EAAS_RT_FAIL(status::invalid_argument, "server {}: a request of {} tokens does not fit its slot", c.rec.id,
                         n);
      return;
    }
    c.staging.assign(l.end, 0);
    slot_header hd{};
    hd.magic = kSlotMagic;
    hd.version = kSlotVersion;
    hd.type = static_cast<std::uint16_t>(type);
    hd.seq = ++c.seq;
    hd.layer = layer;
    hd.tokens = n;
    hd.hidden = h;
    hd.topk = topk;
    hd.payload_bytes = l.end - sizeof(slot_header);
    hd.grant = c.w.grant;
    hd.commit = slot_commit(hd.seq, hd.grant);
    std::memcpy(c.staging.data(), &hd, sizeof(hd));
    for (std::uint32_t r = 0; r < n; ++r) {
      const float* row = normed_.data() + std::size_t{c.tokens[r]} * h;
      if (type == dtype::f32) {
        std::memcpy(c.staging.data() + l.activations + std::size_t{r} * h * 4, row, std::size_t{h} * 4);
        continue;
      }
      unsigned char* dst = c.staging.data() + l.activations + std::size_t{r} * h * 2;
      for (std::uint32_t j = 0; j < h; ++j) {
        const std::uint16_t b = f32_to_bf16(row[j]);
        std::memcpy(dst + std::size_t{j} * 2, &b, 2);
      }
    }
    std::memcpy(c.staging.data() + l.expert_ids, c.ids.data(), c.ids.size() * 2);
    std::memcpy(c.staging.data() + l.weights, c.weights.data(), c.weights.size() * 4);
    // The header last, its commit word last of all (slot.hpp): the server may read the slot before our
    // signal, when its word still holds a value a former holder of the slot signalled.
    const status st = wire_->put_signal(*c.link.ep, c.slots, c.w.slot_offset, c.staging.data(), c.staging.size(),
                                        c.slots, c.w.sig_offset, hd.seq, sizeof(slot_header));
    c.sent = st == status::ok;
    if (!c.sent) c.why = fmt::format("request {} to server {} not delivered ({})", hd.seq, c.rec.id, st);
    std::lock_guard g(stats_mu_);
    stats_.requests++;
  }

  // Waits for one server's answer, checks it, adds its partial sums.
  status collect(server_conn& c, std::uint64_t until_ns) {
    status st;
    // Wait in slices, so that a revoked slot (the server took it back) ends the wait at once.
    for (;;) {
      const std::uint64_t slice = std::min<std::uint64_t>(until_ns, eaas::now_ns() + 20'000'000ull);
      st = wire_->wait(*c.link.ep, *c.result, kResultSig, cmp_op::ge, c.seq, slice, nullptr);
      if (st != status::timeout) break;
      // Taken back: marked revoked, or welcomed anew under another grant (the server saw our link again,
      // e.g. after our lease lapsed while this process was paused).
      constexpr std::uint64_t kGrantAt = kWelcome + offsetof(server_welcome, grant);
      static_assert(kGrantAt % 8 == 0 && kGrantAt > kWelcomeSig);
      std::uint64_t words[2] = {0, 0};  // kWelcomeSig, the grant
      if (wire_->load_words(*c.result, kWelcomeSig, kGrantAt - kWelcomeSig, 2, words) != status::ok) break;
      if (words[0] == kRevoked || words[1] != c.w.grant) {
        c.why = fmt::format("server {} took our slot back (request {})", c.rec.id, c.seq);
        return status::not_connected;
      }
      if (eaas::now_ns() >= until_ns) break;
    }
    if (st != status::ok) return EAAS_RT_FAIL(st, "server {} did not answer request {} ({})", c.rec.id, c.seq, st);
    response_header rh;
    EAAS_CHECK(wire_->read(*c.result, kResponse, &rh, sizeof(rh)));
    if (rh.magic != kSlotMagic || rh.version != kSlotVersion || rh.seq != c.seq)
      return EAAS_RT_FAIL(status::invalid_handle, "server {}: malformed answer to request {}", c.rec.id, c.seq);
    if (rh.error != 0)
      return EAAS_RT_FAIL(status::invalid_argument, "server {} refused request {}: {}", c.rec.id, c.seq,
                          slot_error_name(static_cast<slot_error>(rh.error)));
    if (rh.tokens != c.tokens.size() || rh.type != static_cast<std::uint16_t>(dtype::f32))
      return EAAS_RT_FAIL(status::invalid_handle, "server {}: answered {} tokens of {}", c.rec.id, rh.tokens,
                          c.tokens.size());
    const std::size_t h = o_.shape.hidden;
    answer_.resize(c.tokens.size() * h);
    EAAS_CHECK(wire_->read(*c.result, kOutputs, answer_.data(), answer_.size() * 4));
    const float* outs = answer_.data();
    for (std::size_t r = 0; r < c.tokens.size(); ++r) {
      float* dst = moe_.data() + std::size_t{c.tokens[r]} * h;
      for (std::size_t j = 0; j < h; ++j) dst[j] += outs[r * h + j];
    }
    return status::ok;
  }

  client_options o_;
  dense_model dense_;
  std::unique_ptr<context> ctx_;
  std::unique_ptr<registry> reg_;
  std::unique_ptr<directory> dir_;
  std::unique_ptr<watch> watch_;
  std::map<std::string, std::unique_ptr<server_conn>> servers_;

  // Lock order. mu_ and stats_mu_ are never held together. The GPU lock (gpu_lock(): gpu::capture_mutex(),
  // process-wide, also taken by the step's allocations and by every graph capture) is a leaf: taken with
  // neither of them held (nor the micro-batched client's mutex, never held across an inner forward), no
  // runtime lock taken under it (the library's own, inside the allocation or free, never wait for it), and
  // held for those CUDA calls only, never across the registry, a link or a wait for a server.
  //
  // Shared with the registry's watch thread and the connector thread.
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::map<std::string, peer_record> online_;                 // servers whose record is published
  std::vector<std::string> gone_;                             // went offline since the last refresh
  std::set<std::string> claimed_;                             // being linked, or linked
  std::map<std::string, std::uint64_t> retry_at_;             // failed links: not before
  std::map<std::string, std::vector<std::uint32_t>> linked_;  // linked: their experts
  std::vector<std::unique_ptr<server_conn>> ready_;           // linked, not yet taken by refresh
  std::thread connector_;

  mutable std::mutex stats_mu_;
  client_stats stats_;
  std::vector<failover_event> failovers_;

  std::vector<float> normed_, moe_, answer_;
  std::unique_ptr<wire> wire_;
  // The device path (device_step).
  std::vector<gpu::step_server> step_servers_;
  std::vector<server_conn*> step_conns_;
  std::uint64_t servers_gen_ = 0;   // bumped whenever servers_ changes
  std::uint64_t step_gen_ = ~0ull;  // servers_gen_ when step_servers_ was built
  bool step_covered_ = false;       // step_servers_ host every expert
  gpu::step_result step_result_;
  const float* device_out_ = nullptr;  // the last forward's answer on the GPU (host_output false)
  std::vector<failover_event> device_events_;
  routing routing_;
  std::vector<std::uint64_t> layer_ns_;
  std::vector<routing> layer_routing_;
  std::unique_ptr<gpu::client_step> step_;
};

}  // namespace

status attention_client::start(const client_options& opts, std::unique_ptr<attention_client>& out) {
  auto c = std::make_unique<client_impl>(opts);
  EAAS_CHECK(c->init());
  out = std::move(c);
  return status::ok;
}

}  // namespace eaas::runtime
