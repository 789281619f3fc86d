#include <doctest/doctest.h>
#include <fmt/format.h>
#include <stdlib.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "../common/require_ok.hpp"
#include "eaas/runtime/safetensors.hpp"

using namespace eaas::runtime;
using eaas::status;
namespace fs = std::filesystem;

namespace {

struct temp_dir {
  fs::path path;
  temp_dir() {
    std::string t = (fs::temp_directory_path() / "eaas-st-XXXXXX").string();
    REQUIRE(::mkdtemp(t.data()) != nullptr);
    path = t;
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

bool error_mentions(std::string_view what) { return std::string(eaas::last_error()).find(what) != std::string::npos; }

// Reference rounding computed with double arithmetic (not bit tricks): scale to an integer count of ulps,
// round with nearbyint (ties to even in the default mode), scale back.
float ref_round(float x, int mantissa_bits, int min_exp, double max_finite) {
  if (std::isnan(x) || std::isinf(x) || x == 0.0f) return x;
  const int e = std::max(std::ilogb(x), min_exp);
  const double ulp = std::ldexp(1.0, e - mantissa_bits);
  const double r = std::nearbyint(static_cast<double>(x) / ulp) * ulp;
  if (std::fabs(r) > max_finite) return std::copysign(INFINITY, x);
  return static_cast<float>(r);
}
float ref_bf16(float x) { return ref_round(x, 7, -126, 0x1.fep127); }
float ref_f16(float x) { return ref_round(x, 10, -14, 65504.0); }
float ref_dtype(st_dtype t, float x) { return t == st_dtype::bf16 ? ref_bf16(x) : t == st_dtype::f16 ? ref_f16(x) : x; }

bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
}

// Number of positions where `got` differs from `want` rounded to `t` (0 is the answer a test wants).
std::size_t mismatches(const std::vector<float>& got, const std::vector<float>& want, st_dtype t) {
  if (got.size() != want.size()) return std::max(got.size(), want.size()) + 1;
  std::size_t n = 0;
  for (std::size_t i = 0; i < got.size(); ++i) n += !same_float(got[i], ref_dtype(t, want[i]));
  return n;
}

std::vector<float> random_floats(std::mt19937& rng, std::size_t n) {
  std::normal_distribution<float> d(0.0f, 0.5f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

std::string bytes_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, std::string_view bytes) {
  // A new file, not a truncated one: ext4 flushes a file truncated to zero on close (auto_da_alloc), which
  // made the thousands of rewrites below wait on the disk.
  std::error_code ec;
  fs::remove(path, ec);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

// A file from a literal header and a data area; `len` overrides the header length field.
std::string raw_file(std::string_view header, std::size_t data_bytes, std::uint64_t len = ~0ull) {
  if (len == ~0ull) len = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &len, 8);
  out += header;
  for (std::size_t i = 0; i < data_bytes; ++i) out += static_cast<char>(i * 37 + 11);
  return out;
}

std::uint64_t test_dtype_size(const std::string& d) {
  static const std::map<std::string, std::uint64_t> kSizes = {
      {"BOOL", 1}, {"U8", 1},   {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1}, {"I16", 2}, {"U16", 2},
      {"F16", 2},  {"BF16", 2}, {"I32", 4}, {"U32", 4},     {"F32", 4},     {"I64", 8},     {"U64", 8}, {"F64", 8}};
  const auto it = kSizes.find(d);
  return it == kSizes.end() ? 0 : it->second;
}

// What an accepted file must satisfy, checked here independently of the reader's own checks.
void check_accepted(const safetensors_file& f, std::uint64_t file_size) {
  const std::string bytes = bytes_of(f.path());
  REQUIRE(bytes.size() == file_size);
  std::uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  REQUIRE(header_len <= file_size - 8);
  CHECK(f.data_size() == file_size - 8 - header_len);
  const auto& ts = f.tensors();
  for (std::size_t i = 0; i < ts.size(); ++i) {
    const tensor_info& t = ts[i];
    const std::uint64_t esize = test_dtype_size(t.dtype);
    REQUIRE_MESSAGE(esize != 0, "unexpected dtype accepted: ", t.dtype);
    long double elements = 1;
    for (const std::uint64_t d : t.shape) elements *= static_cast<long double>(d);
    CHECK(static_cast<long double>(t.bytes) == elements * esize);
    CHECK(t.offset + t.bytes <= f.data_size());
    CHECK(t.offset <= f.data_size());
    for (std::size_t j = 0; j < i; ++j) {
      const tensor_info& u = ts[j];
      CHECK_FALSE((t.offset < u.offset + u.bytes && u.offset < t.offset + t.bytes));
    }
    std::vector<float> out;
    const status s = f.read_f32(t, out);
    if (t.dtype == "F32" || t.dtype == "BF16" || t.dtype == "F16") {
      CHECK(s == status::ok);
      CHECK(out.size() == t.elements);
    } else {
      CHECK(s == status::unsupported);
    }
  }
}

// A small random MoE model, and its tensors under a Hugging Face layout (names spelled out here, not taken
// from the library, so the test also checks the naming).
struct small_model {
  model_shape shape{.hidden = 8, .inter = 6, .experts = 4, .topk = 2, .layers = 2};
  std::vector<expert_weights> experts;  // [layer × experts + e]
  std::vector<router_weights> routers;
};

small_model random_model(std::mt19937& rng) {
  small_model m;
  const std::size_t h = m.shape.hidden, i = m.shape.inter;
  for (std::uint32_t k = 0; k < m.shape.layers * m.shape.experts; ++k)
    m.experts.push_back({random_floats(rng, i * h), random_floats(rng, i * h), random_floats(rng, h * i)});
  for (std::uint32_t l = 0; l < m.shape.layers; ++l) m.routers.push_back({random_floats(rng, m.shape.experts * h)});
  return m;
}

std::vector<tensor_to_write> model_tensors(const small_model& m, hf_layout layout, st_dtype t, std::mt19937& rng) {
  const std::uint64_t h = m.shape.hidden, i = m.shape.inter;
  const std::uint32_t first = layout == hf_layout::deepseek_v3 ? 3 : 0;
  std::vector<tensor_to_write> out;
  out.push_back({"model.embed_tokens.weight", t, {16, h}, random_floats(rng, 16 * h)});
  for (std::uint32_t l = 0; l < m.shape.layers; ++l) {
    const std::uint32_t dl = first + l;
    for (std::uint32_t e = 0; e < m.shape.experts; ++e) {
      const expert_weights& w = m.experts[l * m.shape.experts + e];
      if (layout == hf_layout::mixtral) {
        const std::string p = fmt::format("model.layers.{}.block_sparse_moe.experts.{}.", dl, e);
        out.push_back({p + "w1.weight", t, {i, h}, w.gate});
        out.push_back({p + "w3.weight", t, {i, h}, w.up});
        out.push_back({p + "w2.weight", t, {h, i}, w.down});
      } else {
        const std::string p = fmt::format("model.layers.{}.mlp.experts.{}.", dl, e);
        out.push_back({p + "gate_proj.weight", t, {i, h}, w.gate});
        out.push_back({p + "up_proj.weight", t, {i, h}, w.up});
        out.push_back({p + "down_proj.weight", t, {h, i}, w.down});
      }
    }
    const std::string router = layout == hf_layout::mixtral ? "block_sparse_moe.gate.weight" : "mlp.gate.weight";
    out.push_back({fmt::format("model.layers.{}.{}", dl, router), t, {m.shape.experts, h}, m.routers[l].gate});
    if (layout == hf_layout::deepseek_v3) {
      out.push_back(
          {fmt::format("model.layers.{}.mlp.shared_experts.up_proj.weight", dl), t, {i, h}, random_floats(rng, i * h)});
      out.push_back({fmt::format("model.layers.{}.mlp.gate.e_score_correction_bias", dl),
                     st_dtype::f32,
                     {m.shape.experts},
                     random_floats(rng, m.shape.experts)});
    } else if (layout == hf_layout::qwen3_moe) {
      out.push_back({fmt::format("model.layers.{}.self_attn.q_norm.weight", dl), t, {h}, random_floats(rng, h)});
    }
  }
  if (layout == hf_layout::deepseek_v3)  // the dense layers before first_k_dense_replace
    for (std::uint32_t dl = 0; dl < 3; ++dl)
      out.push_back({fmt::format("model.layers.{}.mlp.gate_proj.weight", dl), t, {i, h}, random_floats(rng, i * h)});
  std::shuffle(out.begin(), out.end(), rng);
  return out;
}

void check_model_loads(const checkpoint& ck, const hf_naming& n, const small_model& m, st_dtype t) {
  for (std::uint32_t l = 0; l < m.shape.layers; ++l) {
    for (std::uint32_t e = 0; e < m.shape.experts; ++e) {
      expert_weights w;
      REQUIRE_OK(load_expert(ck, n, m.shape, l, e, w));
      const expert_weights& want = m.experts[l * m.shape.experts + e];
      CHECK(mismatches(w.gate, want.gate, t) == 0);
      CHECK(mismatches(w.up, want.up, t) == 0);
      CHECK(mismatches(w.down, want.down, t) == 0);
    }
    router_weights r;
    REQUIRE_OK(load_router(ck, n, m.shape, l, r));
    CHECK(mismatches(r.gate, m.routers[l].gate, t) == 0);
  }
}

constexpr hf_layout kLayouts[] = {hf_layout::deepseek_v3, hf_layout::qwen3_moe, hf_layout::mixtral};
constexpr st_dtype kDtypes[] = {st_dtype::f32, st_dtype::bf16, st_dtype::f16};

}  // namespace

TEST_CASE("safetensors: bf16 and f16 are written rounded to nearest even and read back exactly") {
  temp_dir dir;
  std::mt19937 rng(7);
  std::vector<float> v = {0.0f,
                          -0.0f,
                          1.0f,
                          -2.5f,
                          INFINITY,
                          -INFINITY,
                          1.0f + 0x1p-8f,      // bf16 tie -> 1 (even)
                          1.0f + 3 * 0x1p-8f,  // bf16 tie -> 1 + 2^-6 (even)
                          65504.0f,
                          65519.0f,
                          65520.0f,
                          0x1p-24f,
                          0x1p-25f,
                          3 * 0x1p-26f,
                          1.5f * 0x1p-24f,
                          2049.0f,
                          2051.0f,
                          0x1.ffp127f,
                          std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::denorm_min(),
                          0x1p-130f};
  std::uniform_int_distribution<std::uint32_t> bits;
  std::uniform_real_distribution<float> expo(-30.0f, 20.0f);
  for (int i = 0; i < 20000; ++i) {
    v.push_back(std::bit_cast<float>(bits(rng)));  // anything, NaNs and subnormals included
    v.push_back((i % 2 ? -1.0f : 1.0f) * std::exp2(expo(rng)));
  }
  const std::string path = dir.file("values.safetensors");
  const std::uint64_t n = v.size();
  REQUIRE_OK(write_safetensors(
      path, {{"F32", st_dtype::f32, {n}, v}, {"BF16", st_dtype::bf16, {n}, v}, {"F16", st_dtype::f16, {n}, v}}));
  safetensors_file f;
  REQUIRE_OK(f.open(path));
  for (const st_dtype t : kDtypes) {
    std::vector<float> got;
    const tensor_info* info = f.find(st_dtype_name(t));
    REQUIRE(info != nullptr);
    CHECK(info->dtype == st_dtype_name(t));
    REQUIRE_OK(f.read_f32(*info, got));
    CHECK(mismatches(got, v, t) == 0);
  }
  // The reference itself, on hand-worked cases.
  std::vector<float> b, h;
  REQUIRE_OK(f.read_f32(*f.find("BF16"), b));
  REQUIRE_OK(f.read_f32(*f.find("F16"), h));
  CHECK(b[6] == 1.0f);
  CHECK(b[7] == 1.0f + 0x1p-6f);
  CHECK(b[17] == INFINITY);  // 0x1.ffp127: the tie above bf16's largest finite 0x1.fep127 rounds to even (inf)
  CHECK(b[18] == INFINITY);
  CHECK(b[19] == 0.0f);  // 2^-149 is below half of bf16's smallest subnormal 2^-133
  CHECK_FALSE(std::signbit(b[19]));
  CHECK(b[20] == 0x1p-130f);
  CHECK(h[8] == 65504.0f);
  CHECK(h[9] == 65504.0f);
  CHECK(h[10] == INFINITY);
  CHECK(h[11] == 0x1p-24f);
  CHECK(h[12] == 0.0f);
  CHECK(h[13] == 0x1p-24f);
  CHECK(h[14] == 0x1p-23f);
  CHECK(h[15] == 2048.0f);
  CHECK(h[16] == 2052.0f);
  CHECK(std::signbit(h[1]));
  std::size_t nan_in = 0, nan_b = 0, nan_h = 0;
  for (std::size_t i = 0; i < v.size(); ++i) {
    nan_in += std::isnan(v[i]);
    nan_b += std::isnan(b[i]);
    nan_h += std::isnan(h[i]);
  }
  CHECK(nan_in > 0);
  CHECK(nan_b == nan_in);  // NaN stays NaN (never rounds into inf)
  CHECK(nan_h == nan_in);
}

TEST_CASE("safetensors: every bf16 and f16 bit pattern decodes to its value and encodes back to itself") {
  temp_dir dir;
  std::string data;
  for (std::uint32_t u = 0; u < 65536; ++u) {
    data += static_cast<char>(u & 0xff);
    data += static_cast<char>(u >> 8);
  }
  const std::string header = R"({"b":{"dtype":"BF16","shape":[65536],"data_offsets":[0,131072]},)"
                             R"("h":{"dtype":"F16","shape":[256,256],"data_offsets":[131072,262144]}})";
  std::string file = raw_file(header, 0);
  file += data + data;
  const std::string path = dir.file("all.safetensors");
  write_bytes(path, file);
  safetensors_file f;
  REQUIRE_OK(f.open(path));
  std::vector<float> b, h;
  REQUIRE_OK(f.read_f32(*f.find("b"), b));
  REQUIRE_OK(f.read_f32(*f.find("h"), h));
  REQUIRE(b.size() == 65536);
  REQUIRE(h.size() == 65536);
  std::size_t bad_b = 0, bad_h = 0;
  for (std::uint32_t u = 0; u < 65536; ++u) {
    const int e = static_cast<int>((u >> 10) & 31), m = static_cast<int>(u & 1023);
    float want = e == 0    ? std::ldexp(static_cast<float>(m), -24)
                 : e == 31 ? (m ? NAN : INFINITY)
                           : std::ldexp(1.0f + m / 1024.0f, e - 15);
    if (u & 0x8000) want = -want;
    bad_h += !same_float(h[u], want);
    const int be = static_cast<int>((u >> 7) & 255), bm = static_cast<int>(u & 127);
    float bwant = be == 0     ? std::ldexp(static_cast<float>(bm), -133)
                  : be == 255 ? (bm ? NAN : INFINITY)
                              : std::ldexp(1.0f + bm / 128.0f, be - 127);
    if (u & 0x8000) bwant = -bwant;
    bad_b += !same_float(b[u], bwant);
  }
  CHECK(bad_b == 0);
  CHECK(bad_h == 0);

  // Written back, every non-NaN pattern is the same 16 bits.
  const std::string back = dir.file("back.safetensors");
  REQUIRE_OK(write_safetensors(back, {{"b", st_dtype::bf16, {65536}, b}, {"h", st_dtype::f16, {65536}, h}}));
  safetensors_file g;
  REQUIRE_OK(g.open(back));
  const auto rb = g.raw(*g.find("b"));
  const auto rh = g.raw(*g.find("h"));
  REQUIRE(rb.size() == 131072);
  REQUIRE(rh.size() == 131072);
  std::size_t diff_b = 0, diff_h = 0;
  for (std::uint32_t u = 0; u < 65536; ++u) {
    std::uint16_t xb, xh;
    std::memcpy(&xb, rb.data() + 2 * u, 2);
    std::memcpy(&xh, rh.data() + 2 * u, 2);
    if (!std::isnan(b[u])) diff_b += xb != u;
    if (!std::isnan(h[u])) diff_h += xh != u;
  }
  CHECK(diff_b == 0);
  CHECK(diff_h == 0);
}

TEST_CASE("safetensors: a written file has the header, metadata and layout asked for") {
  temp_dir dir;
  const std::string path = dir.file("m.safetensors");
  REQUIRE_OK(write_safetensors(path,
                               {{"zeta", st_dtype::bf16, {2, 3}, {1, 2, 3, 4, 5, 6}},
                                {"alpha", st_dtype::f32, {3}, {0.5f, -1.0f, 7.0f}},
                                {"empty", st_dtype::f16, {0, 4}, {}},
                                {"scalar", st_dtype::f32, {}, {42.0f}}},
                               {{"format", "pt"}, {"note", "small"}}));
  const std::string bytes = bytes_of(path);
  std::uint64_t len = 0;
  std::memcpy(&len, bytes.data(), 8);
  CHECK(len % 8 == 0);
  CHECK(bytes.size() == 8 + len + 12 + 12 + 0 + 4);

  safetensors_file f;
  REQUIRE_OK(f.open(path));
  CHECK(f.data_size() == 28);
  CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"note", "small"}});
  REQUIRE(f.tensors().size() == 4);
  CHECK(f.tensors()[0].name == "alpha");  // sorted by name
  CHECK(f.tensors()[3].name == "zeta");
  const tensor_info* z = f.find("zeta");
  const tensor_info* a = f.find("alpha");
  const tensor_info* s = f.find("scalar");
  REQUIRE(z != nullptr);
  REQUIRE(a != nullptr);
  REQUIRE(s != nullptr);
  CHECK(f.find("beta") == nullptr);
  CHECK(z->dtype == "BF16");
  CHECK(z->shape == std::vector<std::uint64_t>{2, 3});
  CHECK(z->offset == 0);  // file order is the order given
  CHECK(z->bytes == 12);
  CHECK(a->offset == 12);
  CHECK(s->offset == 24);
  CHECK(s->shape.empty());
  CHECK(s->elements == 1);
  CHECK(f.find("empty")->elements == 0);
  std::vector<float> out;
  REQUIRE_OK(f.read_f32(*z, out));
  CHECK(out == std::vector<float>{1, 2, 3, 4, 5, 6});
  REQUIRE_OK(f.read_f32(*a, out));
  CHECK(out == std::vector<float>{0.5f, -1.0f, 7.0f});
  REQUIRE_OK(f.read_f32(*s, out));
  CHECK(out == std::vector<float>{42.0f});
  REQUIRE_OK(f.read_f32(*f.find("empty"), out));
  CHECK(out.empty());

  // Writer input errors.
  CHECK(write_safetensors(dir.file("x.safetensors"), {{"a", st_dtype::f32, {2, 2}, {1, 2, 3}}}) ==
        status::invalid_argument);
  CHECK(error_mentions("'a'"));
  CHECK(write_safetensors(dir.file("x.safetensors"), {{"a", st_dtype::f32, {1}, {1}},
                                                      {"a", st_dtype::f32, {1}, {2}}}) == status::invalid_argument);
  CHECK(write_safetensors(dir.file("x.safetensors"), {{"__metadata__", st_dtype::f32, {1}, {1}}}) ==
        status::invalid_argument);
  CHECK(write_safetensors(dir.file("no/such/dir.safetensors"), {{"a", st_dtype::f32, {1}, {1}}}) ==
        status::internal_error);
}

TEST_CASE("hf layouts: names, decoder layers, parsing") {
  CHECK(hf_expert_tensor(hf_layout::deepseek_v3, 1, 2, hf_proj::down) ==
        "model.layers.4.mlp.experts.2.down_proj.weight");
  CHECK(hf_expert_tensor(hf_layout::qwen3_moe, 0, 9, hf_proj::gate) == "model.layers.0.mlp.experts.9.gate_proj.weight");
  CHECK(hf_expert_tensor(hf_layout::mixtral, 0, 7, hf_proj::up) ==
        "model.layers.0.block_sparse_moe.experts.7.w3.weight");
  CHECK(hf_expert_tensor(hf_layout::mixtral, 2, 1, hf_proj::gate) ==
        "model.layers.2.block_sparse_moe.experts.1.w1.weight");
  CHECK(hf_expert_tensor(hf_layout::mixtral, 2, 1, hf_proj::down) ==
        "model.layers.2.block_sparse_moe.experts.1.w2.weight");
  CHECK(hf_router_tensor(hf_layout::qwen3_moe, 5) == "model.layers.5.mlp.gate.weight");
  CHECK(hf_router_tensor(hf_layout::deepseek_v3, 0) == "model.layers.3.mlp.gate.weight");
  CHECK(hf_router_tensor(hf_layout::mixtral, 1) == "model.layers.1.block_sparse_moe.gate.weight");
  CHECK(hf_decoder_layer(hf_layout::deepseek_v3, 57) == 60);
  CHECK(hf_decoder_layer(hf_layout::qwen3_moe, 57) == 57);
  CHECK(hf_decoder_layer(hf_naming(hf_layout::deepseek_v3, 1), 0) == 1);
  CHECK(hf_router_tensor(hf_naming(hf_layout::mixtral, 2), 0) == "model.layers.2.block_sparse_moe.gate.weight");

  for (const hf_layout l : kLayouts) {
    hf_layout back = l == hf_layout::mixtral ? hf_layout::qwen3_moe : hf_layout::mixtral;
    REQUIRE_OK(parse_hf_layout(hf_layout_name(l), back));
    CHECK(back == l);
  }
  hf_layout l = hf_layout::mixtral;
  REQUIRE_OK(parse_hf_layout("DeepSeek_V3", l));
  CHECK(l == hf_layout::deepseek_v3);
  CHECK(std::string(hf_layout_name(hf_layout::qwen3_moe)) == "qwen3-moe");
  CHECK(parse_hf_layout("llama", l) == status::invalid_argument);
  CHECK(error_mentions("'llama'"));
  CHECK(parse_hf_layout("", l) == status::invalid_argument);
  CHECK(l == hf_layout::deepseek_v3);  // untouched on failure
}

TEST_CASE("checkpoint: every layout and dtype in one file loads experts and routers, and is detected") {
  std::mt19937 rng(11);
  for (const hf_layout layout : kLayouts) {
    for (const st_dtype t : kDtypes) {
      CAPTURE(hf_layout_name(layout));
      CAPTURE(st_dtype_name(t));
      temp_dir dir;
      const small_model m = random_model(rng);
      const std::string path = dir.file("model.safetensors");
      REQUIRE_OK(write_safetensors(path, model_tensors(m, layout, t, rng)));
      checkpoint ck;
      REQUIRE_OK(ck.open(path));
      CHECK(ck.files().size() == 1);
      CHECK(ck.contains("model.embed_tokens.weight"));
      check_model_loads(ck, layout, m, t);

      hf_naming found(hf_layout::mixtral, 99);
      REQUIRE_OK(detect_hf_layout(ck, found));
      CHECK(found.layout == layout);
      CHECK(found.first_moe_layer == hf_default_first_moe_layer(layout));

      // Shifting where the MoE layers start reads other tensors: layer 0 with start 1 is our layer 1.
      const hf_naming shifted(layout, hf_default_first_moe_layer(layout) + 1);
      router_weights r;
      REQUIRE_OK(load_router(ck, shifted, m.shape, 0, r));
      CHECK(mismatches(r.gate, m.routers[1].gate, t) == 0);
      CHECK(load_router(ck, shifted, m.shape, 1, r) == status::not_found);
    }
  }
}

TEST_CASE("checkpoint: a sharded directory with an index json, and one without") {
  std::mt19937 rng(13);
  for (const hf_layout layout : kLayouts) {
    const st_dtype t = kDtypes[static_cast<int>(layout)];
    CAPTURE(hf_layout_name(layout));
    temp_dir dir;
    const small_model m = random_model(rng);
    const std::vector<tensor_to_write> all = model_tensors(m, layout, t, rng);
    std::vector<tensor_to_write> shards[3];
    for (std::size_t i = 0; i < all.size(); ++i) shards[i % 3].push_back(all[i]);
    std::string map;
    for (int s = 0; s < 3; ++s) {
      const std::string name = fmt::format("model-{:05}-of-00003.safetensors", s + 1);
      REQUIRE_OK(write_safetensors(dir.file(name), shards[s]));
      for (const tensor_to_write& w : shards[s])
        map += fmt::format("{}\"{}\": \"{}\"", map.empty() ? "" : ",", w.name, name);
    }
    // A stray file that the index does not list, repeating a listed tensor: ignored.
    REQUIRE_OK(write_safetensors(dir.file("stray.safetensors"), {shards[0][0]}));
    const std::string index_path = dir.file("model.safetensors.index.json");
    write_bytes(index_path, fmt::format(R"({{"metadata": {{"total_size": 1234}}, "weight_map": {{{}}}}})", map));

    checkpoint ck;
    REQUIRE_OK(ck.open(dir.path.string()));
    CHECK(ck.files().size() == 3);
    CHECK(ck.names().size() == all.size());
    check_model_loads(ck, layout, m, t);
    hf_naming found(hf_layout::mixtral, 99);
    REQUIRE_OK(detect_hf_layout(ck, found));
    CHECK(found.layout == layout);

    // Without the index every *.safetensors is read: the stray file now repeats a tensor.
    fs::rename(index_path, dir.file("index.json.off"));
    CHECK(ck.open(dir.path.string()) == status::invalid_argument);
    CHECK(error_mentions(shards[0][0].name));
    CHECK(error_mentions("stray.safetensors"));
    fs::remove(dir.file("stray.safetensors"));
    REQUIRE_OK(ck.open(dir.path.string()));
    CHECK(ck.files().size() == 3);
    check_model_loads(ck, layout, m, t);
  }
}

TEST_CASE("checkpoint: bad index files and directories are refused with the reason") {
  temp_dir dir;
  REQUIRE_OK(write_safetensors(dir.file("a.safetensors"), {{"x", st_dtype::f32, {2}, {1, 2}}}));
  checkpoint ck;
  const std::string index = dir.file("model.safetensors.index.json");
  const std::string d = dir.path.string();
  struct bad_index {
    const char* text;
    status want;
    const char* mentions;
  };
  const bad_index cases[] = {
      {R"({"weight_map": {"x": "b.safetensors"}})", status::not_found, "b.safetensors"},
      {R"({"weight_map": {"y": "a.safetensors"}})", status::invalid_argument, "'y'"},
      {R"({"weight_map": {"x": "../a.safetensors"}})", status::invalid_argument, "../a.safetensors"},
      {R"({"weight_map": {"x": 3}})", status::invalid_argument, "weight_map['x']"},
      {R"({"metadata": {}})", status::invalid_argument, "weight_map"},
      {R"([1, 2])", status::invalid_argument, "weight_map"},
      {R"({"weight_map": {"x": "a.safetensors")", status::invalid_argument, "not valid JSON"},
  };
  for (const bad_index& c : cases) {
    CAPTURE(c.text);
    write_bytes(index, c.text);
    CHECK(ck.open(d) == c.want);
    CHECK(error_mentions(c.mentions));
    CHECK(ck.names().empty());
  }
  write_bytes(index, R"({"weight_map": {"x": "a.safetensors"}})");
  REQUIRE_OK(ck.open(d));
  CHECK(ck.names() == std::vector<std::string>{"x"});

  temp_dir empty;
  CHECK(ck.open(empty.path.string()) == status::not_found);
  CHECK(error_mentions(empty.path.string()));
  CHECK(ck.open(dir.file("nothing-here")) == status::not_found);
  CHECK(error_mentions("nothing-here"));
  hf_naming n(hf_layout::mixtral);
  CHECK(detect_hf_layout(ck, n) == status::not_found);  // `ck` failed to open: no tensors at all
}

TEST_CASE("checkpoint: missing tensors, wrong shapes, bad indices and unconvertible dtypes give the right status") {
  std::mt19937 rng(17);
  temp_dir dir;
  const small_model m = random_model(rng);
  std::vector<tensor_to_write> ts = model_tensors(m, hf_layout::qwen3_moe, st_dtype::bf16, rng);
  const std::string path = dir.file("q.safetensors");
  REQUIRE_OK(write_safetensors(path, ts));
  checkpoint ck;
  REQUIRE_OK(ck.open(path));

  expert_weights w;
  w.gate = {123.0f};
  model_shape more = m.shape;
  more.experts = 5;
  CHECK(load_expert(ck, hf_layout::qwen3_moe, more, 1, 4, w) == status::not_found);
  CHECK(error_mentions("'model.layers.1.mlp.experts.4.gate_proj.weight'"));
  CHECK(w.gate == std::vector<float>{123.0f});  // untouched on failure

  model_shape swapped = m.shape;
  std::swap(swapped.hidden, swapped.inter);
  CHECK(load_expert(ck, hf_layout::qwen3_moe, swapped, 0, 0, w) == status::invalid_argument);
  CHECK(error_mentions("'model.layers.0.mlp.experts.0.gate_proj.weight' has shape [6, 8], expected [8, 6]"));
  router_weights r;
  CHECK(load_router(ck, hf_layout::qwen3_moe, more, 0, r) == status::invalid_argument);
  CHECK(error_mentions("[4, 8], expected [5, 8]"));

  CHECK(load_expert(ck, hf_layout::qwen3_moe, m.shape, 2, 0, w) == status::invalid_argument);  // layer >= layers
  CHECK(load_expert(ck, hf_layout::qwen3_moe, m.shape, 0, 4, w) == status::invalid_argument);  // expert >= experts
  CHECK(load_router(ck, hf_layout::qwen3_moe, m.shape, 2, r) == status::invalid_argument);
  CHECK(load_expert(ck, hf_layout::mixtral, m.shape, 0, 0, w) == status::not_found);  // wrong layout: other names
  CHECK(error_mentions("block_sparse_moe"));

  std::vector<float> out;
  CHECK(ck.read("model.embed_tokens.weight", {16, 8}, out) == status::ok);
  CHECK(ck.read("model.embed_tokens.weight", {16, 8, 1}, out) == status::invalid_argument);
  CHECK(ck.read("nope", {1}, out) == status::not_found);
  CHECK(error_mentions("'nope'"));

  // An FP8 checkpoint (DeepSeek-V3 as published) opens, but its weights are refused by dtype.
  const std::string fp8 = dir.file("fp8.safetensors");
  write_bytes(fp8, raw_file(R"({"model.layers.3.mlp.experts.0.gate_proj.weight":)"
                            R"({"dtype":"F8_E4M3","shape":[6,8],"data_offsets":[0,48]}})",
                            48));
  REQUIRE_OK(ck.open(fp8));
  CHECK(ck.read("model.layers.3.mlp.experts.0.gate_proj.weight", {6, 8}, out) == status::unsupported);
  CHECK(error_mentions("F8_E4M3"));
  hf_naming n(hf_layout::mixtral);
  REQUIRE_OK(detect_hf_layout(ck, n));
  CHECK(n.layout == hf_layout::qwen3_moe);  // no DeepSeek-only tensor in it
  CHECK(n.first_moe_layer == 3);
}

TEST_CASE("safetensors: each malformed header is refused with a status naming the file and the field") {
  temp_dir dir;
  struct bad_file {
    std::string header;
    std::size_t data;
    status want;
    const char* mentions;
    std::uint64_t len = ~0ull;
  };
  const std::string good = R"("t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})";
  const bad_file cases[] = {
      {"[1,2]", 0, status::invalid_argument, "not an object"},
      {"{" + good, 24, status::invalid_argument, "not valid JSON"},
      {"{" + good + "}}", 24, status::invalid_argument, "not valid JSON"},
      {"{" + good + "} x", 24, status::invalid_argument, "not valid JSON"},
      {R"({"t":{"shape":[2,3],"data_offsets":[0,24]}})", 24, status::invalid_argument, "has no 'dtype'"},
      {R"({"t":{"dtype":"F32","data_offsets":[0,24]}})", 24, status::invalid_argument, "has no 'shape'"},
      {R"({"t":{"dtype":"F32","shape":[2,3]}})", 24, status::invalid_argument, "has no 'data_offsets'"},
      {R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24],"x":1}})", 24, status::invalid_argument,
       "unknown field 'x'"},
      {R"({"t":{"dtype":5,"shape":[2,3],"data_offsets":[0,24]}})", 24, status::invalid_argument, "'dtype'"},
      {R"({"t":{"dtype":"Q4_K","shape":[2,3],"data_offsets":[0,24]}})", 24, status::unsupported, "'Q4_K'"},
      {R"({"t":{"dtype":"F32","shape":[2,-3],"data_offsets":[0,24]}})", 24, status::invalid_argument, "'shape'"},
      {R"({"t":{"dtype":"F32","shape":[2,3.0],"data_offsets":[0,24]}})", 24, status::invalid_argument, "'shape'"},
      {R"({"t":{"dtype":"F32","shape":"2,3","data_offsets":[0,24]}})", 24, status::invalid_argument, "'shape'"},
      {R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0, status::invalid_argument,
       "overflows"},
      {R"({"t":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0, status::invalid_argument,
       "overflows"},
      {R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0]}})", 24, status::invalid_argument, "'data_offsets'"},
      {R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24,48]}})", 48, status::invalid_argument,
       "'data_offsets'"},
      {R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[-1,23]}})", 24, status::invalid_argument, "'data_offsets'"},
      {R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[24,0]}})", 24, status::invalid_argument,
       "begin 24 > end 0"},
      {R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})", 23, status::invalid_argument,
       "run past the data area (23 bytes)"},
      {R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[18446744073709551600,18446744073709551615]}})", 24,
       status::invalid_argument, "run past"},
      {R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 24, status::invalid_argument,
       "hold 20 bytes but F32 [2, 3] needs 24"},
      {R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F16","shape":[4],"data_offsets":[16,24]}})",
       24, status::invalid_argument, "'a' [0, 24) and 'b' [16, 24) overlap"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
       8, status::invalid_argument, "overlap"},
      {R"({"":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})", 24, status::invalid_argument, "empty name"},
      {R"({"t":[1,2,3]})", 24, status::invalid_argument, "'t' is a JSON array"},
      {R"({"__metadata__":{"a":1}})", 0, status::invalid_argument, "'__metadata__' entry 'a'"},
      {R"({"__metadata__":"x"})", 0, status::invalid_argument, "'__metadata__'"},
      {std::string(200000, '[') + std::string(200000, ']'), 0, status::invalid_argument, "nests deeper"},
      {"{" + good + "}", 24, status::invalid_argument, "exceeds the limit", (100ull << 20) + 1},
      {"{" + good + "}", 24, status::invalid_argument, "exceeds the limit", ~0ull - 1},
      {"{" + good + "}", 24, status::invalid_argument, "exceeds the limit", 1ull << 63},
      {"{" + good + "}", 24, status::invalid_argument, "runs past the end", 8 + 24 + 100},
      {"{" + good + "}", 0, status::invalid_argument, "runs past the end", 100ull << 20},
      {"", 0, status::invalid_argument, "not valid JSON"},
  };
  int i = 0;
  for (const bad_file& c : cases) {
    CAPTURE(c.header.substr(0, 200));
    const std::string path = dir.file(fmt::format("bad{}.safetensors", i++));
    write_bytes(path, raw_file(c.header, c.data, c.len));
    safetensors_file f;
    CHECK(f.open(path) == c.want);
    CHECK_MESSAGE(error_mentions(c.mentions), eaas::last_error());
    CHECK(error_mentions(path));
    CHECK_FALSE(f.is_open());
    CHECK(f.tensors().empty());
  }
  // The same header, intact, is accepted (the cases above fail for the reason named, not another).
  safetensors_file f;
  write_bytes(dir.file("good.safetensors"), raw_file("{" + good + R"(,"__metadata__":{"format":"pt"}})", 24));
  REQUIRE_OK(f.open(dir.file("good.safetensors")));
  CHECK(f.tensors().size() == 1);

  // Files too short or absent, and paths that are not files.
  write_bytes(dir.file("short.safetensors"), std::string(7, '\0'));
  CHECK(f.open(dir.file("short.safetensors")) == status::invalid_argument);
  CHECK(error_mentions("too short"));
  write_bytes(dir.file("zero.safetensors"), "");
  CHECK(f.open(dir.file("zero.safetensors")) == status::invalid_argument);
  CHECK(f.open(dir.file("absent.safetensors")) == status::not_found);
  CHECK(error_mentions("absent.safetensors"));
  CHECK(f.open(dir.path.string()) == status::invalid_argument);
  CHECK(error_mentions("not a regular file"));
  CHECK_FALSE(f.is_open());
}

TEST_CASE("safetensors: random corruptions of a valid file are refused or still valid, never a crash") {
  temp_dir dir;
  std::mt19937 rng(23);
  const std::string base_path = dir.file("base.safetensors");
  REQUIRE_OK(write_safetensors(
      base_path,
      {{"model.layers.0.mlp.experts.0.up_proj.weight", st_dtype::bf16, {6, 8}, random_floats(rng, 48)},
       {"b", st_dtype::f32, {5}, random_floats(rng, 5)},
       {"c", st_dtype::f16, {3, 1, 2}, random_floats(rng, 6)}},
      {{"format", "pt"}}));
  const std::string base = bytes_of(base_path);
  std::uint64_t header_len = 0;
  std::memcpy(&header_len, base.data(), 8);
  const std::string path = dir.file("fuzz.safetensors");

  auto try_open = [&](const std::string& bytes, std::size_t& refused) {
    write_bytes(path, bytes);
    safetensors_file f;
    const status s = f.open(path);
    if (s == status::ok) {
      check_accepted(f, bytes.size());
    } else {
      ++refused;
      CHECK((s == status::invalid_argument || s == status::unsupported));
      CHECK(error_mentions(path));
      CHECK_FALSE(f.is_open());
    }
  };

  SUBCASE("bit flips in the header length and the header") {
    std::size_t refused = 0;
    const int kRuns = 4000;
    for (int run = 0; run < kRuns; ++run) {
      std::string bytes = base;
      const int flips = 1 + run % 3;
      for (int k = 0; k < flips; ++k) {
        const std::size_t pos = std::uniform_int_distribution<std::size_t>(0, 8 + header_len - 1)(rng);
        bytes[pos] = static_cast<char>(bytes[pos] ^ (1 << (rng() % 8)));
      }
      try_open(bytes, refused);
    }
    CHECK(refused > kRuns / 2);  // flips in names and metadata strings may leave a valid file
  }

  SUBCASE("every truncation is refused") {
    std::size_t refused = 0;
    for (std::size_t n = 0; n < base.size(); ++n) try_open(base.substr(0, n), refused);
    CHECK(refused == base.size());
  }

  SUBCASE("random byte overwrites and huge header lengths") {
    std::size_t refused = 0;
    for (int run = 0; run < 3000; ++run) {
      std::string bytes = base;
      const std::size_t pos = std::uniform_int_distribution<std::size_t>(0, 8 + header_len - 1)(rng);
      bytes[pos] = static_cast<char>(rng());
      try_open(bytes, refused);
    }
    // Any longer header length is refused: the JSON then takes in data bytes, or the data area loses its end.
    std::size_t huge_refused = 0;
    for (int run = 0; run < 200; ++run) {
      std::string bytes = base;
      const std::uint64_t len =
          run < 64 ? header_len + (1ull << run) : header_len + 1 + rng() % (1ull << (run % 40 + 1));
      std::memcpy(bytes.data(), &len, 8);
      try_open(bytes, huge_refused);
    }
    CHECK(huge_refused == 200);
  }

  SUBCASE("random JSON values in the tensor fields") {
    struct desc {
      std::string name, dtype, shape, offsets;
    };
    const std::vector<desc> ok_descs = {{"w", "\"BF16\"", "[6,8]", "[0,96]"},
                                        {"b", "\"F32\"", "[5]", "[96,116]"},
                                        {"c", "\"F16\"", "[3,1,2]", "[116,128]"}};
    const char* values[] = {"-1",
                            "0",
                            "1",
                            "3.5",
                            "1e400",
                            "18446744073709551615",
                            "18446744073709551616",
                            "\"F32\"",
                            "\"BF16\"",
                            "\"F8_E4M3\"",
                            "\"I64\"",
                            "\"Q4\"",
                            "null",
                            "true",
                            "[]",
                            "{}",
                            "[1]",
                            "[0,0]",
                            "[1,2,3]",
                            "[[1]]",
                            "\"x\"",
                            "[0,18446744073709551615]",
                            "[4294967296,4294967296]",
                            "[116,128]",
                            "[96,116]",
                            "[0,96]",
                            "[6,8]",
                            "[5]",
                            "[48]",
                            "[96,128]",
                            "[-5,3]",
                            "{\"a\":1}"};
    std::size_t refused = 0, structural = 0;
    const int kRuns = 5000;
    for (int run = 0; run < kRuns; ++run) {
      std::vector<desc> d = ok_descs;
      int mode = 0;
      for (int k = 0; k < 1 + run % 2; ++k) {
        desc& t = d[rng() % d.size()];
        mode = static_cast<int>(rng() % 6);
        const char* v = values[rng() % std::size(values)];
        if (mode == 0) t.dtype = v;
        if (mode == 1) t.shape = v;
        if (mode == 2) t.offsets = v;
        if (mode == 3) t.name = d[rng() % d.size()].name;  // duplicate key: JSON keeps one of them
        if (mode == 4) t.shape.clear();                    // field left out
        if (mode == 5) t.dtype += fmt::format(",\"extra\":{}", v);
      }
      std::string header = "{";
      for (const desc& t : d) {
        if (header.size() > 1) header += ',';
        header += fmt::format("\"{}\":{{\"dtype\":{}", t.name, t.dtype);
        if (!t.shape.empty()) header += fmt::format(",\"shape\":{}", t.shape);
        header += fmt::format(",\"data_offsets\":{}}}", t.offsets);
      }
      header += "}";
      const std::size_t before = refused;
      try_open(raw_file(header, 128), refused);
      if (run % 2 == 0 && (mode == 4 || mode == 5)) {  // a missing or unknown field is always refused
        ++structural;
        CHECK(refused == before + 1);
      }
    }
    CHECK(structural > 500);
    CHECK(refused > kRuns / 2);
  }

  SUBCASE("random tensor placements: accepted exactly when in range and disjoint") {
    std::size_t accepted = 0;
    for (int run = 0; run < 3000; ++run) {
      const std::uint64_t data = rng() % 200;
      const int count = 1 + static_cast<int>(rng() % 4);
      struct span_ {
        std::uint64_t begin, end;
      };
      std::vector<span_> spans;
      std::string header = "{";
      for (int k = 0; k < count; ++k) {
        const std::uint64_t n = rng() % 12;
        const std::uint64_t begin = rng() % 220;
        spans.push_back({begin, begin + 4 * n});
        header += fmt::format("{}\"t{}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{},{}]}}", k ? "," : "",
                              k, n, begin, begin + 4 * n);
      }
      header += "}";
      bool valid = true;
      for (std::size_t a = 0; a < spans.size(); ++a) {
        valid = valid && spans[a].end <= data;
        for (std::size_t b = 0; b < a; ++b)
          valid = valid && !(spans[a].begin < spans[b].end && spans[b].begin < spans[a].end);
      }
      write_bytes(path, raw_file(header, data));
      safetensors_file f;
      const status s = f.open(path);
      CHECK(s == (valid ? status::ok : status::invalid_argument));
      if (s == status::ok) {
        ++accepted;
        check_accepted(f, 8 + header.size() + data);
        CHECK(f.tensors().size() == spans.size());
      }
    }
    CHECK(accepted > 100);
  }
}
