// The ibgda transport of one context: NIC, registered heap, QP pool, dial / accept (station.hpp).

#include "transport/ibgda/station.hpp"

#include <algorithm>
#include <random>

#include "eaas/common/views.hpp"
#include "eaas/detail/atomic.hpp"
#include "eaas/detail/clock.hpp"
#include "log.hpp"
#include "process.hpp"

namespace eaas::detail::ibgda {

namespace {

constexpr std::size_t kAlign = 256;
constexpr std::size_t kScratch = kAlign;  // the heap's first block: discarded atomic results

std::size_t round_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// link, heap_block

link::~link() {
  if (owner_) owner_->release(*this);
}

notice_word notice_slot::wire() const {
  return notice_word{reinterpret_cast<std::uint64_t>(word), mr ? mr->rkey() : 0, kNoticeBytes};
}

status link::close(std::uint32_t local) {
  if (closed_) return status::ok;
  closed_ = true;
  // Our word first leaves the peer's reach, so that a notice racing ours (both sides closing at
  // once) cannot overwrite what we store; the NIC writes nothing through a deregistered MR.
  notice_.mr.reset();
  store_release(notice_.word, local);
  status s = status::ok;
  // A dialer cannot know that the peer accepted its reply: if it did not (another dialer took that
  // QP, or the handle was stale), the word named in the advertisement now belongs to the peer's
  // endpoint for someone else. A completed WQE is the evidence: the peer's QP answered ours, so it
  // is paired with ours. Without one, the dialer does not write.
  bool paired = accepted_;
  if (!paired) {
    std::uint64_t done = 0;
    paired = owner_->nic_->gpu().live_read(&done, &state_->qp.cq.completed, sizeof(done)) == 0 && done != 0;
  }
  if (peer_.present() && qp_->connected() && paired) {
    const std::uint32_t dead = static_cast<std::uint32_t>(::eaas::endpoint_state::peer_dead);
    s = qp_->post_inline_write(&state_->qp, peer_.addr, peer_.rkey, &dead, sizeof(dead),
                               now_ns() + owner_->o_.close_notice_ns);
    if (s != status::ok)
      log(log_level::info, "ibgda: QP {:#x}: the peer was not told of the close: {}", qp_->qpn(), last_error());
  }
  // Nothing more runs on the QP, in either direction: kernels still holding the view get flushed
  // WQEs, and the peer's WQEs are no longer answered.
  if (qp_->connected() && qp_->to_error() != status::ok)
    log(log_level::warn, "ibgda: moving QP {:#x} to ERR at close failed: {}", qp_->qpn(), last_error());
  return s;
}

heap_block::~heap_block() {
  if (owner_) owner_->release(*this);
}

void station::release(link& l) {
  gpu_api& g = nic_->gpu();
  l.qp_.reset();  // the NIC stops using the QP before its state goes
  if (l.state_ != nullptr) g.free(l.state_);
  l.state_ = nullptr;
  l.notice_.reset();
  if (!l.accepted_) return;
  std::lock_guard lock(mu_);
  --accepted_;
  if (refill_locked() != status::ok)
    log(log_level::warn, "ibgda: refilling the QP pool after a peer left failed: {}", last_error());
}

void station::release(heap_block& b) {
  b.mr_.reset();
  std::lock_guard lock(mu_);
  const auto off = static_cast<std::size_t>(static_cast<char*>(b.addr_) - static_cast<char*>(heap_));
  auto [it, fresh] = free_.emplace(off, b.reserved_);
  if (!fresh) return;  // cannot happen: blocks never overlap
  // Merge with the neighbours.
  if (auto next = std::next(it); next != free_.end() && it->first + it->second == next->first) {
    it->second += next->second;
    free_.erase(next);
  }
  if (it != free_.begin()) {
    auto prev = std::prev(it);
    if (prev->first + prev->second == it->first) {
      prev->second += it->second;
      free_.erase(it);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// station

status station::open(std::unique_ptr<verbs_api> own_verbs, std::unique_ptr<gpu_api> own_gpu, verbs_api& verbs,
                     gpu_api& gpu, const station_options& o, std::uint64_t self_id, std::uint64_t host_id,
                     word_source& words, std::shared_ptr<station>& out) {
  try {
    EAAS_CHECK(check_options(o.qp));
    if (o.pool == 0 || o.pool > kMaxQpsPerPeer)
      return EAAS_FAIL(status::invalid_argument, "ibgda: QP pool of {} (1 .. {})", o.pool, kMaxQpsPerPeer);
    if (o.max_peers == 0) return EAAS_FAIL(status::invalid_argument, "ibgda: max_peers 0");
    if (o.heap_bytes < 2 * kAlign || o.heap_bytes % kAlign != 0)
      return EAAS_FAIL(status::invalid_argument, "ibgda: heap of {} bytes (a multiple of {}, at least {})",
                       o.heap_bytes, kAlign, 2 * kAlign);
    if (self_id == 0) return EAAS_FAIL(status::invalid_argument, "ibgda: context id 0");
    std::shared_ptr<station> s(new station());
    s->own_verbs_ = std::move(own_verbs);
    s->own_gpu_ = std::move(own_gpu);
    s->o_ = o;
    s->self_ = self_id;
    s->host_ = host_id;
    s->words_ = &words;
    EAAS_CHECK(nic::open(verbs, gpu, o.nic, s->nic_));
    if (const int e = gpu.alloc(o.heap_bytes, s->heap_); e != 0 || s->heap_ == nullptr) {
      s->heap_ = nullptr;
      return EAAS_FAIL(status::no_resource, "ibgda: allocating the {}-byte heap on the GPU failed: {}", o.heap_bytes,
                       gpu.error_name(e));
    }
    EAAS_CHECK(data_region::create(*s->nic_, s->heap_, o.heap_bytes, o.qp.relaxed_ordering, s->heap_mr_));
    s->scratch_ = reinterpret_cast<std::uint64_t>(s->heap_);
    s->free_.emplace(kScratch, o.heap_bytes - kScratch);
    {
      std::lock_guard lock(s->mu_);
      EAAS_CHECK(s->refill_locked());
    }
    out = std::move(s);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "ibgda: out of memory");
  }
}

station::~station() {
  pool_.clear();
  heap_mr_.reset();
  if (heap_ != nullptr) nic_->gpu().free(heap_);
  nic_.reset();
}

status station::refill_locked() {
  const std::size_t room = o_.max_peers > accepted_ ? o_.max_peers - accepted_ : 0;
  const std::size_t want = std::min<std::size_t>(o_.pool, room);
  while (pool_.size() < want) {
    waiting w;
    EAAS_CHECK(rc_qp::create(*nic_, o_.qp, w.qp));
    EAAS_CHECK(make_notice(w.notice));
    pool_.push_back(std::move(w));
  }
  return status::ok;
}

status station::make_notice(notice_slot& out) {
  notice_slot n;
  n.src = words_;
  n.word = words_->take(static_cast<std::uint32_t>(::eaas::endpoint_state::connected));
  if (n.word == nullptr) return EAAS_FAIL(status::no_resource, "ibgda: no memory for an endpoint state word");
  EAAS_CHECK(data_region::create_host(*nic_, n.word, kNoticeBytes, n.mr));
  out = std::move(n);
  return status::ok;
}

conn_desc station::port_desc() const {
  conn_desc d;
  d.context_id = self_;
  d.host_id = host_;
  d.layer = nic_->port_info().layer;
  d.mtu = nic_->port_info().active_mtu;
  d.lid = d.layer == link_layer::infiniband ? nic_->port_info().lid : 0;
  d.gid = nic_->gid().gid;
  return d;
}

status station::advertise(conn_desc& out) {
  try {
    std::lock_guard lock(mu_);
    conn_desc d = port_desc();
    for (const auto& w : pool_) d.qps.push_back(qp_wire{w.qp->qpn(), w.qp->psn(), w.notice.wire()});
    out = std::move(d);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "ibgda: out of memory");
  }
}

status station::make_link(std::unique_ptr<rc_qp> qp, notice_slot notice, const notice_word& peer,
                          std::unique_ptr<link>& out) {
  std::unique_ptr<link> l(new link());
  l->owner_ = shared_from_this();
  l->qp_ = std::move(qp);
  l->notice_ = std::move(notice);
  l->peer_ = peer;
  qp_config c = l->qp_->device_config();
  c.lkey = heap_mr_->lkey();
  c.scratch_laddr = scratch_;
  endpoint_state host{};
  EAAS_CHECK(make_qp_state(c, &host.qp));
  host.op_timeout_ns = o_.op_timeout_ns;
  void* mem = nullptr;
  gpu_api& g = nic_->gpu();
  if (const int e = g.alloc(sizeof(endpoint_state), mem); e != 0 || mem == nullptr)
    return EAAS_FAIL(status::no_resource, "ibgda: allocating an endpoint state on the GPU failed: {}", g.error_name(e));
  l->state_ = static_cast<endpoint_state*>(mem);
  if (const int e = g.copy_to_device(mem, &host, sizeof(host)); e != 0)
    return EAAS_FAIL(status::internal_error, "ibgda: copying the endpoint state to the GPU failed: {}",
                     g.error_name(e));
  out = std::move(l);
  return status::ok;
}

status station::dial(const conn_desc& theirs, std::unique_ptr<link>& out, conn_desc& reply) {
  try {
    if (theirs.target_id != 0 || theirs.target_qpn != 0)
      return EAAS_FAIL(status::invalid_handle,
                       "ibgda: dialing needs an advertisement, not a description addressed "
                       "to context {:016x}",
                       theirs.target_id);
    if (theirs.context_id == self_)
      return EAAS_FAIL(status::invalid_argument, "ibgda: a context does not dial itself over the network");
    if (theirs.qps.empty())
      return EAAS_FAIL(status::no_resource,
                       "ibgda: context {:016x} advertises no free QP (its pool is exhausted: it accepts at most its "
                       "max_peers); ask it for a fresh connection handle once a peer has left",
                       theirs.context_id);
    std::uniform_int_distribution<std::size_t> pick(0, theirs.qps.size() - 1);
    std::mt19937_64 rng(random_u64());
    const std::size_t i = pick(rng);
    if (!theirs.qps[i].notice.present())
      return EAAS_FAIL(status::invalid_handle,
                       "ibgda: context {:016x} advertises QP {:#x} without a close-notice word (a peer_set "
                       "description, not a connection handle)",
                       theirs.context_id, theirs.qps[i].qpn);
    std::unique_ptr<rc_qp> q;
    EAAS_CHECK(rc_qp::create(*nic_, o_.qp, q));
    notice_slot mine;
    EAAS_CHECK(make_notice(mine));
    EAAS_CHECK(q->connect(theirs.qp(i)));
    conn_desc r = port_desc();
    r.target_id = theirs.context_id;
    r.target_qpn = theirs.qps[i].qpn;
    r.qps = {qp_wire{q->qpn(), q->psn(), mine.wire()}};
    std::unique_ptr<link> l;
    EAAS_CHECK(make_link(std::move(q), std::move(mine), theirs.qps[i].notice, l));
    out = std::move(l);
    reply = std::move(r);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "ibgda: out of memory");
  }
}

status station::accept(const conn_desc& reply, std::unique_ptr<link>& out) {
  try {
    if (reply.target_id != self_)
      return EAAS_FAIL(status::invalid_handle, "ibgda: the reply is addressed to context {:016x}, not to us ({:016x})",
                       reply.target_id, self_);
    if (reply.context_id == self_) return EAAS_FAIL(status::invalid_handle, "ibgda: a reply from this context itself");
    if (reply.qps.size() != 1 || reply.target_qpn == 0)
      return EAAS_FAIL(status::invalid_handle,
                       "ibgda: a reply names one QP of ours and carries one ({} here, target "
                       "QPN {:#x})",
                       reply.qps.size(), reply.target_qpn);
    if (!reply.qps[0].notice.present())
      return EAAS_FAIL(status::invalid_handle, "ibgda: the reply of context {:016x} carries no close-notice word",
                       reply.context_id);
    std::unique_ptr<rc_qp> q;
    notice_slot mine;
    {
      std::lock_guard lock(mu_);
      auto it =
          std::find_if(pool_.begin(), pool_.end(), [&](const auto& p) { return p.qp->qpn() == reply.target_qpn; });
      if (it == pool_.end())
        return EAAS_FAIL(status::not_found,
                         "ibgda: QP {:#x} is not waiting in this context's pool (another peer took it, or the "
                         "handle the peer dialed is stale): the peer must dial again with a fresh connection handle",
                         reply.target_qpn);
      q = std::move(it->qp);
      mine = std::move(it->notice);
      pool_.erase(it);
      ++accepted_;
    }
    auto give_back = [&] {
      std::lock_guard lock(mu_);
      --accepted_;
      if (refill_locked() != status::ok) log(log_level::warn, "ibgda: refilling the QP pool failed");
    };
    // A QP whose connect failed part-way is left as it is (dropped); the pool gets a new one.
    if (const status s = q->connect(reply.qp(0)); s != status::ok) {
      const std::string why(last_error());
      q.reset();
      give_back();
      return EAAS_FAIL(s, "{}", why);
    }
    std::unique_ptr<link> l;
    if (const status s = make_link(std::move(q), std::move(mine), reply.qps[0].notice, l); s != status::ok) {
      const std::string why(last_error());
      l.reset();
      give_back();
      return EAAS_FAIL(s, "{}", why);
    }
    l->accepted_ = true;
    {
      std::lock_guard lock(mu_);
      if (refill_locked() != status::ok)
        log(log_level::warn, "ibgda: refilling the QP pool after accepting a peer failed: {}", last_error());
    }
    out = std::move(l);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "ibgda: out of memory");
  }
}

status station::allocate(std::size_t bytes, std::unique_ptr<heap_block>& out) {
  try {
    if (bytes == 0) return EAAS_FAIL(status::invalid_argument, "allocate: zero bytes");
    if (bytes > o_.heap_bytes)
      return EAAS_FAIL(status::no_resource, "allocate: {} bytes exceed the ibgda heap ({} bytes)", bytes,
                       o_.heap_bytes);
    const std::size_t need = round_up(bytes, kAlign);
    std::size_t off = 0;
    {
      std::lock_guard lock(mu_);
      auto it = std::find_if(free_.begin(), free_.end(), [&](const auto& f) { return f.second >= need; });
      if (it == free_.end())
        return EAAS_FAIL(status::no_resource,
                         "allocate: no {} free contiguous bytes in the ibgda heap ({} bytes; context_options::"
                         "ibgda_heap_bytes)",
                         need, o_.heap_bytes);
      off = it->first;
      const std::size_t left = it->second - need;
      free_.erase(it);
      if (left != 0) free_.emplace(off + need, left);
    }
    std::unique_ptr<heap_block> b(new heap_block());
    b->owner_ = shared_from_this();
    b->addr_ = static_cast<char*>(heap_) + off;
    b->size_ = bytes;
    b->reserved_ = need;
    // Zero-filled, as allocate() promises: the block may have been used before.
    static const std::vector<std::byte> zeros(64 * 1024);
    for (std::size_t done = 0; done < need;) {
      const std::size_t n = std::min(zeros.size(), need - done);
      if (const int e = nic_->gpu().copy_to_device(static_cast<char*>(b->addr_) + done, zeros.data(), n); e != 0)
        return EAAS_FAIL(status::internal_error, "allocate: zero-filling GPU memory failed: {}",
                         nic_->gpu().error_name(e));
      done += n;
    }
    EAAS_CHECK(data_region::create(*nic_, b->addr_, bytes, o_.qp.relaxed_ordering, b->mr_));
    out = std::move(b);
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_FAIL(status::no_resource, "allocate: out of memory");
  }
}

std::size_t station::pool_size() {
  std::lock_guard lock(mu_);
  return pool_.size();
}

std::size_t station::accepted() {
  std::lock_guard lock(mu_);
  return accepted_;
}

}  // namespace eaas::detail::ibgda
