// A deliberately malicious client: links to an expert server like a real client, then writes
// malformed requests into its slot — too many tokens, unknown layers, experts the server does not
// host, NaN weights, wrong sizes, skipped sequence numbers, random header fields — and checks that
// every one gets the right error response. A last, valid request must still be answered correctly.
// Exit 0 when all checks held; prints "evil: N cases" on stdout.
//
//   evil_client REGISTRY NS SERVER_ID HIDDEN INTER EXPERTS TOPK LAYERS SEED [GPU]
//
// With GPU (a CUDA device index) it is a GPU client of a GPU server: its result region in GPU memory, its
// requests put over NVLink through the runtime's gpu wire; the valid answers are then bf16 (checked to 1e-2).

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>

#include "cpu_math.hpp"
#include "eaas/eaas.hpp"
#include "eaas/runtime/slot.hpp"
#include "wire.hpp"

using namespace eaas;
using namespace eaas::runtime;

namespace {

int failures = 0;
#define EXPECT(cond, ...)                               \
  do {                                                  \
    if (!(cond)) {                                      \
      std::fprintf(stderr, "evil: FAILED %s: ", #cond); \
      std::fprintf(stderr, __VA_ARGS__);                \
      std::fprintf(stderr, "\n");                       \
      ++failures;                                       \
    }                                                   \
  } while (0)

struct conn {
  std::unique_ptr<wire> io;
  std::unique_ptr<context> ctx;
  std::unique_ptr<registry> reg;
  std::unique_ptr<directory> dir;
  std::unique_ptr<memory_region> result;
  peer_link link;
  server_welcome w{};
  remote_view slots{};
  std::uint64_t seq = 0;  // last seq the server consumed
};

struct request {
  slot_header h{};
  std::vector<float> act;
  std::vector<std::uint16_t> act16;  // bf16 activations, when the header says so
  std::vector<std::uint16_t> ids;
  std::vector<float> weights;
};

// Writes a request as given (no checks), committed as an honest client commits it (its header last, the
// commit word of its own seq and grant last of all: a malformed request must still reach validation), and
// waits for the answer with seq `answer_seq`.
bool exchange(conn& c, const request& r, std::uint64_t answer_seq, response_header& rh, std::vector<float>* out,
              std::uint64_t wait_ns = 5'000'000'000ull) {
  const slot_layout l = layout_for(r.h.tokens > c.w.max_tokens ? 1 : r.h.tokens, r.h.hidden, r.h.topk ? r.h.topk : 1,
                                   r.act16.empty() ? dtype::f32 : dtype::bf16);
  std::vector<unsigned char> buf(std::min<std::uint64_t>(c.w.slot_bytes, std::max<std::uint64_t>(l.end, 64)), 0);
  slot_header h = r.h;
  h.commit = slot_commit(h.seq, h.grant);
  std::memcpy(buf.data(), &h, sizeof(h));
  auto copy_in = [&](std::uint64_t off, const void* src, std::size_t n) {
    if (off < buf.size()) std::memcpy(buf.data() + off, src, std::min<std::size_t>(n, buf.size() - off));
  };
  if (r.act16.empty())
    copy_in(l.activations, r.act.data(), r.act.size() * 4);
  else
    copy_in(l.activations, r.act16.data(), r.act16.size() * 2);
  copy_in(l.expert_ids, r.ids.data(), r.ids.size() * 2);
  copy_in(l.weights, r.weights.data(), r.weights.size() * 4);
  if (c.io->put_signal(*c.link.ep, c.slots, c.w.slot_offset, buf.data(), buf.size(), c.slots, c.w.sig_offset, r.h.seq,
                       sizeof(slot_header)) != status::ok)
    return false;
  if (c.io->wait(*c.link.ep, *c.result, kResultSig, cmp_op::eq, answer_seq, now_ns() + wait_ns, nullptr) != status::ok)
    return false;
  if (c.io->read(*c.result, kResponse, &rh, sizeof(rh)) != status::ok) return false;
  if (out) {
    out->resize(
        std::min<std::size_t>(std::size_t{rh.tokens} * r.h.hidden, (c.result->size() - kOutputs) / sizeof(float)));
    if (c.io->read(*c.result, kOutputs, out->data(), out->size() * 4) != status::ok) return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 10 && argc != 11) {
    std::fprintf(stderr, "usage: evil_client REGISTRY NS SERVER_ID HIDDEN INTER EXPERTS TOPK LAYERS SEED [GPU]\n");
    return 2;
  }
  const int gpu = argc == 11 ? std::stoi(argv[10]) : -1;
  const model_shape shape{.hidden = std::uint32_t(std::stoul(argv[4])),
                          .inter = std::uint32_t(std::stoul(argv[5])),
                          .experts = std::uint32_t(std::stoul(argv[6])),
                          .topk = std::uint32_t(std::stoul(argv[7])),
                          .layers = std::uint32_t(std::stoul(argv[8]))};
  const std::uint64_t seed = std::stoull(argv[9]);
  conn c;
  registry_options ro;
  ro.endpoint = argv[1];
  if (gpu >= 0 ? make_gpu_wire(gpu, c.io) != status::ok : (c.io = make_host_wire()) == nullptr) return 3;
  if (context::create({.name = "evil", .cuda_device = gpu}, c.ctx) != status::ok ||
      registry::open(ro, c.reg) != status::ok)
    return 3;
  peer_record self;
  self.id = "evil";
  self.role = "client";
  (void)c.ctx->connection_handle(self.connection);
  if (directory::start(*c.reg, *c.ctx, argv[2], self, 2, c.dir) != status::ok) return 3;
  const std::uint32_t max_tokens = 16;
  if (c.ctx->allocate(result_region_bytes(max_tokens, shape.hidden), c.io->kind(), c.result) != status::ok) return 3;
  handle_bytes h;
  (void)c.result->export_handle(h);
  if (c.dir->link(argv[3], {{"result", h}}, 5'000'000'000ull, c.link) != status::ok) {
    std::fprintf(stderr, "evil: link failed: %s\n", std::string(last_error()).c_str());
    return 3;
  }
  if (c.io->wait(*c.link.ep, *c.result, kWelcomeSig, cmp_op::ne, 0, now_ns() + 5'000'000'000ull, nullptr) !=
          status::ok ||
      c.io->read(*c.result, kWelcome, &c.w, sizeof(c.w)) != status::ok)
    return 3;
  c.slots = c.link.region("slots")->view();
  const std::uint32_t local = c.w.local_experts;
  EXPECT(c.w.max_tokens == max_tokens, "welcome max_tokens %u", c.w.max_tokens);

  std::mt19937_64 rng(seed);
  auto valid = [&](std::uint32_t tokens) {
    request r;
    r.h.magic = kSlotMagic;
    r.h.version = kSlotVersion;
    r.h.type = static_cast<std::uint16_t>(dtype::f32);
    r.h.seq = c.seq + 1;
    r.h.grant = c.w.grant;
    r.h.layer = static_cast<std::uint32_t>(rng() % shape.layers);
    r.h.tokens = tokens;
    r.h.hidden = shape.hidden;
    r.h.topk = shape.topk;
    r.h.payload_bytes = layout_for(tokens, shape.hidden, shape.topk, dtype::f32).end - sizeof(slot_header);
    std::normal_distribution<float> nd;
    r.act.resize(std::size_t{tokens} * shape.hidden);
    for (auto& v : r.act) v = nd(rng);
    r.ids.resize(std::size_t{tokens} * shape.topk);
    r.weights.resize(r.ids.size());
    for (std::uint32_t t = 0; t < tokens; ++t) {  // distinct experts per token, some entries unused
      const auto base = static_cast<std::uint32_t>(rng() % local);
      for (std::uint32_t k = 0; k < shape.topk; ++k) {
        const std::size_t i = std::size_t{t} * shape.topk + k;
        r.ids[i] = k % 3 == 2 || k >= local ? kNoExpert : static_cast<std::uint16_t>((base + k) % local);
        r.weights[i] = 0.25f + float(rng() % 100) / 100.0f;
      }
    }
    return r;
  };

  int cases = 0;
  // Each malformed request and the error it must get. The server consumes every request that carries
  // the expected seq, so each case uses the next one.
  auto expect_error = [&](const char* name, request r, slot_error want, bool consumes = true) {
    ++cases;
    response_header rh{};
    const bool ok = exchange(c, r, r.h.seq, rh, nullptr);
    EXPECT(ok, "%s: no answer", name);
    if (!ok) return;
    EXPECT(rh.error == static_cast<std::uint32_t>(want), "%s: error %s, want %s", name,
           slot_error_name(static_cast<slot_error>(rh.error)), slot_error_name(want));
    EXPECT(rh.tokens == 0, "%s: %u tokens answered", name, rh.tokens);
    if (consumes) c.seq = r.h.seq;
  };
  {
    auto r = valid(4);
    r.h.tokens = max_tokens + 1;
    expect_error("tokens beyond the slot", r, slot_error::too_many_tokens);
  }
  {
    auto r = valid(4);
    r.h.tokens = 0xFFFFFFFFu;
    expect_error("4G tokens", r, slot_error::too_many_tokens);
  }
  {
    auto r = valid(4);
    r.h.layer = shape.layers;
    expect_error("unknown layer", r, slot_error::unknown_layer);
  }
  {
    auto r = valid(4);
    r.ids[1] = static_cast<std::uint16_t>(local);
    expect_error("expert not hosted", r, slot_error::expert_not_hosted);
  }
  {
    auto r = valid(4);
    r.ids[0] = 0xFFFE;
    expect_error("expert 0xFFFE", r, slot_error::expert_not_hosted);
  }
  if (shape.topk >= 2 && local >= 1) {
    auto r = valid(4);
    r.ids[shape.topk] = 0;  // token 1 names expert 0 twice
    r.ids[shape.topk + 1] = 0;
    expect_error("expert named twice", r, slot_error::duplicate_expert);
  }
  {
    auto r = valid(4);
    r.weights[3] = std::nanf("");
    r.ids[3] = 0;
    expect_error("NaN weight", r, slot_error::bad_weight);
  }
  {
    auto r = valid(4);
    r.h.magic ^= 1;
    expect_error("bad magic", r, slot_error::bad_magic);
  }
  {
    auto r = valid(4);
    r.h.version = 99;
    expect_error("bad version", r, slot_error::bad_version);
  }
  {
    auto r = valid(4);
    r.h.type = 7;
    expect_error("bad dtype", r, slot_error::bad_dtype);
  }
  {
    auto r = valid(4);
    r.h.payload_bytes += 16;
    expect_error("payload size", r, slot_error::size_mismatch);
  }
  {
    auto r = valid(4);
    r.h.hidden = shape.hidden + 8;
    expect_error("hidden", r, slot_error::hidden_mismatch);
  }
  {
    auto r = valid(4);
    r.h.topk = shape.topk + 1;
    expect_error("topk", r, slot_error::bad_topk);
  }
  {
    auto r = valid(4);
    r.h.seq = c.seq + 7;  // skips ahead: refused, and not consumed
    expect_error("skipped seq", r, slot_error::stale_seq, false);
  }
  {
    // A stranger's grant (a client that held this slot before, say): never answered, nothing consumed.
    ++cases;
    auto r = valid(4);
    r.h.grant ^= 0x5A5A;
    response_header rh{};
    EXPECT(!exchange(c, r, r.h.seq, rh, nullptr, 300'000'000ull), "a request with a wrong grant was answered");
  }
  // Random header fields (seq kept right, so the server reads the rest): the answer is the verdict
  // the header deserves, and the server keeps answering.
  for (int i = 0; i < 300; ++i) {
    auto r = valid(1 + static_cast<std::uint32_t>(rng() % max_tokens));
    auto* words = reinterpret_cast<std::uint32_t*>(&r.h);
    const int field = static_cast<int>(rng() % 16);
    // Not the seq (words 2-3: the server must read the rest) nor the grant (10-11: tested above); the
    // commit (14-15) is written by exchange().
    if (field != 2 && field != 3 && field != 10 && field != 11)
      words[field] = static_cast<std::uint32_t>(rng() >> (rng() % 32));
    if (rng() % 4 == 0) r.ids[rng() % r.ids.size()] = static_cast<std::uint16_t>(rng());
    const slot_limits lim{.slot_bytes = c.w.slot_bytes,
                          .hidden = shape.hidden,
                          .layers = shape.layers,
                          .max_tokens = max_tokens,
                          .max_topk = shape.topk,
                          .local_experts = local,
                          .expected_seq = c.seq + 1};
    slot_error want = validate_request(r.h, lim);
    if (want == slot_error::none) {
      // The routing arrays sit where this (possibly changed) shape puts them; rebuild them there.
      r.ids.resize(std::size_t{r.h.tokens} * r.h.topk, 0);
      r.weights.resize(r.ids.size(), 0.5f);
      r.act.resize(std::size_t{r.h.tokens} * r.h.hidden, 0.0f);
      want = validate_routing(r.h, lim, r.ids.data(), r.weights.data());
    }
    ++cases;
    response_header rh{};
    const bool ok = exchange(c, r, r.h.seq, rh, nullptr);
    EXPECT(ok, "random case %d: no answer", i);
    if (!ok) break;
    EXPECT(rh.error == static_cast<std::uint32_t>(want), "random case %d (field %d): error %s, want %s", i, field,
           slot_error_name(static_cast<slot_error>(rh.error)), slot_error_name(want));
    c.seq = r.h.seq;
  }
  // And valid requests are still answered, correctly: fp32 activations, then bf16 ones.
  for (const dtype type : {dtype::f32, dtype::bf16}) {
    ++cases;
    auto r = valid(5);
    if (type == dtype::bf16) {
      // Round the activations to bf16 (nearest even): the server computes on exactly these values.
      r.h.type = static_cast<std::uint16_t>(dtype::bf16);
      r.h.payload_bytes = layout_for(5, shape.hidden, shape.topk, dtype::bf16).end - sizeof(slot_header);
      for (auto& v : r.act) {
        std::uint32_t u;
        std::memcpy(&u, &v, 4);
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
        std::memcpy(&v, &u, 4);
        r.act16.push_back(static_cast<std::uint16_t>(u >> 16));
      }
    }
    response_header rh{};
    std::vector<float> got;
    const bool ok = exchange(c, r, r.h.seq, rh, &got);
    EXPECT(ok && rh.error == 0 && rh.tokens == 5, "valid %s request after the attack: error %u tokens %u",
           type == dtype::bf16 ? "bf16" : "f32", rh.error, rh.tokens);
    if (ok && rh.error == 0) {
      // Expected: sum over k of w_k * expert_{global(id_k)}(x), experts synthetic from the seed.
      const auto& hosted = c.link.record.experts;
      std::vector<float> want(got.size(), 0.0f), y(shape.hidden);
      cpu::swiglu_scratch s;
      for (std::uint32_t t = 0; t < 5; ++t)
        for (std::uint32_t k = 0; k < shape.topk; ++k) {
          const std::uint16_t id = r.ids[t * shape.topk + k];
          if (id == kNoExpert) continue;
          const auto w = synthetic_expert(shape, seed, r.h.layer, hosted[id]);
          cpu::swiglu_rows(w, r.act.data() + std::size_t{t} * shape.hidden, 1, shape.hidden, shape.inter, y.data(), s);
          for (std::uint32_t j = 0; j < shape.hidden; ++j)
            want[t * shape.hidden + j] += r.weights[t * shape.topk + k] * y[j];
        }
      double err = 0, mx = 0;
      for (std::size_t i = 0; i < want.size(); ++i) {
        err = std::max(err, double(std::fabs(got[i] - want[i])));
        mx = std::max(mx, double(std::fabs(want[i])));
      }
      // fp32 experts on the CPU; bf16 weights (and activations) on the GPU.
      const double tolerance = gpu >= 0 ? 1e-2 : 1e-5;
      EXPECT(mx > 0 && err / mx <= tolerance, "valid answer off by %g relative (tolerance %g)", err / mx, tolerance);
    }
    c.seq = r.h.seq;
  }
  std::printf("evil: %d cases, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
