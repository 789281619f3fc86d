// etcd v3 backend: etcd's JSON gateway (grpc-gateway under /v3/, etcd 3.4+) over HTTP/1.1 with libcurl.
//
// Wire facts this file relies on (checked against etcd 3.4.23):
//   - bytes fields (keys, values) are standard base64 with padding; int64 fields are JSON strings;
//     proto3 leaves out zero, false and empty fields;
//   - a failed call answers a non-200 HTTP status and {"error","message","code"} (a gRPC code);
//   - streaming calls (watch, lease keepalive) answer one {"result":...} or {"error":...} per line;
//   - a watch created on a compacted revision answers created, then canceled with compact_revision;
//     a refused watch answers created and canceled with a cancel_reason.
//
// etcd does not say why a key was deleted. A DELETE whose previous value had a lease is reported as
// `expire` (lease expired or revoked — or a client deleted a leased key: etcd cannot tell these apart),
// any other DELETE as `remove` (also a leased key's, when etcd no longer has its previous value).
//
// A watch runs on its own thread through a curl multi handle, so that cancel() wakes it at once.
// When its stream breaks (etcd restarted, connection lost, history compacted, a malformed line) it
// reconnects with backoff (50 ms doubling to 1 s) and resynchronises: it lists the prefix, delivers
// put for keys that are new or changed since what it delivered (seeded with the state at the
// caller's after_revision), expire for keys that are gone, and watches on from the list's revision.
//
// etcd rounds a lease's TTL up to its minimum, ceil(1.5 × election timeout) — 2 s with etcd's default
// 1 s election timeout — so a 1 s lease lives 2 s there.

#include <curl/curl.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <nlohmann/json.hpp>
#include <thread>
#include <utility>
#include <vector>

#include "log.hpp"
#include "registry/backends.hpp"

namespace eaas::detail {

namespace {

using json = nlohmann::json;
using steady = std::chrono::steady_clock;

/// No answer, and no line of a watch stream, is larger: a bigger one is treated as corrupt.
constexpr std::size_t kMaxAnswerBytes = 64u << 20;
/// Deeper JSON than this is not an etcd answer (and would cost stack and memory to build).
constexpr int kMaxJsonDepth = 32;
constexpr std::size_t kMaxPooledHandles = 8;
constexpr auto kMinBackoff = std::chrono::milliseconds(50);
constexpr auto kMaxBackoff = std::chrono::milliseconds(1000);
/// How long the watch thread sleeps in curl_multi_poll between checks (cancel also wakes it at once).
constexpr int kPollMs = 100;

// ------------------------------------------------------------------------------------------------
// Encodings
// ------------------------------------------------------------------------------------------------

constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string b64_encode(std::string_view in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    const std::uint32_t w = static_cast<std::uint32_t>(static_cast<unsigned char>(in[i])) << 16 |
                            static_cast<std::uint32_t>(static_cast<unsigned char>(in[i + 1])) << 8 |
                            static_cast<unsigned char>(in[i + 2]);
    out.push_back(kB64[(w >> 18) & 63]);
    out.push_back(kB64[(w >> 12) & 63]);
    out.push_back(kB64[(w >> 6) & 63]);
    out.push_back(kB64[w & 63]);
  }
  if (const std::size_t rest = in.size() - i; rest > 0) {
    std::uint32_t w = static_cast<std::uint32_t>(static_cast<unsigned char>(in[i])) << 16;
    if (rest == 2) w |= static_cast<std::uint32_t>(static_cast<unsigned char>(in[i + 1])) << 8;
    out.push_back(kB64[(w >> 18) & 63]);
    out.push_back(kB64[(w >> 12) & 63]);
    out.push_back(rest == 2 ? kB64[(w >> 6) & 63] : '=');
    out.push_back('=');
  }
  return out;
}

int b64_value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

/// Strict standard base64 with padding (what Go's encoding/json writes for []byte); false for
/// anything else or for more than `max_bytes` decoded bytes.
bool b64_decode(std::string_view in, std::size_t max_bytes, std::string& out) {
  out.clear();
  if (in.size() % 4 != 0) return false;
  std::size_t pad = 0;
  if (!in.empty() && in.back() == '=') pad = in[in.size() - 2] == '=' ? 2 : 1;
  if (in.size() / 4 * 3 - pad > max_bytes) return false;
  out.reserve(in.size() / 4 * 3 - pad);
  for (std::size_t i = 0; i < in.size(); i += 4) {
    const bool last = i + 4 == in.size();
    std::uint32_t w = 0;
    for (std::size_t j = 0; j < 4; ++j) {
      int v = 0;
      if (!(last && j >= 4 - pad)) {
        v = b64_value(in[i + j]);
        if (v < 0) return false;
      }
      w = w << 6 | static_cast<std::uint32_t>(v);
    }
    out.push_back(static_cast<char>(w >> 16));
    if (!last || pad < 2) out.push_back(static_cast<char>((w >> 8) & 0xff));
    if (!last || pad < 1) out.push_back(static_cast<char>(w & 0xff));
  }
  return true;
}

/// A key or message as it may appear in a log line: printable ASCII, at most `max` characters.
std::string printable(std::string_view s, std::size_t max = 80) {
  std::string out;
  for (const char c : s.substr(0, max)) out.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  if (s.size() > max) out += "...";
  return out;
}

/// The first key after every key that starts with `prefix` (etcd's prefix range end); "\0" (to the
/// end of the key space) for an empty prefix or one made only of 0xff bytes.
std::string prefix_end(std::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    if (static_cast<unsigned char>(end.back()) < 0xff) {
      end.back() = static_cast<char>(static_cast<unsigned char>(end.back()) + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');
}

// ------------------------------------------------------------------------------------------------
// JSON, read without exceptions
// ------------------------------------------------------------------------------------------------

struct too_deep {};

/// One JSON object, or false (not JSON, not an object, nested deeper than kMaxJsonDepth).
bool parse_object(std::string_view text, json& out) {
  try {
    out = json::parse(
        text,
        [](int depth, json::parse_event_t, json&) {
          if (depth > kMaxJsonDepth) throw too_deep{};
          return true;
        },
        /*allow_exceptions=*/false);
  } catch (const std::bad_alloc&) {
    throw;
  } catch (...) {
    return false;
  }
  return out.is_object();
}

/// An int64 field: etcd writes them as strings; a number is accepted too. Absent means 0.
bool get_i64(const json& obj, const char* name, std::int64_t& out) {
  out = 0;
  const auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return true;
  if (it->is_number_unsigned()) {
    const auto v = it->get<std::uint64_t>();
    if (v > static_cast<std::uint64_t>(INT64_MAX)) return false;
    out = static_cast<std::int64_t>(v);
    return true;
  }
  if (it->is_number_integer()) {
    out = it->get<std::int64_t>();
    return true;
  }
  if (!it->is_string()) return false;
  const auto& s = it->get_ref<const std::string&>();
  const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return !s.empty() && ec == std::errc() && p == s.data() + s.size();
}

bool get_bool(const json& obj, const char* name, bool& out) {
  out = false;
  const auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return true;
  if (!it->is_boolean()) return false;
  out = it->get<bool>();
  return true;
}

bool get_string(const json& obj, const char* name, std::string& out) {
  out.clear();
  const auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return true;
  if (!it->is_string()) return false;
  out = it->get_ref<const std::string&>();
  return true;
}

/// A bytes field (base64), at most `max` decoded bytes. Absent means empty.
bool get_bytes(const json& obj, const char* name, std::size_t max, std::string& out) {
  out.clear();
  const auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return true;
  return it->is_string() && b64_decode(it->get_ref<const std::string&>(), max, out);
}

/// A sub-object: `out` null when absent; false when present but not an object.
bool get_object(const json& obj, const char* name, const json*& out) {
  out = nullptr;
  const auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return true;
  if (!it->is_object()) return false;
  out = &*it;
  return true;
}

/// An array field: `out` null when absent; false when present but not an array.
bool get_array(const json& obj, const char* name, const json*& out) {
  out = nullptr;
  const auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return true;
  if (!it->is_array()) return false;
  out = &*it;
  return true;
}

/// mvccpb.KeyValue. DELETE events carry only the key and mod_revision.
bool read_kv(const json& j, kv_record& out) {
  if (!j.is_object()) return false;
  if (!get_bytes(j, "key", kMaxKeyBytes, out.key) || out.key.empty()) return false;
  if (!get_bytes(j, "value", kMaxValueBytes, out.value)) return false;
  if (!get_i64(j, "lease", out.lease) || !get_i64(j, "create_revision", out.create_revision) ||
      !get_i64(j, "mod_revision", out.mod_revision))
    return false;
  return out.lease >= 0 && out.create_revision >= 0 && out.mod_revision > 0;
}

/// The store revision in an answer's header (required, positive).
bool read_header_revision(const json& answer, std::int64_t& revision) {
  const json* header = nullptr;
  if (!get_object(answer, "header", header) || header == nullptr) return false;
  return get_i64(*header, "revision", revision) && revision > 0;
}

// ------------------------------------------------------------------------------------------------
// HTTP
// ------------------------------------------------------------------------------------------------

/// Where etcd is and how every request to it is made; shared (read-only) by the client and its watches.
struct etcd_target {
  std::string where;     ///< "etcd 127.0.0.1:2379", the start of every message
  std::string base_url;  ///< "http://127.0.0.1:2379"
  long timeout_ms = 0;
  curl_slist* headers = nullptr;

  etcd_target() = default;
  etcd_target(const etcd_target&) = delete;
  etcd_target& operator=(const etcd_target&) = delete;
  ~etcd_target() { curl_slist_free_all(headers); }
};

struct curl_easy_deleter {
  void operator()(CURL* h) const noexcept { curl_easy_cleanup(h); }
};
using easy_ptr = std::unique_ptr<CURL, curl_easy_deleter>;

struct answer_buffer {
  std::string body;
  bool overflow = false;
};

std::size_t collect(char* data, std::size_t, std::size_t n, void* user) {
  auto* b = static_cast<answer_buffer*>(user);
  if (n > kMaxAnswerBytes - b->body.size()) {
    b->overflow = true;
    return 0;  // aborts the transfer (CURLE_WRITE_ERROR)
  }
  try {
    b->body.append(data, n);
  } catch (...) {
    b->overflow = true;
    return 0;
  }
  return n;
}

status init_curl() {
  static std::once_flag once;
  static CURLcode rc = CURLE_OK;
  std::call_once(once, [] { rc = curl_global_init(CURL_GLOBAL_DEFAULT); });
  if (rc != CURLE_OK)
    return EAAS_FAIL(status::internal_error, "etcd: curl_global_init failed: {}", curl_easy_strerror(rc));
  return status::ok;
}

/// Options every request shares: a POST of `body` (which must outlive the transfer) to `path`.
void set_request(CURL* h, const etcd_target& t, const std::string& url, const std::string& body, char* errbuf) {
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(h, CURLOPT_POST, 1L);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, body.data());
  curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, t.headers);
  curl_easy_setopt(h, CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_1_1));
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);  // threads: no SIGALRM for timeouts
  curl_easy_setopt(h, CURLOPT_PROXY, "");     // never through an http_proxy from the environment
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, t.timeout_ms);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
#if LIBCURL_VERSION_NUM >= 0x075500
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http");
#else
  curl_easy_setopt(h, CURLOPT_PROTOCOLS, static_cast<long>(CURLPROTO_HTTP));
#endif
  errbuf[0] = '\0';
}

/// An etcd error ({"error","message","code"}, or a watch's cancel_reason) as a status.
status grpc_failure(const etcd_target& t, std::string_view op, std::int64_t code, std::string_view message) {
  const std::string msg = printable(message, 200);
  const bool auth_message = message.find("user name is empty") != std::string_view::npos ||
                            message.find("invalid auth token") != std::string_view::npos ||
                            message.find("permission denied") != std::string_view::npos;
  switch (code) {
    case 5:  // NotFound
      return EAAS_FAIL(status::not_found, "{}: {}: {}", t.where, op, msg);
    case 7:   // PermissionDenied
    case 16:  // Unauthenticated
      return EAAS_FAIL(status::permission_denied, "{}: {}: {} (check registry_options::token)", t.where, op, msg);
    case 3:  // InvalidArgument: also what etcd answers a request without a token when auth is on
      if (auth_message)
        return EAAS_FAIL(status::permission_denied, "{}: {}: {} (etcd has auth enabled: set registry_options::token)",
                         t.where, op, msg);
      return EAAS_FAIL(status::invalid_argument, "{}: {}: etcd refused the request: {}", t.where, op, msg);
    case 4:   // DeadlineExceeded
    case 10:  // Aborted
    case 14:  // Unavailable (no leader, shutting down, too many requests)
      return EAAS_FAIL(status::peer_unreachable, "{}: {}: {}", t.where, op, msg);
    case 8:  // ResourceExhausted (database space exceeded)
      return EAAS_FAIL(status::no_resource, "{}: {}: {}", t.where, op, msg);
    default:
      if (auth_message) return EAAS_FAIL(status::permission_denied, "{}: {}: {}", t.where, op, msg);
      return EAAS_FAIL(status::internal_error, "{}: {}: etcd error (gRPC code {}): {}", t.where, op, code, msg);
  }
}

/// A body with an etcd error in it, as a status; ok when it is not one. Unary calls answer
/// {"error":"…","message":"…","code":N}; a stream's error line is {"error":{"grpc_code":N,"message":"…",…}}.
status error_body(const etcd_target& t, std::string_view op, const json& body, bool& is_error) {
  is_error = false;
  const auto it = body.find("error");
  if (it == body.end()) return status::ok;
  is_error = true;
  std::int64_t code = 0;
  std::string message, error;
  const bool ok = it->is_object() ? get_i64(*it, "grpc_code", code) && get_string(*it, "message", message)
                                  : get_i64(body, "code", code) && get_string(body, "message", message) &&
                                        get_string(body, "error", error);
  if (!ok)
    return EAAS_FAIL(status::invalid_handle, "{}: {}: malformed answer: an error object of the wrong shape", t.where,
                     op);
  return grpc_failure(t, op, code, message.empty() ? error : message);
}

/// An HTTP status other than 200 whose body is not an etcd error.
status http_failure(const etcd_target& t, std::string_view op, long http, std::string_view body) {
  const std::string snippet = printable(body, 100);
  if (http == 401 || http == 403)
    return EAAS_FAIL(status::permission_denied, "{}: {}: HTTP {} ({})", t.where, op, http, snippet);
  if (http == 404)
    return EAAS_FAIL(status::unsupported, "{}: {}: HTTP 404: no etcd v3 gateway there (etcd 3.4 or later serves /v3/)",
                     t.where, op);
  if (http >= 500) return EAAS_FAIL(status::peer_unreachable, "{}: {}: HTTP {} ({})", t.where, op, http, snippet);
  return EAAS_FAIL(status::invalid_handle, "{}: {}: malformed answer: HTTP {} ({})", t.where, op, http, snippet);
}

/// A transfer that did not complete, as a status.
status transfer_failure(const etcd_target& t, std::string_view op, CURLcode rc, const char* errbuf, bool overflow) {
  const char* detail = errbuf != nullptr && errbuf[0] != '\0' ? errbuf : curl_easy_strerror(rc);
  if (overflow)
    return EAAS_FAIL(status::invalid_handle, "{}: {}: malformed answer: larger than {} MiB", t.where, op,
                     kMaxAnswerBytes >> 20);
  switch (rc) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
      return EAAS_FAIL(status::peer_unreachable, "{}: {}: cannot connect ({}): is etcd running at {}?", t.where, op,
                       detail, t.base_url);
    case CURLE_OPERATION_TIMEDOUT:
      return EAAS_FAIL(status::peer_unreachable, "{}: {}: no answer within {} ms ({})", t.where, op, t.timeout_ms,
                       detail);
    case CURLE_WEIRD_SERVER_REPLY:
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_BAD_CONTENT_ENCODING:
      return EAAS_FAIL(status::invalid_handle, "{}: {}: malformed answer: not HTTP from etcd ({})", t.where, op,
                       detail);
    case CURLE_OUT_OF_MEMORY:
      return EAAS_FAIL(status::no_resource, "{}: {}: out of memory", t.where, op);
    case CURLE_ABORTED_BY_CALLBACK:
      return EAAS_FAIL(status::aborted, "{}: {}: the watch was cancelled", t.where, op);
    default:
      return EAAS_FAIL(status::peer_unreachable, "{}: {}: connection failed ({})", t.where, op, detail);
  }
}

/// Where a unary transfer runs: on the calling thread, or in a watch thread's multi handle, which
/// the watch's cancel wakes (the transfer then ends at once with CURLE_ABORTED_BY_CALLBACK).
struct transfer_runner {
  CURLM* multi = nullptr;
  const std::atomic<bool>* stop = nullptr;
};

CURLcode perform(CURL* h, const transfer_runner& run) {
  if (run.multi == nullptr) return curl_easy_perform(h);
  if (curl_multi_add_handle(run.multi, h) != CURLM_OK) return CURLE_FAILED_INIT;
  CURLcode rc = CURLE_ABORTED_BY_CALLBACK;
  int running = 1;
  while (!run.stop->load()) {
    if (curl_multi_perform(run.multi, &running) != CURLM_OK) {
      rc = CURLE_FAILED_INIT;
      break;
    }
    if (running == 0) {
      int left = 0;
      while (CURLMsg* msg = curl_multi_info_read(run.multi, &left))
        if (msg->msg == CURLMSG_DONE && msg->easy_handle == h) rc = msg->data.result;
      break;
    }
    curl_multi_poll(run.multi, nullptr, 0, kPollMs, nullptr);
  }
  curl_multi_remove_handle(run.multi, h);
  return rc;
}

/// One unary call: POSTs `request` to `path` and returns the answer object (an etcd error answer
/// becomes its status). Bounded by the target's timeout.
status http_call(CURL* h, const etcd_target& t, std::string_view op, const char* path, const json& request,
                 json& answer, const transfer_runner& run = {}) {
  const std::string body = request.dump();
  const std::string url = t.base_url + path;
  char errbuf[CURL_ERROR_SIZE];
  answer_buffer buf;
  curl_easy_reset(h);  // keeps the connection cache
  set_request(h, t, url, body, errbuf);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, t.timeout_ms);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, &collect);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &buf);
  const CURLcode rc = perform(h, run);
  if (rc != CURLE_OK) return transfer_failure(t, op, rc, errbuf, buf.overflow);
  long http = 0;
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &http);
  const bool parsed = parse_object(buf.body, answer);
  if (parsed) {
    bool is_error = false;
    if (const status s = error_body(t, op, answer, is_error); is_error) return s;
  }
  if (http != 200) return http_failure(t, op, http, buf.body);
  if (!parsed)
    return EAAS_FAIL(status::invalid_handle, "{}: {}: malformed answer: not a JSON object ({})", t.where, op,
                     printable(buf.body, 100));
  return status::ok;
}

/// Whether a handle that produced `s` may be reused: after answers etcd gave, yes; after transport
/// trouble or a malformed answer, no (its connection is closed with it).
bool reusable(status s) {
  return s == status::ok || s == status::not_found || s == status::permission_denied || s == status::invalid_argument;
}

status malformed(const etcd_target& t, std::string_view op, std::string_view what) {
  return EAAS_FAIL(status::invalid_handle, "{}: {}: malformed answer: {}", t.where, op, what);
}

/// Every key under `prefix` (at `at_revision`, 0: the latest), validated, and the header's revision.
status range_prefix(CURL* h, const etcd_target& t, std::string_view op, std::string_view prefix,
                    std::int64_t at_revision, std::vector<kv_record>& out, std::int64_t& revision,
                    const transfer_runner& run = {}) {
  json req{{"key", b64_encode(prefix.empty() ? std::string_view("\0", 1) : prefix)},
           {"range_end", b64_encode(prefix_end(prefix))}};
  if (at_revision > 0) req["revision"] = std::to_string(at_revision);
  json a;
  EAAS_CHECK(http_call(h, t, op, "/v3/kv/range", req, a, run));
  std::int64_t rev = 0;
  if (!read_header_revision(a, rev)) return malformed(t, op, "no header revision");
  const json* kvs = nullptr;
  bool more = false;
  if (!get_array(a, "kvs", kvs) || !get_bool(a, "more", more)) return malformed(t, op, "kvs or more of the wrong type");
  if (more) return malformed(t, op, "a partial range (more: true) to a range without limit");
  std::vector<kv_record> records;
  if (kvs != nullptr) {
    records.reserve(kvs->size());
    for (const json& j : *kvs) {
      kv_record r;
      if (!read_kv(j, r)) return malformed(t, op, "a key-value of the wrong shape, size or encoding");
      if (r.key.compare(0, prefix.size(), prefix) != 0) return malformed(t, op, "a key outside the prefix");
      if (!records.empty() && !(records.back().key < r.key)) return malformed(t, op, "keys out of order");
      if (r.mod_revision > rev) return malformed(t, op, "a key newer than the store");
      records.push_back(std::move(r));
    }
  }
  out = std::move(records);
  revision = rev;
  return status::ok;
}

/// Runs `f` (which returns a status); exceptions (memory, JSON) become statuses.
template <class F>
status guarded(const etcd_target& t, std::string_view op, F&& f) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "{}: {}: out of memory", t.where, op);
  } catch (const std::exception& e) {
    return EAAS_FAIL(status::internal_error, "{}: {}: {}", t.where, op, e.what());
  } catch (...) {
    return EAAS_FAIL(status::internal_error, "{}: {}: unexpected exception", t.where, op);
  }
}

// ------------------------------------------------------------------------------------------------
// Watches
// ------------------------------------------------------------------------------------------------

struct curl_multi_deleter {
  void operator()(CURLM* m) const noexcept { curl_multi_cleanup(m); }
};

/// What a watch's thread and its owner share. The thread holds a reference, so a watch destroyed
/// from inside its own callback leaves the thread a valid state to finish with.
struct watch_state {
  std::shared_ptr<const etcd_target> target;
  std::string prefix;
  std::string request;  ///< the create_request minus start_revision, built once
  std::function<void(const watch_event&)> on_event;
  std::unique_ptr<CURLM, curl_multi_deleter> multi;

  std::atomic<bool> stop{false};
  std::mutex mu;
  std::condition_variable cv;
  bool started = false;  ///< the first stream was created, or failed (`start_status`, `start_error`)
  status start_status = status::ok;
  std::string start_error;

  // Owned by the watch thread.
  bool start_reported = false;
  std::map<std::string, std::int64_t> known;  ///< key → mod_revision of what was delivered
  std::int64_t last_revision = 0;             ///< events at or before it were delivered

  void request_stop() noexcept {
    stop.store(true);
    std::lock_guard lk(mu);
    if (multi) curl_multi_wakeup(multi.get());
    cv.notify_all();
  }
  /// The first stream's outcome, with the failure's sentence (last_error() is per thread).
  void report_start(status s) noexcept {
    std::lock_guard lk(mu);
    started = true;
    start_status = s;
    try {
      if (s != status::ok) start_error = last_error();
    } catch (...) {
    }
    cv.notify_all();
  }
  transfer_runner runner() const { return {multi.get(), &stop}; }
  /// Sleeps `d` unless stopped first.
  void sleep_for(std::chrono::milliseconds d) {
    std::unique_lock lk(mu);
    cv.wait_for(lk, d, [this] { return stop.load(); });
  }
  /// Calls the callback unless stopped; false once stopped.
  bool deliver(const watch_event& ev) {
    if (stop.load()) return false;
    try {
      on_event(ev);
    } catch (...) {
      log(log_level::error, "{}: a watch callback on '{}' threw; the exception was ignored", target->where,
          printable(prefix));
    }
    if (ev.type == watch_event_type::put)
      known[ev.record.key] = ev.record.mod_revision;
    else
      known.erase(ev.record.key);
    return !stop.load();
  }
};

/// How one stream ended.
struct stream_end {
  status result = status::ok;  ///< why it ended (a failure with its message recorded)
  bool created = false;        ///< etcd created the watch
};

/// One line of a watch stream. Events are validated as a whole before any is delivered.
/// Returns false when the stream must end (`end` says why).
bool watch_line(watch_state& st, std::string_view line, stream_end& end) {
  const etcd_target& t = *st.target;
  constexpr std::string_view op = "watch";
  json j;
  if (!parse_object(line, j)) {
    end.result = malformed(t, op, fmt::format("a stream line that is not a JSON object ({})", printable(line, 100)));
    return false;
  }
  bool is_error = false;
  if (const status s = error_body(t, op, j, is_error); is_error) {
    end.result = s;
    return false;
  }
  const json* r = nullptr;
  if (!get_object(j, "result", r) || r == nullptr) {
    end.result = malformed(t, op, "a stream line without a result");
    return false;
  }
  bool created = false, canceled = false;
  std::int64_t compact = 0;
  std::string reason;
  const json* events = nullptr;
  if (!get_bool(*r, "created", created) || !get_bool(*r, "canceled", canceled) ||
      !get_i64(*r, "compact_revision", compact) || !get_string(*r, "cancel_reason", reason) ||
      !get_array(*r, "events", events) || compact < 0) {
    end.result = malformed(t, op, "a watch result with fields of the wrong type");
    return false;
  }
  if (canceled) {
    if (compact > 0) {  // the history we asked for is gone: the caller resynchronises
      end.result = EAAS_FAIL(status::peer_unreachable, "{}: watch on '{}': revision {} was compacted", t.where,
                             printable(st.prefix), compact);
    } else {
      end.result = grpc_failure(t, op, reason.find("PermissionDenied") != std::string::npos ? 7 : 2, reason);
    }
    return false;
  }
  if (created) {
    end.created = true;
    if (!st.start_reported) {  // watch_prefix returns now: etcd has the watch
      st.start_reported = true;
      st.report_start(status::ok);
    }
  }
  if (events == nullptr) return true;

  std::vector<watch_event> batch;
  batch.reserve(events->size());
  for (const json& e : *events) {
    std::string type;
    const json* kv = nullptr;
    const json* prev = nullptr;
    watch_event ev{watch_event_type::put, {}};
    if (!e.is_object() || !get_string(e, "type", type) || !get_object(e, "kv", kv) || kv == nullptr ||
        !get_object(e, "prev_kv", prev) || !read_kv(*kv, ev.record)) {
      end.result = malformed(t, op, "a watch event of the wrong shape, size or encoding");
      return false;
    }
    kv_record previous;
    if (prev != nullptr && !read_kv(*prev, previous)) {
      end.result = malformed(t, op, "a watch event's previous value of the wrong shape, size or encoding");
      return false;
    }
    if (ev.record.key.compare(0, st.prefix.size(), st.prefix) != 0) {
      end.result = malformed(t, op, "an event for a key outside the prefix");
      return false;
    }
    if (!batch.empty() && ev.record.mod_revision < batch.back().record.mod_revision) {
      end.result = malformed(t, op, "events out of revision order");
      return false;
    }
    if (type == "DELETE") {
      ev.type = previous.lease != 0 ? watch_event_type::expire : watch_event_type::remove;
      ev.record = kv_record{std::move(ev.record.key), {}, 0, 0, ev.record.mod_revision};
    } else if (type.empty() || type == "PUT") {
      if (ev.record.create_revision <= 0) {
        end.result = malformed(t, op, "a put event without a create revision");
        return false;
      }
    } else {
      end.result = malformed(t, op, fmt::format("an event of unknown type '{}'", printable(type)));
      return false;
    }
    batch.push_back(std::move(ev));
  }
  // One revision's events arrive together; those at or before the last delivered one were
  // delivered already (before a reconnect, or by a resynchronisation).
  const std::int64_t floor = st.last_revision;
  for (const watch_event& ev : batch) {
    if (ev.record.mod_revision <= floor) continue;
    st.last_revision = std::max(st.last_revision, ev.record.mod_revision);
    if (!st.deliver(ev)) return false;
  }
  return true;
}

/// Splits complete lines off `buf` and handles them; false once the stream must end.
bool watch_lines(watch_state& st, std::string& buf, stream_end& end) {
  std::size_t start = 0;
  bool go_on = true;
  while (go_on) {
    const std::size_t nl = buf.find('\n', start);
    if (nl == std::string::npos) break;
    std::string_view line(buf.data() + start, nl - start);
    start = nl + 1;
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.remove_suffix(1);
    if (!line.empty()) go_on = watch_line(st, line, end);
  }
  buf.erase(0, start);
  return go_on;
}

/// Runs one watch stream from `start_revision` until it breaks, fails or the watch is stopped.
stream_end watch_stream(watch_state& st, std::int64_t start_revision) {
  const etcd_target& t = *st.target;
  stream_end end;
  easy_ptr h(curl_easy_init());
  if (!h) {
    end.result = EAAS_FAIL(status::no_resource, "{}: watch: curl_easy_init failed", t.where);
    return end;
  }
  const std::string body = st.request + std::to_string(start_revision) + "\"}}";
  const std::string url = t.base_url + "/v3/watch";
  char errbuf[CURL_ERROR_SIZE];
  answer_buffer buf;
  set_request(h.get(), t, url, body, errbuf);
  curl_easy_setopt(h.get(), CURLOPT_WRITEFUNCTION, &collect);
  curl_easy_setopt(h.get(), CURLOPT_WRITEDATA, &buf);
  // A stream has no total timeout; a peer that vanished without a FIN is found by TCP keepalive.
  curl_easy_setopt(h.get(), CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(h.get(), CURLOPT_TCP_KEEPIDLE, 5L);
  curl_easy_setopt(h.get(), CURLOPT_TCP_KEEPINTVL, 2L);
  CURLM* m = st.multi.get();
  if (curl_multi_add_handle(m, h.get()) != CURLM_OK) {
    end.result = EAAS_FAIL(status::internal_error, "{}: watch: curl_multi_add_handle failed", t.where);
    return end;
  }
  const auto created_by = steady::now() + std::chrono::milliseconds(t.timeout_ms);
  int running = 1;
  bool go_on = true;
  while (go_on && !st.stop.load()) {
    if (const CURLMcode mc = curl_multi_perform(m, &running); mc != CURLM_OK) {
      end.result = EAAS_FAIL(status::internal_error, "{}: watch: {}", t.where, curl_multi_strerror(mc));
      go_on = false;
      break;
    }
    go_on = watch_lines(st, buf.body, end);
    if (!go_on || running == 0) break;
    if (!end.created && steady::now() > created_by) {
      end.result = EAAS_FAIL(status::peer_unreachable, "{}: watch on '{}': not created within {} ms", t.where,
                             printable(st.prefix), t.timeout_ms);
      go_on = false;
      break;
    }
    curl_multi_poll(m, nullptr, 0, kPollMs, nullptr);
  }
  if (go_on && running == 0 && !st.stop.load()) {
    // The transfer ended: an error answer (its body has no final newline) or a broken connection.
    CURLcode rc = CURLE_OK;
    int left = 0;
    while (CURLMsg* msg = curl_multi_info_read(m, &left))
      if (msg->msg == CURLMSG_DONE && msg->easy_handle == h.get()) rc = msg->data.result;
    long http = 0;
    curl_easy_getinfo(h.get(), CURLINFO_RESPONSE_CODE, &http);
    std::string_view rest(buf.body);
    while (!rest.empty() && (rest.back() == '\r' || rest.back() == ' ')) rest.remove_suffix(1);
    json j;
    bool is_error = false;
    status error_status = status::ok;
    if (!rest.empty() && parse_object(rest, j)) error_status = error_body(t, "watch", j, is_error);
    if (is_error) {
      end.result = error_status;
    } else if (rc != CURLE_OK) {
      end.result = transfer_failure(t, "watch", rc, errbuf, buf.overflow);
    } else if (http != 200) {
      end.result = http_failure(t, "watch", http, buf.body);
    } else if (!rest.empty()) {
      end.result = malformed(t, "watch", fmt::format("a truncated stream line ({})", printable(rest, 100)));
    } else {
      end.result = EAAS_FAIL(status::peer_unreachable, "{}: watch on '{}': etcd ended the stream", t.where,
                             printable(st.prefix));
    }
  }
  curl_multi_remove_handle(m, h.get());
  return end;
}

/// Reads the prefix, delivers what changed since the last delivery (put for new or changed keys,
/// expire for keys that are gone) and makes the list's revision the last delivered one.
status resynchronise(watch_state& st, CURL* h) {
  std::vector<kv_record> records;
  std::int64_t revision = 0;
  EAAS_CHECK(range_prefix(h, *st.target, "watch resynchronisation", st.prefix, 0, records, revision, st.runner()));
  std::vector<const kv_record*> changed;
  std::vector<std::string> gone;
  auto it = st.known.begin();
  for (const kv_record& r : records) {
    for (; it != st.known.end() && it->first < r.key; ++it) gone.push_back(it->first);
    if (it != st.known.end() && it->first == r.key) {
      if (it->second != r.mod_revision) changed.push_back(&r);
      ++it;
    } else {
      changed.push_back(&r);
    }
  }
  for (; it != st.known.end(); ++it) gone.push_back(it->first);
  std::stable_sort(changed.begin(), changed.end(),
                   [](const kv_record* a, const kv_record* b) { return a->mod_revision < b->mod_revision; });
  log(log_level::info, "{}: watch on '{}' resynchronised at revision {}: {} new or changed, {} gone", st.target->where,
      printable(st.prefix), revision, changed.size(), gone.size());
  for (const kv_record* r : changed)
    if (!st.deliver(watch_event{watch_event_type::put, *r})) return status::ok;
  // A key that vanished while we were away most likely lost its lease (its owner went silent).
  for (std::string& key : gone)
    if (!st.deliver(watch_event{watch_event_type::expire, kv_record{std::move(key), {}, 0, 0, revision}}))
      return status::ok;
  st.last_revision = revision;  // also when the store went back (a new etcd cluster)
  return status::ok;
}

void watch_main(std::shared_ptr<watch_state> stp, std::int64_t after_revision) {
  watch_state& st = *stp;
  const etcd_target& t = *st.target;
  easy_ptr h(curl_easy_init());  // for the seed and resynchronisation reads
  try {
    if (after_revision > 0 && h) {
      // What the caller saw at after_revision (a list, usually): the baseline a later
      // resynchronisation compares against. Compacted away: start with nothing known.
      std::vector<kv_record> records;
      std::int64_t revision = 0;
      if (range_prefix(h.get(), t, "watch", st.prefix, after_revision, records, revision, st.runner()) == status::ok)
        for (kv_record& r : records) st.known.emplace(std::move(r.key), r.mod_revision);
    }
    st.last_revision = after_revision;
    bool resync = false;
    auto backoff = kMinBackoff;
    while (!st.stop.load()) {
      if (resync) {
        if (!h) h.reset(curl_easy_init());
        const status s = h ? resynchronise(st, h.get()) : status::no_resource;
        if (st.stop.load()) break;
        if (s != status::ok) {
          log(log_level::warn, "{}: watch on '{}': reconnecting in {} ms: {}", t.where, printable(st.prefix),
              backoff.count(), last_error());
          st.sleep_for(backoff);
          backoff = std::min(backoff * 2, kMaxBackoff);
          continue;
        }
        resync = false;
      }
      const stream_end end = watch_stream(st, st.last_revision + 1);
      if (!st.start_reported) {
        st.report_start(end.result == status::ok ? status::aborted : end.result);
        return;
      }
      if (st.stop.load()) break;
      if (end.created) backoff = kMinBackoff;
      log(log_level::warn, "{}: watch on '{}' broke ({}: {}); resynchronising in {} ms", t.where, printable(st.prefix),
          status_name(end.result), last_error(), backoff.count());
      resync = true;
      st.sleep_for(backoff);
      backoff = std::min(backoff * 2, kMaxBackoff);
    }
  } catch (...) {
    // Memory ran out in the thread: nothing to report to, the watch stops.
    log(log_level::error, "{}: watch on '{}' stopped: out of memory or unexpected exception", t.where,
        printable(st.prefix));
    if (!st.start_reported) st.report_start(EAAS_FAIL(status::no_resource, "{}: watch: out of memory", t.where));
  }
}

class etcd_watch final : public watch {
 public:
  explicit etcd_watch(std::shared_ptr<watch_state> st) : st_(std::move(st)) {}
  ~etcd_watch() override {
    cancel();
    // Destroyed from its own callback: the thread finishes on its own, holding the state.
    if (std::this_thread::get_id() == worker_ && thread_.joinable()) thread_.detach();
  }
  /// Starts the thread (before the watch is handed out: `worker_` is not written again).
  void start(std::int64_t after_revision) {
    thread_ = std::thread(watch_main, st_, after_revision);
    worker_ = thread_.get_id();
  }
  void cancel() noexcept override {
    st_->request_stop();
    if (std::this_thread::get_id() == worker_) return;  // from the callback: none runs after it returns
    std::lock_guard lk(join_mu_);
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::shared_ptr<watch_state> st_;
  std::thread thread_;
  std::thread::id worker_;
  std::mutex join_mu_;
};

// ------------------------------------------------------------------------------------------------
// The client
// ------------------------------------------------------------------------------------------------

class etcd_registry final : public registry {
 public:
  explicit etcd_registry(std::shared_ptr<const etcd_target> t) : t_(std::move(t)) {}
  ~etcd_registry() override {
    for (CURL* h : idle_) curl_easy_cleanup(h);
  }

  /// Asks etcd for its status: is something that speaks etcd's gateway there?
  status probe() {
    return guarded(*t_, "connect", [&]() -> status {
      json a;
      EAAS_CHECK(call("connect", "/v3/maintenance/status", json::object(), a));
      const json* header = nullptr;
      std::string version;
      if (!get_object(a, "header", header) || header == nullptr || !get_string(a, "version", version))
        return malformed(*t_, "connect", "a status without header or version");
      log(log_level::info, "{}: connected (etcd {})", t_->where, printable(version));
      return status::ok;
    });
  }

  status grant_lease(std::uint32_t ttl_seconds, std::int64_t& lease) override {
    if (ttl_seconds < 1 || ttl_seconds > 3600)
      return EAAS_FAIL(status::invalid_argument, "{}: grant lease: ttl {} s is outside 1 .. 3600", t_->where,
                       ttl_seconds);
    return guarded(*t_, "grant lease", [&]() -> status {
      json a;
      EAAS_CHECK(call("grant lease", "/v3/lease/grant", json{{"TTL", std::to_string(ttl_seconds)}}, a));
      std::int64_t id = 0, ttl = 0;
      std::string error;
      if (!get_i64(a, "ID", id) || !get_i64(a, "TTL", ttl) || !get_string(a, "error", error))
        return malformed(*t_, "grant lease", "fields of the wrong type");
      if (!error.empty())
        return EAAS_FAIL(status::internal_error, "{}: grant lease: {}", t_->where, printable(error, 200));
      if (id <= 0 || ttl <= 0) return malformed(*t_, "grant lease", "no lease id or ttl");
      lease = id;
      return status::ok;
    });
  }

  status keep_alive(std::int64_t lease) override {
    if (lease <= 0)
      return EAAS_FAIL(status::invalid_argument, "{}: keep alive: lease {} is not a lease", t_->where, lease);
    return guarded(*t_, "keep alive", [&]() -> status {
      json a;
      EAAS_CHECK(call("keep alive", "/v3/lease/keepalive", json{{"ID", std::to_string(lease)}}, a));
      const json* r = nullptr;
      std::int64_t id = 0, ttl = 0;
      if (!get_object(a, "result", r) || r == nullptr || !get_i64(*r, "ID", id) || !get_i64(*r, "TTL", ttl))
        return malformed(*t_, "keep alive", "no result, or fields of the wrong type");
      if (id != lease) return malformed(*t_, "keep alive", "the answer is about another lease");
      // etcd answers a keep-alive of a lease it no longer has with TTL 0 (left out) or negative.
      if (ttl <= 0) return EAAS_FAIL(status::not_found, "{}: keep alive: lease {} has ended", t_->where, lease);
      return status::ok;
    });
  }

  status revoke_lease(std::int64_t lease) override {
    if (lease <= 0) return EAAS_FAIL(status::invalid_argument, "{}: revoke: lease {} is not a lease", t_->where, lease);
    return guarded(*t_, "revoke lease", [&]() -> status {
      json a;
      EAAS_CHECK(call("revoke lease", "/v3/lease/revoke", json{{"ID", std::to_string(lease)}}, a));
      std::int64_t revision = 0;
      if (!read_header_revision(a, revision)) return malformed(*t_, "revoke lease", "no header revision");
      return status::ok;
    });
  }

  status put(std::string_view key, std::string_view value, std::int64_t lease) override {
    EAAS_CHECK(check_key_value(key, value));
    if (lease < 0) return EAAS_FAIL(status::invalid_argument, "{}: put: lease {} is not a lease", t_->where, lease);
    return guarded(*t_, "put", [&]() -> status {
      json req{{"key", b64_encode(key)}, {"value", b64_encode(value)}};
      if (lease != 0) req["lease"] = std::to_string(lease);
      json a;
      EAAS_CHECK(call("put", "/v3/kv/put", req, a));
      std::int64_t revision = 0;
      if (!read_header_revision(a, revision)) return malformed(*t_, "put", "no header revision");
      return status::ok;
    });
  }

  status get(std::string_view key, kv_record& out) override {
    EAAS_CHECK(check_key_value(key, {}));
    return guarded(*t_, "get", [&]() -> status {
      json a;
      EAAS_CHECK(call("get", "/v3/kv/range", json{{"key", b64_encode(key)}}, a));
      std::int64_t revision = 0;
      const json* kvs = nullptr;
      if (!read_header_revision(a, revision) || !get_array(a, "kvs", kvs))
        return malformed(*t_, "get", "no header revision, or kvs of the wrong type");
      if (kvs == nullptr || kvs->empty())
        return EAAS_FAIL(status::not_found, "{}: get: no key '{}'", t_->where, printable(key));
      kv_record r;
      if (kvs->size() != 1 || !read_kv((*kvs)[0], r))
        return malformed(*t_, "get", "a key-value of the wrong shape, size or encoding");
      if (r.key != key) return malformed(*t_, "get", "another key than the one asked for");
      out = std::move(r);
      return status::ok;
    });
  }

  status list(std::string_view prefix, std::vector<kv_record>& out, std::int64_t& revision) override {
    if (prefix.size() > kMaxKeyBytes)
      return EAAS_FAIL(status::invalid_argument, "{}: list: prefix of {} bytes (at most {})", t_->where, prefix.size(),
                       kMaxKeyBytes);
    return guarded(*t_, "list", [&]() -> status {
      pooled h(*this);
      if (!h.get()) return EAAS_FAIL(status::no_resource, "{}: list: curl_easy_init failed", t_->where);
      const status s = range_prefix(h.get(), *t_, "list", prefix, 0, out, revision);
      h.keep = reusable(s);
      return s;
    });
  }

  status remove(std::string_view key) override {
    EAAS_CHECK(check_key_value(key, {}));
    return guarded(*t_, "remove", [&]() -> status {
      json a;
      EAAS_CHECK(call("remove", "/v3/kv/deleterange", json{{"key", b64_encode(key)}}, a));
      std::int64_t revision = 0, deleted = 0;
      if (!read_header_revision(a, revision) || !get_i64(a, "deleted", deleted))
        return malformed(*t_, "remove", "no header revision, or deleted of the wrong type");
      if (deleted < 0 || deleted > 1) return malformed(*t_, "remove", "more than one key deleted");
      if (deleted == 0) return EAAS_FAIL(status::not_found, "{}: remove: no key '{}'", t_->where, printable(key));
      return status::ok;
    });
  }

  status compare_and_swap(std::string_view key, std::int64_t expected_revision, std::string_view value,
                          std::int64_t lease, bool& swapped) override {
    EAAS_CHECK(check_key_value(key, value));
    if (expected_revision < 0 || lease < 0)
      return EAAS_FAIL(status::invalid_argument, "{}: compare-and-swap: negative revision {} or lease {}", t_->where,
                       expected_revision, lease);
    return guarded(*t_, "compare-and-swap", [&]() -> status {
      const std::string k = b64_encode(key);
      json cmp{{"key", k}, {"result", "EQUAL"}};
      if (expected_revision == 0) {
        cmp["target"] = "CREATE";
        cmp["create_revision"] = "0";
      } else {
        cmp["target"] = "MOD";
        cmp["mod_revision"] = std::to_string(expected_revision);
      }
      json put{{"key", k}, {"value", b64_encode(value)}};
      if (lease != 0) put["lease"] = std::to_string(lease);
      json req{{"compare", json::array({cmp})}, {"success", json::array({json{{"request_put", put}}})}};
      json a;
      EAAS_CHECK(call("compare-and-swap", "/v3/kv/txn", req, a));
      std::int64_t revision = 0;
      bool succeeded = false;
      if (!read_header_revision(a, revision) || !get_bool(a, "succeeded", succeeded))
        return malformed(*t_, "compare-and-swap", "no header revision, or succeeded of the wrong type");
      swapped = succeeded;
      return status::ok;
    });
  }

  status watch_prefix(std::string_view prefix, std::int64_t after_revision,
                      std::function<void(const watch_event&)> on_event, std::unique_ptr<watch>& out) override {
    if (prefix.size() > kMaxKeyBytes || after_revision < 0 || !on_event)
      return EAAS_FAIL(status::invalid_argument,
                       "{}: watch: prefix of {} bytes (at most {}), revision {} or no callback", t_->where,
                       prefix.size(), kMaxKeyBytes, after_revision);
    return guarded(*t_, "watch", [&]() -> status {
      auto st = std::make_shared<watch_state>();
      st->target = t_;
      st->prefix = std::string(prefix);
      st->on_event = std::move(on_event);
      st->multi.reset(curl_multi_init());
      if (!st->multi) return EAAS_FAIL(status::no_resource, "{}: watch: curl_multi_init failed", t_->where);
      // start_revision is appended per stream (watch_stream closes the object).
      st->request =
          fmt::format(R"({{"create_request":{{"key":"{}","range_end":"{}","prev_kv":true,"start_revision":")",
                      b64_encode(prefix.empty() ? std::string_view("\0", 1) : prefix), b64_encode(prefix_end(prefix)));
      auto w = std::make_unique<etcd_watch>(st);
      w->start(after_revision);
      // The thread bounds its start (seed read, connect, created) by the request timeout; this is a backstop.
      const auto backstop = std::chrono::milliseconds(3 * t_->timeout_ms + 1000);
      std::unique_lock lk(st->mu);
      const bool started = st->cv.wait_for(lk, backstop, [&] { return st->started; });
      const status s = started ? st->start_status : status::peer_unreachable;
      const std::string why = started ? st->start_error : std::string();
      lk.unlock();
      if (s != status::ok) {
        w->cancel();
        if (!started)
          return EAAS_FAIL(status::peer_unreachable, "{}: watch on '{}': not started within {} ms", t_->where,
                           printable(prefix), backstop.count());
        return EAAS_FAIL(s, "{}", why);  // the thread's sentence, recorded again on the caller's thread
      }
      out = std::move(w);
      return status::ok;
    });
  }

 private:
  /// A pooled easy handle; given back unless `keep` is false (a broken connection is not reused).
  struct pooled {
    explicit pooled(etcd_registry& r) : reg(r), h(r.acquire()) {}
    ~pooled() {
      if (h != nullptr) reg.release(h, keep);
    }
    CURL* get() const { return h; }
    etcd_registry& reg;
    CURL* h;
    bool keep = true;
  };

  CURL* acquire() {
    {
      std::lock_guard lk(mu_);
      if (!idle_.empty()) {
        CURL* h = idle_.back();
        idle_.pop_back();
        return h;
      }
    }
    return curl_easy_init();
  }
  void release(CURL* h, bool keep) noexcept {
    if (keep) {
      std::lock_guard lk(mu_);
      if (idle_.size() < kMaxPooledHandles) {
        try {
          idle_.push_back(h);
          return;
        } catch (...) {
        }
      }
    }
    curl_easy_cleanup(h);
  }

  status call(std::string_view op, const char* path, const json& req, json& answer) {
    pooled h(*this);
    if (!h.get()) return EAAS_FAIL(status::no_resource, "{}: {}: curl_easy_init failed", t_->where, op);
    const status s = http_call(h.get(), *t_, op, path, req, answer);
    h.keep = reusable(s);
    return s;
  }

  std::shared_ptr<const etcd_target> t_;
  std::mutex mu_;
  std::vector<CURL*> idle_;
};

}  // namespace

status open_etcd(const registry_options& options, std::string_view host_port, std::unique_ptr<registry>& out) {
  std::string host;
  std::uint16_t port = 0;
  EAAS_CHECK(parse_host_port(host_port, host, port));
  // The host goes into a URL: letters, digits and . - _ (and : % inside an IPv6 address) only, so that
  // nothing in it can name another host, a user or a path.
  const bool host_ok = !host.empty() && std::all_of(host.begin(), host.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '-' ||
           c == '_' || c == ':' || c == '%';
  });
  if (!host_ok) return EAAS_FAIL(status::invalid_argument, "etcd: '{}' is not a host name or address", printable(host));
  if (options.request_timeout_ns < 1'000'000)
    return EAAS_FAIL(status::invalid_argument, "etcd {}: request_timeout_ns {} is below 1 ms", host_port,
                     options.request_timeout_ns);
  if (std::any_of(options.token.begin(), options.token.end(), [](char c) { return c >= 0 && c < 0x20; }))
    return EAAS_FAIL(status::invalid_argument, "etcd {}: the token contains a control character", host_port);
  EAAS_CHECK(init_curl());
  try {
    auto t = std::make_shared<etcd_target>();
    const bool v6 = host.find(':') != std::string::npos;
    t->where = fmt::format("etcd {}", host_port);
    t->base_url = v6 ? fmt::format("http://[{}]:{}", host, port) : fmt::format("http://{}:{}", host, port);
    t->timeout_ms = static_cast<long>(
        std::min<std::uint64_t>((options.request_timeout_ns + 999'999) / 1'000'000, 24ull * 3600 * 1000));
    // Expect: off — a 100-continue round trip would add a second to every large put.
    for (const std::string& h : {std::string("Content-Type: application/json"), std::string("Expect:"),
                                 options.token.empty() ? std::string() : "Authorization: " + options.token}) {
      if (h.empty()) continue;
      curl_slist* next = curl_slist_append(t->headers, h.c_str());
      if (next == nullptr) return EAAS_FAIL(status::no_resource, "etcd {}: out of memory", host_port);
      t->headers = next;
    }
    auto reg = std::make_unique<etcd_registry>(std::move(t));
    EAAS_CHECK(reg->probe());
    out = std::move(reg);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "etcd {}: out of memory", host_port);
  } catch (...) {
    return EAAS_FAIL(status::internal_error, "etcd {}: unexpected exception", host_port);
  }
}

}  // namespace eaas::detail
