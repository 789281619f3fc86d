#pragma once

// Facts about this host and its processes that handles carry (private).

#include <sys/types.h>

#include <cstdint>

namespace eaas::detail {

/// A random 64-bit value from the kernel (never 0).
std::uint64_t random_u64() noexcept;

/// Identifies "processes that can map each other's memory by pid": the boot id mixed with the pid
/// namespace. Equal ids mean same kernel, same pid namespace.
std::uint64_t host_id() noexcept;

/// Start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22); 0 when the
/// process does not exist. With the pid it names one process, immune to pid reuse.
std::uint64_t process_start_time(pid_t pid) noexcept;

/// True when `pid` exists and started at `start_time`.
bool process_alive(pid_t pid, std::uint64_t start_time) noexcept;

}  // namespace eaas::detail
