#include "process.hpp"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>

namespace eaas::detail {

namespace {

std::uint64_t fnv1a(std::uint64_t h, const void* data, std::size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

std::uint64_t compute_host_id() {
  std::uint64_t h = 0xcbf29ce484222325ull;
  char boot[64] = {};
  if (int fd = ::open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC); fd >= 0) {
    const ssize_t n = ::read(fd, boot, sizeof(boot) - 1);
    ::close(fd);
    if (n > 0) h = fnv1a(h, boot, static_cast<std::size_t>(n));
  }
  struct stat st {};
  if (::stat("/proc/self/ns/pid", &st) == 0) {
    h = fnv1a(h, &st.st_ino, sizeof(st.st_ino));
    h = fnv1a(h, &st.st_dev, sizeof(st.st_dev));
  }
  return h == 0 ? 1 : h;
}

}  // namespace

std::uint64_t random_u64() noexcept {
  std::uint64_t v = 0;
  while (v == 0) {
    if (::getrandom(&v, sizeof(v), 0) != static_cast<ssize_t>(sizeof(v))) {
      // getrandom cannot fail for 8 bytes once the pool is initialised; mix time and pid if it does.
      v ^= static_cast<std::uint64_t>(::getpid()) * 0x9E3779B97F4A7C15ull ^ static_cast<std::uint64_t>(::clock());
    }
  }
  return v;
}

std::uint64_t host_id() noexcept {
  static const std::uint64_t id = compute_host_id();
  return id;
}

std::uint64_t process_start_time(pid_t pid) noexcept {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[1024];
  const ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
  ::close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
  const char* p = std::strrchr(buf, ')');
  if (p == nullptr) return 0;
  ++p;
  // Fields 3..22: state is field 3; skip 19 separators to reach field 22.
  for (int field = 3; field < 22; ++field) {
    p = std::strchr(p + 1, ' ');
    if (p == nullptr) return 0;
  }
  return std::strtoull(p + 1, nullptr, 10);
}

bool process_alive(pid_t pid, std::uint64_t start_time) noexcept {
  if (pid <= 0) return false;
  const std::uint64_t t = process_start_time(pid);
  if (t == 0 || t != start_time) return false;
  // A zombie has exited: its memory is gone even though /proc still lists it.
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[512];
  const ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  const char* p = std::strrchr(buf, ')');
  return p != nullptr && p[1] == ' ' && p[2] != 'Z' && p[2] != 'X';
}

}  // namespace eaas::detail
