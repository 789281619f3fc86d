// The embedded registry server: one thread, poll() over a loopback listener and its clients,
// etcd-like revisions, leases and prefix watches held in memory.

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <deque>
#include <map>
#include <set>
#include <thread>

#include "eaas/device/ops.hpp"
#include "log.hpp"
#include "process.hpp"
#include "registry/backends.hpp"
#include "registry/net.hpp"
#include "registry/protocol.hpp"

namespace eaas {
namespace detail {
namespace {

using namespace regproto;

constexpr std::size_t kHistory = 65536;               // events kept for watches that resume
constexpr std::size_t kMaxClientBacklog = 64u << 20;  // a client that reads nothing is dropped
constexpr std::size_t kMaxClients = 1024;

struct client_conn {
  int fd = -1;
  frame_reader in;
  std::vector<std::byte> out;
  std::size_t out_pos = 0;
  bool hello = false;
  bool dead = false;
  std::map<std::uint64_t, std::string> watches;  // watch id -> prefix
};

struct lease_state {
  std::uint32_t ttl = 0;
  std::uint64_t deadline_ns = 0;
  std::set<std::string> keys;
};

class server_impl final : public registry_server {
 public:
  explicit server_impl(options o) : o_(std::move(o)) {}
  ~server_impl() override { stop(); }

  status init() {
    EAAS_CHECK(net::listen_on(o_.bind, o_.port, listen_fd_, port_));
    if (::pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0)
      return EAAS_FAIL(status::no_resource, "registry server: pipe failed");
    // Lease ids are random per server lifetime, so a lease from before a restart never matches.
    next_lease_ = static_cast<std::int64_t>(random_u64() >> 20) + 1;
    thread_ = std::thread([this] { run(); });
    log(log_level::info, "registry server: listening on {}:{}{}", o_.bind, port_, o_.token.empty() ? "" : " (token)");
    return status::ok;
  }

  std::uint16_t port() const noexcept override { return port_; }

  void stop() noexcept override {
    if (stopping_.exchange(true)) return;
    if (wake_[1] >= 0) {
      const char c = 0;
      [[maybe_unused]] ssize_t n = ::write(wake_[1], &c, 1);
    }
    if (thread_.joinable()) thread_.join();
    for (auto& [fd, c] : clients_) ::close(fd);
    clients_.clear();
    net::close_fd(listen_fd_);
    net::close_fd(wake_[0]);
    net::close_fd(wake_[1]);
  }

 private:
  void run() {
    std::vector<pollfd> fds;
    std::vector<std::byte> buf(1 << 16), body;
    while (!stopping_.load()) {
      fds.clear();
      fds.push_back({listen_fd_, POLLIN, 0});
      fds.push_back({wake_[0], POLLIN, 0});
      for (auto& [fd, c] : clients_)
        fds.push_back({fd, static_cast<short>(POLLIN | (c.out.size() > c.out_pos ? POLLOUT : 0)), 0});
      ::poll(fds.data(), fds.size(), poll_timeout_ms());
      if (stopping_.load()) break;
      if (fds[0].revents & POLLIN) accept_clients();
      for (std::size_t i = 2; i < fds.size(); ++i) {
        auto it = clients_.find(fds[i].fd);
        if (it == clients_.end()) continue;
        client_conn& c = it->second;
        if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) {
          const ssize_t n = ::recv(c.fd, buf.data(), buf.size(), MSG_DONTWAIT);
          if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            c.dead = true;
          } else if (n > 0) {
            c.in.feed(buf.data(), static_cast<std::size_t>(n));
            int got;
            while (!c.dead && (got = c.in.next(body, kMaxFrame)) == 1) handle(c, body);
            if (got < 0) drop(c, "oversized or corrupt frame");
          }
        }
        if (!c.dead) flush(c);
      }
      expire_leases();
      std::erase_if(clients_, [](auto& kv) {
        if (!kv.second.dead) return false;
        ::close(kv.first);
        return true;
      });
    }
  }

  int poll_timeout_ms() const {
    std::uint64_t next = ~std::uint64_t{0};
    for (const auto& [id, l] : leases_) next = std::min(next, l.deadline_ns);
    const std::uint64_t now = now_ns();
    if (next == ~std::uint64_t{0}) return 100;
    return next <= now ? 0 : static_cast<int>(std::min<std::uint64_t>(100, (next - now) / 1'000'000 + 1));
  }

  void accept_clients() {
    for (;;) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      if (clients_.size() >= kMaxClients) {
        ::close(fd);
        continue;
      }
      const int one = 1;  // small replies go out at once (Nagle + delayed ACK would add ~40 ms)
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      clients_[fd].fd = fd;
    }
  }

  void drop(client_conn& c, const char* why) {
    if (c.dead) return;
    c.dead = true;
    log(log_level::warn, "registry server: dropping client fd {}: {}", c.fd, why);
    // One best-effort send, so the client learns why (e.g. permission_denied) before the close.
    if (c.out.size() > c.out_pos) [[maybe_unused]]
      ssize_t n = ::send(c.fd, c.out.data() + c.out_pos, c.out.size() - c.out_pos, MSG_NOSIGNAL | MSG_DONTWAIT);
  }

  void flush(client_conn& c) {
    while (c.out.size() > c.out_pos) {
      const ssize_t w = ::send(c.fd, c.out.data() + c.out_pos, c.out.size() - c.out_pos, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w <= 0) {
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) c.dead = true;
        break;
      }
      c.out_pos += static_cast<std::size_t>(w);
    }
    if (c.out_pos == c.out.size()) {
      c.out.clear();
      c.out_pos = 0;
    } else if (c.out.size() - c.out_pos > kMaxClientBacklog) {
      drop(c, "it does not read its events");
    }
  }

  void send(client_conn& c, const handle_writer& w) {
    const auto f = frame(w);
    c.out.insert(c.out.end(), f.begin(), f.end());
  }

  void reply(client_conn& c, std::uint64_t id, status s, const handle_writer* extra = nullptr) {
    handle_writer w;
    w.u8(msg::reply);
    w.u64(id);
    w.u32(static_cast<std::uint32_t>(s));
    if (extra != nullptr) w.raw(extra->bytes());
    send(c, w);
  }

  // One mutation: next revision, history, fan-out to every watch whose prefix matches.
  void publish(watch_event_type type, const kv_record& rec) {
    watch_event ev{type, rec};
    history_.push_back(ev);
    if (history_.size() > kHistory) history_.pop_front();
    for (auto& [fd, c] : clients_)
      for (const auto& [wid, prefix] : c.watches)
        if (rec.key.compare(0, prefix.size(), prefix) == 0) send_event(c, wid, ev);
  }

  void send_event(client_conn& c, std::uint64_t wid, const watch_event& ev) {
    handle_writer w;
    w.u8(msg::event);
    w.u64(wid);
    w.u8(static_cast<std::uint8_t>(ev.type));
    put_record(w, ev.record);
    send(c, w);
  }

  void erase_key(std::map<std::string, kv_record>::iterator it, watch_event_type type) {
    kv_record gone = it->second;
    if (gone.lease != 0) {
      auto l = leases_.find(gone.lease);
      if (l != leases_.end()) l->second.keys.erase(gone.key);
    }
    kv_.erase(it);
    gone.mod_revision = ++revision_;
    gone.value.clear();
    publish(type, gone);
  }

  void end_lease(std::map<std::int64_t, lease_state>::iterator l) {
    const auto keys = l->second.keys;
    l->second.keys.clear();
    for (const auto& k : keys) {
      auto it = kv_.find(k);
      if (it != kv_.end()) erase_key(it, watch_event_type::expire);
    }
    leases_.erase(l);
  }

  void expire_leases() {
    const std::uint64_t now = now_ns();
    for (auto it = leases_.begin(); it != leases_.end();) {
      auto next = std::next(it);
      if (it->second.deadline_ns <= now) {
        log(log_level::info, "registry server: lease {:x} expired ({} keys)", it->first, it->second.keys.size());
        end_lease(it);
      }
      it = next;
    }
  }

  void handle(client_conn& c, const std::vector<std::byte>& body) {
    handle_reader r(body);
    const std::uint8_t type = r.u8();
    const std::uint64_t id = r.u64();
    if (!r.ok()) return drop(c, "short frame");
    if (!c.hello && type != msg::op_hello) {
      reply(c, id, status::permission_denied);
      return drop(c, "request before hello");
    }
    handle_writer out;
    std::string key, value, prefix;
    switch (type) {
      case msg::op_hello: {
        const std::uint16_t version = r.u16();
        std::string token;
        if (!get_string(r, 4096, token) || !r.done()) return drop(c, "malformed hello");
        if (version != kVersion) {
          reply(c, id, status::unsupported);
          return drop(c, "protocol version mismatch");
        }
        if (!o_.token.empty() && token != o_.token) {
          reply(c, id, status::permission_denied);
          return drop(c, "wrong token");
        }
        c.hello = true;
        return reply(c, id, status::ok);
      }
      case msg::op_grant: {
        const std::uint32_t ttl = r.u32();
        if (!r.done() || ttl == 0 || ttl > 3600) return reply(c, id, status::invalid_argument);
        const std::int64_t lease = next_lease_++;
        leases_[lease] = lease_state{ttl, now_ns() + ttl * 1'000'000'000ull, {}};
        out.u64(static_cast<std::uint64_t>(lease));
        return reply(c, id, status::ok, &out);
      }
      case msg::op_keepalive:
      case msg::op_revoke: {
        const auto lease = static_cast<std::int64_t>(r.u64());
        if (!r.done()) return drop(c, "malformed lease request");
        auto it = leases_.find(lease);
        if (it == leases_.end()) return reply(c, id, status::not_found);
        if (type == msg::op_keepalive)
          it->second.deadline_ns = now_ns() + it->second.ttl * 1'000'000'000ull;
        else
          end_lease(it);
        return reply(c, id, status::ok);
      }
      case msg::op_put:
      case msg::op_cas: {
        std::int64_t expected = 0;
        if (!get_string(r, kMaxKeyBytes, key)) return drop(c, "malformed put");
        if (type == msg::op_cas) expected = static_cast<std::int64_t>(r.u64());
        if (!get_string(r, kMaxValueBytes, value)) return drop(c, "malformed put");
        const auto lease = static_cast<std::int64_t>(r.u64());
        if (!r.done() || key.empty()) return reply(c, id, status::invalid_argument);
        if (lease != 0 && !leases_.contains(lease)) return reply(c, id, status::not_found);
        auto it = kv_.find(key);
        if (type == msg::op_cas) {
          const std::int64_t current = it == kv_.end() ? 0 : it->second.mod_revision;
          if (current != expected) {
            out.u8(0);
            return reply(c, id, status::ok, &out);
          }
        }
        kv_record rec;
        rec.key = key;
        rec.value = std::move(value);
        rec.lease = lease;
        rec.mod_revision = ++revision_;
        rec.create_revision = it == kv_.end() ? rec.mod_revision : it->second.create_revision;
        if (it != kv_.end() && it->second.lease != 0 && it->second.lease != lease) {
          auto old = leases_.find(it->second.lease);
          if (old != leases_.end()) old->second.keys.erase(key);
        }
        if (lease != 0) leases_[lease].keys.insert(key);
        kv_[key] = rec;
        publish(watch_event_type::put, rec);
        if (type == msg::op_cas)
          out.u8(1);
        else
          out.u64(static_cast<std::uint64_t>(rec.mod_revision));
        return reply(c, id, status::ok, &out);
      }
      case msg::op_get: {
        if (!get_string(r, kMaxKeyBytes, key) || !r.done()) return drop(c, "malformed get");
        auto it = kv_.find(key);
        if (it == kv_.end()) return reply(c, id, status::not_found);
        put_record(out, it->second);
        return reply(c, id, status::ok, &out);
      }
      case msg::op_list: {
        if (!get_string(r, kMaxKeyBytes, prefix) || !r.done()) return drop(c, "malformed list");
        std::vector<const kv_record*> hits;
        for (auto it = kv_.lower_bound(prefix); it != kv_.end() && it->first.compare(0, prefix.size(), prefix) == 0;
             ++it)
          hits.push_back(&it->second);
        out.u64(static_cast<std::uint64_t>(revision_));
        out.u32(static_cast<std::uint32_t>(hits.size()));
        for (const auto* rec : hits) put_record(out, *rec);
        return reply(c, id, status::ok, &out);
      }
      case msg::op_remove: {
        if (!get_string(r, kMaxKeyBytes, key) || !r.done()) return drop(c, "malformed remove");
        auto it = kv_.find(key);
        if (it == kv_.end()) return reply(c, id, status::not_found);
        erase_key(it, watch_event_type::remove);
        return reply(c, id, status::ok);
      }
      case msg::op_watch: {
        const std::uint64_t wid = r.u64();
        if (!get_string(r, kMaxKeyBytes, prefix)) return drop(c, "malformed watch");
        const auto after = static_cast<std::int64_t>(r.u64());
        if (!r.done()) return drop(c, "malformed watch");
        // Resuming needs every event after `after` still in the history (and a revision this
        // server has issued): otherwise the client lists and diffs instead.
        const std::int64_t oldest = history_.empty() ? revision_ + 1 : history_.front().record.mod_revision;
        if (after > revision_ || after + 1 < oldest) return reply(c, id, status::no_resource);
        c.watches[wid] = prefix;
        reply(c, id, status::ok);
        for (const auto& ev : history_)
          if (ev.record.mod_revision > after && ev.record.key.compare(0, prefix.size(), prefix) == 0)
            send_event(c, wid, ev);
        return;
      }
      case msg::op_cancel: {
        const std::uint64_t wid = r.u64();
        if (!r.done()) return drop(c, "malformed cancel");
        c.watches.erase(wid);
        return reply(c, id, status::ok);
      }
      default:
        reply(c, id, status::unsupported);
        return drop(c, "unknown request type");
    }
  }

  options o_;
  int listen_fd_ = -1;
  int wake_[2] = {-1, -1};
  std::uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
  std::map<int, client_conn> clients_;
  std::map<std::string, kv_record> kv_;
  std::map<std::int64_t, lease_state> leases_;
  std::deque<watch_event> history_;
  std::int64_t revision_ = 0;
  std::int64_t next_lease_ = 1;
};

}  // namespace
}  // namespace detail

status registry_server::start(const options& opts, std::unique_ptr<registry_server>& out) {
  try {
    auto s = std::make_unique<detail::server_impl>(opts);
    EAAS_CHECK(s->init());
    out = std::move(s);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "registry server: out of memory");
  } catch (const std::system_error& e) {
    return EAAS_FAIL(status::internal_error, "registry server: {}", e.what());
  }
}

}  // namespace eaas
