#pragma once

// Starts a separately built test executable with pipes on its stdin and stdout: what the
// multi-process tests use to bootstrap a peer (handles as text lines), before eaas takes over.

#include <spawn.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "eaas/host/handle.hpp"

extern char** environ;

namespace eaas::test {

struct spawned {
  pid_t pid = -1;
  FILE* to = nullptr;    ///< the child's stdin
  FILE* from = nullptr;  ///< the child's stdout
};

/// posix_spawn(path, args...) with both pipes; false on failure.
inline bool spawn_with_pipes(const char* path, std::vector<std::string> args, spawned& out) {
  int to_child[2], from_child[2];
  if (::pipe(to_child) != 0 || ::pipe(from_child) != 0) return false;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, to_child[0], 0);
  posix_spawn_file_actions_adddup2(&fa, from_child[1], 1);
  posix_spawn_file_actions_addclose(&fa, to_child[1]);
  posix_spawn_file_actions_addclose(&fa, from_child[0]);
  std::vector<char*> argv{const_cast<char*>(path)};
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const int rc = ::posix_spawn(&out.pid, path, &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(to_child[0]);
  ::close(from_child[1]);
  if (rc != 0) {
    ::close(to_child[1]);
    ::close(from_child[0]);
    return false;
  }
  out.to = ::fdopen(to_child[1], "w");
  out.from = ::fdopen(from_child[0], "r");
  return out.to != nullptr && out.from != nullptr;
}

/// Reads a "TAG HEX" line into a handle.
inline bool read_handle_line(FILE* in, char tag, handle_bytes& out) {
  std::vector<char> line(16384);
  if (std::fgets(line.data(), static_cast<int>(line.size()), in) == nullptr || line[0] != tag || line[1] != ' ')
    return false;
  return handle_from_text(line.data() + 2, out) == status::ok;
}

}  // namespace eaas::test
