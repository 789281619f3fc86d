#pragma once

// What every eaas perf tool shares: statistics, perftest-style tables, JSON, size sweeps, the
// rendezvous between separately started processes, and failing loudly.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "eaas/eaas.hpp"

namespace eaas::perf {

/// perftest's latency columns, in microseconds.
struct latency_stats {
  std::size_t iterations = 0;
  double t_min = 0, t_max = 0, t_typical = 0, t_avg = 0, t_stdev = 0, p99 = 0, p999 = 0;
};

/// Statistics of per-iteration samples (µs). t_typical is the median, as in perftest.
latency_stats summarize(std::vector<double> samples_us);

/// perftest ib_write_lat header and rows; `extra` names optional trailing columns.
void print_latency_header(const std::vector<std::string>& extra);
void print_latency_row(std::size_t bytes, const latency_stats& s, const std::vector<double>& extra);

nlohmann::json to_json(std::size_t bytes, const latency_stats& s);

/// Powers of two from `min` to `max` (both included when they are powers of two).
std::vector<std::size_t> size_sweep(std::size_t min, std::size_t max);

/// Publishes this side's handles in `<dir>/<role>` (written atomically).
status publish(const std::string& dir, const std::string& role, const std::vector<handle_bytes>& handles);
/// Waits for `<dir>/<role>` to appear with `count` handles.
status await_peer(const std::string& dir, const std::string& role, std::size_t count, std::uint64_t timeout_ns,
                  std::vector<handle_bytes>& out);

/// The two-process tools' handshake: publishes this side's connection handle and `region`'s handle in
/// `dir` as `me`, waits (60 s) for `other`'s, connects to it and imports its region; dies on a failure.
void connect_through(const std::string& dir, const char* me, const char* other, context& ctx, memory_region& region,
                     std::unique_ptr<endpoint>& ep, std::unique_ptr<remote_region>& peer);

/// Half round trips (µs) from kernel-timed round trips in SM cycles, the clock rate taken from the same
/// iterations' %globaltimer span (ns), so that no SM clock needs to be assumed.
std::vector<double> half_rtt_us(const std::vector<long long>& cycles, std::uint64_t span_ns);

/// Prints what failed (status and last_error) and exits with 2.
[[noreturn]] void die(const std::string& what, status s);

/// Exits through die() when `expr` is not ok.
#define EAAS_PERF_CHECK(expr)                                                                                    \
  do {                                                                                                           \
    if (const ::eaas::status perf_s_ = (expr); perf_s_ != ::eaas::status::ok) ::eaas::perf::die(#expr, perf_s_); \
  } while (0)

/// Starts this executable again (the other side of a two-process tool) with `args` (argv[1..]); returns
/// its pid, or dies saying it could not.
int spawn_self(const std::vector<std::string>& args);
/// Starts the program at `path` with `args`; returns its pid, or dies saying it could not.
int spawn_program(const std::string& path, const std::vector<std::string>& args);
/// The path of program `name` next to this executable, or "" where there is none.
std::string sibling_program(const std::string& name);

/// Current UTC date as YYYY-MM-DD, for result files.
std::string today_utc();

}  // namespace eaas::perf
