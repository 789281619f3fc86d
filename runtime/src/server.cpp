#include "server.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "bf16.hpp"
#include "cpu_math.hpp"
#include "eaas/eaas.hpp"
#include "eaas/runtime/slot.hpp"
#include "fail.hpp"
#include "synth.hpp"
#include "wire.hpp"
#if EAAS_MOE_WITH_GPU
#include "gpu/expert_step.hpp"
#include "gpu/server_step.hpp"
#endif

namespace eaas::runtime {
namespace {

/// One client's slot.
struct client_slot {
  bool used = false;
  std::string client;
  std::unique_ptr<endpoint> ep;
  std::unique_ptr<remote_region> result;
  slot_cursor cur{0, 1, 0};      // the protocol state (look_at_slot)
  std::uint32_t max_tokens = 0;  // most tokens per request (what its result region holds)
  std::uint64_t grant = 0;       // what its requests must carry
};

/// A request read out of a slot, checked.
struct request {
  std::uint32_t slot;
  slot_header h;
  slot_error err = slot_error::none;
  std::vector<std::uint16_t> ids;
  std::vector<float> weights;
  std::vector<float> act;         // CPU: tokens × hidden, fp32, a private copy (the peer can still write its slot)
  std::vector<float> out;         // CPU: tokens × hidden
  std::uint64_t act_offset = 0;   // GPU: where the activations are in the slots region
  status delivered = status::ok;  // GPU: whether the step's answer reached the client
};

class server_impl final : public expert_server {
 public:
  explicit server_impl(server_options o) : o_(std::move(o)) {}
  ~server_impl() override {
    watch_.reset();  // no callback runs after these return
    dir_.reset();
    load_keeper_.reset();
#if EAAS_MOE_WITH_GPU
    dstep_.reset();  // waits for the rounds in flight, which may use the retired links
#endif
    retired_.clear();
  }

  status init() {
    EAAS_CHECK(check_shape(o_.shape));
    std::sort(o_.experts.begin(), o_.experts.end());
    o_.experts.erase(std::unique(o_.experts.begin(), o_.experts.end()), o_.experts.end());
    if (o_.experts.empty()) return EAAS_RT_FAIL(status::invalid_argument, "server {}: hosts no experts", o_.id);
    if (o_.experts.back() >= o_.shape.experts)
      return EAAS_RT_FAIL(status::invalid_argument, "server {}: expert {} out of range (the model has {})", o_.id,
                          o_.experts.back(), o_.shape.experts);
    if (o_.max_clients == 0 || o_.max_clients > 4096 || o_.max_tokens == 0 || o_.max_tokens > (1u << 20))
      return EAAS_RT_FAIL(status::invalid_argument, "server {}: max_clients {} (1..4096), max_tokens {} (1..2^20)",
                          o_.id, o_.max_clients, o_.max_tokens);
    geo_ = slots_geometry_for(o_.max_clients, o_.max_tokens, o_.shape.hidden, o_.shape.topk);
    slots_.resize(o_.max_clients);
    sigs_.resize(o_.max_clients);
    if (o_.device_step && o_.gpu < 0)
      return EAAS_RT_FAIL(status::invalid_argument, "server {}: the device step needs a GPU (--gpu)", o_.id);
    if (o_.gpu >= 0) {
#if EAAS_MOE_WITH_GPU
      EAAS_CHECK(make_gpu_wire(o_.gpu, wire_));
      // With the device step, expert_step only holds the weights (server_step has the round's buffers).
      EAAS_CHECK(gpu::expert_step::create(o_.gpu, o_.shape, static_cast<std::uint32_t>(o_.experts.size()),
                                          o_.device_step ? 1 : o_.max_clients, o_.device_step ? 1 : o_.max_tokens,
                                          step_));
#else
      return EAAS_RT_FAIL(status::unsupported, "server {}: --gpu {} asked for, but this eaas was built without CUDA",
                          o_.id, o_.gpu);
#endif
    } else {
      wire_ = make_host_wire();
    }
    EAAS_CHECK(make_weights());
    EAAS_CHECK(context::create({.name = o_.id, .cuda_device = o_.gpu}, ctx_));
    EAAS_CHECK(ctx_->allocate(geo_.bytes, wire_->kind(), slots_mem_));
#if EAAS_MOE_WITH_GPU
    if (o_.device_step) {
      EAAS_CHECK(gpu::server_step::create({.device = o_.gpu,
                                           .shape = o_.shape,
                                           .local_experts = static_cast<std::uint32_t>(o_.experts.size()),
                                           .max_clients = o_.max_clients,
                                           .max_tokens = o_.max_tokens,
                                           .slots = slots_mem_->data(),
                                           .slots_bytes = slots_mem_->size(),
                                           .poll_ns = o_.device_poll_ns,
                                           .graph = o_.device_graph,
                                           .shrink = o_.device_shrink,
                                           .put_blocks = o_.device_put_blocks,
                                           .batch_window_ns = o_.device_batch_window_ns,
                                           .direct_answers = o_.device_direct_answers,
                                           .pipeline = o_.device_pipeline,
                                           .pdl = o_.device_pdl},
                                          *step_, dstep_));
      for (std::uint32_t i = 0; i < slots_.size(); ++i) sync_slot(i);
    }
#endif
    EAAS_CHECK(registry::open(o_.registry, reg_));
    peer_record self;
    self.id = o_.id;
    self.role = "server";
    self.experts = o_.experts;
    self.capacity = o_.max_tokens * o_.max_clients;
    EAAS_CHECK(ctx_->connection_handle(self.connection));
    handle_bytes h;
    EAAS_CHECK(slots_mem_->export_handle(h));
    self.regions.emplace_back("slots", std::move(h));
    EAAS_CHECK(directory::start(*reg_, *ctx_, o_.ns, std::move(self), o_.ttl_seconds, dir_));
    dir_->on_link([this](peer_link&& l) {
      std::lock_guard g(mu_);
      incoming_.push_back(std::move(l));
    });
    EAAS_CHECK(dir_->watch_peers(
        [this](peer_change c, const peer_record& r) {
          if (c != peer_change::offline || r.role != "client") return;
          std::lock_guard g(mu_);
          gone_.push_back(r.id);
        },
        watch_));
    stats_.ready_ns = eaas::now_ns();
    stats_.slots = o_.max_clients;
    stats_.slots_bytes = geo_.bytes;
    return status::ok;
  }

  status serve(const std::atomic<bool>& stop) override {
    std::uint32_t idle = 0;
    bool leaving = false;
    std::uint64_t left_at = 0, last_work = 0;
    for (;;) {
      if (!leaving && stop.load(std::memory_order_relaxed)) {
        // Withdraw the record (the lease is revoked: every watcher sees us go), keep serving.
        watch_.reset();
        dir_.reset();
        load_keeper_.reset();  // its load record goes with it
        leaving = true;
        left_at = last_work = eaas::now_ns();
        detail::note("[{}] leaving: record withdrawn, draining", o_.id);
      }
      if (!leaving) {
        admit();
        publish_load();
      }
      if (failed_ != status::ok) break;  // the GPU round failed: this server cannot serve any more
      if (poll_once()) {
        idle = 0;
        last_work = eaas::now_ns();
      } else if (++idle > 2000) {
        std::this_thread::sleep_for(std::chrono::microseconds(idle > 20000 ? 200 : 20));
      } else {
        std::this_thread::yield();
      }
      if (leaving) {
        const std::uint64_t now = eaas::now_ns();
        if (now - last_work >= o_.drain_quiet_ns || now - left_at >= o_.drain_max_ns) break;
      }
    }
    if (failed_ == status::ok) (void)drain_device();  // the pipelined round in flight: accounted, not dropped
    for (std::uint32_t i = 0; i < slots_.size(); ++i)
      release(i, failed_ != status::ok ? "server failed" : "server left");
    return failed_;
  }

  server_stats stats() const override {
    std::lock_guard g(stats_mu_);
    return stats_;
  }

 private:
  // Every (layer, hosted expert)'s weights: loaded (one at a time: a loader need not be thread-safe) or
  // generated, on several threads. On a GPU each goes to the device (bf16) as soon as it exists, so the
  // host holds a few at a time; on the CPU they stay in weights_.
  status make_weights() {
    const auto local = static_cast<std::uint32_t>(o_.experts.size());
    const std::size_t total = std::size_t{o_.shape.layers} * local, n = std::size_t{o_.shape.hidden} * o_.shape.inter;
    if (!step_) weights_.assign(o_.shape.layers, std::vector<expert_weights>(local));
    std::atomic<std::size_t> next{0};
    std::mutex mu;  // the loader, and the first failure
    status failed = status::ok;
    std::string why;
    auto work = [&] {
      for (std::size_t i; (i = next.fetch_add(1)) < total;) {
        const auto l = static_cast<std::uint32_t>(i / local), k = static_cast<std::uint32_t>(i % local);
        const std::uint32_t e = o_.experts[k];
        expert_weights w;
        status st = status::ok;
        std::string msg;
        if (o_.load) {
          std::lock_guard g(mu);
          st = o_.load(l, e, w);
          if (st != status::ok) msg = last_error();
        } else {
          w = synthetic_expert(o_.shape, o_.seed, l, e);
        }
        if (st == status::ok && (w.gate.size() != n || w.up.size() != n || w.down.size() != n)) {
          st = status::invalid_argument;
          msg = fmt::format("loaded expert {} of layer {} has the wrong size", e, l);
        }
#if EAAS_MOE_WITH_GPU
        if (st == status::ok && step_) {
          st = step_->upload(l, k, w);
          if (st != status::ok) msg = last_error();
        }
#endif
        if (st == status::ok && !step_) weights_[l][k] = std::move(w);
        if (st != status::ok) {
          std::lock_guard g(mu);
          if (failed == status::ok) {
            failed = st;
            why = msg;
          }
          next.store(total);
        }
      }
    };
    const std::size_t threads = std::min<std::size_t>({total, 16, std::max(1u, std::thread::hardware_concurrency())});
    std::vector<std::thread> pool;
    for (std::size_t t = 1; t < threads; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    if (failed != status::ok) return EAAS_RT_FAIL(failed, "server {}: weights: {}", o_.id, why);
    return status::ok;
  }

  std::uint64_t slot_offset(std::uint32_t i) const { return geo_.slots_base + std::uint64_t{i} * geo_.slot_stride; }

  void release(std::uint32_t i, const char* why) {
    client_slot& s = slots_[i];
    if (!s.used) return;
    detail::note("[{}] client {} left slot {} ({})", o_.id, s.client, i, why);
    if (o_.on_client) o_.on_client("left", s.client, why);
    // Tell a client that may still be alive (paused past its lease, say) that the slot is gone, so it
    // links again instead of waiting for answers. Best effort: it may be dead.
    if (s.ep && s.result && s.ep->state() == endpoint_state::connected)
      (void)wire_->signal(*s.ep, s.result->view(), kWelcomeSig, kRevoked);
#if EAAS_MOE_WITH_GPU
    // A device round in flight (pipelined rounds) holds views of this endpoint and result region: they live
    // until every round launched so far has been reported.
    if (dstep_ && dstep_->in_flight()) retired_.push_back({std::move(s.ep), std::move(s.result), dstep_->launched()});
#endif
    s = client_slot{};
    sync_slot(i);
    set_clients();
  }

  // The device step's copy of slot i (configuration and protocol state), from slots_[i].
  void sync_slot(std::uint32_t i) {
#if EAAS_MOE_WITH_GPU
    if (!dstep_) return;
    const client_slot& s = slots_[i];
    gpu::server_slot_config c{};
    gpu::server_slot_state st{};
    if (s.used && s.ep && s.result) {
      c.ep = s.ep->view();
      c.result = s.result->view();
      c.grant = s.grant;
      c.used = 1;
      c.max_tokens = s.max_tokens;
    }
    st.last_sig = s.cur.last_sig;
    st.expected = s.cur.expected;
    st.ignored_sig = s.cur.ignored_sig;
    dstep_->set_slot(i, c, st);
#else
    (void)i;
#endif
  }

  std::uint64_t next_grant() {
    std::uint64_t g;
    do g = detail::splitmix(grant_key_ + ++grant_count_);
    while (g == 0);
    return g;
  }

  void set_clients() {
    std::uint32_t n = 0;
    for (const auto& s : slots_) n += s.used ? 1 : 0;
    std::lock_guard g(stats_mu_);
    stats_.clients = n;
  }

  // New links get a slot and a welcome; clients gone offline give theirs back.
  void admit() {
    std::vector<peer_link> links;
    std::vector<std::string> gone;
    {
      std::lock_guard g(mu_);
      links.swap(incoming_);
      gone.swap(gone_);
    }
    // New links first: an expiry event and a link that re-registered the same client come through two
    // watches in no particular order, so an expiry only frees a slot if the client is not published now.
    for (auto& l : links) welcome(std::move(l));
    if (gone.empty() || !dir_) return;
    std::vector<peer_record> online;
    const bool listed = dir_->peers(online) == status::ok;
    for (const auto& id : gone) {
      if (listed && std::any_of(online.begin(), online.end(), [&](const peer_record& r) { return r.id == id; }))
        continue;  // back already (its endpoint still tells us if the process is gone)
      for (std::uint32_t i = 0; i < slots_.size(); ++i)
        if (slots_[i].used && slots_[i].client == id) release(i, "lease ended");
    }
  }

  void welcome(peer_link&& l) {
    // A client that links again (it restarted its connection) gets a fresh slot.
    for (std::uint32_t i = 0; i < slots_.size(); ++i)
      if (slots_[i].used && slots_[i].client == l.record.id) release(i, "linked again");
    if (l.ep->transport() != wire_->transport()) {
      detail::note("[{}] refusing client {}: it is reached over {}, and this server serves {} clients", o_.id,
                   l.record.id, transport_name(l.ep->transport()), o_.gpu >= 0 ? "GPU (nvlink)" : "CPU (shm)");
      return;
    }
    auto it = std::find_if(l.regions.begin(), l.regions.end(), [](const auto& r) { return r.first == "result"; });
    if (it == l.regions.end() || !it->second || it->second->size() < result_region_bytes(1, o_.shape.hidden)) {
      detail::note("[{}] refusing client {}: no result region of at least {} bytes", o_.id, l.record.id,
                   result_region_bytes(1, o_.shape.hidden));
      return;
    }
    // Requests from this client may carry as many tokens as its result region can answer.
    const std::uint64_t fits = (it->second->size() - kOutputs) / (std::uint64_t{o_.shape.hidden} * 4);
    std::uint32_t i = 0;
    while (i < slots_.size() && slots_[i].used) ++i;
    if (i == slots_.size()) {
      detail::note("[{}] refusing client {}: all {} slots are in use", o_.id, l.record.id, slots_.size());
      return;
    }
    client_slot& s = slots_[i];
    s.used = true;
    s.client = l.record.id;
    s.ep = std::move(l.ep);
    s.result = std::move(it->second);
    // The slot's signal word may still hold an earlier client's last seq.
    if (wire_->store_word(*slots_mem_, std::uint64_t{i} * 64, 0) != status::ok) {
      detail::note("[{}] refusing client {}: {}", o_.id, l.record.id, last_error());
      s = client_slot{};
      return;
    }
    s.cur = slot_cursor{0, 1, 0};
    s.max_tokens = static_cast<std::uint32_t>(std::min<std::uint64_t>(o_.max_tokens, fits));
    s.grant = next_grant();
    server_welcome w{};
    w.magic = kSlotMagic;
    w.version = kSlotVersion;
    w.slot = i;
    w.max_tokens = s.max_tokens;
    w.sig_offset = std::uint64_t{i} * 64;
    w.slot_offset = geo_.slots_base + std::uint64_t{i} * geo_.slot_stride;
    w.slot_bytes = geo_.slot_stride;
    w.hidden = o_.shape.hidden;
    w.layers = o_.shape.layers;
    w.max_topk = o_.shape.topk;
    w.local_experts = static_cast<std::uint32_t>(o_.experts.size());
    w.grant = s.grant;
    const auto rv = s.result->view();
    const status st = wire_->put_signal(*s.ep, rv, kWelcome, &w, sizeof(w), rv, kWelcomeSig, i + 1, 0);
    if (st != status::ok) {
      release(i, "welcome failed");
      return;
    }
    sync_slot(i);
    detail::note("[{}] client {} linked, slot {}", o_.id, s.client, i);
    if (o_.on_client) o_.on_client("linked", s.client, "");
    set_clients();
  }

  // Every 500 ms: /eaas/NS/load/ID = what it computed per expert since the last report (token-expert
  // pairs per second), and the mean number of requests found per poll (its queue). The autoscaler
  // reads these. Kept under its own lease, revoked when the server leaves.
  void publish_load() {
    const std::uint64_t now = eaas::now_ns();
    if (window_start_ == 0) {
      window_start_ = now;
      window_pairs_.assign(o_.experts.size(), 0);
      return;
    }
    if (now - window_start_ < 500'000'000ull) return;
    const double secs = double(now - window_start_) * 1e-9;
    std::string v = fmt::format("{{\"v\":1,\"pid\":{},\"experts\":[", static_cast<long>(::getpid()));
    for (std::size_t i = 0; i < o_.experts.size(); ++i) v += fmt::format("{}{}", i ? "," : "", o_.experts[i]);
    v += "],\"expert_tps\":[";
    for (std::size_t i = 0; i < o_.experts.size(); ++i)
      v += fmt::format("{}{:.1f}", i ? "," : "", double(window_pairs_[i]) / secs);
    std::uint32_t clients = 0;
    for (const auto& sl : slots_) clients += sl.used ? 1 : 0;
    v += fmt::format("],\"queue\":{:.3f},\"clients\":{}}}",
                     window_polls_ ? double(window_requests_) / double(window_polls_) : 0.0, clients);
    const std::string key = "/eaas/" + o_.ns + "/load/" + o_.id;
    if (!load_keeper_) {
      if (lease_keeper::start(*reg_, o_.ttl_seconds, {{key, v}}, load_keeper_) != status::ok)
        detail::note("[{}] cannot publish its load: {}", o_.id, last_error());
    } else if (load_keeper_->set(key, v) != status::ok) {
      detail::note("[{}] cannot publish its load: {}", o_.id, last_error());
    }
    window_start_ = now;
    window_pairs_.assign(o_.experts.size(), 0);
    window_polls_ = window_requests_ = 0;
  }

  // Reads every slot whose signal moved, computes them as one batch, answers each. True if any.
  bool poll_once() {
    if (dstep_) return poll_device();
    std::vector<request>& reqs = reqs_;
    reqs.clear();
    if (wire_->load_words(*slots_mem_, 0, 64, static_cast<std::uint32_t>(slots_.size()), sigs_.data()) != status::ok) {
      detail::note("[{}] cannot read its slots: {}", o_.id, last_error());
      return false;
    }
    for (std::uint32_t i = 0; i < slots_.size(); ++i) {
      client_slot& s = slots_[i];
      if (!s.used) continue;
      if (s.ep->state() != endpoint_state::connected) {
        release(i, "peer gone");
        continue;
      }
      const std::uint64_t v = sigs_[i];
      if (v == s.cur.last_sig) continue;
      request r;
      const slot_look k = read_request(i, v, r);
      if (k == slot_look::foreign) {
        // A former holder's write: not consumed, never answered (the slot is looked at again while its
        // word differs from last_sig, so that the owner's next request is noticed whatever seq it carries).
        std::lock_guard g(stats_mu_);
        stats_.ignored++;
      }
      if (k == slot_look::take) reqs.push_back(std::move(r));
    }
    window_polls_++;
    window_requests_ += reqs.size();
    if (reqs.empty()) return false;
    const auto t0 = std::chrono::steady_clock::now();
    compute(reqs);
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    {
      std::lock_guard g(stats_mu_);
      stats_.compute_ns += static_cast<std::uint64_t>(ns);
    }
    for (auto& r : reqs) respond(r);
    std::lock_guard g(stats_mu_);
    stats_.batches++;
    return true;
  }

  // Slot i, whose signal word reads v (!= last_sig): look_at_slot's verdict; with `take`, `r` holds the
  // request, checked (r.err), and the slot's cursor has moved past it. Anything unreadable leaves the
  // cursor as it was (`none`: looked at again at the next poll).
  slot_look read_request(std::uint32_t i, std::uint64_t v, request& r) {
    client_slot& s = slots_[i];
    const slot_cursor before = s.cur;
    r.slot = i;
    const std::uint64_t base = slot_offset(i);
    // The commit word with acquire, then a private copy of the header (the client cannot change what was
    // checked), then, for a committed request, everything else: all written before its commit. Each read
    // that needs the owner's bytes is ordered after an acquire of the commit word by the wire itself (on a
    // GPU one kernel reads both: a copy engine is outside the memory model, so a later copy would not be).
    const std::uint64_t commit_at = base + offsetof(slot_header, commit);
    std::uint64_t committed = 0;
    if (wire_->read_after_acquire(*slots_mem_, commit_at, base, &r.h, sizeof(r.h), &committed) != status::ok) {
      detail::note("[{}] cannot read slot {}: {}", o_.id, i, last_error());
      return slot_look::none;
    }
    const slot_look k = look_at_slot(s.cur, v, committed, r.h, s.grant);
    if (k != slot_look::take) return k;
    const slot_limits lim{.slot_bytes = geo_.slot_stride,
                          .hidden = o_.shape.hidden,
                          .layers = o_.shape.layers,
                          .max_tokens = s.max_tokens,
                          .max_topk = o_.shape.topk,
                          .local_experts = static_cast<std::uint32_t>(o_.experts.size()),
                          .expected_seq = s.cur.expected};
    r.err = validate_request(r.h, lim);
    if (r.h.seq == s.cur.expected) s.cur.expected++;  // consumed, answered or refused
    if (r.err != slot_error::none) return k;
    const slot_layout l = layout_for(r.h.tokens, r.h.hidden, r.h.topk, static_cast<dtype>(r.h.type));
    const std::size_t n = std::size_t{r.h.tokens} * r.h.topk;
    r.ids.resize(n);
    r.weights.resize(n);
    // The routing arrays follow each other: one read for both, after the commit word's acquire again (on a
    // GPU the header's kernel has finished; this read is a new one). The word read here is at or after the
    // one the header was taken on, so it orders these bytes after all the owner wrote before that commit.
    raw_.resize(l.end - l.expert_ids);
    std::uint64_t again = 0;
    if (wire_->read_after_acquire(*slots_mem_, commit_at, base + l.expert_ids, raw_.data(), raw_.size(), &again) !=
        status::ok) {
      s.cur = before;  // not taken: read again at the next poll
      detail::note("[{}] cannot read slot {}: {}", o_.id, i, last_error());
      return slot_look::none;
    }
    if (again != committed) {  // the owner committed anew between the two reads: header and routing may differ
      s.cur = before;          // not taken: the next poll reads the newer request whole
      return slot_look::none;
    }
    std::memcpy(r.ids.data(), raw_.data(), n * 2);
    std::memcpy(r.weights.data(), raw_.data() + (l.weights - l.expert_ids), n * 4);
    r.err = validate_routing(r.h, lim, r.ids.data(), r.weights.data());
    if (r.err != slot_error::none) return k;
    r.act_offset = base + l.activations;
    if (step_) return k;  // the GPU reads the activations where they are (their bounds were checked above)
    // The activations too, so that everything computed is what was read here, once.
    const std::size_t h = r.h.hidden, elems = std::size_t{r.h.tokens} * h;
    const bool bf16 = r.h.type == static_cast<std::uint16_t>(dtype::bf16);
    raw_.resize(elems * (bf16 ? 2 : 4));
    if (wire_->read(*slots_mem_, r.act_offset, raw_.data(), raw_.size()) != status::ok) {
      s.cur = before;  // not taken: read again at the next poll
      detail::note("[{}] cannot read slot {}: {}", o_.id, i, last_error());
      return slot_look::none;
    }
    r.act.resize(elems);
    if (bf16) {
      for (std::size_t j = 0; j < elems; ++j) {
        std::uint16_t b;
        std::memcpy(&b, raw_.data() + j * 2, 2);
        r.act[j] = bf16_to_f32(b);
      }
    } else {
      std::memcpy(r.act.data(), raw_.data(), elems * 4);
    }
    return k;
  }

  // Regroups every valid request's tokens by (layer, local expert), runs each group, scatters back.
  void compute(std::vector<request>& reqs) {
    if (step_) {
      compute_gpu(reqs);
      return;
    }
    const std::size_t h = o_.shape.hidden;
    struct row {
      std::uint32_t req, token;
      float w;
    };
    std::map<std::pair<std::uint32_t, std::uint16_t>, std::vector<row>> groups;
    std::uint64_t tokens = 0;
    for (std::uint32_t q = 0; q < reqs.size(); ++q) {
      request& r = reqs[q];
      if (r.err != slot_error::none) continue;
      r.out.assign(std::size_t{r.h.tokens} * h, 0.0f);
      tokens += r.h.tokens;
      for (std::uint32_t t = 0; t < r.h.tokens; ++t)
        for (std::uint32_t k = 0; k < r.h.topk; ++k) {
          const std::uint16_t e = r.ids[std::size_t{t} * r.h.topk + k];
          if (e != kNoExpert) groups[{r.h.layer, e}].push_back({q, t, r.weights[std::size_t{t} * r.h.topk + k]});
        }
    }
    for (const auto& [key, rows] : groups) {
      window_pairs_[key.second] += rows.size();
      xs_.resize(rows.size() * h);
      ys_.resize(rows.size() * h);
      for (std::size_t i = 0; i < rows.size(); ++i)
        std::memcpy(xs_.data() + i * h, reqs[rows[i].req].act.data() + std::size_t{rows[i].token} * h, h * 4);
      cpu::swiglu_rows(weights_[key.first][key.second], xs_.data(), rows.size(), o_.shape.hidden, o_.shape.inter,
                       ys_.data(), scratch_);
      for (std::size_t i = 0; i < rows.size(); ++i) {
        float* o = reqs[rows[i].req].out.data() + std::size_t{rows[i].token} * h;
        const float w = rows[i].w;
        const float* y = ys_.data() + i * h;
        for (std::size_t j = 0; j < h; ++j) o[j] += w * y[j];
      }
    }
    std::lock_guard g(stats_mu_);
    stats_.tokens += tokens;
  }

  // The GPU batch: the valid requests' pairs sorted by (layer, local expert) for the step, which
  // computes and answers them; `delivered` says which answers arrived.
  void compute_gpu(std::vector<request>& reqs) {
#if EAAS_MOE_WITH_GPU
    const auto local = static_cast<std::uint32_t>(o_.experts.size());
    const std::uint32_t groups = o_.shape.layers * local;
    group_offsets_.assign(groups + 1, 0);
    step_reqs_.clear();
    std::uint64_t tokens = 0;
    for (request& r : reqs) {
      if (r.err != slot_error::none) continue;
      const client_slot& s = slots_[r.slot];
      step_reqs_.push_back({.act_offset = r.act_offset,
                            .tokens = r.h.tokens,
                            .bf16 = r.h.type == static_cast<std::uint16_t>(dtype::bf16),
                            .ep = s.ep->view(),
                            .result = s.result->view(),
                            .header = response_for(r)});
      tokens += r.h.tokens;
      for (std::size_t j = 0; j < r.ids.size(); ++j)
        if (r.ids[j] != kNoExpert) {
          group_offsets_[r.h.layer * local + r.ids[j] + 1]++;
          window_pairs_[r.ids[j]]++;
        }
    }
    if (step_reqs_.empty()) return;
    for (std::uint32_t g = 0; g < groups; ++g) group_offsets_[g + 1] += group_offsets_[g];
    rows_.resize(static_cast<std::size_t>(group_offsets_[groups]));
    cursor_.assign(group_offsets_.begin(), group_offsets_.end() - 1);
    std::uint32_t q = 0;
    for (request& r : reqs) {
      if (r.err != slot_error::none) continue;
      for (std::size_t j = 0; j < r.ids.size(); ++j)
        if (r.ids[j] != kNoExpert)
          rows_[static_cast<std::size_t>(cursor_[r.h.layer * local + r.ids[j]]++)] = {
              .request = q,
              .token = static_cast<std::uint32_t>(j / r.h.topk),
              .slot = static_cast<std::uint32_t>(j % r.h.topk),
              .weight = r.weights[j]};
      ++q;
    }
    const status st = step_->run(slots_mem_->data(), slots_mem_->size(), step_reqs_, rows_, group_offsets_, answered_);
    if (st != status::ok) detail::note("[{}] the GPU batch failed: {}", o_.id, last_error());
    q = 0;
    for (request& r : reqs)
      if (r.err == slot_error::none) r.delivered = st == status::ok ? answered_[q++] : st;
    std::lock_guard g(stats_mu_);
    stats_.tokens += tokens;
#else
    (void)reqs;
#endif
  }

  response_header response_for(const request& r) const {
    response_header rh{};
    rh.magic = kSlotMagic;
    rh.version = kSlotVersion;
    rh.type = static_cast<std::uint16_t>(dtype::f32);
    rh.seq = r.h.seq;
    rh.error = static_cast<std::uint32_t>(r.err);
    rh.tokens = r.err == slot_error::none ? r.h.tokens : 0;
    return rh;
  }

  void respond(const request& r) {
    client_slot& s = slots_[r.slot];
    status st;
    if (step_ && r.err == slot_error::none) {
      st = r.delivered;  // the GPU answered it
    } else {
      const response_header rh = response_for(r);
      const std::size_t out_bytes = r.out.size() * 4;
      out_.resize(sizeof(rh) + out_bytes);
      std::memcpy(out_.data(), &rh, sizeof(rh));
      if (out_bytes) std::memcpy(out_.data() + sizeof(rh), r.out.data(), out_bytes);
      const auto rv = s.result->view();
      st = wire_->put_signal(*s.ep, rv, kResponse, out_.data(), out_.size(), rv, kResultSig, r.h.seq, 0);
    }
    answered(r.slot, r.err, st);
  }

  // The bookkeeping of one answer (refused or not) to slot i, whose delivery ended with `st`.
  void answered(std::uint32_t i, slot_error err, status st) {
    std::uint64_t first = 0;
    {
      std::lock_guard g(stats_mu_);
      stats_.requests++;
      if (err != slot_error::none) stats_.refused++;
      if (stats_.first_served_ns == 0 && st == status::ok) first = stats_.first_served_ns = eaas::now_ns();
    }
    if (first != 0 && o_.on_first_answer) o_.on_first_answer(first);  // not under the lock
    if (err != slot_error::none)
      detail::note("[{}] refused a request of client {}: {}", o_.id, slots_[i].client, slot_error_name(err));
    if (st != status::ok) release(i, "answer not delivered");
  }

  // One round of the device step: the GPU polls, checks, computes and answers; here, before it, the
  // clients that died give their slots back, and after it the round's summary (in pinned memory) feeds the
  // protocol state, the stats and the failure handling, as the host path's poll does. True if it answered.
  bool poll_device() {
#if EAAS_MOE_WITH_GPU
    std::uint32_t hi = 0;
    for (std::uint32_t i = 0; i < slots_.size(); ++i) {
      client_slot& s = slots_[i];
      if (!s.used) continue;
      if (s.ep->state() != endpoint_state::connected) {
        release(i, "peer gone");
        continue;
      }
      hi = i + 1;
    }
    window_polls_++;
    if (hi == 0) {  // no client: no new round (the GPU goes idle), and no gap to count across the idle time
      const bool any = drain_device();
      last_round_done_ = 0;
      return any;
    }
    gpu::server_round_summary sum;
    if (const status st = dstep_->round(hi, sum); st != status::ok) {
      failed_ = st;
      last_round_done_ = 0;
      detail::note("[{}] the GPU round failed: {}", o_.id, last_error());
      return false;
    }
    return account_round(sum, hi);
#else
    return false;
#endif
  }

  // The device step's round in flight (pipelined rounds), reported and accounted; none is launched after it.
  // Before the host stops polling: no client left, or the server leaves. True if it answered.
  bool drain_device() {
#if EAAS_MOE_WITH_GPU
    if (!dstep_ || !dstep_->in_flight()) return false;
    gpu::server_round_summary sum;
    if (const status st = dstep_->drain(static_cast<std::uint32_t>(slots_.size()), sum); st != status::ok) {
      failed_ = st;
      detail::note("[{}] the GPU round failed: {}", o_.id, last_error());
      return false;
    }
    return account_round(sum, static_cast<std::uint32_t>(slots_.size()));
#else
    return false;
#endif
  }

#if EAAS_MOE_WITH_GPU
  // A device round's summary (slots 0 .. hi - 1) into the protocol state, the stats and the failure handling,
  // as the host path's poll does. True if it answered.
  bool account_round(const gpu::server_round_summary& sum, std::uint32_t hi) {
    std::erase_if(retired_, [&](const retired_link& r) { return dstep_->collected() >= r.until; });
    std::uint32_t answers = 0, ignored = 0, direct = 0;
    round_answers_.clear();
    for (std::uint32_t i = 0; i < hi && i < sum.slots.size(); ++i) {
      client_slot& s = slots_[i];
      if (!s.used) continue;
      const gpu::server_slot_state& d = sum.slots[i];
      s.cur = slot_cursor{d.last_sig, d.expected, d.ignored_sig};
      const auto v = static_cast<gpu::slot_verdict>(d.verdict);
      if (v == gpu::slot_verdict::ignored) ignored++;
      if (v != gpu::slot_verdict::served && v != gpu::slot_verdict::refused) continue;
      answers++;
      if (v == gpu::slot_verdict::served && d.direct != 0) direct++;
      round_answers_.push_back({i, d.error, d.put_result});
    }
    for (std::size_t e = 0; e < sum.pairs.size() && e < window_pairs_.size(); ++e) window_pairs_[e] += sum.pairs[e];
    window_requests_ += answers;
    if (sum.head->gemm_error != 0)
      detail::note("[{}] the GPU round's grouped GEMM refused its plan (bits {})", o_.id, sum.head->gemm_error);
    {
      std::lock_guard g(stats_mu_);
      stats_.ignored += ignored;
      stats_.device_rounds++;
      stats_.graph_captures = dstep_->captures();
      stats_.padded_rows += sum.head->padded_rows;
      if (answers != 0) {
        const gpu::server_round_head& h = *sum.head;
        const auto span = [](std::uint64_t from, std::uint64_t to) { return from != 0 && to > from ? to - from : 0; };
        const std::uint64_t wait = span(h.stamp_poll, h.stamp_seen);
        stats_.round_wait_ns += wait;
        stats_.round_window_ns += h.window_ns;
        const std::uint64_t seen_to_place = span(h.stamp_seen, h.stamp_place);  // the window, then validation..
        stats_.round_front_ns += seen_to_place - std::min<std::uint64_t>(h.window_ns, seen_to_place);
        stats_.direct_answers += direct;
        stats_.round_gemm_ns += span(h.stamp_place, h.stamp_combine);
        stats_.round_back_ns += span(h.stamp_combine, h.stamp_done);
        stats_.round_gap_ns += span(last_round_done_, h.stamp_poll);
        if (h.stamp_seen != 0 && wait < kLateRoundNs) stats_.late_rounds++;
        stats_.tokens += sum.head->tokens;
        stats_.compute_ns += span(h.stamp_seen, h.stamp_done);  // the device's time on it (rounds do not overlap)
        stats_.batches++;
      }
      last_round_done_ = sum.head->stamp_done;
    }
    // Last: an answer that did not arrive releases its slot (which changes slots_).
    for (const auto& [i, err, put] : round_answers_)
      answered(i, static_cast<slot_error>(err), static_cast<status>(put));
    return answers != 0;
  }
#endif

  server_options o_;
  std::vector<std::vector<expert_weights>> weights_;  // [layer][local expert]
  slots_geometry geo_{};
  std::vector<client_slot> slots_;
  std::unique_ptr<context> ctx_;
  std::unique_ptr<memory_region> slots_mem_;
  std::unique_ptr<registry> reg_;
  std::unique_ptr<directory> dir_;
  std::unique_ptr<watch> watch_;
  std::unique_ptr<lease_keeper> load_keeper_;
  std::uint64_t window_start_ = 0, window_polls_ = 0, window_requests_ = 0;
  std::vector<std::uint64_t> window_pairs_;  // per local expert
  // The device step: the last round's end on the GPU's clock, and how short a poll's wait must be for its
  // request to have been waiting already (one pass over the slots takes well under this).
  std::uint64_t last_round_done_ = 0;
  static constexpr std::uint64_t kLateRoundNs = 2'000;

  std::mutex mu_;
  std::vector<peer_link> incoming_;
  std::vector<std::string> gone_;

  mutable std::mutex stats_mu_;
  server_stats stats_;

  std::uint64_t grant_key_ =
      detail::mix(std::random_device{}(), static_cast<std::uint64_t>(::getpid()), eaas::now_ns());
  std::uint64_t grant_count_ = 0;
  std::vector<request> reqs_;
  std::vector<float> xs_, ys_;
  std::vector<unsigned char> out_, raw_;
  std::vector<std::uint64_t> sigs_;
  std::unique_ptr<wire> wire_;
  // Links of released slots that a device round in flight may still use (see release()), freed once every
  // round launched before the release was reported (`until`: the step's launched() then).
  struct retired_link {
    std::unique_ptr<endpoint> ep;
    std::unique_ptr<remote_region> result;
    std::uint64_t until = 0;
  };
  std::vector<retired_link> retired_;
#if EAAS_MOE_WITH_GPU
  std::unique_ptr<gpu::expert_step> step_;
  std::unique_ptr<gpu::server_step> dstep_;
  std::vector<gpu::step_request> step_reqs_;
  std::vector<gpu::step_row> rows_;
  std::vector<std::int32_t> group_offsets_, cursor_;
  std::vector<status> answered_;
#else
  std::unique_ptr<int> step_;   // never set: no GPU in this build
  std::unique_ptr<int> dstep_;  // never set
#endif
  cpu::swiglu_scratch scratch_;
  struct round_answer {
    std::uint32_t slot, error;
    int put;
  };
  std::vector<round_answer> round_answers_;  // the device round's answers, accounted after its summary
  status failed_ = status::ok;               // the device round failed (CUDA): serve() ends with it
};

}  // namespace

status expert_server::start(const server_options& opts, std::unique_ptr<expert_server>& out) {
  auto s = std::make_unique<server_impl>(opts);
  EAAS_CHECK(s->init());
  out = std::move(s);
  return status::ok;
}

}  // namespace eaas::runtime
