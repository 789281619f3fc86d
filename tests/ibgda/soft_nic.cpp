#include "soft_nic.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include "eaas/detail/clock.hpp"

namespace eaas::test {

namespace {

using namespace eaas::mlx5;

std::uint32_t load_be32(const std::uint8_t* p) {
  std::uint32_t v;
  std::memcpy(&v, p, 4);
  return from_be32(v);
}
std::uint64_t load_be64(const std::uint8_t* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return from_be64(v);
}

constexpr std::uint8_t kOpNop = static_cast<std::uint8_t>(opcode::nop);
constexpr std::uint8_t kOpWrite = static_cast<std::uint8_t>(opcode::rdma_write);
constexpr std::uint8_t kOpRead = static_cast<std::uint8_t>(opcode::rdma_read);
constexpr std::uint8_t kOpCs = static_cast<std::uint8_t>(opcode::atomic_cs);
constexpr std::uint8_t kOpFa = static_cast<std::uint8_t>(opcode::atomic_fa);

constexpr std::uint8_t synd(cqe_syndrome s) { return static_cast<std::uint8_t>(s); }

}  // namespace

soft_nic::soft_nic(soft_nic_options o) : opt_(o) {}

soft_nic::~soft_nic() { stop(); }

soft_nic::keys soft_nic::register_memory(const void* addr, std::size_t len) {
  std::lock_guard<std::mutex> lock(keys_mu_);
  const auto i = static_cast<std::uint32_t>(regions_.size());
  region r{reinterpret_cast<std::uint64_t>(addr), len, 0x1000u + 16 * i + 1, 0x70000u + 16 * i + 3};
  regions_.push_back(r);
  return {r.lkey, r.rkey};
}

bool soft_nic::unregister_memory(std::uint32_t rkey) {
  std::lock_guard<std::mutex> lock(keys_mu_);  // waits for a WQE being executed against the table
  for (region& r : regions_)
    if (r.rkey == rkey && r.len != 0) {
      r.len = 0;
      r.lkey = r.rkey = 0;
      return true;
    }
  return false;
}

int soft_nic::attach(const detail::ibgda::qp_state& q) {
  if (thread_.joinable()) throw std::logic_error("soft_nic: attach after start");
  auto m = std::make_unique<qp_model>();
  m->sq = q.sq;
  m->sq_size = q.sq_size;
  m->qpn = q.qpn;
  m->dbrec = q.sq_dbrec;
  m->uar = q.uar_db;
  m->cq = q.cq.cqe;
  m->cq_size = q.cq.size;
  m->dbr = from_be32(std::atomic_ref<std::uint32_t>(*q.sq_dbrec).load()) & 0xffffu;
  m->announced = m->dbr;
  m->pos = m->dbr;
  m->last_uar = std::atomic_ref<std::uint64_t>(*q.uar_db).load();
  qps_.push_back(std::move(m));
  return static_cast<int>(qps_.size() - 1);
}

void soft_nic::detach(int qp) {
  if (thread_.joinable()) throw std::logic_error("soft_nic: detach while running");
  qps_[qp]->detached = true;
}

void soft_nic::start() {
  stop_.store(false);
  thread_ = std::thread([this] { run(); });
}

void soft_nic::stop() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

void soft_nic::inject_error(int qp, std::uint64_t wqe_index, std::uint8_t syndrome) {
  qps_[qp]->inject_syndrome.store(syndrome, std::memory_order_relaxed);
  qps_[qp]->inject_at.store(wqe_index, std::memory_order_release);
}

void soft_nic::kill_peer(int qp) { qps_[qp]->dead.store(true, std::memory_order_release); }

std::string soft_nic::first_violation() const {
  std::lock_guard<std::mutex> lock(mu_);
  return first_violation_;
}

void soft_nic::violation(const std::string& what) {
  std::lock_guard<std::mutex> lock(mu_);
  if (violations_.fetch_add(1) == 0) first_violation_ = what;
}

void soft_nic::wait_ns(std::uint64_t ns) const {
  const std::uint64_t until = detail::now_ns() + ns;
  while (detail::now_ns() < until && !stop_.load(std::memory_order_relaxed)) std::this_thread::yield();
}

const soft_nic::region* soft_nic::find(std::uint32_t key, bool remote, std::uint64_t addr, std::uint64_t len) const {
  for (const region& r : regions_) {
    if ((remote ? r.rkey : r.lkey) != key) continue;
    if (addr < r.addr || len > r.len || addr - r.addr > r.len - len) return nullptr;
    return &r;
  }
  return nullptr;
}

void soft_nic::run() {
  std::uint32_t idle = 0;
  while (!stop_.load(std::memory_order_acquire)) {
    bool busy = false;
    if (!paused_.load(std::memory_order_acquire))
      for (auto& m : qps_) busy |= step(*m);
    if (busy) {
      idle = 0;
    } else if (++idle < 256) {
      detail::spin_pause(0);
    } else if (idle < 4096) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
}

// One pass over a QP: read the doorbell and its record, execute what both allow, land and retire.
bool soft_nic::step(qp_model& m) {
  if (m.detached) return false;
  bool busy = false;
  const std::uint64_t uar = std::atomic_ref<std::uint64_t>(*m.uar).load(std::memory_order_acquire);
  if (uar != m.last_uar) {
    m.last_uar = uar;
    m.doorbells.fetch_add(1, std::memory_order_relaxed);
    std::uint8_t b[8];
    std::memcpy(b, &uar, 8);
    const std::uint32_t w0 = load_be32(b), w1 = load_be32(b + 4);
    if ((w1 >> 8) != m.qpn) violation("doorbell names QP " + std::to_string(w1 >> 8));
    const auto idx = static_cast<std::uint16_t>(w0 >> 8);
    // The doorbell names the newest WQE, at most a ring ahead of what was announced before; anything
    // else is a doorbell that went backwards (two posters ringing out of order).
    const std::uint32_t ahead = static_cast<std::uint16_t>(idx - static_cast<std::uint16_t>(m.announced)) + 1u;
    if (ahead > m.sq_size)
      violation("doorbell names WQE index " + std::to_string(idx) + ", behind or more than a ring ahead of " +
                std::to_string(m.announced));
    else
      m.announced += ahead;
    busy = true;
  }
  const std::uint32_t rec = from_be32(std::atomic_ref<std::uint32_t>(*m.dbrec).load(std::memory_order_acquire));
  const auto moved = static_cast<std::uint16_t>(static_cast<std::uint16_t>(rec) - static_cast<std::uint16_t>(m.dbr));
  if (moved != 0) {
    if ((rec >> 16) != 0) violation("doorbell record has bits above the 16-bit producer index");
    // The producer can be at most a ring ahead of the NIC: a larger step is a record that went backwards.
    if (moved > m.sq_size)
      violation("doorbell record moved from " + std::to_string(m.dbr) + " to " + std::to_string(rec) +
                " (backwards, or more than a ring ahead)");
    else
      m.dbr += moved;
  }
  // The record is written before the doorbell: once a doorbell is seen, its record must cover it.
  if (busy && m.announced > m.dbr)
    violation("doorbell announces WQE " + std::to_string(m.announced - 1) + " beyond the doorbell record " +
              std::to_string(m.dbr));
  const std::uint64_t limit = opt_.require_doorbell ? std::min(m.announced, m.dbr) : m.dbr;
  while (m.pos < limit && !stop_.load(std::memory_order_relaxed) && !paused_.load(std::memory_order_relaxed)) {
    execute(m);
    busy = true;
  }
  if (!m.flight.empty()) {  // idle (or caught up): outstanding responses land
    land_all(m);
    retire(m);
    busy = true;
  }
  return busy;
}

void soft_nic::land(inflight& f) {
  if (!f.pending) return;
  std::memcpy(reinterpret_cast<void*>(f.dst), f.data.data(), f.data.size());
  f.pending = false;
}

void soft_nic::land_all(qp_model& m) {
  for (auto& f : m.flight) land(f);
}

void soft_nic::retire(qp_model& m) {
  while (!m.flight.empty() && !m.flight.front().pending) {
    const inflight& f = m.flight.front();
    if (f.cqe) write_cqe(m, f.index, f.byte_cnt);
    m.flight.pop_front();
  }
}

void soft_nic::store_cqe(qp_model& m, const void* bytes64) {
  std::uint32_t w[16];
  std::memcpy(w, bytes64, 64);
  auto* dst = reinterpret_cast<std::uint32_t*>(m.cq);  // collapsed: always entry 0
  for (int i = 0; i < 15; ++i) std::atomic_ref<std::uint32_t>(dst[i]).store(w[i], std::memory_order_relaxed);
  std::atomic_ref<std::uint32_t>(dst[15]).store(w[15], std::memory_order_release);
  ++m.cqe_count;
  m.cqes.fetch_add(1, std::memory_order_release);
}

void soft_nic::write_cqe(qp_model& m, std::uint64_t index, std::uint32_t byte_cnt) {
  cqe64 c{};
  c.byte_cnt_be = to_be32(byte_cnt);
  c.sop_drop_qpn_be = to_be32(m.qpn & 0xffffffu);
  c.wqe_counter_be = to_be16(static_cast<std::uint16_t>(index));
  // The owner bit flips every pass over the CQ buffer, as on hardware; the poller must not rely on it.
  c.op_own =
      static_cast<std::uint8_t>(static_cast<std::uint8_t>(cqe_opcode::req) << 4 | ((m.cqe_count / m.cq_size) & 1u));
  store_cqe(m, &c);
}

void soft_nic::write_err_cqe(qp_model& m, std::uint64_t index, std::uint8_t op, std::uint8_t syndrome) {
  err_cqe64 c{};
  c.vendor_err_synd = 0x42;
  c.syndrome = syndrome;
  c.s_wqe_opcode_qpn_be = to_be32(static_cast<std::uint32_t>(op) << 24 | (m.qpn & 0xffffffu));
  c.wqe_counter_be = to_be16(static_cast<std::uint16_t>(index));
  c.op_own =
      static_cast<std::uint8_t>(static_cast<std::uint8_t>(cqe_opcode::req_err) << 4 | ((m.cqe_count / m.cq_size) & 1u));
  store_cqe(m, &c);
  m.error_cqes.fetch_add(1, std::memory_order_release);
}

// The QP goes to error at WQE `index`: everything before it completes (responses land, CQEs are
// written), the failed WQE gets an error CQE, and every later WQE will be flushed.
void soft_nic::fail(qp_model& m, std::uint64_t index, std::uint8_t op, std::uint8_t syndrome) {
  land_all(m);
  retire(m);
  write_err_cqe(m, index, op, syndrome);
  m.in_error = true;
}

void soft_nic::execute(qp_model& m) {
  const std::uint64_t index = m.pos++;
  std::uint8_t w[64];
  std::memcpy(w, m.sq[index & (m.sq_size - 1)].bytes, 64);
  const std::uint32_t c0 = load_be32(w), c1 = load_be32(w + 4);
  const auto op = static_cast<std::uint8_t>(c0);
  if (m.in_error) {  // flushed, whether or not it asked for a CQE
    write_err_cqe(m, index, op, synd(cqe_syndrome::wr_flush));
    return;
  }
  if (opt_.wqe_delay_ns != 0) wait_ns(opt_.wqe_delay_ns);

  // Decode and check the WQE as the hardware would parse it.
  const auto wqe_index = static_cast<std::uint16_t>(c0 >> 8);
  const std::uint32_t opmod = c0 >> 24, qpn = c1 >> 8, ds = c1 & 0xffu;
  const std::uint8_t fm_ce_se = w[11];
  std::string bad;
  if (wqe_index != static_cast<std::uint16_t>(index))
    bad = "WQE at index " + std::to_string(index) + " carries index " + std::to_string(wqe_index) +
          " (stale slot: the doorbell record ran ahead of the WQEs)";
  else if (qpn != m.qpn)
    bad = "WQE " + std::to_string(index) + " names QP " + std::to_string(qpn);
  else if (opmod != 0 || w[8] != 0 || w[9] != 0 || w[10] != 0)
    bad = "WQE " + std::to_string(index) + " has nonzero opmod/signature/reserved bytes";
  else if ((fm_ce_se & ~(kCtrlCqUpdate | kCtrlSolicited | kCtrlFenceModeMask)) != 0)
    bad = "WQE " + std::to_string(index) + " has unknown fm_ce_se bits";
  else if (ds == 0 || ds * kSegUnit > kSendWqeBB)
    bad = "WQE " + std::to_string(index) + " has ds " + std::to_string(ds);

  std::uint32_t inl_bytes = 0;
  bool inl = false;
  if (bad.empty()) {
    switch (op) {
      case kOpNop:
        break;
      case kOpWrite:
        if (ds >= 3) {
          const std::uint32_t bc = load_be32(w + 32);
          inl = (bc & kInlineSeg) != 0;
          inl_bytes = bc & ~kInlineSeg;
          if (inl && (inl_bytes > 28 || ds != (36 + inl_bytes + 15) / 16)) bad = "inline WRITE with a wrong ds";
          if (!inl && ds != 3) bad = "WRITE with a wrong ds";
        } else if (ds != 2) {
          bad = "WRITE with a wrong ds";
        }
        break;
      case kOpRead:
        if (ds != 2 && ds != 3) bad = "READ with a wrong ds";
        if (ds == 3 && (load_be32(w + 32) & kInlineSeg) != 0) bad = "READ with inline data";
        break;
      case kOpCs:
      case kOpFa:
        if (ds != 4 || load_be32(w + 48) != 8) bad = "atomic with a wrong ds or result size";
        break;
      default:
        bad = "unsupported opcode " + std::to_string(op);
    }
  }
  if (!bad.empty()) {
    violation(bad);
    fail(m, index, op, synd(cqe_syndrome::local_qp_op));
    return;
  }

  if (const std::uint64_t at = m.inject_at.load(std::memory_order_acquire); at == index) {
    fail(m, index, op, m.inject_syndrome.load(std::memory_order_relaxed));
    return;
  }
  if (m.dead.load(std::memory_order_acquire)) {
    wait_ns(opt_.retry_timeout_ns);  // ack_timeout x retries, compressed
    fail(m, index, op, synd(cqe_syndrome::transport_retry_exc));
    return;
  }

  // A fence waits for every earlier READ / atomic response.
  if ((fm_ce_se & kCtrlFenceModeMask) != 0) {
    bool waited = false;
    for (auto& f : m.flight) {
      waited |= f.pending;
      land(f);
    }
    if (waited) m.fenced_waits.fetch_add(1, std::memory_order_relaxed);
  }

  inflight f{index, (fm_ce_se & kCtrlCqUpdate) != 0, 0, false, 0, 0, {}};
  // Keys are checked and the memory touched under one lock: once unregister_memory returns, nothing
  // lands through that key (as ibv_dereg_mr guarantees).
  std::unique_lock<std::mutex> keys_lock(keys_mu_);
  const std::uint64_t raddr = load_be64(w + 16);
  const std::uint32_t rkey = load_be32(w + 24);
  switch (op) {
    case kOpNop:
      break;
    case kOpWrite: {
      std::uint32_t n = 0;
      const std::uint8_t* src = nullptr;
      if (inl) {
        n = inl_bytes;
        src = w + 36;
      } else if (ds == 3) {
        n = load_be32(w + 32);
        const std::uint32_t lkey = load_be32(w + 36);
        const std::uint64_t laddr = load_be64(w + 40);
        if (find(lkey, false, laddr, n) == nullptr) return fail(m, index, op, synd(cqe_syndrome::local_prot));
        src = reinterpret_cast<const std::uint8_t*>(laddr);
      }
      if (n != 0 && find(rkey, true, raddr, n) == nullptr) return fail(m, index, op, synd(cqe_syndrome::remote_access));
      if (n == 8 && (raddr & 7u) == 0) {  // an aligned 8-byte write is one untorn store (signals rely on it)
        std::uint64_t v;
        std::memcpy(&v, src, 8);
        std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(raddr)).store(v, std::memory_order_release);
      } else if (n == 4 && (raddr & 3u) == 0) {  // likewise 4 bytes (endpoint state words: close notices)
        std::uint32_t v;
        std::memcpy(&v, src, 4);
        std::atomic_ref<std::uint32_t>(*reinterpret_cast<std::uint32_t*>(raddr)).store(v, std::memory_order_release);
      } else if (n != 0) {
        std::memcpy(reinterpret_cast<void*>(raddr), src, n);
        std::atomic_thread_fence(std::memory_order_release);
      }
      break;
    }
    case kOpRead: {
      if (ds == 2) break;
      const std::uint32_t n = load_be32(w + 32), lkey = load_be32(w + 36);
      const std::uint64_t laddr = load_be64(w + 40);
      if (find(lkey, false, laddr, n) == nullptr) return fail(m, index, op, synd(cqe_syndrome::local_prot));
      if (find(rkey, true, raddr, n) == nullptr) return fail(m, index, op, synd(cqe_syndrome::remote_access));
      f.data.assign(reinterpret_cast<const std::uint8_t*>(raddr), reinterpret_cast<const std::uint8_t*>(raddr) + n);
      f.dst = laddr;
      f.byte_cnt = n;
      f.pending = true;
      break;
    }
    case kOpCs:
    case kOpFa: {
      const std::uint64_t swap_add = load_be64(w + 32), compare = load_be64(w + 40);
      const std::uint32_t lkey = load_be32(w + 52);
      const std::uint64_t laddr = load_be64(w + 56);
      if (find(lkey, false, laddr, 8) == nullptr) return fail(m, index, op, synd(cqe_syndrome::local_prot));
      if (find(rkey, true, raddr, 8) == nullptr) return fail(m, index, op, synd(cqe_syndrome::remote_access));
      if ((raddr & 7u) != 0) return fail(m, index, op, synd(cqe_syndrome::remote_inval_req));
      std::atomic_ref<std::uint64_t> word(*reinterpret_cast<std::uint64_t*>(raddr));
      std::uint64_t old;
      if (op == kOpFa) {
        old = word.fetch_add(swap_add, std::memory_order_acq_rel);
      } else {
        old = compare;
        word.compare_exchange_strong(old, swap_add, std::memory_order_acq_rel, std::memory_order_acquire);
      }
      f.data.resize(8);
      std::memcpy(f.data.data(), &old, 8);
      f.dst = laddr;
      f.byte_cnt = 8;
      f.pending = true;
      break;
    }
  }
  keys_lock.unlock();
  if (f.pending) {
    f.lag_left = opt_.response_lag;
    if (f.lag_left == 0) land(f);
  }
  // Earlier responses come closer to landing with every WQE executed after them.
  for (auto& e : m.flight)
    if (e.pending && --e.lag_left == 0) land(e);
  m.flight.push_back(std::move(f));
  m.executed.fetch_add(1, std::memory_order_release);
  retire(m);
}

}  // namespace eaas::test
