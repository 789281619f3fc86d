#pragma once

// Runtime processes for tests: eaas-server / eaas-client / eaas-demo started with pipes, their JSON
// lines read back.

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "../common/spawn.hpp"
#include "eaas/runtime/model.hpp"

namespace eaas::test {

struct proc {
  test::spawned sp;
  ~proc() {
    if (sp.pid > 0) {
      ::kill(sp.pid, SIGKILL);
      ::waitpid(sp.pid, nullptr, 0);
    }
  }
  bool start(const char* bin, std::vector<std::string> args) {
    ::setenv("OPENBLAS_NUM_THREADS", "1", 0);  // the processes share few cores
    return test::spawn_with_pipes(bin, std::move(args), sp);
  }
  /// The next stdout line that parses as a JSON object with this "type" (others are skipped), within
  /// `timeout_ms`; an empty json on timeout or end of output.
  nlohmann::json next(const std::string& type, int timeout_ms = 60000) {
    const int fd = ::fileno(sp.from);
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      std::size_t nl;
      while ((nl = buf.find('\n')) != std::string::npos) {
        const std::string line = buf.substr(0, nl);
        buf.erase(0, nl + 1);
        auto j = nlohmann::json::parse(line, nullptr, false);
        if (!j.is_discarded() && j.is_object() && j.value("type", "") == type) return j;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
      if (left.count() <= 0) return {};
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char b[4096];
      const ssize_t n = ::read(fd, b, sizeof(b));
      if (n <= 0) return {};
      buf.append(b, static_cast<std::size_t>(n));
    }
  }
  std::string buf;
  int wait() {
    int st = 0;
    ::waitpid(sp.pid, &st, 0);
    sp.pid = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
};

/// Runs eaas-demo (`bin`) with `args` plus `--json FILE`; its exit code in `exit_code`, and the summary
/// it wrote (discarded json when none).
/// max over tokens of ||a - b||_inf / ||b||_inf for rows of `hidden` values (NaN in `a` counts as
/// infinitely wrong; a size mismatch too).
inline double rel_err(const std::vector<float>& a, const std::vector<float>& b, std::size_t hidden) {
  if (a.size() != b.size() || b.empty()) return std::numeric_limits<double>::infinity();
  double worst = 0;
  for (std::size_t t = 0; t < b.size() / hidden; ++t) {
    double num = 0, den = 0;
    for (std::size_t j = 0; j < hidden; ++j) {
      const double d = std::fabs(double(a[t * hidden + j]) - double(b[t * hidden + j]));
      num = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(num, d);
      den = std::max(den, double(std::fabs(b[t * hidden + j])));
    }
    worst = std::max(worst, den > 0 ? num / den : num);
  }
  return worst;
}

/// `n` token ids from `seed`.
inline std::vector<std::uint32_t> random_tokens(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::uint32_t> t(n);
  for (auto& v : t) v = static_cast<std::uint32_t>(rng());
  return t;
}

inline nlohmann::json demo_summary(const char* bin, std::vector<std::string> args, int& exit_code) {
  const std::string out = "/tmp/eaas-demo-summary-" + std::to_string(::getpid()) + ".json";
  args.insert(args.end(), {"--json", out});
  proc demo;
  exit_code = demo.start(bin, args) ? demo.wait() : -1;
  std::ifstream f(out);
  nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
  std::remove(out.c_str());
  return j;
}

/// What the malicious client (tests/runtime/evil_client.cpp) reported and how it exited.
struct evil_verdict {
  bool reported = false;
  int cases = 0, failures = -1, exit_code = -1;
};

inline evil_verdict run_evil(const char* bin, std::vector<std::string> args) {
  evil_verdict v;
  proc evil;
  if (!evil.start(bin, std::move(args))) return v;
  char line[256] = {};
  v.reported = std::fgets(line, sizeof(line), evil.sp.from) != nullptr &&
               std::sscanf(line, "evil: %d cases, %d failures", &v.cases, &v.failures) == 2;
  v.exit_code = evil.wait();
  return v;
}

inline std::vector<std::string> shape_args(const std::string& endpoint, const std::string& ns,
                                           const runtime::model_shape& kShape) {
  return {"--registry", endpoint,
          "--ns",       ns,
          "--seed",     "11",
          "--hidden",   std::to_string(kShape.hidden),
          "--inter",    std::to_string(kShape.inter),
          "--experts",  std::to_string(kShape.experts),
          "--topk",     std::to_string(kShape.topk),
          "--layers",   std::to_string(kShape.layers)};
}

}  // namespace eaas::test
