// Peer records, discovery and the pairwise handshake over a registry (see eaas/host/directory.hpp).

#include "eaas/host/directory.hpp"

#include <chrono>
#include <map>
#include <mutex>
#include <thread>

#include "eaas/device/ops.hpp"
#include "handle.hpp"
#include "log.hpp"
#include "registry/backends.hpp"
#include "transport/ibgda/wire.hpp"

namespace eaas {

namespace {

constexpr std::size_t kMaxId = 128, kMaxRole = 32, kMaxExperts = 65536, kMaxRegions = 64, kMaxRegionName = 64;

bool valid_id(std::string_view id) {
  if (id.empty() || id.size() > kMaxId) return false;
  for (char c : id)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) return false;
  return true;
}

void put_bytes(detail::handle_writer& w, std::span<const std::byte> b) {
  w.u32(static_cast<std::uint32_t>(b.size()));
  w.raw(b);
}
void put_text(detail::handle_writer& w, std::string_view s) {
  put_bytes(w, std::as_bytes(std::span(s.data(), s.size())));
}

bool get_bytes(detail::handle_reader& r, std::size_t max, handle_bytes& out) {
  const std::uint32_t n = r.u32();
  if (!r.ok() || n > max) return false;
  const auto b = r.raw(n);
  if (!r.ok()) return false;
  out.assign(b.begin(), b.end());
  return true;
}
bool get_text(detail::handle_reader& r, std::size_t max, std::string& out) {
  handle_bytes b;
  if (!get_bytes(r, max, b)) return false;
  out.assign(reinterpret_cast<const char*>(b.data()), b.size());
  return true;
}

}  // namespace

status encode_peer_record(const peer_record& rec, std::string& out) {
  try {
    if (!valid_id(rec.id))
      return EAAS_FAIL(status::invalid_argument, "peer record: id '{}' is not 1..{} of [A-Za-z0-9._-]", rec.id, kMaxId);
    if (rec.role.size() > kMaxRole || rec.experts.size() > kMaxExperts || rec.regions.size() > kMaxRegions ||
        rec.connection.size() > detail::kHandleMaxSize)
      return EAAS_FAIL(status::invalid_argument, "peer record '{}': a field is over its limit", rec.id);
    detail::handle_writer w;
    w.u16(kPeerRecordSchema);
    put_text(w, rec.id);
    put_text(w, rec.role);
    w.u32(static_cast<std::uint32_t>(rec.experts.size()));
    for (std::uint32_t e : rec.experts) w.u32(e);
    w.u32(rec.capacity);
    put_bytes(w, rec.connection);
    w.u8(static_cast<std::uint8_t>(rec.regions.size()));
    for (const auto& [name, h] : rec.regions) {
      if (name.empty() || name.size() > kMaxRegionName || h.size() > detail::kHandleMaxSize)
        return EAAS_FAIL(status::invalid_argument, "peer record '{}': region '{}' is malformed", rec.id, name);
      put_text(w, name);
      put_bytes(w, h);
    }
    const handle_bytes b = w.finish(handle_kind::record, transport_kind::none);
    if (b.size() > kMaxValueBytes)
      return EAAS_FAIL(status::invalid_argument, "peer record '{}' encodes to {} bytes (registry limit {})", rec.id,
                       b.size(), kMaxValueBytes);
    out.assign(reinterpret_cast<const char*>(b.data()), b.size());
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "peer record: out of memory");
  }
}

status decode_peer_record(std::string_view bytes, peer_record& out) {
  try {
    const auto all = std::as_bytes(std::span(bytes.data(), bytes.size()));
    handle_info info{};
    std::span<const std::byte> payload;
    EAAS_CHECK(detail::decode_handle(all, handle_kind::record, transport_kind::none, info, payload, kMaxValueBytes));
    detail::handle_reader r(payload);
    peer_record rec;
    const std::uint16_t schema = r.u16();
    if (r.ok() && schema != kPeerRecordSchema)
      return EAAS_FAIL(status::invalid_handle, "peer record: schema {} is not supported (this build reads {})", schema,
                       kPeerRecordSchema);
    bool ok = get_text(r, kMaxId, rec.id) && get_text(r, kMaxRole, rec.role);
    const std::uint32_t n = ok ? r.u32() : 0;
    ok = ok && r.ok() && n <= kMaxExperts;
    if (ok) {
      rec.experts.resize(n);
      for (auto& e : rec.experts) e = r.u32();
    }
    rec.capacity = ok ? r.u32() : 0;
    ok = ok && get_bytes(r, detail::kHandleMaxSize, rec.connection);
    const std::uint8_t nr = ok ? r.u8() : 0;
    ok = ok && r.ok() && nr <= kMaxRegions;
    for (std::uint8_t i = 0; ok && i < nr; ++i) {
      std::string name;
      handle_bytes h;
      ok = get_text(r, kMaxRegionName, name) && !name.empty() && get_bytes(r, detail::kHandleMaxSize, h);
      if (ok) rec.regions.emplace_back(std::move(name), std::move(h));
    }
    if (!ok || !r.done() || !valid_id(rec.id))
      return EAAS_FAIL(status::invalid_handle, "peer record: malformed (field sizes or id)");
    out = std::move(rec);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "peer record: out of memory");
  }
}

remote_region* peer_link::region(std::string_view name) const {
  for (const auto& [n, r] : regions)
    if (n == name) return r.get();
  return nullptr;
}

namespace detail {
namespace {

// A link request's region of this name carries the dialer's connection reply (ibgda: the QP it
// connected against ours), not a memory region. Names starting with "eaas." are reserved.
constexpr std::string_view kReplyRegion = "eaas.reply";
constexpr std::uint32_t kMaxDials = 8;  // a link's dials (each a fresh read of the peer's record)

// The context and host a context's connection handle names (the first fields of its payload).
status connection_identity(const handle_bytes& h, std::uint64_t& context_id, std::uint64_t& host_id) {
  handle_info info{};
  std::span<const std::byte> payload;
  EAAS_CHECK(decode_handle(h, handle_kind::connection, transport_kind::none, info, payload));
  handle_reader r(payload);
  context_id = r.u64();
  host_id = r.u64();
  if (!r.ok() || context_id == 0) return EAAS_FAIL(status::invalid_handle, "connection handle: no identity");
  return status::ok;
}

// A reply carried in a link request must be an ibgda reply from the requester's own context: anything
// else (another kind of handle, a reply some other context made) would hand the acceptor a link whose
// endpoint reaches someone other than the record it came with.
status check_reply(const handle_bytes& reply, const peer_record& req) {
  handle_info info{};
  EAAS_CHECK(inspect_handle(reply, info));
  if (info.kind != handle_kind::connection || info.transport != transport_kind::ibgda)
    return EAAS_FAIL(status::invalid_handle, "link request from {}: its reply is not an ibgda connection reply",
                     req.id);
  ibgda::conn_desc d;
  EAAS_CHECK(ibgda::decode(reply, d));
  std::uint64_t ctx = 0, host = 0;
  EAAS_CHECK(connection_identity(req.connection, ctx, host));
  if (d.context_id != ctx || d.host_id != host)
    return EAAS_FAIL(status::invalid_handle,
                     "link request from {}: its reply was made by context {:#x} (host {:#x}), its record names "
                     "{:#x} (host {:#x})",
                     req.id, d.context_id, d.host_id, ctx, host);
  return status::ok;
}

// Imports the regions a record names into `link`, whose endpoint is connected.
status import_regions(const peer_record& rec, peer_link& link) {
  for (const auto& [name, h] : rec.regions) {
    std::unique_ptr<remote_region> rr;
    EAAS_CHECK(link.ep->import_region(h, rr));
    link.regions.emplace_back(name, std::move(rr));
  }
  link.record = rec;
  return status::ok;
}

// Dials the peer a record describes (`reply` gets what the peer must accept, if the transport needs
// a message back) and imports its regions.
status dial_record(context& ctx, const peer_record& rec, peer_link& out, handle_bytes& reply) {
  peer_link link;
  EAAS_CHECK(ctx.connect(rec.connection, link.ep, reply));
  EAAS_CHECK(import_regions(rec, link));
  out = std::move(link);
  return status::ok;
}

class directory_impl final : public directory {
 public:
  directory_impl(registry& reg, context& ctx, std::string ns, peer_record self)
      : reg_(reg), ctx_(ctx), ns_(std::move(ns)), self_(std::move(self)) {}

  ~directory_impl() override {
    if (links_watch_) links_watch_->cancel();
  }

  status begin(std::uint32_t ttl) {
    std::string enc;
    EAAS_CHECK(encode_peer_record(self_, enc));
    EAAS_CHECK(lease_keeper::start(reg_, ttl, {{key_peer(self_.id), enc}}, keeper_));
    // Link requests made before we started (e.g. while we restarted) are served too: list, then watch.
    std::vector<kv_record> pending;
    std::int64_t rev = 0;
    const std::string prefix = base() + "links/" + self_.id + "/";
    EAAS_CHECK(reg_.list(prefix, pending, rev));
    EAAS_CHECK(reg_.watch_prefix(
        prefix, rev,
        [this](const watch_event& e) {
          if (e.type == watch_event_type::put) serve_link(e.record);
        },
        links_watch_));
    for (const auto& rec : pending) serve_link(rec);
    return status::ok;
  }

  void on_link(std::function<void(peer_link&&)> fn) override {
    std::vector<peer_link> early;
    {
      std::lock_guard lock(mu_);
      on_link_ = fn;
      early.swap(early_links_);
    }
    // Links acknowledged before a callback was installed were held for it.
    if (fn)
      for (auto& l : early) fn(std::move(l));
  }

  status link(const std::string& peer_id, const std::vector<std::pair<std::string, handle_bytes>>& extra,
              std::uint64_t timeout_ns, peer_link& out) override {
    try {
      const std::uint64_t until = now_ns() + timeout_ns;
      if (!valid_id(peer_id)) return EAAS_FAIL(status::invalid_argument, "link: '{}' is not a peer id", peer_id);
      kv_record kv;
      if (status s = reg_.get(key_peer(peer_id), kv); s != status::ok)
        return s == status::not_found ? EAAS_FAIL(status::not_found, "link: no peer '{}' is published", peer_id) : s;
      peer_record theirs;
      EAAS_CHECK(decode_peer_record(kv.value, theirs));
      if (theirs.id != peer_id)
        return EAAS_FAIL(status::invalid_handle, "link: the record under '{}' names '{}'", peer_id, theirs.id);
      for (const auto& [name, h] : extra)
        if (name.starts_with("eaas."))
          return EAAS_FAIL(status::invalid_argument, "link: region name '{}' is reserved (eaas.*)", name);
      for (std::uint32_t dial = 1;; ++dial) {
        peer_link link;
        handle_bytes reply;
        EAAS_CHECK(dial_record(ctx_, theirs, link, reply));
        // Ask the peer to link back: our record plus the regions meant for it alone (and, where our
        // transport needs it, the reply it must accept instead of dialing us).
        peer_record request;
        {
          std::lock_guard lock(self_mu_);
          request = self_;
        }
        request.regions.insert(request.regions.end(), extra.begin(), extra.end());
        const bool replied = !reply.empty();
        if (replied) request.regions.emplace_back(std::string(kReplyRegion), std::move(reply));
        std::string enc;
        EAAS_CHECK(encode_peer_record(request, enc));
        const std::string req_key = base() + "links/" + peer_id + "/" + self_.id;
        EAAS_CHECK(keeper_->set(req_key, enc));
        kv_record mine;
        EAAS_CHECK(reg_.get(req_key, mine));
        // The peer answers "ok REV" or "error STATUS REV" for the request it served.
        const std::string ack_key = base() + "acks/" + self_.id + "/" + peer_id;
        const std::string want = " " + std::to_string(mine.mod_revision);
        std::string refused;
        for (;;) {
          kv_record ack;
          if (reg_.get(ack_key, ack) == status::ok && ack.value.ends_with(want)) {
            if (!ack.value.starts_with("ok ")) refused = ack.value;
            break;
          }
          if (now_ns() >= until)
            return EAAS_FAIL(status::timeout, "link: '{}' did not acknowledge within {} ms", peer_id,
                             timeout_ns / 1'000'000);
          std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
        if (refused.empty()) {
          out = std::move(link);
          return status::ok;
        }
        // The QP we dialed was no longer in the peer's pool (another dialer took it, or its record was
        // stale): the peer republishes its record with a fresh pool; dial again from that.
        const bool redial = replied && refused.starts_with(std::string("error ") + status_name(status::not_found));
        if (!redial || dial >= kMaxDials || now_ns() >= until)
          return EAAS_FAIL(status::peer_unreachable, "link: '{}' refused the link: {}{}", peer_id, refused,
                           redial ? fmt::format(" (after {} dials)", dial) : std::string());
        link.ep->close();
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
        peer_record fresh;
        if (reg_.get(key_peer(peer_id), kv) == status::ok && decode_peer_record(kv.value, fresh) == status::ok &&
            fresh.id == peer_id)
          theirs = std::move(fresh);
      }
    } catch (const std::bad_alloc&) {
      return EAAS_FAIL(status::no_resource, "link: out of memory");
    }
  }

  status peers(std::vector<peer_record>& out) override {
    std::vector<kv_record> recs;
    std::int64_t rev = 0;
    EAAS_CHECK(reg_.list(base() + "peers/", recs, rev));
    out.clear();
    for (const auto& kv : recs) {
      peer_record pr;
      if (decode_peer_record(kv.value, pr) == status::ok)
        out.push_back(std::move(pr));
      else
        log(log_level::warn, "directory: skipping malformed record {}: {}", kv.key, last_error());
    }
    return status::ok;
  }

  status watch_peers(std::function<void(peer_change, const peer_record&)> fn, std::unique_ptr<watch>& out) override {
    auto known = std::make_shared<std::map<std::string, peer_record>>();
    auto deliver = [known, fn](const watch_event& e) {
      if (e.type == watch_event_type::put) {
        peer_record pr;
        if (decode_peer_record(e.record.value, pr) != status::ok) {
          log(log_level::warn, "directory: skipping malformed record {}", e.record.key);
          return;
        }
        (*known)[e.record.key] = pr;
        fn(peer_change::online, pr);
      } else if (auto it = known->find(e.record.key); it != known->end()) {
        const peer_record pr = std::move(it->second);
        known->erase(it);
        fn(peer_change::offline, pr);
      }
    };
    // The peers online now, then every change after the revision they were read at.
    std::vector<kv_record> now;
    std::int64_t rev = 0;
    EAAS_CHECK(reg_.list(base() + "peers/", now, rev));
    for (const auto& kv : now) deliver(watch_event{watch_event_type::put, kv});
    return reg_.watch_prefix(base() + "peers/", rev, deliver, out);
  }

 private:
  std::string base() const { return "/eaas/" + ns_ + "/"; }
  std::string key_peer(const std::string& id) const { return base() + "peers/" + id; }

  void serve_link(const kv_record& kv) {
    peer_record req;
    status s = decode_peer_record(kv.value, req);
    const std::string from = kv.key.substr(kv.key.rfind('/') + 1);
    if (s == status::ok && req.id != from)
      s = EAAS_FAIL(status::invalid_handle, "link request under {} names {}", from, req.id);
    if (s != status::ok) {
      log(log_level::warn, "directory: refusing malformed link request {}: {}", kv.key, last_error());
      if (valid_id(from))
        (void)keeper_->set(base() + "acks/" + from + "/" + self_.id,
                           fmt::format("error {} {}", status_name(s), kv.mod_revision));
      return;
    }
    // A reply from the dialer (ibgda): accept it rather than dial the dialer's handle.
    handle_bytes reply;
    std::size_t replies = 0;
    for (auto it = req.regions.begin(); it != req.regions.end();) {
      if (it->first == kReplyRegion) {
        reply = std::move(it->second);
        ++replies;
        it = req.regions.erase(it);
      } else {
        ++it;
      }
    }
    peer_link link;
    if (replies > 1) {
      s = EAAS_FAIL(status::invalid_handle, "link request from {} carries {} replies", req.id, replies);
    } else if (replies == 1) {
      s = check_reply(reply, req);
      if (s == status::ok) s = ctx_.connect(reply, link.ep);
      if (s == status::ok) s = import_regions(req, link);
    } else {
      handle_bytes none;
      s = dial_record(ctx_, req, link, none);
      if (s == status::ok && !none.empty())  // our transport needs a message back: the dialer cannot get it
        s = EAAS_FAIL(status::unsupported, "link from {}: connecting back needs a reply to it", req.id);
    }
    // An accept takes a QP out of the pool its connection handle advertised: publish the new pool, so
    // that the next dialer (or this one, dialing again after a not_found) finds live QPs.
    if (replies == 1) republish();
    if (s != status::ok) log(log_level::warn, "directory: link from '{}' failed: {}", req.id, last_error());
    // The record is public before start() returns, so a peer can link before on_link() is called: hold
    // its link for the callback instead of dropping a link the peer was told is accepted. Held before the
    // acknowledgement, so that a callback installed once the peer has its "ok" finds the link.
    std::function<void(peer_link &&)> fn;
    if (s == status::ok) {
      std::lock_guard lock(mu_);
      fn = on_link_;
      if (!fn) early_links_.push_back(std::move(link));
    }
    (void)keeper_->set(base() + "acks/" + req.id + "/" + self_.id,
                       s == status::ok ? fmt::format("ok {}", kv.mod_revision)
                                       : fmt::format("error {} {}", status_name(s), kv.mod_revision));
    if (fn) fn(std::move(link));
  }

  void republish() {
    handle_bytes h;
    std::string enc;
    if (ctx_.connection_handle(h) != status::ok) return;
    std::lock_guard lock(self_mu_);
    // Written even when unchanged: a refused dialer may have read a record older than ours.
    self_.connection = std::move(h);
    if (encode_peer_record(self_, enc) != status::ok || keeper_->set(key_peer(self_.id), enc) != status::ok)
      log(log_level::warn, "directory: cannot republish {}'s record: {}", self_.id, last_error());
  }

  registry& reg_;
  context& ctx_;
  std::string ns_;
  std::mutex self_mu_;  // self_.connection changes when an accept republishes it
  peer_record self_;
  std::unique_ptr<lease_keeper> keeper_;
  std::unique_ptr<watch> links_watch_;
  std::mutex mu_;
  std::function<void(peer_link&&)> on_link_;
  std::vector<peer_link> early_links_;  // acknowledged before on_link() was called (guarded by mu_)
};

}  // namespace
}  // namespace detail

status directory::start(registry& reg, context& ctx, std::string ns, peer_record self, std::uint32_t ttl_seconds,
                        std::unique_ptr<directory>& out) {
  try {
    if (!valid_id(ns)) return EAAS_FAIL(status::invalid_argument, "directory: namespace '{}' is not a valid id", ns);
    auto d = std::make_unique<detail::directory_impl>(reg, ctx, std::move(ns), std::move(self));
    EAAS_CHECK(d->begin(ttl_seconds));
    out = std::move(d);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "directory: out of memory");
  }
}

}  // namespace eaas
