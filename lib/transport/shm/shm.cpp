#include "transport/shm/shm.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "log.hpp"
#include "process.hpp"

namespace eaas::detail::shm {

namespace {

constexpr std::size_t kPage = 4096;

std::string memfd_name(std::uint64_t token) { return fmt::format("eaas-{:016x}", token); }

}  // namespace

segment::~segment() {
  if (base != nullptr) ::munmap(base, map_size);
  if (fd >= 0) ::close(fd);
}

mapping::~mapping() {
  if (base != nullptr) ::munmap(base, map_size);
}

status allocate(std::size_t bytes, std::shared_ptr<segment>& out) {
  if (bytes == 0 || bytes > kMaxMapSize)
    return EAAS_FAIL(status::invalid_argument, "shm: cannot allocate {} bytes (1 B .. 1 TiB)", bytes);
  auto seg = std::make_shared<segment>();
  seg->token = random_u64();
  seg->map_size = (bytes + kPage - 1) / kPage * kPage;
  seg->fd = ::memfd_create(memfd_name(seg->token).c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (seg->fd < 0) return EAAS_FAIL(status::no_resource, "shm: memfd_create failed: {}", std::strerror(errno));
  if (::ftruncate(seg->fd, static_cast<off_t>(seg->map_size)) != 0)
    return EAAS_FAIL(status::no_resource, "shm: ftruncate({} bytes) failed: {}", seg->map_size, std::strerror(errno));
  // Its size is final: nobody holding the file (a peer opens it through /proc) can shrink it under a
  // mapping (which would fault the other side) or grow it.
  if (::fcntl(seg->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
    return EAAS_FAIL(status::internal_error, "shm: sealing the memfd failed: {}", std::strerror(errno));
  void* p = ::mmap(nullptr, seg->map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, seg->fd, 0);
  if (p == MAP_FAILED)
    return EAAS_FAIL(status::no_resource, "shm: mmap of {} bytes failed: {}", seg->map_size, std::strerror(errno));
  seg->base = p;
  out = std::move(seg);
  return status::ok;
}

void encode(const region_desc& d, handle_writer& w) {
  w.u64(d.owner_id);
  w.u64(d.host_id);
  w.u32(d.pid);
  w.u32(d.fd);
  w.u64(d.start_time);
  w.u64(d.token);
  w.u64(d.offset);
  w.u64(d.size);
  w.u64(d.map_size);
}

status decode(std::span<const std::byte> payload, region_desc& out) {
  handle_reader r(payload);
  region_desc d;
  d.owner_id = r.u64();
  d.host_id = r.u64();
  d.pid = r.u32();
  d.fd = r.u32();
  d.start_time = r.u64();
  d.token = r.u64();
  d.offset = r.u64();
  d.size = r.u64();
  d.map_size = r.u64();
  if (!r.done())
    return EAAS_FAIL(status::invalid_handle, "shm region handle: payload of {} bytes has the wrong length",
                     payload.size());
  if (d.pid == 0 || d.pid > 0x7fffffffu || d.fd > 0x7fffffffu)
    return EAAS_FAIL(status::invalid_handle, "shm region handle: pid {} / fd {} out of range", d.pid, d.fd);
  if (d.map_size == 0 || d.map_size > kMaxMapSize || d.map_size % kPage != 0)
    return EAAS_FAIL(status::invalid_handle, "shm region handle: mapping size {} is not a page multiple up to 1 TiB",
                     d.map_size);
  if (d.offset > d.map_size || d.size > d.map_size - d.offset)
    return EAAS_FAIL(status::invalid_handle, "shm region handle: [{}, +{}) lies outside the {}-byte segment", d.offset,
                     d.size, d.map_size);
  out = d;
  return status::ok;
}

status map_peer(const region_desc& d, std::shared_ptr<mapping>& out) {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%u/fd/%u", d.pid, d.fd);
  const int fd = ::open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    if (!process_alive(static_cast<pid_t>(d.pid), d.start_time))
      return EAAS_FAIL(status::peer_unreachable, "shm: the process {} that exported the region is gone", d.pid);
    if (e == EACCES || e == EPERM)
      return EAAS_FAIL(status::remote_access_error,
                       "shm: no permission to open {} (peers must run as the same user, in one pid namespace)", path);
    return EAAS_FAIL(status::invalid_handle, "shm: {} cannot be opened ({}): the region was freed", path,
                     std::strerror(e));
  }
  // Check the fd we now hold (not the path, which could change under us) is the exported memfd.
  char self[64], target[256] = {};
  std::snprintf(self, sizeof(self), "/proc/self/fd/%d", fd);
  const ssize_t n = ::readlink(self, target, sizeof(target) - 1);
  const std::string want = "/memfd:" + memfd_name(d.token);
  struct stat st {};
  const bool named = n > 0 && std::strncmp(target, want.c_str(), want.size()) == 0 &&
                     (target[want.size()] == '\0' || target[want.size()] == ' ');
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (!named || ::fstat(fd, &st) != 0 || static_cast<std::uint64_t>(st.st_size) != d.map_size || seals < 0 ||
      (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW)) {
    ::close(fd);
    return EAAS_FAIL(status::invalid_handle,
                     "shm: {} is not the exported region (freed, fd reused, or not size-sealed): expected {} of {} bytes",
                     path, want, d.map_size);
  }
  void* p = ::mmap(nullptr, d.map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);  // the mapping keeps the memory alive
  if (p == MAP_FAILED)
    return EAAS_FAIL(status::no_resource, "shm: mmap of the peer's {} bytes failed: {}", d.map_size,
                     std::strerror(errno));
  auto m = std::make_shared<mapping>();
  m->base = p;
  m->map_size = d.map_size;
  m->token = d.token;
  out = std::move(m);
  return status::ok;
}

}  // namespace eaas::detail::shm
