// The etcd backend against a fake etcd: a loopback HTTP server thread that answers what each test
// scripts — garbage, wrong shapes, wrong sizes, errors, truncated and endless watch streams. No etcd
// needed. The client must turn every one of them into a clear status (or a resynchronisation, for a
// watch), never a crash, a hang or a bad event.

#include <arpa/inet.h>
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../common/require_ok.hpp"
#include "collector.hpp"
#include "eaas/eaas.hpp"
#include "registry/net.hpp"

using namespace eaas;
using eaas::regtest::collector;
using eaas::regtest::describe;
using namespace std::chrono_literals;

namespace {

using ms = std::chrono::milliseconds;
ms since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<ms>(std::chrono::steady_clock::now() - t0);
}

// ---- encodings, written independently of the library's ----------------------------------------

std::string b64(std::string_view in) {
  static const char* k = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  unsigned bits = 0;
  int n = 0;
  for (unsigned char c : in) {
    bits = bits << 8 | c;
    n += 8;
    while (n >= 6) out.push_back(k[(bits >> (n -= 6)) & 63]);
  }
  if (n > 0) out.push_back(k[(bits << (6 - n)) & 63]);
  while (out.size() % 4 != 0) out.push_back('=');
  return out;
}

std::string kv_json(std::string_view key, std::string_view value, long create, long mod, long lease = 0) {
  std::string s = fmt::format(R"({{"key":"{}","create_revision":"{}","mod_revision":"{}","version":"1","value":"{}")",
                              b64(key), create, mod, b64(value));
  if (lease != 0) s += fmt::format(R"(,"lease":"{}")", lease);
  return s + "}";
}
std::string header(long rev) {
  return fmt::format(R"("header":{{"cluster_id":"1","member_id":"2","revision":"{}"}})", rev);
}
std::string range_answer(long rev, const std::vector<std::string>& kvs) {
  std::string list;
  for (const auto& kv : kvs) list += (list.empty() ? "" : ",") + kv;
  return fmt::format(R"({{{},"kvs":[{}],"count":"{}"}})", header(rev), list, kvs.size());
}
std::string put_event(std::string_view key, std::string_view value, long create, long mod, long lease = 0) {
  return R"({"kv":)" + kv_json(key, value, create, mod, lease) + "}";
}
std::string delete_event(std::string_view key, long mod, long prev_lease) {
  return fmt::format(R"({{"type":"DELETE","kv":{{"key":"{}","mod_revision":"{}"}},"prev_kv":{}}})", b64(key), mod,
                     kv_json(key, "old", 1, mod - 1, prev_lease));
}
std::string events_line(long rev, const std::vector<std::string>& events) {
  std::string list;
  for (const auto& e : events) list += (list.empty() ? "" : ",") + e;
  return fmt::format(R"({{"result":{{{},"events":[{}]}}}})", header(rev), list) + "\n";
}
const std::string kCreated = R"({"result":{"header":{"cluster_id":"1","revision":"1"},"created":true}})"
                             "\n";

// ---- HTTP ----------------------------------------------------------------------------------------

std::string reply(int code, std::string_view body) {
  return fmt::format(
      "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}", code,
      body.size(), body);
}
std::string ok(std::string_view body) { return reply(200, body); }
const std::string kChunkedHead =
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
std::string chunk(std::string_view s) { return fmt::format("{:x}\r\n{}\r\n", s.size(), s); }
const std::string kLastChunk = "0\r\n\r\n";
const std::string kStatus =
    ok(R"({"header":{"cluster_id":"1","member_id":"2","revision":"1","raft_term":"2"},"version":"3.4.23"})");

struct request {
  std::string path, headers, body;
};

/// What the fake sends on one connection: `head`, then more(0), more(1), ... every `interval` until
/// one is empty, then (with `hold`) keeps the connection open until the client or the server closes.
struct fake_reply {
  fake_reply(std::string h = {}, bool hold_open = false, std::function<std::string(int)> then = {})
      : head(std::move(h)), more(std::move(then)), hold(hold_open) {}
  std::string head;
  std::function<std::string(int)> more;
  ms interval{1};
  bool hold = false;
};

class fake_etcd {
 public:
  using handler = std::function<fake_reply(const request&)>;

  explicit fake_etcd(handler h) : handler_(std::move(h)) {
    REQUIRE(eaas::detail::net::listen_on("127.0.0.1", 0, fd_, port_) == eaas::status::ok);
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~fake_etcd() {
    stop_ = true;
    acceptor_.join();
    for (auto& t : conns_) t.join();
    ::close(fd_);
  }

  std::string endpoint() const { return "etcd://127.0.0.1:" + std::to_string(port_); }
  std::vector<request> requests() {
    std::lock_guard lk(mu_);
    return log_;
  }
  int count(std::string_view path) {
    std::lock_guard lk(mu_);
    int n = 0;
    for (const auto& r : log_) n += r.path == path;
    return n;
  }
  /// Waits until `path` was asked `n` times.
  bool wait_count(std::string_view path, int n, ms limit = 5s) {
    const auto t0 = std::chrono::steady_clock::now();
    while (count(path) < n) {
      if (since(t0) > limit) return false;
      std::this_thread::sleep_for(5ms);
    }
    return true;
  }

 private:
  void accept_loop() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c >= 0) conns_.emplace_back([this, c] { serve(c); });
    }
  }
  bool read_request(int c, request& r) {
    std::string buf;
    char tmp[65536];
    std::size_t head_end = std::string::npos, need = 0;
    for (;;) {
      if (head_end != std::string::npos && buf.size() >= head_end + 4 + need) break;
      pollfd p{c, POLLIN, 0};
      if (stop_) return false;
      if (::poll(&p, 1, 20) <= 0) continue;
      const ssize_t n = ::recv(c, tmp, sizeof(tmp), 0);
      if (n <= 0) return false;
      buf.append(tmp, static_cast<std::size_t>(n));
      if (head_end == std::string::npos && (head_end = buf.find("\r\n\r\n")) != std::string::npos) {
        r.headers = buf.substr(0, head_end);
        const auto cl = r.headers.find("Content-Length: ");
        if (cl != std::string::npos) need = std::stoul(r.headers.substr(cl + 16));
        const auto sp = r.headers.find(' ');
        r.path = r.headers.substr(sp + 1, r.headers.find(' ', sp + 1) - sp - 1);
      }
    }
    r.body = buf.substr(head_end + 4, need);
    return true;
  }
  void send_all(int c, std::string_view s) {
    while (!s.empty() && !stop_) {
      const ssize_t n = ::send(c, s.data(), s.size(), MSG_NOSIGNAL);
      if (n <= 0) return;
      s.remove_prefix(static_cast<std::size_t>(n));
    }
  }
  void serve(int c) {
    request r;
    if (read_request(c, r)) {
      fake_reply rep;
      {
        std::lock_guard lk(mu_);
        log_.push_back(r);
        rep = handler_(r);
      }
      send_all(c, rep.head);
      if (rep.more) {
        for (int i = 0; !stop_; ++i) {
          const std::string s = rep.more(i);
          if (s.empty()) break;
          send_all(c, s);
          std::this_thread::sleep_for(rep.interval);
        }
      }
      if (rep.hold) {
        char tmp[256];
        while (!stop_) {
          pollfd p{c, POLLIN, 0};
          if (::poll(&p, 1, 20) > 0 && ::recv(c, tmp, sizeof(tmp), 0) <= 0) break;  // the client closed
        }
      }
    }
    ::close(c);
  }

  handler handler_;
  int fd_ = -1;
  std::uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  std::vector<std::thread> conns_;  // only the acceptor adds; joined after it
  std::mutex mu_;
  std::vector<request> log_;
};

/// A port with nothing listening on it (bound, then closed).
std::uint16_t dead_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0);
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
  ::close(fd);
  return ntohs(a.sin_port);
}

status open_at(const std::string& endpoint, std::unique_ptr<registry>& r, ms timeout = 2000ms, std::string token = {}) {
  registry_options o;
  o.endpoint = endpoint;
  o.token = std::move(token);
  o.request_timeout_ns = static_cast<std::uint64_t>(timeout.count()) * 1'000'000ull;
  return registry::open(o, r);
}

bool contains(std::string_view hay, std::string_view needle) { return hay.find(needle) != std::string_view::npos; }

}  // namespace

TEST_CASE("etcd wire: open refuses what is not an etcd gateway, with a status that says so") {
  struct row {
    const char* what;
    std::string answer;
    status expect;
    const char* message;
  };
  const std::vector<row> rows = {
      {"plain text", ok("hello"), status::invalid_handle, "malformed answer"},
      {"JSON array", ok("[1,2]"), status::invalid_handle, "malformed answer"},
      {"no header", ok(R"({"version":"3.4"})"), status::invalid_handle, "malformed answer"},
      {"not HTTP", "SSH-2.0-OpenSSH_9.2\r\n", status::invalid_handle, "not HTTP"},
      {"HTTP 404", reply(404, "404 page not found"), status::unsupported, "etcd 3.4 or later"},
      {"HTTP 500", reply(500, "boom"), status::peer_unreachable, "HTTP 500"},
      {"HTTP 401", reply(401, "go away"), status::permission_denied, "HTTP 401"},
  };
  for (const row& r : rows) {
    INFO(std::string(r.what));
    fake_etcd fake([&](const request&) { return fake_reply{r.answer}; });
    std::unique_ptr<registry> reg;
    CHECK(open_at(fake.endpoint(), reg) == r.expect);
    CHECK(contains(last_error(), r.message));
    CHECK(contains(last_error(), "etcd 127.0.0.1:"));
    CHECK(reg == nullptr);
  }
}

TEST_CASE("etcd wire: an unreachable or silent etcd is peer_unreachable within the request timeout") {
  std::unique_ptr<registry> reg;
  auto t0 = std::chrono::steady_clock::now();
  CHECK(open_at("etcd://127.0.0.1:" + std::to_string(dead_port()), reg) == status::peer_unreachable);
  CHECK(contains(last_error(), "cannot connect"));
  CHECK(since(t0) < 1000ms);

  // Accepts, reads the request, never answers.
  fake_etcd silent([](const request&) { return fake_reply{{}, true}; });
  t0 = std::chrono::steady_clock::now();
  CHECK(open_at(silent.endpoint(), reg, 300ms) == status::peer_unreachable);
  const ms waited = since(t0);
  MESSAGE("silent etcd, 300 ms timeout: open returned after ", waited.count(), " ms");
  CHECK(waited >= 250ms);
  CHECK(waited < 1500ms);
  CHECK(contains(last_error(), "no answer within 300 ms"));
}

TEST_CASE("etcd wire: malformed or oversized records are invalid_handle, never trusted") {
  std::string answer;
  fake_etcd fake([&](const request& r) { return fake_reply{r.path == "/v3/maintenance/status" ? kStatus : answer}; });
  std::unique_ptr<registry> reg;
  REQUIRE_OK(open_at(fake.endpoint(), reg));
  const std::string key = "/svc/a";
  const std::string kv_tail = R"(,"create_revision":"3","mod_revision":"4","value":"MQ=="}]})";
  struct row {
    const char* what;
    std::string body;
  };
  const std::vector<row> bad = {
      {"not JSON", "{\"header\":"},
      {"JSON array", "[]"},
      {"nested 1000 deep", std::string(1000, '[') + std::string(1000, ']')},
      {"nested objects 100 deep",
       [] {
         std::string s = "{";
         for (int i = 0; i < 100; ++i) s += "\"a\":{";
         return s + std::string(101, '}');
       }()},
      {"no header", R"({"kvs":[]})"},
      {"kvs not an array", "{" + header(5) + R"(,"kvs":{}})"},
      {"key not base64", "{" + header(5) + R"(,"kvs":[{"key":"!!!!")" + kv_tail},
      {"key with bad padding", "{" + header(5) + R"(,"kvs":[{"key":"L3N2Y=9h")" + kv_tail},
      {"key of the wrong length", "{" + header(5) + R"(,"kvs":[{"key":"L3N2Yy9")" + kv_tail},
      {"another key", "{" + header(5) + R"(,"kvs":[{"key":")" + b64("/svc/b") + "\"" + kv_tail},
      {"key too large",
       "{" + header(5) + R"(,"kvs":[{"key":")" + b64(std::string(kMaxKeyBytes + 1, 'k')) + "\"" + kv_tail},
      {"value too large",
       "{" + header(5) + R"(,"kvs":[)" + kv_json(key, std::string(kMaxValueBytes + 1, 'v'), 3, 4) + "]}"},
      {"revision not a number", "{" + header(5) + R"(,"kvs":[{"key":")" + b64(key) + R"(","mod_revision":"4x"}]})"},
      {"revision overflows int64",
       "{" + header(5) + R"(,"kvs":[{"key":")" + b64(key) + R"(","mod_revision":"99999999999999999999"}]})"},
      {"negative lease", "{" + header(5) + R"(,"kvs":[)" + kv_json(key, "1", 3, 4, -2) + "]}"},
      {"no mod_revision", "{" + header(5) + R"(,"kvs":[{"key":")" + b64(key) + R"("}]})"},
      {"revision as a float", "{" + header(5) + R"(,"kvs":[{"key":")" + b64(key) + R"(","mod_revision":4.5}]})"},
      {"two records for one key",
       "{" + header(5) + ",\"kvs\":[" + kv_json(key, "1", 3, 4) + "," + kv_json(key, "1", 3, 4) + "]}"},
      {"error of the wrong shape", R"({"error":17})"},
  };
  kv_record rec;
  for (const row& r : bad) {
    INFO(std::string(r.what));
    answer = ok(r.body);
    CHECK(reg->get(key, rec) == status::invalid_handle);
    CHECK(contains(last_error(), "malformed answer"));
  }
  // The same shapes done right: binary values decode exactly; int64 as strings or as numbers.
  const std::string binary("\0\x01\xfe\xff value", 10);
  answer = ok("{" + header(5) + ",\"kvs\":[" + kv_json(key, binary, 3, 4, 77) + "]}");
  REQUIRE_OK(reg->get(key, rec));
  CHECK(rec.key == key);
  CHECK(rec.value == binary);
  CHECK(rec.lease == 77);
  CHECK(rec.create_revision == 3);
  CHECK(rec.mod_revision == 4);
  answer =
      ok(R"({"header":{"revision":5},"kvs":[{"key":")" + b64(key) + R"(","create_revision":3,"mod_revision":4}]})");
  REQUIRE_OK(reg->get(key, rec));
  CHECK(rec.value.empty());  // proto3 leaves an empty value out
  CHECK(rec.mod_revision == 4);
  const std::string largest(kMaxValueBytes, 'v');
  answer = ok("{" + header(5) + ",\"kvs\":[" + kv_json(key, largest, 3, 4) + "]}");
  REQUIRE_OK(reg->get(key, rec));
  CHECK(rec.value == largest);

  // list checks order and prefix too.
  std::vector<kv_record> all;
  std::int64_t rev = 0;
  answer = ok(range_answer(9, {kv_json("/svc/b", "1", 2, 2), kv_json("/svc/a", "1", 3, 3)}));
  CHECK(reg->list("/svc/", all, rev) == status::invalid_handle);
  answer = ok(range_answer(9, {kv_json("/svc/a", "1", 2, 2), kv_json("/other", "1", 3, 3)}));
  CHECK(reg->list("/svc/", all, rev) == status::invalid_handle);
  answer = ok(range_answer(9, {kv_json("/svc/a", "1", 2, 2), kv_json("/svc/b", "2", 3, 12)}));
  CHECK(reg->list("/svc/", all, rev) == status::invalid_handle);  // newer than the store's revision
  answer = ok(R"({"header":{"revision":"9"},"kvs":[],"more":true})");
  CHECK(reg->list("/svc/", all, rev) == status::invalid_handle);
  answer = ok(range_answer(9, {kv_json("/svc/a", "1", 2, 2), kv_json("/svc/b", "2", 3, 8)}));
  REQUIRE_OK(reg->list("/svc/", all, rev));
  CHECK(rev == 9);
  REQUIRE(all.size() == 2);
  CHECK(all[1].key == "/svc/b");
  CHECK(all[1].value == "2");
  answer = ok(R"({"header":{"revision":"9"}})");  // nothing under the prefix
  REQUIRE_OK(reg->list("/svc/", all, rev));
  CHECK(all.empty());
}

TEST_CASE("etcd wire: an answer larger than the limit is refused") {
  // 64 MiB is the limit; send a little more (a valid start, so only the size can be the reason).
  const std::string body = "{" + header(5) + ",\"pad\":\"" + std::string((64u << 20) + 1024, 'x') + "\"}";
  fake_etcd fake([&](const request& r) { return fake_reply{r.path == "/v3/maintenance/status" ? kStatus : ok(body)}; });
  std::unique_ptr<registry> reg;
  REQUIRE_OK(open_at(fake.endpoint(), reg, 10'000ms));
  kv_record rec;
  CHECK(reg->get("/k", rec) == status::invalid_handle);
  CHECK(contains(last_error(), "larger than 64 MiB"));
}

TEST_CASE("etcd wire: etcd's errors and absences map to statuses") {
  std::string answer;
  fake_etcd fake([&](const request& r) { return fake_reply{r.path == "/v3/maintenance/status" ? kStatus : answer}; });
  std::unique_ptr<registry> reg;
  REQUIRE_OK(open_at(fake.endpoint(), reg));
  auto err = [](int http, int code, std::string_view msg) {
    return reply(http, fmt::format(R"({{"error":"{0}","message":"{0}","code":{1}}})", msg, code));
  };
  answer = err(404, 5, "etcdserver: requested lease not found");
  CHECK(reg->revoke_lease(42) == status::not_found);
  CHECK(contains(last_error(), "requested lease not found"));
  CHECK(reg->put("/k", "v", 42) == status::not_found);
  answer = err(401, 16, "etcdserver: invalid auth token");
  CHECK(reg->put("/k", "v", 0) == status::permission_denied);
  CHECK(contains(last_error(), "invalid auth token"));
  answer = err(400, 3, "etcdserver: user name is empty");
  CHECK(reg->put("/k", "v", 0) == status::permission_denied);
  CHECK(contains(last_error(), "auth enabled"));
  answer = err(403, 7, "etcdserver: permission denied");
  CHECK(reg->remove("/k") == status::permission_denied);
  answer = err(400, 3, "etcdserver: request is too large");
  CHECK(reg->put("/k", "v", 0) == status::invalid_argument);
  answer = err(503, 14, "etcdserver: no leader");
  CHECK(reg->put("/k", "v", 0) == status::peer_unreachable);
  answer = err(500, 8, "etcdserver: mvcc: database space exceeded");
  CHECK(reg->put("/k", "v", 0) == status::no_resource);
  answer = reply(502, "<html>bad gateway</html>");
  CHECK(reg->put("/k", "v", 0) == status::peer_unreachable);
  CHECK(contains(last_error(), "HTTP 502"));
  answer = reply(418, "teapot");
  CHECK(reg->put("/k", "v", 0) == status::invalid_handle);
  // A stream-style error object.
  answer = ok(R"({"error":{"grpc_code":5,"http_code":404,"message":"etcdserver: requested lease not found"}})");
  CHECK(reg->keep_alive(42) == status::not_found);

  // Absences: keep-alive of an ended lease answers TTL 0 (left out) or -1.
  answer = ok(R"({"result":{)" + header(5) + R"(,"ID":"42"}})");
  CHECK(reg->keep_alive(42) == status::not_found);
  CHECK(contains(last_error(), "lease 42 has ended"));
  answer = ok(R"({"result":{)" + header(5) + R"(,"ID":"42","TTL":"-1"}})");
  CHECK(reg->keep_alive(42) == status::not_found);
  answer = ok(R"({"result":{)" + header(5) + R"(,"ID":"42","TTL":"7"}})");
  CHECK(reg->keep_alive(42) == status::ok);
  answer = ok(R"({"result":{)" + header(5) + R"(,"ID":"43","TTL":"7"}})");
  CHECK(reg->keep_alive(42) == status::invalid_handle);
  answer = ok("{" + header(5) + "}");
  CHECK(reg->remove("/k") == status::not_found);
  kv_record rec;
  CHECK(reg->get("/k", rec) == status::not_found);
  answer = ok("{" + header(5) + R"(,"deleted":"1"})");
  CHECK(reg->remove("/k") == status::ok);
  answer = ok("{" + header(5) + R"(,"deleted":"2"})");
  CHECK(reg->remove("/k") == status::invalid_handle);
  std::int64_t lease = 0;
  answer = ok("{" + header(5) + R"(,"ID":"0","TTL":"5"})");
  CHECK(reg->grant_lease(5, lease) == status::invalid_handle);
  answer = ok("{" + header(5) + R"(,"ID":"7587","TTL":"5"})");
  REQUIRE_OK(reg->grant_lease(5, lease));
  CHECK(lease == 7587);
}

TEST_CASE("etcd wire: requests carry the token, base64 keys and values, and etcd's compare for CAS") {
  std::string answer;
  fake_etcd fake([&](const request& r) { return fake_reply{r.path == "/v3/maintenance/status" ? kStatus : answer}; });
  std::unique_ptr<registry> reg;
  REQUIRE_OK(open_at(fake.endpoint(), reg, 2000ms, "s3cret.token"));
  const std::string key("/bin\0key", 8), value("\xff\x00v", 3);
  answer = ok("{" + header(6) + "}");
  REQUIRE_OK(reg->put(key, value, 1234));
  auto last = fake.requests().back();
  CHECK(last.path == "/v3/kv/put");
  CHECK(contains(last.headers, "Authorization: s3cret.token"));
  CHECK(contains(last.headers, "Content-Type: application/json"));
  CHECK(contains(last.body, "\"key\":\"" + b64(key) + "\""));
  CHECK(contains(last.body, "\"value\":\"" + b64(value) + "\""));
  CHECK(contains(last.body, "\"lease\":\"1234\""));

  bool swapped = true;
  answer = ok("{" + header(6) + "}");  // compare failed: succeeded left out
  REQUIRE_OK(reg->compare_and_swap(key, 0, value, 0, swapped));
  CHECK_FALSE(swapped);
  last = fake.requests().back();
  CHECK(last.path == "/v3/kv/txn");
  CHECK(contains(last.body, "\"target\":\"CREATE\""));
  CHECK(contains(last.body, "\"create_revision\":\"0\""));
  CHECK_FALSE(contains(last.body, "\"lease\""));
  answer = ok("{" + header(7) + R"(,"succeeded":true})");
  REQUIRE_OK(reg->compare_and_swap(key, 6, value, 9, swapped));
  CHECK(swapped);
  last = fake.requests().back();
  CHECK(contains(last.body, "\"target\":\"MOD\""));
  CHECK(contains(last.body, "\"mod_revision\":\"6\""));
  CHECK(contains(last.body, "\"lease\":\"9\""));

  std::vector<kv_record> all;
  std::int64_t rev = 0;
  answer = ok(range_answer(7, {}));
  REQUIRE_OK(reg->list("/a\xff\xff", all, rev));
  last = fake.requests().back();
  CHECK(contains(last.body, "\"range_end\":\"" + b64("/b") + "\""));  // trailing 0xff bytes roll over
  REQUIRE_OK(reg->list("", all, rev));
  last = fake.requests().back();
  CHECK(contains(last.body, "\"key\":\"AA==\""));  // the whole key space: "\0" .. "\0"
  CHECK(contains(last.body, "\"range_end\":\"AA==\""));
}

TEST_CASE("etcd wire: bad arguments are refused before anything is sent") {
  fake_etcd fake([](const request&) { return fake_reply{kStatus}; });
  std::unique_ptr<registry> reg;
  REQUIRE_OK(open_at(fake.endpoint(), reg));
  const std::size_t before = fake.requests().size();
  std::int64_t lease = 0;
  bool swapped = false;
  std::unique_ptr<watch> w;
  CHECK(reg->grant_lease(0, lease) == status::invalid_argument);
  CHECK(reg->grant_lease(3601, lease) == status::invalid_argument);
  CHECK(reg->keep_alive(0) == status::invalid_argument);
  CHECK(reg->revoke_lease(-1) == status::invalid_argument);
  CHECK(reg->put("/k", "v", -5) == status::invalid_argument);
  CHECK(reg->compare_and_swap("/k", -1, "v", 0, swapped) == status::invalid_argument);
  CHECK(reg->watch_prefix(
            "/k", -1, [](const watch_event&) {}, w) == status::invalid_argument);
  CHECK(reg->watch_prefix("/k", 0, nullptr, w) == status::invalid_argument);
  CHECK(fake.requests().size() == before);
  registry_options o;
  o.endpoint = fake.endpoint();
  o.request_timeout_ns = 0;
  CHECK(registry::open(o, reg) == status::invalid_argument);
  o.request_timeout_ns = 1'000'000'000;
  o.token = "a\r\nX-Injected: 1";
  CHECK(registry::open(o, reg) == status::invalid_argument);
  o.token.clear();
  o.endpoint = "etcd://user@elsewhere:2379";  // would name another host in the URL
  CHECK(registry::open(o, reg) == status::invalid_argument);
  o.endpoint = "etcd://host/path:2379";
  CHECK(registry::open(o, reg) == status::invalid_argument);
}

TEST_CASE("etcd wire: a watch resynchronises after a truncated stream: put for new keys, expire for gone ones") {
  std::atomic<int> watches{0};
  std::string second_body;
  fake_etcd fake([&](const request& r) -> fake_reply {
    if (r.path == "/v3/maintenance/status") return {kStatus};
    if (r.path == "/v3/kv/range") {
      if (contains(r.body, "\"revision\"")) return {ok(range_answer(4, {}))};  // the seed at after_revision
      return {ok(range_answer(9, {kv_json("/p/a", "1", 5, 5), kv_json("/p/c", "3", 8, 8)}))};
    }
    if (r.path == "/v3/watch" && watches++ == 0) {
      // Two events, then half a line and the connection drops (no last chunk).
      return {kChunkedHead + chunk(kCreated) + chunk(events_line(5, {put_event("/p/a", "1", 5, 5)})) +
              chunk(events_line(6, {put_event("/p/b", "2", 6, 6, 7)})) + chunk(R"({"result":{"hea)")};
    }
    if (r.path == "/v3/watch") {
      second_body = r.body;
      return {kChunkedHead + chunk(kCreated) + chunk(events_line(10, {delete_event("/p/a", 10, 7)})) +
                  chunk(events_line(11, {delete_event("/p/c", 11, 0)})),
              true};
    }
    return {reply(404, "")};
  });
  std::unique_ptr<registry> reg;
  REQUIRE_OK(open_at(fake.endpoint(), reg));
  collector c;
  std::unique_ptr<watch> w;
  REQUIRE_OK(reg->watch_prefix("/p/", 4, c.fn(), w));
  REQUIRE(c.wait_size(6));
  std::this_thread::sleep_for(100ms);
  const auto ev = c.snapshot();
  INFO(describe(ev));
  REQUIRE(ev.size() == 6);
  CHECK((ev[0].type == watch_event_type::put && ev[0].record.key == "/p/a" && ev[0].record.mod_revision == 5));
  CHECK((ev[1].type == watch_event_type::put && ev[1].record.key == "/p/b" && ev[1].record.lease == 7));
  CHECK(ev[1].record.value == "2");
  // Resynchronisation at revision 9: c is new, b vanished while we were away.
  CHECK((ev[2].type == watch_event_type::put && ev[2].record.key == "/p/c" && ev[2].record.mod_revision == 8));
  CHECK(ev[2].record.value == "3");
  CHECK((ev[3].type == watch_event_type::expire && ev[3].record.key == "/p/b" && ev[3].record.mod_revision == 9));
  // Then the stream from revision 10: a leased key's delete is expire, a plain one remove.
  CHECK((ev[4].type == watch_event_type::expire && ev[4].record.key == "/p/a" && ev[4].record.mod_revision == 10));
  CHECK((ev[5].type == watch_event_type::remove && ev[5].record.key == "/p/c" && ev[5].record.mod_revision == 11));
  CHECK(contains(second_body, "\"start_revision\":\"10\""));
  CHECK(contains(second_body, "\"prev_kv\":true"));
  w->cancel();
}

TEST_CASE("etcd wire: malformed watch lines end the stream and resynchronise; no bad event is delivered") {
  const std::vector<std::string> bad_lines = {
      "this is not JSON\n",
      events_line(12, {R"({"kv":{"key":"!!!!","create_revision":"12","mod_revision":"12"}})"}),
      events_line(12, {put_event("/elsewhere", "1", 12, 12)}),
      events_line(12, {put_event("/p/big", std::string(kMaxValueBytes + 1, 'v'), 12, 12)}),
      events_line(12, {R"({"type":"BOGUS","kv":)" + kv_json("/p/x", "1", 12, 12) + "}"}),
      events_line(12, {R"({"kv":{"key":")" + b64("/p/x") + R"(","mod_revision":"12"}})"}),  // put without create
      R"({"result":{"created":"yes"}})"
      "\n",
      std::string(5000, '[') + "\n",
      R"({"error":{"grpc_code":"x"}})"
      "\n",
      events_line(13, {put_event("/p/x", "1", 13, 13), put_event("/p/y", "1", 12, 12)}),  // out of order
  };
  std::atomic<int> watches{0};
  fake_etcd fake([&](const request& r) -> fake_reply {
    if (r.path == "/v3/maintenance/status") return {kStatus};
    if (r.path == "/v3/kv/range") return {ok(range_answer(9, {kv_json("/p/a", "1", 5, 5)}))};
    const auto n = static_cast<std::size_t>(watches++);
    if (n < bad_lines.size()) return {kChunkedHead + chunk(kCreated) + chunk(bad_lines[n]), true};
    return {kChunkedHead + chunk(kCreated) + chunk(events_line(20, {put_event("/p/z", "ok", 20, 20)})), true};
  });
  std::unique_ptr<registry> reg;
  REQUIRE_OK(open_at(fake.endpoint(), reg));
  collector c;
  std::unique_ptr<watch> w;
  REQUIRE_OK(reg->watch_prefix("/p/", 0, c.fn(), w));
  REQUIRE(c.wait_size(2, 10s));
  std::this_thread::sleep_for(100ms);
  const auto ev = c.snapshot();
  INFO(describe(ev));
  REQUIRE(ev.size() == 2);
  CHECK((ev[0].type == watch_event_type::put && ev[0].record.key == "/p/a"));  // the first resynchronisation
  CHECK((ev[1].type == watch_event_type::put && ev[1].record.key == "/p/z" && ev[1].record.value == "ok"));
  CHECK(watches.load() == static_cast<int>(bad_lines.size()) + 1);
  CHECK(fake.count("/v3/kv/range") == static_cast<int>(bad_lines.size()));
}

TEST_CASE("etcd wire: events at or before the last delivered revision are not delivered again") {
  std::atomic<int> watches{0};
  std::string second_body;
  fake_etcd fake([&](const request& r) -> fake_reply {
    if (r.path == "/v3/maintenance/status") return {kStatus};
    if (r.path == "/v3/kv/range") return {ok(range_answer(6, {kv_json("/p/a", "6", 5, 6)}))};
    if (watches++ == 0)  // ends cleanly after two events
      return {kChunkedHead + chunk(kCreated) + chunk(events_line(5, {put_event("/p/a", "5", 5, 5)})) +
              chunk(events_line(6, {put_event("/p/a", "6", 5, 6)})) + kLastChunk};
    second_body = r.body;
    // A confused server repeats revision 6; revision 8 is one transaction of two keys.
    return {kChunkedHead + chunk(kCreated) + chunk(events_line(6, {put_event("/p/a", "6", 5, 6)})) +
                chunk(events_line(7, {put_event("/p/a", "7", 5, 7)})) +
                chunk(events_line(8, {put_event("/p/b", "8", 8, 8), put_event("/p/c", "8", 8, 8)})),
            true};
  });
  std::unique_ptr<registry> reg;
  REQUIRE_OK(open_at(fake.endpoint(), reg));
  collector c;
  std::unique_ptr<watch> w;
  REQUIRE_OK(reg->watch_prefix("/p/", 0, c.fn(), w));
  REQUIRE(c.wait_size(5));
  std::this_thread::sleep_for(100ms);
  const auto ev = c.snapshot();
  INFO(describe(ev));
  REQUIRE(ev.size() == 5);
  const std::vector<std::pair<std::string, std::int64_t>> expect = {
      {"/p/a", 5}, {"/p/a", 6}, {"/p/a", 7}, {"/p/b", 8}, {"/p/c", 8}};
  for (std::size_t i = 0; i < expect.size(); ++i) {
    CHECK(ev[i].type == watch_event_type::put);
    CHECK(ev[i].record.key == expect[i].first);
    CHECK(ev[i].record.mod_revision == expect[i].second);
  }
  CHECK(contains(second_body, "\"start_revision\":\"7\""));
}

TEST_CASE("etcd wire: a watch that cannot start returns why") {
  struct row {
    const char* what;
    std::string head;
    bool hold;
    status expect;
    const char* message;
  };
  const std::vector<row> rows = {
      {"refused by auth",
       kChunkedHead +
           chunk(R"({"result":{"header":{},"watch_id":"-1","created":true,"canceled":true,)"
                 R"("cancel_reason":"rpc error: code = PermissionDenied desc = etcdserver: permission denied"}})"
                 "\n"),
       true, status::permission_denied, "permission denied"},
      {"bad token", reply(401, R"({"error":"etcdserver: invalid auth token","code":16})"), false,
       status::permission_denied, "invalid auth token"},
      {"HTTP 500", reply(500, "boom"), false, status::peer_unreachable, "HTTP 500"},
      {"not HTTP", "garbage\r\n\r\n", false, status::invalid_handle, "not HTTP"},
      {"never created", kChunkedHead, true, status::peer_unreachable, "not created within 300 ms"},
      {"closed at once", "", false, status::peer_unreachable, "connection failed"},
  };
  for (const row& r : rows) {
    INFO(std::string(r.what));
    fake_etcd fake([&](const request& q) -> fake_reply {
      if (q.path == "/v3/maintenance/status") return {kStatus};
      return {r.head, r.hold};
    });
    std::unique_ptr<registry> reg;
    REQUIRE_OK(open_at(fake.endpoint(), reg, 300ms));
    std::unique_ptr<watch> w;
    const auto t0 = std::chrono::steady_clock::now();
    CHECK(reg->watch_prefix(
              "/p/", 0, [](const watch_event&) {}, w) == r.expect);
    CHECK(contains(last_error(), r.message));
    CHECK(w == nullptr);
    CHECK(since(t0) < 2000ms);
  }
}

TEST_CASE("etcd wire: cancel ends a blocked watch at once, and no callback runs after it returns") {
  SUBCASE("a stream with nothing to say") {
    fake_etcd fake([](const request& r) -> fake_reply {
      if (r.path == "/v3/maintenance/status") return {kStatus};
      return {kChunkedHead + chunk(kCreated), true};
    });
    std::unique_ptr<registry> reg;
    REQUIRE_OK(open_at(fake.endpoint(), reg, 10'000ms));
    std::unique_ptr<watch> w;
    REQUIRE_OK(reg->watch_prefix(
        "/p/", 0, [](const watch_event&) {}, w));
    std::this_thread::sleep_for(150ms);
    const auto t0 = std::chrono::steady_clock::now();
    w->cancel();
    const ms took = since(t0);
    MESSAGE("cancel of an idle stream took ", took.count(), " ms");
    CHECK(took < 100ms);
  }
  SUBCASE("a resynchronisation read that gets no answer") {
    fake_etcd fake([](const request& r) -> fake_reply {
      if (r.path == "/v3/maintenance/status") return {kStatus};
      if (r.path == "/v3/kv/range") return {{}, true};       // never answers (10 s timeout)
      return {kChunkedHead + chunk(kCreated) + kLastChunk};  // created, then ends
    });
    std::unique_ptr<registry> reg;
    REQUIRE_OK(open_at(fake.endpoint(), reg, 10'000ms));
    std::unique_ptr<watch> w;
    REQUIRE_OK(reg->watch_prefix(
        "/p/", 0, [](const watch_event&) {}, w));
    REQUIRE(fake.wait_count("/v3/kv/range", 1));
    std::this_thread::sleep_for(50ms);
    const auto t0 = std::chrono::steady_clock::now();
    w.reset();  // the destructor cancels too
    const ms took = since(t0);
    MESSAGE("cancel during a blocked resynchronisation took ", took.count(), " ms");
    CHECK(took < 100ms);
  }
  SUBCASE("a stream that never stops talking") {
    fake_etcd fake([](const request& r) -> fake_reply {
      if (r.path == "/v3/maintenance/status") return {kStatus};
      return {kChunkedHead + chunk(kCreated), true,
              [](int i) { return chunk(events_line(10 + i, {put_event("/p/k", std::to_string(i), 10, 10 + i)})); }};
    });
    std::unique_ptr<registry> reg;
    REQUIRE_OK(open_at(fake.endpoint(), reg, 10'000ms));
    std::atomic<int> seen{0};
    std::atomic<bool> in_order{true};
    std::unique_ptr<watch> w;
    REQUIRE_OK(reg->watch_prefix(
        "/p/", 0,
        [&](const watch_event& e) {
          if (e.record.mod_revision != 10 + seen.load()) in_order = false;
          ++seen;
        },
        w));
    for (int i = 0; i < 400 && seen.load() < 50; ++i) std::this_thread::sleep_for(5ms);
    REQUIRE(seen.load() >= 50);
    w->cancel();
    const int at_cancel = seen.load();
    std::this_thread::sleep_for(200ms);
    CHECK(seen.load() == at_cancel);
    CHECK(in_order.load());
  }
}

TEST_CASE("etcd wire: a callback may cancel or destroy its own watch") {
  std::atomic<bool> go{false};
  fake_etcd fake([&](const request& r) -> fake_reply {
    if (r.path == "/v3/maintenance/status") return {kStatus};
    // Blank lines (skipped) until the test has its watch object, then an event every millisecond.
    return {kChunkedHead + chunk(kCreated), true, [&, n = 0](int) mutable {
              if (!go.load()) return chunk("\n");
              ++n;
              return chunk(events_line(10 + n, {put_event("/p/k", "v", 10, 10 + n)}));
            }};
  });
  std::unique_ptr<registry> reg;
  REQUIRE_OK(open_at(fake.endpoint(), reg, 10'000ms));

  SUBCASE("cancel from the callback") {
    std::atomic<int> seen{0};
    std::unique_ptr<watch> w;
    watch* self = nullptr;
    REQUIRE_OK(reg->watch_prefix(
        "/p/", 0,
        [&](const watch_event&) {
          if (++seen == 5) self->cancel();
        },
        w));
    self = w.get();
    go = true;
    for (int i = 0; i < 400 && seen.load() < 5; ++i) std::this_thread::sleep_for(5ms);
    std::this_thread::sleep_for(200ms);
    CHECK(seen.load() == 5);
    w->cancel();  // and again from outside: joins the finished thread
  }
  SUBCASE("destroy from the callback") {
    std::atomic<int> seen{0};
    std::atomic<bool> destroyed{false};
    std::unique_ptr<watch> w;
    REQUIRE_OK(reg->watch_prefix(
        "/p/", 0,
        [&](const watch_event&) {
          if (++seen == 5) {
            w.reset();
            destroyed = true;
          }
        },
        w));
    go = true;
    for (int i = 0; i < 400 && !destroyed.load(); ++i) std::this_thread::sleep_for(5ms);
    REQUIRE(destroyed.load());
    std::this_thread::sleep_for(200ms);
    CHECK(seen.load() == 5);
  }
}
