#include "gpu_tools.hpp"

#include <stdlib.h>
#include <sys/wait.h>

#include <filesystem>

#include "driver.hpp"
#include "ibgda_softnic.hpp"

namespace eaas::perf {

int run_nvlink_tool(nvlink_pair_options g, int (*client)(const nvlink_pair_options&)) {
  if (g.role != "both") {
    if (g.rendezvous.empty()) die("--role " + g.role + " needs --rendezvous DIR", status::invalid_argument);
    return g.role == "server" ? run_nvlink_server(g) : client(g);
  }
  (void)nvlink_default_gpu("client");  // no GPU: say so once, before a server is started
  char tmpl[] = "/tmp/eaas-nvlink-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) die("mkdtemp", status::internal_error);
  g.rendezvous = tmpl;
  g.role = "client";
  std::vector<std::string> args = {"--role",       "server",     "--transport", "nvlink",
                                   "--rendezvous", g.rendezvous, "--max-size",  std::to_string(g.max_size)};
  if (g.server_gpu >= 0) args.insert(args.end(), {"--gpu", std::to_string(g.server_gpu)});
  const pid_t server = spawn_self(args);
  const int rc = client(g);
  int st = 0;
  ::waitpid(server, &st, 0);
  std::filesystem::remove_all(g.rendezvous);
  return rc != 0 ? rc : (WIFEXITED(st) ? WEXITSTATUS(st) : 4);
}

int run_soft_nic(const std::vector<std::size_t>& sizes, std::size_t iters, std::size_t warmup, int gpu,
                 const std::vector<std::uint32_t>& warps, const std::string& json) {
  ibgda_softnic_options s;
  s.sizes = sizes;
  if (iters != 0) s.iterations = iters;
  s.warmup = warmup;
  s.cuda_device = gpu >= 0 ? gpu : 0;
  if (!warps.empty()) s.warps = warps;
  s.json_path = json;
  const status st = run_ibgda_softnic(s);
  if (st != status::ok) die("the ibgda soft-NIC benchmark", st);
  return 0;
}

}  // namespace eaas::perf
