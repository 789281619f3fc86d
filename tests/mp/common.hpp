#pragma once

// What the multi-process test driver and its peer executable agree on. After a bootstrap over
// pipes (connection and region handles as hex lines), every command and answer travels through
// eaas itself: the driver put_signals a command into the peer's region, the peer answers with a
// put_signal into its response block in the driver's region.

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../../perf/pattern.hpp"

namespace eaas::mptest {

// Offsets inside each side's region.
inline constexpr std::size_t kCmdSeq = 0;        // peer region: command sequence (signal word)
inline constexpr std::size_t kCmdArgs = 64;      // peer region: u64 cmd, then args
inline constexpr std::size_t kRespBlock = 4096;  // driver region: peer k answers at kRespBlock * (k + 1)
inline constexpr std::size_t kRespSeq = 0;       //   + 0: answer sequence (signal word)
inline constexpr std::size_t kRespValue = 8;     //   + 8: result
inline constexpr std::size_t kMaxPeers = 64;
inline constexpr std::size_t kData = std::size_t{1} << 20;  // data area of every region starts here

enum cmd : std::uint64_t {
  cmd_verify = 1,      // (seed, offset, bytes): count bytes of my data area that differ from the pattern
  cmd_fill = 2,        // (seed, offset, bytes): write the pattern into my own data area
  cmd_put = 3,         // (seed, offset, bytes): put the pattern into the driver's data area
  cmd_add = 4,         // (count, offset): fetch_add 1, count times, on the driver's word at offset
  cmd_order_send = 5,  // (iterations, payload offset, signal offset): put_signal stream for the ordering check
  cmd_exit = 6,
};

using perf::count_mismatches;
using perf::fill_pattern;

}  // namespace eaas::mptest
