#include "etcd_process.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "log.hpp"

extern char** environ;

namespace eaas::test {

namespace {

constexpr const char* kSetpriv = "/usr/bin/setpriv";

bool executable(const std::string& path) { return !path.empty() && ::access(path.c_str(), X_OK) == 0; }

std::string find_etcd() {
  if (const char* env = std::getenv("EAAS_ETCD"); env != nullptr && executable(env)) return env;
  if (const char* path = std::getenv("PATH"); path != nullptr) {
    std::stringstream dirs(path);
    for (std::string dir; std::getline(dirs, dir, ':');)
      if (!dir.empty() && executable(dir + "/etcd")) return dir + "/etcd";
  }
  return executable("/usr/bin/etcd") ? "/usr/bin/etcd" : "";
}

/// A port the kernel calls free right now (etcd binds it a moment later: start() retries if lost).
status free_port(std::uint16_t& port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return EAAS_FAIL(status::internal_error, "etcd_process: socket: {}", std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const int e = errno;
    ::close(fd);
    return EAAS_FAIL(status::internal_error, "etcd_process: bind 127.0.0.1:0: {}", std::strerror(e));
  }
  ::close(fd);
  port = ntohs(a.sin_port);
  return status::ok;
}

}  // namespace

bool etcd_process::available() { return !find_etcd().empty(); }

status etcd_process::start(std::unique_ptr<etcd_process>& out) {
  std::unique_ptr<etcd_process> p(new etcd_process());
  p->binary_ = find_etcd();
  if (p->binary_.empty())
    return EAAS_FAIL(status::unsupported,
                     "etcd_process: no etcd binary (apt-get install etcd-server, or set EAAS_ETCD)");
  char tmpl[] = "/tmp/eaas-etcd-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr)
    return EAAS_FAIL(status::internal_error, "etcd_process: mkdtemp: {}", std::strerror(errno));
  p->dir_ = tmpl;
  status s = status::ok;
  for (int attempt = 0; attempt < 3; ++attempt) {
    // Another process may take a port between our probe and etcd's bind: try again with new ones.
    if ((s = free_port(p->client_port_)) != status::ok || (s = free_port(p->peer_port_)) != status::ok) return s;
    if (p->client_port_ == p->peer_port_) continue;
    std::error_code ec;
    std::filesystem::remove_all(p->dir_ + "/data", ec);
    if ((s = p->spawn()) != status::ok) return s;
    if ((s = p->wait_ready(10'000)) == status::ok) {
      out = std::move(p);
      return status::ok;
    }
    p->kill9();
  }
  return s;
}

etcd_process::~etcd_process() {
  kill9();
  if (!dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

std::string etcd_process::host_port() const { return "127.0.0.1:" + std::to_string(client_port_); }
std::string etcd_process::endpoint() const { return "etcd://" + host_port(); }

void etcd_process::kill9() noexcept {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int st = 0;
  while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
}

status etcd_process::restart() {
  kill9();
  status s = status::ok;
  for (int attempt = 0; attempt < 3; ++attempt) {
    if ((s = spawn()) != status::ok) return s;
    if ((s = wait_ready(10'000)) == status::ok) return s;
    kill9();  // e.g. its old port not yet free: the ports are fixed now, so wait a little and retry
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return s;
}

status etcd_process::spawn() {
  const std::string client = "http://127.0.0.1:" + std::to_string(client_port_);
  const std::string peer = "http://127.0.0.1:" + std::to_string(peer_port_);
  std::vector<std::string> args;
  if (executable(kSetpriv)) args = {kSetpriv, "--pdeathsig", "KILL", "--"};
  const std::vector<std::string> etcd_args = {
      binary_, "--name=default", "--data-dir=" + dir_ + "/data", "--listen-client-urls=" + client,
      "--advertise-client-urls=" + client, "--listen-peer-urls=" + peer, "--initial-advertise-peer-urls=" + peer,
      "--initial-cluster=default=" + peer, "--initial-cluster-state=new",
      // Raft ticks of 20 ms: etcd's smallest lease TTL is ceil(1.5 election ticks x heartbeat) = 1 s
      // (with the defaults it would be 2 s, and a 1 s lease would live twice as long as asked).
      "--heartbeat-interval=20", "--election-timeout=200", "--logger=zap", "--log-outputs=stderr", "--log-level=warn"};
  args.insert(args.end(), etcd_args.begin(), etcd_args.end());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  // etcd reads ETCD_* variables as flags: keep the caller's out of it.
  std::vector<std::string> env_store;
  for (char** e = environ; *e != nullptr; ++e)
    if (std::strncmp(*e, "ETCD_", 5) != 0) env_store.emplace_back(*e);
#if defined(__aarch64__)
  env_store.emplace_back("ETCD_UNSUPPORTED_ARCH=arm64");  // etcd 3.4 refuses to start on arm64 without it
#endif
  std::vector<char*> envp;
  for (std::string& e : env_store) envp.push_back(e.data());
  envp.push_back(nullptr);

  const std::string log = dir_ + "/etcd.log";
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // Its own process group: a terminal's Ctrl-C reaches the test, whose death (pdeathsig) or
  // destructor then ends etcd; no signal meant for the test is delivered to etcd twice.
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, argv[0], &fa, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return EAAS_FAIL(status::internal_error, "etcd_process: posix_spawn {}: {}", argv[0], std::strerror(rc));
  pid_ = pid;
  return status::ok;
}

status etcd_process::wait_ready(int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  std::string answer;
  int code = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    int st = 0;
    if (::waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      return EAAS_FAIL(status::internal_error, "etcd_process: etcd exited at start ({} {}); its log ends with:\n{}",
                       WIFEXITED(st) ? "status" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st), log_tail());
    }
    if (http("/health", {}, answer, code) == status::ok && code == 200 &&
        answer.find("\"health\":\"true\"") != std::string::npos)
      return status::ok;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return EAAS_FAIL(status::timeout, "etcd_process: etcd on {} not healthy within {} ms; its log ends with:\n{}",
                   host_port(), timeout_ms, log_tail());
}

std::string etcd_process::log_tail() const {
  std::ifstream in(dir_ + "/etcd.log");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string all = ss.str();
  return all.size() > 2000 ? all.substr(all.size() - 2000) : all;
}

status etcd_process::http(std::string_view path, std::string_view body, std::string& answer, int& http_status,
                          std::string_view token) const {
  answer.clear();
  http_status = 0;
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return EAAS_FAIL(status::internal_error, "etcd_process: socket: {}", std::strerror(errno));
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(client_port_);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    const int e = errno;
    ::close(fd);
    return EAAS_FAIL(status::peer_unreachable, "etcd_process: connect {}: {}", host_port(), std::strerror(e));
  }
  std::string req = fmt::format("{} {} HTTP/1.0\r\nHost: {}\r\n", body.empty() ? "GET" : "POST", path, host_port());
  if (!token.empty()) req += fmt::format("Authorization: {}\r\n", token);
  if (!body.empty()) req += fmt::format("Content-Type: application/json\r\nContent-Length: {}\r\n", body.size());
  req += "\r\n";
  req += body;
  for (std::size_t done = 0; done < req.size();) {
    const ssize_t n = ::send(fd, req.data() + done, req.size() - done, MSG_NOSIGNAL);
    if (n <= 0) {
      const int e = errno;
      ::close(fd);
      return EAAS_FAIL(status::peer_unreachable, "etcd_process: send: {}", std::strerror(e));
    }
    done += static_cast<std::size_t>(n);
  }
  std::string all;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n == 0) break;
    if (n < 0) {
      const int e = errno;
      ::close(fd);
      return EAAS_FAIL(status::peer_unreachable, "etcd_process: recv: {}", std::strerror(e));
    }
    all.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  const std::size_t head_end = all.find("\r\n\r\n");
  if (all.compare(0, 9, "HTTP/1.0 ") != 0 && all.compare(0, 9, "HTTP/1.1 ") != 0)
    return EAAS_FAIL(status::invalid_handle, "etcd_process: not an HTTP answer");
  http_status = std::atoi(all.c_str() + 9);
  if (head_end != std::string::npos) answer = all.substr(head_end + 4);
  return status::ok;
}

}  // namespace eaas::test
