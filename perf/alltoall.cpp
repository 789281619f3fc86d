// eaas-alltoall: the MoE dispatch/combine pattern between M senders and N receivers, each a process.
//
// Every sender holds `--tokens` tokens of `--hidden` elements; each token picks `--topk` distinct experts
// of `--experts` (seeded), experts live on receivers round robin (expert e on receiver e mod N), and a
// token travels once to every receiver hosting one of its experts (dispatch, with its token index). The
// receiver answers every token it got with one row of results (combine), which the sender gathers. Rows
// are deterministic patterns of (sender, token, receiver): before timing, one round is checked byte for
// byte on both sides (#wrong counts bad rows), and the last timed round is checked again.
//
// Output: nccl-tests columns (size = dispatched bytes per sender, time = the average dispatch + combine
// round, algbw = bytes a sender moves both ways / time) plus per-phase µs (min/avg/max over ranks), and
// the floor measured in the same run: memcpy of the same bytes in one process (shm moves bytes through
// memory, so this is what the copies alone cost).
//
// `--transport nvlink` (CUDA builds): the same plan, patterns, checks and columns, with every rank a process
// on its own GPU (rank i on GPU i % device count), regions in device memory, and the rows moved by
// kernels through the device ops (alltoall_gpu.cpp, alltoall_kernels.cu); the floor is the copy
// engine moving the busiest GPU's bytes, and NCCL's grouped send/recv of the same bytes runs in the same
// processes as the baseline (alltoall_nccl.cpp, when NCCL was found).
//
//   eaas-alltoall --senders 2 --receivers 2 --tokens 128 --hidden 7168 --topk 8 --experts 256
//   eaas-alltoall --transport nvlink --senders 1 --receivers 3

#include "alltoall.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <vector>

#include "driver.hpp"
#if EAAS_A2A_WITH_GPU
#include "alltoall_gpu.hpp"
#endif

extern char** environ;

using namespace eaas;
using namespace eaas::perf;

namespace eaas::perf::a2a {

void connect_peers(const options& o, transport_kind want, rank_state& st) {
  constexpr std::uint64_t kWait = 60'000'000'000ull;
  const bool sender = o.rank < static_cast<int>(o.senders);
  handle_bytes ch, rh;
  EAAS_PERF_CHECK(st.ctx->connection_handle(ch));
  EAAS_PERF_CHECK(st.mine->export_handle(rh));
  EAAS_PERF_CHECK(publish(o.rendezvous, name_of(o, o.rank), {ch, rh}));
  const std::uint32_t n = sender ? o.receivers : o.senders;
  for (std::uint32_t i = 0; i < n; ++i) {
    const int peer = sender ? static_cast<int>(o.senders + i) : static_cast<int>(i);
    std::vector<handle_bytes> theirs;
    EAAS_PERF_CHECK(await_peer(o.rendezvous, name_of(o, peer), 2, kWait, theirs));
    std::unique_ptr<endpoint> ep;
    std::unique_ptr<remote_region> rr;
    EAAS_PERF_CHECK(st.ctx->connect(theirs[0], ep));
    if (ep->transport() != want)
      die("connect to " + name_of(o, peer) + " chose " + transport_name(ep->transport()) + ", not " +
              transport_name(want),
          status::unsupported);
    EAAS_PERF_CHECK(ep->import_region(theirs[1], rr));
    st.eps.push_back(std::move(ep));
    st.peers.push_back(std::move(rr));
  }
}

}  // namespace eaas::perf::a2a

namespace {

constexpr std::uint64_t kSecond = 1'000'000'000ull;

using a2a::ckey;
using a2a::dkey;
using a2a::fill;
using a2a::mix;
using a2a::name_of;
using a2a::options;
using a2a::plan;
using a2a::same;

std::uint64_t now_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

using a2a::rank_state;

void connect_all(const options& o, const plan& p, rank_state& st) {
  const bool sender = o.rank < static_cast<int>(o.senders);
  EAAS_PERF_CHECK(context::create({.name = name_of(o, o.rank)}, st.ctx));
  EAAS_PERF_CHECK(st.ctx->allocate(sender ? p.send_block * o.receivers : p.recv_block * o.senders, st.mine));
  a2a::connect_peers(o, transport_kind::shm, st);
}

struct rank_result {
  double dispatch_us = 0, combine_us = 0, round_us = 0;  // per round, averaged
  std::uint64_t wrong = 0;
};

rank_result run_sender(const options& o, const plan& p, rank_state& st) {
  const auto s = static_cast<std::uint32_t>(o.rank);
  std::vector<std::vector<std::uint32_t>> toks(o.receivers);
  std::vector<std::vector<unsigned char>> staging(o.receivers);
  std::vector<unsigned char> rows(std::size_t{o.tokens} * p.row);
  for (std::uint32_t t = 0; t < o.tokens; ++t) fill(rows.data() + t * p.row, p.row, dkey(s, t));
  for (std::uint32_t r = 0; r < o.receivers; ++r) {
    toks[r] = p.tokens_for(s, r);
    staging[r].assign(64 + p.idx_bytes + toks[r].size() * p.row, 0);
  }
  rank_result res;
  const std::uint32_t total = o.warmup + o.iters + 1;  // round 0 is checked, then warm-up, timed rounds
  for (std::uint32_t it = 0; it < total; ++it) {
    const std::uint64_t seq = it + 1;
    const bool check = it == 0 || it + 1 == total;
    const std::uint64_t t0 = now_ns();
    for (std::uint32_t r = 0; r < o.receivers; ++r) {
      auto& sg = staging[r];
      const auto count = static_cast<std::uint32_t>(toks[r].size());
      std::memcpy(sg.data(), &count, 4);
      std::memcpy(sg.data() + 64, toks[r].data(), count * 4);
      for (std::uint32_t i = 0; i < count; ++i)  // gather: the packing a dispatch kernel does
        std::memcpy(sg.data() + 64 + p.idx_bytes + i * p.row, rows.data() + toks[r][i] * p.row, p.row);
      const auto ep = st.eps[r]->view();
      const auto dst = st.peers[r]->view();
      EAAS_PERF_CHECK(put_signal(coop_thread{}, ep, dst, s * p.recv_block + 64, sg.data(), sg.size(), dst,
                                 s * p.recv_block, seq, signal_op::set));
    }
    for (std::uint32_t r = 0; r < o.receivers; ++r) EAAS_PERF_CHECK(quiet(coop_thread{}, st.eps[r]->view()));
    const std::uint64_t t1 = now_ns();
    for (std::uint32_t r = 0; r < o.receivers; ++r) {
      const auto* sig = reinterpret_cast<const std::uint64_t*>(st.base() + r * p.send_block);
      EAAS_PERF_CHECK(wait_signal(st.eps[r]->view(), sig, cmp_op::ge, seq, timeout{30 * kSecond}));
    }
    const std::uint64_t t2 = now_ns();
    if (check)
      for (std::uint32_t r = 0; r < o.receivers; ++r)
        for (std::size_t i = 0; i < toks[r].size(); ++i)
          res.wrong += !same(st.base() + r * p.send_block + 64 + i * p.row, p.row, ckey(s, toks[r][i], r));
    if (it >= o.warmup + 1) {
      res.dispatch_us += double(t1 - t0) * 1e-3;
      res.combine_us += double(t2 - t1) * 1e-3;
      res.round_us += double(t2 - t0) * 1e-3;
    }
  }
  res.dispatch_us /= o.iters;
  res.combine_us /= o.iters;
  res.round_us /= o.iters;
  return res;
}

rank_result run_receiver(const options& o, const plan& p, rank_state& st) {
  const auto r = static_cast<std::uint32_t>(o.rank - o.senders);
  // The "experts' answers", made once: the timed rounds measure moving them, not generating them.
  std::vector<std::vector<std::uint32_t>> want(o.senders);
  std::vector<std::vector<unsigned char>> reply(o.senders);
  for (std::uint32_t s = 0; s < o.senders; ++s) {
    want[s] = p.tokens_for(s, r);
    reply[s].resize(want[s].size() * p.row);
    for (std::size_t i = 0; i < want[s].size(); ++i) fill(reply[s].data() + i * p.row, p.row, ckey(s, want[s][i], r));
  }
  rank_result res;
  const std::uint32_t total = o.warmup + o.iters + 1;
  for (std::uint32_t it = 0; it < total; ++it) {
    const std::uint64_t seq = it + 1;
    const bool check = it == 0 || it + 1 == total;
    const std::uint64_t t0 = now_ns();
    for (std::uint32_t s = 0; s < o.senders; ++s) {
      const auto* sig = reinterpret_cast<const std::uint64_t*>(st.base() + s * p.recv_block);
      EAAS_PERF_CHECK(wait_signal(st.eps[s]->view(), sig, cmp_op::ge, seq, timeout{30 * kSecond}));
    }
    const std::uint64_t t1 = now_ns();
    for (std::uint32_t s = 0; s < o.senders; ++s) {
      const unsigned char* blk = st.base() + s * p.recv_block + 64;
      if (check) {
        std::uint32_t count;
        std::memcpy(&count, blk, 4);
        if (count != want[s].size()) res.wrong += std::max<std::size_t>(count, want[s].size());
        for (std::uint32_t i = 0; i < std::min<std::size_t>(count, want[s].size()); ++i) {
          std::uint32_t t;
          std::memcpy(&t, blk + 64 + i * 4, 4);
          res.wrong += t != want[s][i] || !same(blk + 64 + p.idx_bytes + i * p.row, p.row, dkey(s, want[s][i]));
        }
      }
      if (o.inject_error && r == 0 && s == 0 && !reply[s].empty()) reply[s][reply[s].size() / 2] ^= check ? 1 : 0;
      const auto ep = st.eps[s]->view();
      const auto dst = st.peers[s]->view();
      EAAS_PERF_CHECK(put_signal(coop_thread{}, ep, dst, r * p.send_block + 64, reply[s].data(), reply[s].size(), dst,
                                 r * p.send_block, seq, signal_op::set));
      if (o.inject_error && r == 0 && s == 0 && !reply[s].empty()) reply[s][reply[s].size() / 2] ^= check ? 1 : 0;
    }
    for (std::uint32_t s = 0; s < o.senders; ++s) EAAS_PERF_CHECK(quiet(coop_thread{}, st.eps[s]->view()));
    if (it >= o.warmup + 1) {
      res.dispatch_us += double(t1 - t0) * 1e-3;  // waiting for every sender's dispatch
      res.combine_us += double(now_ns() - t1) * 1e-3;
    }
  }
  res.dispatch_us /= o.iters;
  res.combine_us /= o.iters;
  return res;
}

/// memcpy of the bytes one sender moves (dispatch out, combine back), in this process: the floor.
double memcpy_floor_us(const plan& p, std::uint32_t iters) {
  const std::size_t bytes = p.dispatch_bytes(0) * 2;
  std::vector<unsigned char> a(bytes, 1), b(bytes, 2);
  std::vector<double> us;
  for (std::uint32_t i = 0; i < iters + 3; ++i) {
    const std::uint64_t t0 = now_ns();
    std::memcpy(b.data(), a.data(), bytes);
    if (i >= 3) us.push_back(double(now_ns() - t0) * 1e-3);
    a[i % bytes] ^= b[(i * 7) % bytes];  // keep the copies live
  }
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

// Stay until every rank is done (the launcher closes our stdin): a peer's last op must not find this
// process (and its memory) gone.
void hold_until_released() {
  char b[64];
  while (::read(0, b, sizeof(b)) > 0) {
  }
}

int run_rank(const options& o) {
  const plan p(o);
  if (o.transport == "nvlink") {
#if EAAS_A2A_WITH_GPU
    a2a::run_rank_nvlink(o, p, [](const nlohmann::json& line) {
      std::printf("%s\n", line.dump().c_str());
      std::fflush(stdout);
      hold_until_released();
    });
    return 0;
#else
    die("--transport nvlink: this eaas-alltoall was built without CUDA", status::unsupported);
#endif
  }
  rank_state st;
  connect_all(o, p, st);
  const rank_result r = o.rank < static_cast<int>(o.senders) ? run_sender(o, p, st) : run_receiver(o, p, st);
  std::printf("{\"rank\":%d,\"dispatch_us\":%.3f,\"combine_us\":%.3f,\"round_us\":%.3f,\"wrong\":%llu}\n", o.rank,
              r.dispatch_us, r.combine_us, r.round_us, static_cast<unsigned long long>(r.wrong));
  std::fflush(stdout);
  hold_until_released();
  return 0;
}

/// min / avg / max of `key` over ranks [from, to).
/// The JSON fields both transports report: the shape, the headline columns, the per-phase times.
nlohmann::json result_json(const options& o, std::size_t size, double time_us, double algbw, std::uint64_t wrong,
                           double floor_us, const std::array<double, 3>& sd, const std::array<double, 3>& sc,
                           const std::array<double, 3>& rd, const std::array<double, 3>& rc) {
  return {{"senders", o.senders},
          {"receivers", o.receivers},
          {"tokens", o.tokens},
          {"hidden", o.hidden},
          {"topk", o.topk},
          {"experts", o.experts},
          {"dtype", o.dtype},
          {"size", size},
          {"time_us", time_us},
          {"algbw_gbs", algbw},
          {"wrong", wrong},
          {"floor_us", floor_us},
          {"dispatch_us", sd},
          {"combine_wait_us", sc},
          {"recv_dispatch_wait_us", rd},
          {"recv_combine_us", rc},
          {"date", today_utc()}};
}

std::array<double, 3> over_ranks(const std::vector<nlohmann::json>& res, const char* key, int from, int to) {
  double mn = 1e300, mx = 0, sum = 0;
  for (int i = from; i < to; ++i) {
    const double v = res[i].value(key, 0.0);
    mn = std::min(mn, v);
    mx = std::max(mx, v);
    sum += v;
  }
  return {mn, sum / (to - from), mx};
}

#if EAAS_A2A_WITH_GPU
double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Every rank's round stamps on one time axis: per timed round, minus sender 0's round start; the median
// over rounds. Each GPU has its own %globaltimer (the driver keeps those of one host near its clock); the
// margins bound the disagreement: a sender sees a receiver's answers after the receiver signalled them, a
// receiver sees a dispatch after the sender's round began (both >= 0 when the clocks agree).
nlohmann::json timeline(const options& o, const std::vector<nlohmann::json>& res) {
  const int S = static_cast<int>(o.senders), ranks = static_cast<int>(o.senders + o.receivers);
  for (const auto& r : res)
    if (!r.contains("stamps") || r["stamps"].size() != o.iters) return nullptr;
  auto at = [&](int rank, std::size_t k, int i) { return double(res[rank]["stamps"][k][i].get<std::uint64_t>()); };
  nlohmann::json out = nlohmann::json::array();
  for (int i = 0; i < ranks; ++i) {
    std::vector<double> v[4];
    for (std::size_t k = 0; k < o.iters; ++k)
      for (int j = 0; j < 4; ++j) v[j].push_back((at(i, k, j) - at(0, k, 0)) * 1e-3);
    out.push_back({{"rank", i},
                   {"gpu", res[i].value("gpu", -1)},
                   {"start_us", median(v[0])},
                   {"waited_us", median(v[1])},
                   {"last_signal_us", median(v[2])},
                   {"last_waited_us", median(v[3])}});
  }
  double answers = 1e300, dispatch = 1e300;
  for (std::size_t k = 0; k < o.iters; ++k)
    for (int s = 0; s < S; ++s)
      for (int r = S; r < ranks; ++r) {
        answers = std::min(answers, (at(s, k, 1) - at(r, k, 2)) * 1e-3);
        dispatch = std::min(dispatch, (at(r, k, 1) - at(s, k, 0)) * 1e-3);
      }
  return {{"ranks", out}, {"margin_answers_us", answers}, {"margin_dispatch_us", dispatch}};
}

std::vector<nlohmann::json> without_stamps(std::vector<nlohmann::json> res) {
  for (auto& r : res) r.erase("stamps");
  return res;
}

void print_timeline(const options& o, const nlohmann::json& t) {
  if (t.is_null()) return;
  std::printf("# timeline, us from sender 0's round start (median over the timed rounds; each GPU's %%globaltimer):\n");
  for (const auto& r : t["ranks"]) {
    const int i = r["rank"].get<int>();
    const bool sender = i < static_cast<int>(o.senders);
    const double start = r["start_us"], waited = r["waited_us"], last = r["last_signal_us"],
                 last_waited = r["last_waited_us"];
    if (sender)
      std::printf("#   %-4s GPU %d: kernel start %8.1f | last dispatch signal %8.1f | every answer seen %8.1f\n",
                  name_of(o, i).c_str(), r["gpu"].get<int>(), start, last, waited);
    else
      std::printf(
          "#   %-4s GPU %d: kernel start %8.1f | dispatch seen %8.1f (last block %8.1f) | last answer signal %8.1f "
          "(combine %.1f)\n",
          name_of(o, i).c_str(), r["gpu"].get<int>(), start, waited, last_waited, last, last - waited);
  }
  std::printf(
      "#   clock check (min over rounds, >= 0 when the GPUs' clocks agree): sender sees answers - receiver signalled "
      "them %.2f us; receiver sees dispatch - sender's round start %.2f us\n",
      t["margin_answers_us"].get<double>(), t["margin_dispatch_us"].get<double>());
}

// The nvlink table: the shm columns, then NCCL's time and its ratio to eaas, both from cudaEvents around
// the same number of queued rounds (launch gaps included on both sides); the kernel-timed eaas numbers
// (launch excluded) are the time column and the per-phase line.
int report_nvlink(const options& o, const plan& p, const std::vector<nlohmann::json>& res) {
  const int S = static_cast<int>(o.senders), ranks = static_cast<int>(o.senders + o.receivers);
  std::uint64_t wrong = 0, nccl_wrong = 0;
  bool nccl = true;
  for (const auto& r : res) {
    wrong += r.value("wrong", 0ull);
    nccl_wrong += r.value("nccl_wrong", 0ull);
    nccl = nccl && r.value("nccl", false);
  }
  const auto round = over_ranks(res, "round_us", 0, S), sd = over_ranks(res, "dispatch_us", 0, S),
             sc = over_ranks(res, "combine_us", 0, S), rd = over_ranks(res, "dispatch_us", S, ranks),
             rc = over_ranks(res, "combine_us", S, ranks), loop = over_ranks(res, "loop_us", 0, ranks);
  const nlohmann::json fl = a2a::copy_engine_floor(o, p);
  const double floor_us = fl.value("floor_us", 0.0);
  const std::size_t size = p.dispatch_bytes(0);
  const double elt = o.dtype == "bf16" ? 2 : 4;
  const double algbw = double(size) * 2 / (round[1] * 1e-6) / 1e9;
  std::printf(
      "# eaas-alltoall: %u senders x %u receivers, %u tokens x %u hidden (%s), top-%u of %u experts, nvlink "
      "(%d x %s; rank i on GPU i %% %d)\n",
      o.senders, o.receivers, o.tokens, o.hidden, o.dtype.c_str(), o.topk, o.experts, fl.value("gpus", 0),
      fl.value("gpu_name", std::string("?")).c_str(), fl.value("gpus", 0));
  if (fl.value("gpus", 0) < ranks)
    std::printf("# warning: %d ranks share %d GPUs: ranks on one GPU time-share it, the numbers are not NVLink's\n",
                ranks, fl.value("gpus", 0));
  std::printf("%12s %12s %6s %10s %10s %10s %8s %12s %8s %10s %9s\n", "size", "count", "type", "time(us)", "algbw",
              "busbw", "#wrong", "floor(us)", "ratio", "nccl(us)", "nccl/eaas");
  std::array<double, 3> nround{}, nd{}, nc{}, nloop{};
  if (nccl) {
    nround = over_ranks(res, "nccl_round_us", 0, S);
    nd = over_ranks(res, "nccl_dispatch_us", 0, ranks);
    nc = over_ranks(res, "nccl_combine_us", 0, ranks);
    nloop = over_ranks(res, "nccl_loop_us", 0, ranks);
  }
  const double speedup = nccl && loop[1] > 0 ? nloop[1] / loop[1] : 0;
  std::printf("%12zu %12.0f %6s %10.2f %10.2f %10.2f %8llu %12.2f %7.2fx", size, double(size) / elt, o.dtype.c_str(),
              round[1], algbw, algbw, static_cast<unsigned long long>(wrong + nccl_wrong), floor_us,
              round[1] / floor_us);
  if (nccl)
    std::printf(" %10.2f %8.2fx\n", nloop[1], speedup);
  else
    std::printf(" %10s %9s\n", "-", "-");
  std::printf(
      "# eaas per phase, us, kernel-timed (%%globaltimer, launch excluded; min/avg/max over ranks): sender dispatch "
      "%.1f/%.1f/%.1f, sender wait for combine %.1f/%.1f/%.1f, receiver wait for dispatch %.1f/%.1f/%.1f, receiver "
      "combine %.1f/%.1f/%.1f\n",
      sd[0], sd[1], sd[2], sc[0], sc[1], sc[2], rd[0], rd[1], rd[2], rc[0], rc[1], rc[2]);
  std::printf(
      "# eaas loop: %.2f us per round (cudaEvents around %u queued rounds released together by a device gate, "
      "launch gaps between the round kernels included; min/avg/max over ranks %.2f/%.2f/%.2f)\n",
      loop[1], o.iters, loop[0], loop[1], loop[2]);
  if (nccl) {
    std::printf(
        "# NCCL (grouped ncclSend/ncclRecv of the same bytes, same processes and GPUs): loop %.2f us per round "
        "(%.2f/%.2f/%.2f), per round %.2f us (senders, cudaEvents); dispatch %.1f/%.1f/%.1f, combine %.1f/%.1f/%.1f "
        "us (over ranks); #wrong %llu; NCCL / eaas: %.2fx like for like (loops), %.2fx vs eaas kernel-timed\n",
        nloop[1], nloop[0], nloop[1], nloop[2], nround[1], nd[0], nd[1], nd[2], nc[0], nc[1], nc[2],
        static_cast<unsigned long long>(nccl_wrong), speedup, nround[1] / round[1]);
  } else {
    std::printf("# NCCL baseline: %s\n",
                a2a::nccl_built() ? "skipped (--no-nccl)" : "not built (NCCL was not found at configure time)");
  }
  std::printf(
      "# floor: the busiest GPU's bytes per phase (dispatch %zu, combine %zu) copied by the copy engine "
      "(cudaMemcpyPeerAsync GPU %d -> GPU %d, median of %d, in the launcher after the ranks ended): %.2f + %.2f us\n",
      fl.value("dispatch_bytes", std::size_t{0}), fl.value("combine_bytes", std::size_t{0}), fl.value("src_gpu", 0),
      fl.value("dst_gpu", 0), fl.value("reps", 0), fl.value("dispatch_us", 0.0), fl.value("combine_us", 0.0));
  const nlohmann::json pat = fl.value("pattern", nlohmann::json::object());
  std::printf(
      "# the phases' whole patterns on the copy engines at once (every copy of the phase from its own GPU; event "
      "chain, median): dispatch %zu copies %.2f us, combine %zu copies %.2f us; one copy of the busiest bytes "
      "through the same chain: %.2f + %.2f us\n",
      pat.value("dispatch_copies", std::size_t{0}), pat.value("dispatch_all_us", 0.0),
      pat.value("combine_copies", std::size_t{0}), pat.value("combine_all_us", 0.0), pat.value("dispatch_one_us", 0.0),
      pat.value("combine_one_us", 0.0));
  if (o.combine_blocks != 0 || o.combine_rows != 1)
    std::printf("# combine: %u blocks per receiver, %u rows per put\n", res[S].value("blocks", 0u),
                res[S].value("rows_per_put", 1u));
  const nlohmann::json tl = timeline(o, res);
  print_timeline(o, tl);
  if (!o.json.empty()) {
    nlohmann::json j = result_json(o, size, round[1], algbw, wrong, floor_us, sd, sc, rd, rc);
    j["transport"] = "nvlink";
    j["floor"] = fl;
    j["combine_blocks"] = o.combine_blocks;
    j["combine_rows"] = o.combine_rows;
    j["timeline"] = tl;
    j.update(nlohmann::json{{"loop_us", loop},
                            {"nccl", nccl ? nlohmann::json{{"loop_us", nloop},
                                                           {"round_us", nround},
                                                           {"dispatch_us", nd},
                                                           {"combine_us", nc},
                                                           {"wrong", nccl_wrong},
                                                           {"nccl_over_eaas_loop", speedup},
                                                           {"nccl_over_eaas_kernel", nround[1] / round[1]}}
                                          : nlohmann::json(nullptr)},
                            {"ranks", without_stamps(res)}});
    std::ofstream(o.json) << j.dump(2) << "\n";
  }
  return wrong == 0 && nccl_wrong == 0 ? 0 : 1;
}
#endif

int launch(options o) {
  const plan p(o);
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("eaas-a2a-" + std::to_string(::getpid()))).string();
  std::filesystem::create_directories(dir);
  const int ranks = static_cast<int>(o.senders + o.receivers);
  std::vector<pid_t> pids(ranks);
  std::vector<FILE*> outs(ranks);
  std::vector<int> ins(ranks);
  for (int i = 0; i < ranks; ++i) {
    int fd[2], in[2];
    if (::pipe2(fd, O_CLOEXEC) != 0 || ::pipe2(in, O_CLOEXEC) != 0) die("pipe", status::internal_error);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fd[1], 1);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    std::vector<std::string> args = {"/proc/self/exe",
                                     "--role",
                                     "rank",
                                     "--rank",
                                     std::to_string(i),
                                     "--rendezvous",
                                     dir,
                                     "--senders",
                                     std::to_string(o.senders),
                                     "--receivers",
                                     std::to_string(o.receivers),
                                     "--tokens",
                                     std::to_string(o.tokens),
                                     "--hidden",
                                     std::to_string(o.hidden),
                                     "--topk",
                                     std::to_string(o.topk),
                                     "--experts",
                                     std::to_string(o.experts),
                                     "--dtype",
                                     o.dtype,
                                     "--iters",
                                     std::to_string(o.iters),
                                     "--warmup",
                                     std::to_string(o.warmup),
                                     "--seed",
                                     std::to_string(o.seed),
                                     "--transport",
                                     o.transport,
                                     "--blocks",
                                     std::to_string(o.blocks),
                                     "--combine-blocks",
                                     std::to_string(o.combine_blocks),
                                     "--combine-rows",
                                     std::to_string(o.combine_rows),
                                     "--timeout-ms",
                                     std::to_string(o.timeout_ms)};
    if (o.inject_error) args.push_back("--inject-error");
    if (!o.nccl) args.push_back("--no-nccl");
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (::posix_spawn(&pids[i], "/proc/self/exe", &fa, nullptr, argv.data(), environ) != 0)
      die("posix_spawn", status::internal_error);
    posix_spawn_file_actions_destroy(&fa);
    ::close(fd[1]);
    ::close(in[0]);
    ins[i] = in[1];
    outs[i] = ::fdopen(fd[0], "r");
  }
  std::vector<nlohmann::json> res(ranks);
  bool ok = true;
  for (int i = 0; i < ranks; ++i) {
    char* line = nullptr;  // one JSON line, long with nvlink's per-round stamps
    std::size_t cap = 0;
    if (::getline(&line, &cap, outs[i]) > 0) res[i] = nlohmann::json::parse(line, nullptr, false);
    std::free(line);
    std::fclose(outs[i]);
  }
  for (int i = 0; i < ranks; ++i) ::close(ins[i]);  // everyone is done: let them go
  for (int i = 0; i < ranks; ++i) {
    int stt = 0;
    ::waitpid(pids[i], &stt, 0);
    if (!WIFEXITED(stt) || WEXITSTATUS(stt) != 0 || !res[i].is_object()) ok = false;
  }
  std::filesystem::remove_all(dir);
  if (!ok) die("a rank failed", status::internal_error);
#if EAAS_A2A_WITH_GPU
  if (o.transport == "nvlink") return report_nvlink(o, p, res);
#endif

  std::uint64_t wrong = 0;
  for (const auto& r : res) wrong += r.value("wrong", 0ull);
  const int S = static_cast<int>(o.senders);
  const auto round = over_ranks(res, "round_us", 0, S), sd = over_ranks(res, "dispatch_us", 0, S),
             sc = over_ranks(res, "combine_us", 0, S);
  const auto rd = over_ranks(res, "dispatch_us", S, ranks), rc = over_ranks(res, "combine_us", S, ranks);
  const std::size_t size = p.dispatch_bytes(0);
  const double elt = o.dtype == "bf16" ? 2 : 4;
  const double algbw = double(size) * 2 / (round[1] * 1e-6) / 1e9;
  const double floor_us = memcpy_floor_us(p, 20);
  std::printf("# eaas-alltoall: %u senders x %u receivers, %u tokens x %u hidden (%s), top-%u of %u experts, shm\n",
              o.senders, o.receivers, o.tokens, o.hidden, o.dtype.c_str(), o.topk, o.experts);
  std::printf("%12s %12s %6s %10s %10s %10s %8s %12s %8s\n", "size", "count", "type", "time(us)", "algbw", "busbw",
              "#wrong", "floor(us)", "ratio");
  std::printf("%12zu %12.0f %6s %10.2f %10.2f %10.2f %8llu %12.2f %7.2fx\n", size, double(size) / elt, o.dtype.c_str(),
              round[1], algbw, algbw, static_cast<unsigned long long>(wrong), floor_us, round[1] / floor_us);
  std::printf(
      "# per phase, us (min/avg/max over ranks): sender dispatch %.1f/%.1f/%.1f, sender wait for combine "
      "%.1f/%.1f/%.1f, receiver wait for dispatch %.1f/%.1f/%.1f, receiver combine %.1f/%.1f/%.1f\n",
      sd[0], sd[1], sd[2], sc[0], sc[1], sc[2], rd[0], rd[1], rd[2], rc[0], rc[1], rc[2]);
  std::printf("# floor: memcpy of the %zu bytes one sender moves (dispatch + combine) in one process, median\n",
              size * 2);
  if (!o.json.empty())
    std::ofstream(o.json) << result_json(o, size, round[1], algbw, wrong, floor_us, sd, sc, rd, rc).dump(2) << "\n";
  return wrong == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eaas-alltoall: MoE dispatch + combine between M sender and N receiver processes"};
  options o;
  app.add_option("--role", o.role, "launch (default) or rank (internal)");
  app.add_option("--rank", o.rank, "internal");
  app.add_option("--rendezvous", o.rendezvous, "internal");
  app.add_option("--senders", o.senders, "sender processes (M)")->capture_default_str();
  app.add_option("--receivers", o.receivers, "receiver processes (N)")->capture_default_str();
  app.add_option("--tokens", o.tokens, "tokens per sender")->capture_default_str();
  app.add_option("--hidden", o.hidden, "hidden size")->capture_default_str();
  app.add_option("--topk", o.topk, "experts per token")->capture_default_str();
  app.add_option("--experts", o.experts, "experts (on receivers round robin)")->capture_default_str();
  app.add_option("--dtype", o.dtype, "bf16 or f32")->check(CLI::IsMember({"bf16", "f32"}))->capture_default_str();
  app.add_option("--iters", o.iters, "timed rounds")->capture_default_str();
  app.add_option("--warmup", o.warmup, "untimed rounds")->capture_default_str();
  app.add_option("--seed", o.seed, "routing seed")->capture_default_str();
  app.add_option("--json", o.json, "write the result as JSON");
  app.add_flag("--inject-error", o.inject_error, "tests: corrupt one answer byte, which the check must count");
  app.add_option("--transport", o.transport, "shm (processes, host memory) or nvlink (a GPU per process)")
      ->check(CLI::IsMember({"shm", "nvlink"}))
      ->capture_default_str();
  app.add_option("--blocks", o.blocks, "nvlink: kernel blocks per rank (0: one row per warp, at most the SM count)")
      ->capture_default_str();
  app.add_option("--combine-blocks", o.combine_blocks,
                 "nvlink: the receivers' kernel blocks, the combine's writers (0: as --blocks, or with --blocks 0 "
                 "16 blocks, 8 from 3 receivers: more writers into one GPU slow the combine down)")
      ->capture_default_str();
  app.add_option("--combine-rows", o.combine_rows,
                 "nvlink: rows per put in the combine (a warp's item; with --blocks 0 fewer items mean fewer blocks)")
      ->check(CLI::Range(1u, 1u << 20))
      ->capture_default_str();
  bool no_nccl = false;
  app.add_flag("--no-nccl", no_nccl, "nvlink: skip the NCCL baseline");
  app.add_option("--timeout-ms", o.timeout_ms, "nvlink: bound of every device wait")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  o.nccl = !no_nccl;
#if !EAAS_A2A_WITH_GPU
  if (o.transport == "nvlink")
    die("--transport nvlink: this eaas-alltoall was built without CUDA", status::unsupported);
#endif
  if (o.senders == 0 || o.receivers == 0 || o.tokens == 0 || o.hidden == 0 || o.topk == 0 || o.topk > o.experts ||
      o.iters == 0)
    die("need senders, receivers, tokens, hidden, iters >= 1 and 1 <= topk <= experts", status::invalid_argument);
  if (o.role == "rank") {
    if (o.rank < 0 || o.rank >= static_cast<int>(o.senders + o.receivers) || o.rendezvous.empty())
      die("--role rank needs --rank and --rendezvous", status::invalid_argument);
    return run_rank(o);
  }
  return launch(o);
}
