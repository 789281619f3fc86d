// Client of the embedded registry: one connection, a reader thread that matches replies to
// requests and queues watch events, a dispatcher thread that runs callbacks (so a callback may call
// the registry), and reconnection with watch resynchronisation after a registry restart.

#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "eaas/device/ops.hpp"
#include "log.hpp"
#include "registry/backends.hpp"
#include "registry/net.hpp"
#include "registry/protocol.hpp"

namespace eaas {
namespace detail {
namespace {

using namespace regproto;

struct watch_state {
  std::uint64_t id = 0;
  std::string prefix;
  std::function<void(const watch_event&)> cb;
  std::int64_t last_revision = 0;             // highest revision delivered
  std::map<std::string, std::int64_t> known;  // key -> mod_revision, as delivered
  bool cancelled = false;
  bool registered = false;       // the server has it (since the last (re)connect)
  std::thread::id running_in{};  // the dispatcher thread while a callback runs
};

struct queued {
  std::shared_ptr<watch_state> w;
  bool resync = false;
  watch_event ev{};
};

class client_impl;

class watch_impl final : public watch {
 public:
  watch_impl(std::shared_ptr<client_impl> c, std::shared_ptr<watch_state> w) : c_(std::move(c)), w_(std::move(w)) {}
  ~watch_impl() override { cancel(); }
  void cancel() noexcept override;

 private:
  std::shared_ptr<client_impl> c_;
  std::shared_ptr<watch_state> w_;
};

class client_impl final : public registry, public std::enable_shared_from_this<client_impl> {
 public:
  client_impl(registry_options o, std::string host, std::uint16_t port)
      : o_(std::move(o)), host_(std::move(host)), port_(port) {}

  ~client_impl() override { shutdown(); }

  status start() {
    EAAS_CHECK(connect_now());
    reader_ = std::thread([this] { reader_loop(); });
    dispatcher_ = std::thread([this] { dispatcher_loop(); });
    return status::ok;
  }

  void shutdown() {
    if (stopping_.exchange(true)) return;
    {
      std::lock_guard lock(mu_);
      if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
    }
    qcv_.notify_all();
    cv_.notify_all();
    if (reader_.joinable()) reader_.join();
    if (dispatcher_.joinable()) dispatcher_.join();
    std::lock_guard lock(mu_);
    net::close_fd(fd_);
  }

  // ---- registry ------------------------------------------------------------------------------

  status grant_lease(std::uint32_t ttl_seconds, std::int64_t& lease) override {
    if (ttl_seconds == 0 || ttl_seconds > 3600)
      return EAAS_FAIL(status::invalid_argument, "registry: lease TTL {} s is outside 1..3600", ttl_seconds);
    handle_writer w;
    w.u32(ttl_seconds);
    std::vector<std::byte> rep;
    EAAS_CHECK(call(msg::op_grant, w, rep));
    handle_reader r(rep);
    lease = static_cast<std::int64_t>(r.u64());
    return r.done() && lease > 0 ? status::ok : malformed("grant");
  }
  status keep_alive(std::int64_t lease) override { return lease_op(msg::op_keepalive, lease); }
  status revoke_lease(std::int64_t lease) override { return lease_op(msg::op_revoke, lease); }

  status put(std::string_view key, std::string_view value, std::int64_t lease) override {
    EAAS_CHECK(check_key_value(key, value));
    handle_writer w;
    put_string(w, key);
    put_string(w, value);
    w.u64(static_cast<std::uint64_t>(lease));
    std::vector<std::byte> rep;
    return call(msg::op_put, w, rep);
  }

  status get(std::string_view key, kv_record& out) override {
    EAAS_CHECK(check_key_value(key, {}));
    handle_writer w;
    put_string(w, key);
    std::vector<std::byte> rep;
    EAAS_CHECK(call(msg::op_get, w, rep));
    handle_reader r(rep);
    return get_record(r, out) && r.done() ? status::ok : malformed("get");
  }

  status list(std::string_view prefix, std::vector<kv_record>& out, std::int64_t& revision) override {
    if (prefix.size() > kMaxKeyBytes) return EAAS_FAIL(status::invalid_argument, "registry: prefix too long");
    handle_writer w;
    put_string(w, prefix);
    std::vector<std::byte> rep;
    EAAS_CHECK(call(msg::op_list, w, rep));
    handle_reader r(rep);
    revision = static_cast<std::int64_t>(r.u64());
    const std::uint32_t n = r.u32();
    if (!r.ok() || n > rep.size() / 40) return malformed("list");
    std::vector<kv_record> recs(n);
    for (auto& rec : recs)
      if (!get_record(r, rec)) return malformed("list");
    if (!r.done()) return malformed("list");
    out = std::move(recs);
    return status::ok;
  }

  status remove(std::string_view key) override {
    EAAS_CHECK(check_key_value(key, {}));
    handle_writer w;
    put_string(w, key);
    std::vector<std::byte> rep;
    return call(msg::op_remove, w, rep);
  }

  status compare_and_swap(std::string_view key, std::int64_t expected, std::string_view value, std::int64_t lease,
                          bool& swapped) override {
    EAAS_CHECK(check_key_value(key, value));
    handle_writer w;
    put_string(w, key);
    w.u64(static_cast<std::uint64_t>(expected));
    put_string(w, value);
    w.u64(static_cast<std::uint64_t>(lease));
    std::vector<std::byte> rep;
    EAAS_CHECK(call(msg::op_cas, w, rep));
    handle_reader r(rep);
    const std::uint8_t v = r.u8();
    if (!r.done() || v > 1) return malformed("compare_and_swap");
    swapped = v == 1;
    return status::ok;
  }

  status watch_prefix(std::string_view prefix, std::int64_t after_revision,
                      std::function<void(const watch_event&)> on_event, std::unique_ptr<watch>& out) override {
    if (prefix.size() > kMaxKeyBytes || !on_event)
      return EAAS_FAIL(status::invalid_argument, "registry: watch needs a prefix ≤ {} bytes and a callback",
                       kMaxKeyBytes);
    auto w = std::make_shared<watch_state>();
    w->prefix = std::string(prefix);
    w->cb = std::move(on_event);
    w->last_revision = after_revision;
    {
      std::lock_guard lock(wmu_);
      w->id = next_watch_++;
      watches_[w->id] = w;
    }
    status s = register_watch(w);
    if (s == status::no_resource) {
      enqueue({w, true, {}});  // history does not reach back that far: list and diff instead
      s = status::ok;
    }
    if (s != status::ok) {
      std::lock_guard lock(wmu_);
      watches_.erase(w->id);
      return s;
    }
    out = std::make_unique<watch_impl>(shared_from_this(), w);
    return status::ok;
  }

  void cancel_watch(const std::shared_ptr<watch_state>& w) noexcept {
    {
      std::unique_lock lock(wmu_);
      w->cancelled = true;
      watches_.erase(w->id);
      // Wait until its callback is not running, unless we are that callback.
      wcv_.wait(lock,
                [&] { return w->running_in == std::thread::id{} || w->running_in == std::this_thread::get_id(); });
    }
    try {
      handle_writer body;
      body.u64(w->id);
      std::vector<std::byte> rep;
      (void)call(msg::op_cancel, body, rep);
    } catch (...) {
    }
  }

 private:
  status malformed(const char* what) {
    return EAAS_FAIL(status::invalid_handle, "registry: malformed answer to {}", what);
  }

  status lease_op(std::uint8_t op, std::int64_t lease) {
    handle_writer w;
    w.u64(static_cast<std::uint64_t>(lease));
    std::vector<std::byte> rep;
    return call(op, w, rep);
  }

  status register_watch(const std::shared_ptr<watch_state>& w) {
    std::int64_t after;
    {
      std::lock_guard lock(wmu_);
      after = w->last_revision;
    }
    handle_writer body;
    body.u64(w->id);
    put_string(body, w->prefix);
    body.u64(static_cast<std::uint64_t>(after));
    std::vector<std::byte> rep;
    const status s = call(msg::op_watch, body, rep);
    if (s == status::ok) {
      std::lock_guard lock(wmu_);
      w->registered = true;
    }
    return s;
  }

  // One request, its reply's status and body (after the status).
  status call(std::uint8_t op, const handle_writer& fields, std::vector<std::byte>& reply_body) {
    try {
      // Lock order: write_mu_, then mu_. The socket cannot be closed while we write to it, since
      // closing takes write_mu_ as well.
      std::uint64_t id = 0;
      {
        std::lock_guard wl(write_mu_);
        int fd = -1;
        {
          std::lock_guard l(mu_);
          if (fd_ < 0)
            return EAAS_FAIL(status::peer_unreachable, "registry: not connected to {}:{} (reconnecting)", host_,
                             port_);
          id = next_request_++;
          pending_[id];
          fd = fd_;
        }
        handle_writer w;
        w.u8(op);
        w.u64(id);
        w.raw(fields.bytes());
        const auto f = frame(w);
        if (status s = net::write_all(fd, f.data(), f.size(), o_.request_timeout_ns); s != status::ok) {
          std::lock_guard l(mu_);
          pending_.erase(id);
          return s;
        }
      }
      std::unique_lock lock(mu_);
      auto& p = pending_[id];
      const bool done = cv_.wait_for(lock, std::chrono::nanoseconds(o_.request_timeout_ns),
                                     [&] { return p.done || stopping_.load(); });
      const pending_call got = std::move(p);
      pending_.erase(id);
      if (!done || !got.done)
        return EAAS_FAIL(status::peer_unreachable, "registry: no answer from {}:{} within {} ms", host_, port_,
                         o_.request_timeout_ns / 1'000'000);
      if (got.s == status::permission_denied)
        return EAAS_FAIL(got.s, "registry: {}:{} refused the token", host_, port_);
      if (got.s != status::ok)
        return EAAS_FAIL(got.s, "registry: request {} answered {}", static_cast<int>(op), status_name(got.s));
      reply_body = std::move(got.body);
      return status::ok;
    } catch (const std::bad_alloc&) {
      return EAAS_FAIL(status::no_resource, "registry: out of memory");
    }
  }

  status connect_now() {
    int fd = -1;
    EAAS_CHECK(net::connect_to(host_, port_, o_.request_timeout_ns, fd));
    // Hello, answered before the reader thread sees this socket.
    handle_writer w;
    w.u8(msg::op_hello);
    w.u64(0);
    w.u16(kVersion);
    put_string(w, o_.token);
    const auto f = frame(w);
    if (status s = net::write_all(fd, f.data(), f.size(), o_.request_timeout_ns); s != status::ok) {
      net::close_fd(fd);
      return s;
    }
    frame_reader fr;
    std::vector<std::byte> body, buf(4096);
    const std::uint64_t until = now_ns() + o_.request_timeout_ns;
    int got = 0;
    while ((got = fr.next(body, kMaxFrame)) == 0) {
      const std::uint64_t now = now_ns();
      pollfd p{fd, POLLIN, 0};
      if (now >= until || ::poll(&p, 1, static_cast<int>((until - now) / 1'000'000 + 1)) <= 0) break;
      const ssize_t n = ::recv(fd, buf.data(), buf.size(), 0);
      if (n <= 0) break;
      fr.feed(buf.data(), static_cast<std::size_t>(n));
    }
    handle_reader r(body);
    const std::uint8_t type = r.u8();
    r.u64();
    const auto s = static_cast<status>(r.u32());
    if (got != 1 || !r.done() || type != msg::reply) {
      net::close_fd(fd);
      return EAAS_FAIL(status::peer_unreachable, "registry: {}:{} did not greet back (not an eaas registry?)", host_,
                       port_);
    }
    if (s != status::ok) {
      net::close_fd(fd);
      return EAAS_FAIL(s, "registry: {}:{} refused us: {}", host_, port_,
                       s == status::permission_denied ? "wrong or missing token" : status_name(s));
    }
    std::lock_guard lock(mu_);
    fd_ = fd;
    return status::ok;
  }

  void fail_pending_locked() {
    for (auto& [id, p] : pending_) {
      p.done = true;
      p.s = status::peer_unreachable;
    }
    cv_.notify_all();
  }

  void reader_loop() {
    std::vector<std::byte> buf(1 << 16), body;
    frame_reader fr;
    std::uint64_t backoff_ms = 20;
    while (!stopping_.load()) {
      int fd;
      {
        std::lock_guard lock(mu_);
        fd = fd_;
      }
      if (fd < 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
        if (stopping_.load()) break;
        if (connect_now() == status::ok) {
          log(log_level::info, "registry: reconnected to {}:{}", host_, port_);
          backoff_ms = 20;
          fr = frame_reader{};
          std::lock_guard lock(wmu_);
          for (auto& [id, w] : watches_) {
            w->registered = false;
            queue_.push_back({w, true, {}});
          }
          qcv_.notify_all();
        } else {
          backoff_ms = std::min<std::uint64_t>(backoff_ms * 2, 500);
        }
        continue;
      }
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      const ssize_t n = ::recv(fd, buf.data(), buf.size(), 0);
      int got = 0;
      if (n > 0) {
        fr.feed(buf.data(), static_cast<std::size_t>(n));
        while ((got = fr.next(body)) == 1)
          if (!dispatch_frame(body)) {
            got = -1;
            break;
          }
      }
      if (n <= 0 || got < 0) {
        if (!stopping_.load())
          log(log_level::info, "registry: connection to {}:{} lost{}", host_, port_, got < 0 ? " (bad frame)" : "");
        std::lock_guard wl(write_mu_);  // no writer is using the socket we close
        std::lock_guard lock(mu_);
        net::close_fd(fd_);
        fail_pending_locked();
      }
    }
  }

  // A frame from the server: false when it is malformed (the connection is then dropped).
  bool dispatch_frame(const std::vector<std::byte>& body) {
    handle_reader r(body);
    const std::uint8_t type = r.u8();
    const std::uint64_t id = r.u64();
    if (type == msg::reply) {
      const auto s = static_cast<status>(r.u32());
      if (!r.ok() || static_cast<std::uint32_t>(s) > static_cast<std::uint32_t>(kLastStatus)) return false;
      std::lock_guard lock(mu_);
      auto it = pending_.find(id);
      if (it != pending_.end()) {
        it->second.done = true;
        it->second.s = s;
        it->second.body.assign(body.begin() + 13, body.end());
        cv_.notify_all();
      }
      return true;
    }
    if (type == msg::event) {
      const std::uint8_t et = r.u8();
      watch_event ev{};
      if (et > 2 || !get_record(r, ev.record) || !r.done()) return false;
      ev.type = static_cast<watch_event_type>(et);
      std::lock_guard lock(wmu_);
      auto it = watches_.find(id);
      if (it != watches_.end()) {
        queue_.push_back({it->second, false, std::move(ev)});
        qcv_.notify_all();
      }
      return true;
    }
    return false;
  }

  void enqueue(queued q) {
    std::lock_guard lock(wmu_);
    queue_.push_back(std::move(q));
    qcv_.notify_all();
  }

  void dispatcher_loop() {
    for (;;) {
      queued q;
      {
        std::unique_lock lock(wmu_);
        qcv_.wait(lock, [&] { return stopping_.load() || !queue_.empty(); });
        if (stopping_.load()) return;
        q = std::move(queue_.front());
        queue_.pop_front();
        if (q.w->cancelled) continue;
      }
      if (q.resync)
        resync(q.w);
      else
        deliver(q.w, q.ev, false);
    }
  }

  // Runs the callback for one event unless it is old news; keeps the watch's view of the keys.
  void deliver(const std::shared_ptr<watch_state>& w, const watch_event& ev, bool synthetic) {
    {
      std::lock_guard lock(wmu_);
      if (w->cancelled) return;
      if (!synthetic && ev.record.mod_revision <= w->last_revision) return;
      if (!synthetic) w->last_revision = ev.record.mod_revision;
      if (ev.type == watch_event_type::put)
        w->known[ev.record.key] = ev.record.mod_revision;
      else
        w->known.erase(ev.record.key);
      w->running_in = std::this_thread::get_id();
    }
    try {
      w->cb(ev);
    } catch (...) {
      log(log_level::error, "registry: a watch callback threw; the exception was dropped");
    }
    {
      std::lock_guard lock(wmu_);
      w->running_in = std::thread::id{};
    }
    wcv_.notify_all();
  }

  // After a reconnect (or a resume the server cannot serve): list, report the difference, watch on.
  void resync(const std::shared_ptr<watch_state>& w) {
    std::vector<kv_record> now;
    std::int64_t rev = 0;
    if (list(w->prefix, now, rev) != status::ok) {
      // Not reachable right now: the reconnect after the next failure queues another resync.
      return;
    }
    std::map<std::string, std::int64_t> before;
    {
      std::lock_guard lock(wmu_);
      before = w->known;
    }
    std::map<std::string, const kv_record*> present;
    for (const auto& rec : now) present[rec.key] = &rec;
    for (const auto& [key, mod] : before)
      if (!present.contains(key)) {
        watch_event ev{watch_event_type::expire, kv_record{key, {}, 0, 0, rev}};
        deliver(w, ev, true);
      }
    for (const auto& rec : now) {
      auto it = before.find(rec.key);
      if (it == before.end() || it->second != rec.mod_revision)
        deliver(w, watch_event{watch_event_type::put, rec}, true);
    }
    {
      std::lock_guard lock(wmu_);
      w->last_revision = rev;
    }
    (void)register_watch(w);
  }

  struct pending_call {
    bool done = false;
    status s = status::internal_error;
    std::vector<std::byte> body;
  };

  registry_options o_;
  std::string host_;
  std::uint16_t port_;
  std::mutex mu_;        // fd_, pending_, next_request_
  std::mutex write_mu_;  // one writer on the socket at a time
  std::condition_variable cv_;
  int fd_ = -1;
  std::uint64_t next_request_ = 1;
  std::map<std::uint64_t, pending_call> pending_;
  std::atomic<bool> stopping_{false};
  std::thread reader_, dispatcher_;

  std::mutex wmu_;  // watches_, queue_, watch_state fields
  std::condition_variable qcv_, wcv_;
  std::uint64_t next_watch_ = 1;
  std::map<std::uint64_t, std::shared_ptr<watch_state>> watches_;
  std::deque<queued> queue_;
};

void watch_impl::cancel() noexcept {
  if (c_ && w_) c_->cancel_watch(w_);
  c_.reset();
}

// The public object is a thin owner: the implementation must be a shared_ptr (watches hold it).
class client_handle final : public registry {
 public:
  explicit client_handle(std::shared_ptr<client_impl> c) : c_(std::move(c)) {}
  ~client_handle() override { c_->shutdown(); }
  status grant_lease(std::uint32_t t, std::int64_t& l) override { return c_->grant_lease(t, l); }
  status keep_alive(std::int64_t l) override { return c_->keep_alive(l); }
  status revoke_lease(std::int64_t l) override { return c_->revoke_lease(l); }
  status put(std::string_view k, std::string_view v, std::int64_t l) override { return c_->put(k, v, l); }
  status get(std::string_view k, kv_record& o) override { return c_->get(k, o); }
  status list(std::string_view p, std::vector<kv_record>& o, std::int64_t& r) override { return c_->list(p, o, r); }
  status remove(std::string_view k) override { return c_->remove(k); }
  status compare_and_swap(std::string_view k, std::int64_t e, std::string_view v, std::int64_t l, bool& s) override {
    return c_->compare_and_swap(k, e, v, l, s);
  }
  status watch_prefix(std::string_view p, std::int64_t a, std::function<void(const watch_event&)> cb,
                      std::unique_ptr<watch>& o) override {
    return c_->watch_prefix(p, a, std::move(cb), o);
  }

 private:
  std::shared_ptr<client_impl> c_;
};

}  // namespace

status open_embedded(const registry_options& options, std::string_view host_port, std::unique_ptr<registry>& out) {
  try {
    std::string host;
    std::uint16_t port = 0;
    EAAS_CHECK(parse_host_port(host_port, host, port));
    auto c = std::make_shared<client_impl>(options, host, port);
    EAAS_CHECK(c->start());
    out = std::make_unique<client_handle>(std::move(c));
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "registry: out of memory");
  } catch (const std::system_error& e) {
    return EAAS_FAIL(status::internal_error, "registry: {}", e.what());
  }
}

}  // namespace detail
}  // namespace eaas
