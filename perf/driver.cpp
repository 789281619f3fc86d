#include "driver.hpp"

#include <spawn.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <thread>

extern char** environ;

namespace eaas::perf {

latency_stats summarize(std::vector<double> v) {
  latency_stats s;
  s.iterations = v.size();
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  auto pct = [&](double p) {
    const auto i = static_cast<std::size_t>(std::ceil(p * static_cast<double>(v.size()))) - 1;
    return v[std::min(i, v.size() - 1)];
  };
  s.t_min = v.front();
  s.t_max = v.back();
  s.t_typical = v[v.size() / 2];
  s.t_avg = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  double var = 0;
  for (double x : v) var += (x - s.t_avg) * (x - s.t_avg);
  s.t_stdev = std::sqrt(var / static_cast<double>(v.size()));
  s.p99 = pct(0.99);
  s.p999 = pct(0.999);
  return s;
}

void print_latency_header(const std::vector<std::string>& extra) {
  std::printf("%10s %12s %14s %14s %17s %14s %15s %25s %27s", "#bytes", "#iterations", "t_min[usec]", "t_max[usec]",
              "t_typical[usec]", "t_avg[usec]", "t_stdev[usec]", "99% percentile[usec]", "99.9% percentile[usec]");
  for (const auto& e : extra) std::printf(" %14s", e.c_str());
  std::printf("\n");
}

void print_latency_row(std::size_t bytes, const latency_stats& s, const std::vector<double>& extra) {
  std::printf("%10zu %12zu %14.2f %14.2f %17.2f %14.2f %15.2f %25.2f %27.2f", bytes, s.iterations, s.t_min, s.t_max,
              s.t_typical, s.t_avg, s.t_stdev, s.p99, s.p999);
  for (double e : extra) std::printf(" %14.2f", e);
  std::printf("\n");
  std::fflush(stdout);
}

nlohmann::json to_json(std::size_t bytes, const latency_stats& s) {
  return {{"bytes", bytes},
          {"iterations", s.iterations},
          {"t_min_us", s.t_min},
          {"t_max_us", s.t_max},
          {"t_typical_us", s.t_typical},
          {"t_avg_us", s.t_avg},
          {"t_stdev_us", s.t_stdev},
          {"p99_us", s.p99},
          {"p999_us", s.p999}};
}

std::vector<std::size_t> size_sweep(std::size_t min, std::size_t max) {
  std::vector<std::size_t> v;
  for (std::size_t n = 1; n <= max && n != 0; n <<= 1)
    if (n >= min) v.push_back(n);
  return v;
}

status publish(const std::string& dir, const std::string& role, const std::vector<handle_bytes>& handles) {
  const std::string tmp = dir + "/." + role + ".tmp", final_path = dir + "/" + role;
  {
    std::ofstream f(tmp, std::ios::trunc);
    for (const auto& h : handles) f << handle_to_text(h) << "\n";
    if (!f) return status::internal_error;
  }
  return std::rename(tmp.c_str(), final_path.c_str()) == 0 ? status::ok : status::internal_error;
}

status await_peer(const std::string& dir, const std::string& role, std::size_t count, std::uint64_t timeout_ns,
                  std::vector<handle_bytes>& out) {
  const deadline until = deadline_after(timeout_ns);
  const std::string path = dir + "/" + role;
  while (now_ns() < until.ns) {
    std::ifstream f(path);
    if (f) {
      std::vector<handle_bytes> hs;
      std::string line;
      while (std::getline(f, line)) {
        handle_bytes h;
        if (handle_from_text(line, h) != status::ok) return status::invalid_handle;
        hs.push_back(std::move(h));
      }
      if (hs.size() != count) return status::invalid_handle;
      out = std::move(hs);
      return status::ok;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return status::timeout;
}

void die(const std::string& what, status s) {
  std::fprintf(stderr, "error: %s: %s", what.c_str(), status_name(s));
  if (!last_error().empty())
    std::fprintf(stderr, " (%.*s)", static_cast<int>(last_error().size()), last_error().data());
  std::fprintf(stderr, "\n");
  std::exit(2);
}

void connect_through(const std::string& dir, const char* me, const char* other, context& ctx, memory_region& region,
                     std::unique_ptr<endpoint>& ep, std::unique_ptr<remote_region>& peer) {
  handle_bytes ch, rh;
  EAAS_PERF_CHECK(ctx.connection_handle(ch));
  EAAS_PERF_CHECK(region.export_handle(rh));
  EAAS_PERF_CHECK(publish(dir, me, {ch, rh}));
  std::vector<handle_bytes> theirs;
  EAAS_PERF_CHECK(await_peer(dir, other, 2, 60'000'000'000ull, theirs));
  EAAS_PERF_CHECK(ctx.connect(theirs[0], ep));
  EAAS_PERF_CHECK(ep->import_region(theirs[1], peer));
}

std::vector<double> half_rtt_us(const std::vector<long long>& cycles, std::uint64_t span_ns) {
  double total = 0;
  for (long long c : cycles) total += static_cast<double>(c);
  const double ns_per_cycle = total > 0 ? static_cast<double>(span_ns) / total : 0;
  std::vector<double> us(cycles.size());
  for (std::size_t i = 0; i < cycles.size(); ++i) us[i] = static_cast<double>(cycles[i]) * ns_per_cycle / 2e3;
  return us;
}

int spawn_program(const std::string& path, const std::vector<std::string>& args) {
  std::vector<std::string> all{path};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (::posix_spawn(&pid, path.c_str(), nullptr, nullptr, argv.data(), environ) != 0)
    die("starting " + path, status::internal_error);
  return pid;
}

int spawn_self(const std::vector<std::string>& args) { return spawn_program("/proc/self/exe", args); }

std::string sibling_program(const std::string& name) {
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return {};
  const auto p = self.parent_path() / name;
  return std::filesystem::exists(p, ec) ? p.string() : std::string{};
}

std::string today_utc() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d", &tm);
  return buf;
}

}  // namespace eaas::perf
