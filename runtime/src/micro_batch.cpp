#include "micro_batch.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <utility>

#include "eaas/host/error.hpp"
#include "fail.hpp"

namespace eaas::runtime {

namespace {

class micro_batched final : public attention_client {
 public:
  micro_batched(std::unique_ptr<attention_client> a, std::unique_ptr<attention_client> b, micro_batching mode,
                std::uint32_t max_tokens)
      : a_(std::move(a)), b_(std::move(b)), mode_(mode), max_tokens_(max_tokens), worker_([this] { work(); }) {}

  ~micro_batched() override {
    {
      std::lock_guard g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }

  status wait_for_experts(std::uint32_t replicas, std::uint64_t timeout_ns) override {
    EAAS_CHECK(a_->wait_for_experts(replicas, timeout_ns));
    return b_->wait_for_experts(replicas, timeout_ns);
  }

  status forward(std::span<const std::uint32_t> tokens, std::vector<float>& out) override {
    if (tokens.empty() || tokens.size() > max_tokens_)
      return EAAS_RT_FAIL(status::invalid_argument, "micro-batched client: {} tokens (1..{})", tokens.size(),
                          max_tokens_);
    const bool two = tokens.size() >= 2 && use_two();
    const auto t0 = std::chrono::steady_clock::now();
    last_two_ = two;
    status st = two ? forward_two(tokens, out) : forward_one(tokens, out);
    if (st == status::ok && mode_ == micro_batching::automatic && trials_ < 2 * kTrials) {
      const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      (two ? two_us_ : one_us_).push_back(us / static_cast<double>(tokens.size()));
      ++trials_;
    }
    return st;
  }

  const std::vector<std::uint64_t>& last_moe_ns() const override { return moe_ns_; }
  const std::vector<routing>& last_routing() const override { return routing_; }
  // One batch: the inner client's answer on the GPU; two: the halves are in two buffers (none given).
  const float* device_output() const override { return last_two_ ? nullptr : a_->device_output(); }

  client_stats stats() const override {
    const client_stats x = a_->stats(), y = b_->stats();
    client_stats s;
    s.forwards = forwards_;
    // Every counter of the halves is summed (each half is a forward of its own on the device path), but the
    // forwards, which are this client's, and the micro-batch count.
    using S = client_stats;
    // clang-format off
    static constexpr std::uint64_t S::*kSummed[] = {
        &S::requests, &S::dropped_servers, &S::resent_entries, &S::device_forwards, &S::direct_requests,
        &S::fallback_forwards, &S::graph_captures, &S::capture_retries, &S::device_layers, &S::device_send_ns,
        &S::device_round_ns, &S::device_combine_ns, &S::device_dense_layers, &S::device_dense_ns,
        &S::device_forward_ns, &S::device_timed_forwards, &S::device_wall_ns, &S::device_prepare_ns,
        &S::device_wait_ns, &S::device_call_ns};
    // clang-format on
    for (const auto m : kSummed) s.*m = x.*m + y.*m;
    s.micro_batches = mode_ == micro_batching::two ? 2 : decided() ? (prefer_two() ? 2 : 1) : 0;
    return s;
  }

  std::vector<failover_event> take_failovers() override {
    auto f = a_->take_failovers();
    auto g = b_->take_failovers();
    f.insert(f.end(), std::make_move_iterator(g.begin()), std::make_move_iterator(g.end()));
    return f;
  }
  const dense_model& dense() const override { return a_->dense(); }

 private:
  static constexpr std::size_t kTrials = 3;  // forwards timed each way before `automatic` decides

  bool decided() const { return one_us_.size() >= kTrials && two_us_.size() >= kTrials; }
  static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  }
  bool prefer_two() const { return median(two_us_) < median(one_us_); }
  // automatic: alternate while trying (the first try of each way also links and warms up), then keep the faster.
  bool use_two() const {
    if (mode_ == micro_batching::two) return true;
    if (!decided()) return trials_ % 2 == 1;
    return prefer_two();
  }

  status forward_one(std::span<const std::uint32_t> tokens, std::vector<float>& out) {
    EAAS_CHECK(a_->forward(tokens, out));
    moe_ns_ = a_->last_moe_ns();
    routing_ = a_->last_routing();
    ++forwards_;
    return status::ok;
  }

  // The second half on the worker thread, the first here; then both halves' rows in token order.
  status forward_two(std::span<const std::uint32_t> tokens, std::vector<float>& out) {
    const std::size_t half = (tokens.size() + 1) / 2;
    {
      std::lock_guard g(mu_);
      job_ = tokens.subspan(half);
      pending_ = true;
    }
    cv_.notify_all();
    const status sa = a_->forward(tokens.first(half), out);
    std::unique_lock lk(mu_);
    cv_.wait(lk, [this] { return !pending_; });
    EAAS_CHECK(sa);
    EAAS_CHECK(b_status_);
    // Without host output a half that ran on the device leaves its rows on the GPU (and no routing), while a
    // half that fell back to the host path has them here: only two host halves make a whole answer.
    const bool whole = !out.empty() && !b_out_.empty();
    if (whole)
      out.insert(out.end(), b_out_.begin(), b_out_.end());
    else
      out.clear();
    // A layer's round trip as the forward saw it: the later of the two.
    const auto& ma = a_->last_moe_ns();
    const auto& mb = b_->last_moe_ns();
    moe_ns_.assign(ma.size(), 0);
    for (std::size_t l = 0; l < ma.size(); ++l) moe_ns_[l] = std::max(ma[l], l < mb.size() ? mb[l] : 0);
    const auto& ra = a_->last_routing();
    const auto& rb = b_->last_routing();
    if (!whole || ra.size() != rb.size()) {
      routing_.clear();
      ++forwards_;
      return status::ok;
    }
    routing_.resize(ra.size());
    for (std::size_t l = 0; l < ra.size(); ++l) {
      routing_[l] = ra[l];
      routing_[l].ids.insert(routing_[l].ids.end(), rb[l].ids.begin(), rb[l].ids.end());
      routing_[l].weights.insert(routing_[l].weights.end(), rb[l].weights.begin(), rb[l].weights.end());
    }
    ++forwards_;
    return status::ok;
  }

  void work() {
    std::unique_lock lk(mu_);
    for (;;) {
      cv_.wait(lk, [this] { return stop_ || pending_; });
      if (stop_) return;
      const auto job = job_;
      lk.unlock();
      const status s = b_->forward(job, b_out_);
      lk.lock();
      b_status_ = s;
      pending_ = false;
      cv_.notify_all();
    }
  }

  std::unique_ptr<attention_client> a_, b_;
  micro_batching mode_;
  std::uint32_t max_tokens_;
  std::vector<std::uint64_t> moe_ns_;
  std::vector<routing> routing_;
  std::vector<double> one_us_, two_us_;  // µs per token of the timed forwards, each way
  std::size_t trials_ = 0;
  bool last_two_ = false;  // the last forward went as two micro-batches
  std::uint64_t forwards_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false, pending_ = false;
  std::span<const std::uint32_t> job_;
  std::vector<float> b_out_;
  status b_status_ = status::ok;
  std::thread worker_;  // last: it starts in the constructor and reads the members above
};

}  // namespace

status start_micro_batched(const client_options& opts, micro_batching mode, std::unique_ptr<attention_client>& out) {
  if (mode == micro_batching::one) return attention_client::start(opts, out);
  std::unique_ptr<attention_client> a, b;
  EAAS_CHECK(attention_client::start(opts, a));
  client_options ob = opts;
  ob.id = opts.id + ".b";
  ob.max_tokens = (opts.max_tokens + 1) / 2;
  EAAS_CHECK(attention_client::start(ob, b));
  out = std::make_unique<micro_batched>(std::move(a), std::move(b), mode, opts.max_tokens);
  return status::ok;
}

}  // namespace eaas::runtime
