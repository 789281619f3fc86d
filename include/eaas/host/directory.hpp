#pragma once

/// Peer discovery and the pairwise handshake, over a registry.
///
/// Every process publishes a `peer_record` (its id, role, the experts it hosts, capacity, its
/// connection handle and named region handles) under a lease it keeps alive. To talk to a peer, a
/// process calls `link(peer_id)`: it reads the peer's record, connects an endpoint from the peer's
/// connection handle, imports the peer's regions, then asks the peer to link back by publishing a
/// link request (its own record, plus region handles meant for that peer only); the peer connects,
/// imports, answers with an acknowledgement, and hands the new link to its `on_link` callback. Both
/// sides then hold a ready endpoint. Nobody keeps a fixed peer list and nobody restarts when a peer
/// joins; a peer whose lease lapses is reported offline to every `watch_peers` callback.
///
/// Registry layout under the namespace NS:
///   /eaas/NS/peers/ID          the peer's record                 (ID's lease)
///   /eaas/NS/links/TO/FROM     FROM's link request to TO         (FROM's lease)
///   /eaas/NS/acks/FROM/TO      TO's acknowledgement of FROM      (TO's lease)

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "eaas/common/status.hpp"
#include "eaas/host/context.hpp"
#include "eaas/host/endpoint.hpp"
#include "eaas/host/handle.hpp"
#include "eaas/host/registry.hpp"

namespace eaas {

/// What a peer publishes about itself. Encoded with a schema version, sizes and a checksum; a
/// record that fails any check is refused (and skipped by watchers), never trusted.
struct peer_record {
  std::string id;                                             ///< unique in the namespace; 1..128 of [A-Za-z0-9._-]
  std::string role;                                           ///< e.g. "server", "client"; up to 32 bytes
  std::vector<std::uint32_t> experts;                         ///< experts hosted (servers); up to 65536
  std::uint32_t capacity = 0;                                 ///< tokens per step it takes (servers)
  handle_bytes connection;                                    ///< context::connection_handle
  std::vector<std::pair<std::string, handle_bytes>> regions;  ///< named region handles; up to 64
};

inline constexpr std::uint16_t kPeerRecordSchema = 1;

status encode_peer_record(const peer_record& rec, std::string& out);
status decode_peer_record(std::string_view bytes, peer_record& out);

/// A ready connection to a peer.
struct peer_link {
  peer_record record;            ///< the peer's record (and, for incoming links, its extra regions)
  std::unique_ptr<endpoint> ep;  ///< connected
  std::vector<std::pair<std::string, std::unique_ptr<remote_region>>> regions;  ///< the peer's regions, imported

  /// The imported region of this name, or null.
  remote_region* region(std::string_view name) const;
};

enum class peer_change : std::uint8_t { online, offline };

/// One per process and namespace.
class directory {
 public:
  /// Publishes `self` under a lease of `ttl_seconds` (kept alive, re-registered after a registry
  /// restart) and starts serving link requests. `reg` and `ctx` must outlive the directory.
  static status start(registry& reg, context& ctx, std::string ns, peer_record self, std::uint32_t ttl_seconds,
                      std::unique_ptr<directory>& out);
  virtual ~directory() = default;

  /// Called (on a registry thread) with every link a peer made to us, once it is ready. Links that
  /// arrive before a callback is installed are held and handed to the first one installed.
  virtual void on_link(std::function<void(peer_link&&)> fn) = 0;

  /// Links to `peer_id`, giving it `extra_regions` (e.g. a result area meant for that peer only).
  /// Bounded by `timeout_ns`: `not_found` if the peer is not published, `timeout` if it does not
  /// acknowledge in time, or what connecting/importing returned.
  virtual status link(const std::string& peer_id,
                      const std::vector<std::pair<std::string, handle_bytes>>& extra_regions, std::uint64_t timeout_ns,
                      peer_link& out) = 0;

  /// The valid peer records published now (malformed ones are skipped).
  virtual status peers(std::vector<peer_record>& out) = 0;

  /// Calls `fn` for every peer that comes online (including those online now) or goes offline.
  virtual status watch_peers(std::function<void(peer_change, const peer_record&)> fn, std::unique_ptr<watch>& out) = 0;

 protected:
  directory() = default;
};

}  // namespace eaas
