#include "eaas/runtime/safetensors.hpp"

#include "bf16.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <new>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <utility>

#include "eaas/host/error.hpp"
#include "fail.hpp"

// safetensors stores little-endian values; the element loops below read them in native order.
static_assert(std::endian::native == std::endian::little, "safetensors loading assumes a little-endian host");

namespace eaas::runtime {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Names and dtypes come from the file: keep a hostile 50 MB name out of the error sentence.
std::string clip(std::string_view s) {
  constexpr std::size_t kMax = 160;
  return s.size() <= kMax ? std::string(s) : fmt::format("{}...({} bytes)", s.substr(0, kMax), s.size());
}

std::string shape_str(const std::vector<std::uint64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

bool mul_overflows(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return true;
  out = a * b;
  return false;
}

std::uint64_t dtype_size(std::string_view d) {
  struct entry {
    std::string_view name;
    std::uint64_t size;
  };
  static constexpr entry kDtypes[] = {
      {"BOOL", 1}, {"U8", 1},   {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1}, {"I16", 2}, {"U16", 2},
      {"F16", 2},  {"BF16", 2}, {"I32", 4}, {"U32", 4},     {"F32", 4},     {"I64", 8},     {"U64", 8}, {"F64", 8}};
  for (const entry& e : kDtypes)
    if (e.name == d) return e.size;
  return 0;
}

float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man × 2^-24, exact in fp32
    const float v = static_cast<float>(man) * 0x1p-24f;
    return sign ? -v : v;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
}

std::uint16_t round_shift(std::uint32_t v, unsigned shift) {  // v >> shift, rounded to nearest even
  std::uint32_t q = v >> shift;
  const std::uint32_t rest = v & ((1u << shift) - 1);
  const std::uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (q & 1u))) ++q;  // a carry into the exponent field is the right answer
  return static_cast<std::uint16_t>(q);
}

std::uint16_t f32_to_f16(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;                // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;               // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                    // normal in f16 (>= 2^-14)
    const std::uint32_t rebased = a - ((127u - 15u) << 23);  // exponent re-biased, mantissa kept
    return sign | round_shift(rebased, 13);
  }
  const std::uint32_t e = a >> 23;
  if (e < 102) return sign;  // below half the smallest subnormal (2^-25): zero
  // a subnormal f16 counts units of 2^-24: (1.m × 2^(e-127)) / 2^-24 = (m | 2^23) >> (126 - e)
  return sign | round_shift((a & 0x7fffffu) | 0x800000u, 126 - e);
}

std::uint64_t read_le64(const std::byte* p) {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The format nests at most 3 deep (header → tensor → shape); checking before parsing keeps a header of a
// million '[' from costing gigabytes.
bool nesting_within(std::string_view text, int limit) {
  int depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > limit) return false;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return true;
}

bool unsigned_array(const json& j) {
  return j.is_array() && std::all_of(j.begin(), j.end(), [](const json& v) { return v.is_number_unsigned(); });
}

}  // namespace

const char* st_dtype_name(st_dtype t) {
  switch (t) {
    case st_dtype::f32:
      return "F32";
    case st_dtype::bf16:
      return "BF16";
    case st_dtype::f16:
      return "F16";
  }
  return "?";
}

// ------------------------------------------------------------------------------------------------------------------
// safetensors_file
// ------------------------------------------------------------------------------------------------------------------

safetensors_file::safetensors_file(safetensors_file&& o) noexcept
    : path_(std::move(o.path_)),
      map_(std::exchange(o.map_, nullptr)),
      map_size_(std::exchange(o.map_size_, 0)),
      data_begin_(o.data_begin_),
      data_size_(o.data_size_),
      tensors_(std::move(o.tensors_)),
      metadata_(std::move(o.metadata_)) {}

safetensors_file& safetensors_file::operator=(safetensors_file&& o) noexcept {
  if (this != &o) {
    close();
    path_ = std::move(o.path_);
    map_ = std::exchange(o.map_, nullptr);
    map_size_ = std::exchange(o.map_size_, 0);
    data_begin_ = o.data_begin_;
    data_size_ = o.data_size_;
    tensors_ = std::move(o.tensors_);
    metadata_ = std::move(o.metadata_);
  }
  return *this;
}

safetensors_file::~safetensors_file() { close(); }

void safetensors_file::close() noexcept {
  if (map_ != nullptr) ::munmap(const_cast<std::byte*>(map_), map_size_);
  map_ = nullptr;
  map_size_ = data_begin_ = data_size_ = 0;
  tensors_.clear();
  metadata_.clear();
}

status safetensors_file::open(const std::string& path) {
  close();
  status s = status::ok;
  try {
    path_ = path;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int e = errno;
      const status why = (e == ENOENT || e == ENOTDIR) ? status::not_found
                         : (e == EACCES || e == EPERM) ? status::permission_denied
                                                       : status::internal_error;
      return EAAS_RT_FAIL(why, "safetensors {}: cannot open: {}", path, std::strerror(e));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: not a regular file", path);
    }
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (size < 8) {
      ::close(fd);
      return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: {} bytes, too short for the 8-byte header length",
                          path, size);
    }
    void* m = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int e = errno;
    ::close(fd);
    if (m == MAP_FAILED)
      return EAAS_RT_FAIL(status::no_resource, "safetensors {}: mmap of {} bytes failed: {}", path, size,
                          std::strerror(e));
    map_ = static_cast<const std::byte*>(m);
    map_size_ = size;

    const std::uint64_t header_len = read_le64(map_);
    if (header_len > kSafetensorsMaxHeader)
      s = EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: header length {} exceeds the limit of {} bytes", path,
                       header_len, kSafetensorsMaxHeader);
    else if (header_len > size - 8)
      s = EAAS_RT_FAIL(status::invalid_argument,
                       "safetensors {}: header length {} runs past the end of the file ({} bytes)", path, header_len,
                       size);
    else
      s = parse_header(header_len);
  } catch (const std::bad_alloc&) {
    s = EAAS_RT_FAIL(status::no_resource, "safetensors {}: out of memory while reading the header", path);
  } catch (const std::exception& ex) {
    s = EAAS_RT_FAIL(status::internal_error, "safetensors {}: {}", path, ex.what());
  }
  if (s != status::ok) close();
  return s;
}

status safetensors_file::parse_header(std::uint64_t header_len) {
  const std::string_view text(reinterpret_cast<const char*>(map_ + 8), header_len);
  data_begin_ = 8 + header_len;
  data_size_ = map_size_ - data_begin_;
  if (!nesting_within(text, 3))
    return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: header nests deeper than 3 levels", path_);
  json header;
  try {
    header = json::parse(text);
  } catch (const json::exception& e) {
    return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: header is not valid JSON: {}", path_, e.what());
  }
  if (!header.is_object())
    return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: header is a JSON {}, not an object", path_,
                        header.type_name());

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object())
        return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: '__metadata__' is a JSON {}, not an object",
                            path_, entry.type_name());
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string())
          return EAAS_RT_FAIL(status::invalid_argument,
                              "safetensors {}: '__metadata__' entry '{}' is a JSON {}, not a string", path_, clip(key),
                              value.type_name());
        metadata_.emplace(key, value.get<std::string>());
      }
      continue;
    }
    const std::string tname = clip(name);
    if (name.empty())
      return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: a tensor has an empty name", path_);
    if (!entry.is_object())
      return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: tensor '{}' is a JSON {}, not an object", path_,
                          tname, entry.type_name());
    for (const auto& [field, value] : entry.items())
      if (field != "dtype" && field != "shape" && field != "data_offsets")
        return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: tensor '{}' has an unknown field '{}'", path_,
                            tname, clip(field));
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!entry.contains(field))
        return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: tensor '{}' has no '{}'", path_, tname, field);

    tensor_info t;
    t.name = name;
    const json& dtype = entry["dtype"];
    if (!dtype.is_string())
      return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: tensor '{}': 'dtype' is a JSON {}, not a string",
                          path_, tname, dtype.type_name());
    t.dtype = dtype.get<std::string>();
    const std::uint64_t esize = dtype_size(t.dtype);
    if (esize == 0)
      return EAAS_RT_FAIL(status::unsupported, "safetensors {}: tensor '{}' has unknown dtype '{}'", path_, tname,
                          clip(t.dtype));

    const json& shape = entry["shape"];
    if (!unsigned_array(shape))
      return EAAS_RT_FAIL(status::invalid_argument,
                          "safetensors {}: tensor '{}': 'shape' is not an array of non-negative integers", path_,
                          tname);
    t.elements = 1;
    for (const json& d : shape) {
      t.shape.push_back(d.get<std::uint64_t>());
      if (mul_overflows(t.elements, t.shape.back(), t.elements))
        return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: tensor '{}': shape {} overflows 64 bits", path_,
                            tname, shape.dump());
    }
    if (mul_overflows(t.elements, esize, t.bytes))
      return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: tensor '{}': shape {} of {} overflows 64 bits",
                          path_, tname, shape_str(t.shape), t.dtype);

    const json& offsets = entry["data_offsets"];
    if (!unsigned_array(offsets) || offsets.size() != 2)
      return EAAS_RT_FAIL(status::invalid_argument,
                          "safetensors {}: tensor '{}': 'data_offsets' is not [begin, end] of non-negative integers",
                          path_, tname);
    const auto begin = offsets[0].get<std::uint64_t>();
    const auto end = offsets[1].get<std::uint64_t>();
    if (begin > end)
      return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: tensor '{}': data_offsets begin {} > end {}",
                          path_, tname, begin, end);
    if (end > data_size_)
      return EAAS_RT_FAIL(status::invalid_argument,
                          "safetensors {}: tensor '{}': data_offsets [{}, {}] run past the data area ({} bytes)", path_,
                          tname, begin, end, data_size_);
    if (end - begin != t.bytes)
      return EAAS_RT_FAIL(status::invalid_argument,
                          "safetensors {}: tensor '{}': data_offsets [{}, {}] hold {} bytes but {} {} needs {}", path_,
                          tname, begin, end, end - begin, t.dtype, shape_str(t.shape), t.bytes);
    t.offset = begin;
    tensors_.push_back(std::move(t));
  }

  std::vector<std::size_t> by_offset(tensors_.size());
  std::iota(by_offset.begin(), by_offset.end(), 0);
  std::sort(by_offset.begin(), by_offset.end(), [&](std::size_t a, std::size_t b) {
    const tensor_info &x = tensors_[a], &y = tensors_[b];
    return std::pair(x.offset, x.bytes) < std::pair(y.offset, y.bytes);
  });
  for (std::size_t i = 1; i < by_offset.size(); ++i) {
    const tensor_info& prev = tensors_[by_offset[i - 1]];
    const tensor_info& cur = tensors_[by_offset[i]];
    if (cur.offset < prev.offset + prev.bytes)
      return EAAS_RT_FAIL(status::invalid_argument,
                          "safetensors {}: tensors '{}' [{}, {}) and '{}' [{}, {}) overlap in the data area", path_,
                          clip(prev.name), prev.offset, prev.offset + prev.bytes, clip(cur.name), cur.offset,
                          cur.offset + cur.bytes);
  }
  std::sort(tensors_.begin(), tensors_.end(),
            [](const tensor_info& a, const tensor_info& b) { return a.name < b.name; });
  return status::ok;
}

const tensor_info* safetensors_file::find(std::string_view name) const {
  const auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                                   [](const tensor_info& t, std::string_view n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

std::span<const std::byte> safetensors_file::raw(const tensor_info& t) const {
  const std::less<const tensor_info*> before;
  if (tensors_.empty() || before(&t, tensors_.data()) || !before(&t, tensors_.data() + tensors_.size())) return {};
  return {map_ + data_begin_ + t.offset, static_cast<std::size_t>(t.bytes)};
}

status safetensors_file::read_f32(const tensor_info& t, std::vector<float>& out) const {
  const std::span<const std::byte> src = raw(t);
  if (src.data() == nullptr && t.bytes != 0)
    return EAAS_RT_FAIL(status::invalid_argument, "safetensors {}: tensor '{}' is not one of this file's", path_,
                        clip(t.name));
  const bool f32 = t.dtype == "F32", bf16 = t.dtype == "BF16", f16 = t.dtype == "F16";
  if (!f32 && !bf16 && !f16)
    return EAAS_RT_FAIL(status::unsupported,
                        "safetensors {}: tensor '{}' has dtype {}; only F32, BF16 and F16 convert to fp32 "
                        "(dequantize the checkpoint first)",
                        path_, clip(t.name), t.dtype);
  try {
    out.resize(t.elements);
  } catch (const std::exception&) {
    return EAAS_RT_FAIL(status::no_resource, "safetensors {}: no memory for the {} values of '{}'", path_, t.elements,
                        clip(t.name));
  }
  if (f32) {
    if (t.bytes != 0) std::memcpy(out.data(), src.data(), src.size());
    return status::ok;
  }
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::uint16_t v;
    std::memcpy(&v, src.data() + 2 * i, 2);
    out[i] = bf16 ? bf16_to_f32(v) : f16_to_f32(v);
  }
  return status::ok;
}

// ------------------------------------------------------------------------------------------------------------------
// checkpoint
// ------------------------------------------------------------------------------------------------------------------

namespace {

status read_text_file(const fs::path& p, std::string& out) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return EAAS_RT_FAIL(status::not_found, "checkpoint: cannot read {}", p.string());
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0 || static_cast<std::uint64_t>(size) > kSafetensorsMaxHeader)
    return EAAS_RT_FAIL(status::invalid_argument, "checkpoint: {} is larger than {} bytes", p.string(),
                        kSafetensorsMaxHeader);
  out.resize(static_cast<std::size_t>(size));
  in.seekg(0);
  if (!in.read(out.data(), size)) return EAAS_RT_FAIL(status::internal_error, "checkpoint: cannot read {}", p.string());
  return status::ok;
}

}  // namespace

status checkpoint::open(const std::string& path) {
  path_ = path;
  files_.clear();
  index_.clear();
  status s = status::ok;
  try {
    s = [&]() -> status {
      std::error_code ec;
      const fs::file_status st = fs::status(path, ec);
      if (ec || !fs::exists(st)) return EAAS_RT_FAIL(status::not_found, "checkpoint: {} does not exist", path);
      if (!fs::is_directory(st)) {
        EAAS_CHECK(files_.emplace_back().open(path));
        for (std::uint32_t i = 0; i < files_[0].tensors().size(); ++i)
          index_.emplace(files_[0].tensors()[i].name, where{0, i});
        return status::ok;
      }

      const fs::path index_path = fs::path(path) / "model.safetensors.index.json";
      if (fs::exists(index_path, ec)) {
        std::string text;
        EAAS_CHECK(read_text_file(index_path, text));
        json index;
        try {
          index = json::parse(text);
        } catch (const json::exception& e) {
          return EAAS_RT_FAIL(status::invalid_argument, "checkpoint: {} is not valid JSON: {}", index_path.string(),
                              e.what());
        }
        if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
          return EAAS_RT_FAIL(status::invalid_argument, "checkpoint: {} has no 'weight_map' object",
                              index_path.string());
        std::map<std::string, std::uint32_t> file_ids;
        for (const auto& [name, file] : index["weight_map"].items()) {
          if (!file.is_string())
            return EAAS_RT_FAIL(status::invalid_argument,
                                "checkpoint: {}: weight_map['{}'] is a JSON {}, not a file name", index_path.string(),
                                clip(name), file.type_name());
          const std::string fname = file.get<std::string>();
          if (fname.empty() || fname == "." || fname == ".." || fname.find_first_of("/\\") != std::string::npos)
            return EAAS_RT_FAIL(status::invalid_argument,
                                "checkpoint: {}: weight_map['{}'] = '{}' is not a file name in that directory",
                                index_path.string(), clip(name), clip(fname));
          auto [it, added] = file_ids.emplace(fname, static_cast<std::uint32_t>(files_.size()));
          if (added) EAAS_CHECK(files_.emplace_back().open((fs::path(path) / fname).string()));
          const safetensors_file& f = files_[it->second];
          const tensor_info* t = f.find(name);
          if (t == nullptr)
            return EAAS_RT_FAIL(status::invalid_argument,
                                "checkpoint: {} puts tensor '{}' in {}, which has no such tensor", index_path.string(),
                                clip(name), f.path());
          index_.emplace(name, where{it->second, static_cast<std::uint32_t>(t - f.tensors().data())});
        }
        return status::ok;
      }

      std::vector<fs::path> shards;
      for (fs::directory_iterator it(path, ec), end; !ec && it != end; it.increment(ec))
        if (it->path().extension() == ".safetensors" && it->is_regular_file(ec)) shards.push_back(it->path());
      if (ec) return EAAS_RT_FAIL(status::internal_error, "checkpoint: cannot list {}: {}", path, ec.message());
      if (shards.empty())
        return EAAS_RT_FAIL(status::not_found,
                            "checkpoint: {} has neither model.safetensors.index.json nor any *.safetensors file", path);
      std::sort(shards.begin(), shards.end());
      for (const fs::path& p : shards) {
        const auto id = static_cast<std::uint32_t>(files_.size());
        EAAS_CHECK(files_.emplace_back().open(p.string()));
        for (std::uint32_t i = 0; i < files_[id].tensors().size(); ++i) {
          const std::string& name = files_[id].tensors()[i].name;
          const auto [it, added] = index_.emplace(name, where{id, i});
          if (!added)
            return EAAS_RT_FAIL(status::invalid_argument, "checkpoint: tensor '{}' is in both {} and {}", clip(name),
                                files_[it->second.file].path(), files_[id].path());
        }
      }
      return status::ok;
    }();
  } catch (const std::bad_alloc&) {
    s = EAAS_RT_FAIL(status::no_resource, "checkpoint {}: out of memory", path);
  } catch (const std::exception& e) {
    s = EAAS_RT_FAIL(status::internal_error, "checkpoint {}: {}", path, e.what());
  }
  if (s != status::ok) {
    files_.clear();
    index_.clear();
  }
  return s;
}

std::vector<std::string> checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& [name, w] : index_) out.push_back(name);
  return out;
}

status checkpoint::find(std::string_view name, const safetensors_file*& file, const tensor_info*& info) const {
  const auto it = index_.find(name);
  if (it == index_.end()) return EAAS_RT_FAIL(status::not_found, "checkpoint {}: no tensor '{}'", path_, clip(name));
  file = &files_[it->second.file];
  info = &file->tensors()[it->second.tensor];
  return status::ok;
}

status checkpoint::read(std::string_view name, const std::vector<std::uint64_t>& shape, std::vector<float>& out) const {
  const safetensors_file* file = nullptr;
  const tensor_info* info = nullptr;
  EAAS_CHECK(find(name, file, info));
  if (info->shape != shape)
    return EAAS_RT_FAIL(status::invalid_argument, "checkpoint {}: tensor '{}' has shape {}, expected {}", path_,
                        clip(name), shape_str(info->shape), shape_str(shape));
  return file->read_f32(*info, out);
}

// ------------------------------------------------------------------------------------------------------------------
// Hugging Face names
// ------------------------------------------------------------------------------------------------------------------

const char* hf_layout_name(hf_layout l) {
  switch (l) {
    case hf_layout::deepseek_v3:
      return "deepseek-v3";
    case hf_layout::qwen3_moe:
      return "qwen3-moe";
    case hf_layout::mixtral:
      return "mixtral";
  }
  return "?";
}

status parse_hf_layout(std::string_view s, hf_layout& out) {
  std::string norm(s);
  for (char& c : norm) c = c == '_' ? '-' : static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const hf_layout l : {hf_layout::deepseek_v3, hf_layout::qwen3_moe, hf_layout::mixtral}) {
    if (norm == hf_layout_name(l)) {
      out = l;
      return status::ok;
    }
  }
  return EAAS_RT_FAIL(status::invalid_argument,
                      "unknown checkpoint layout '{}' (known: deepseek-v3, qwen3-moe, mixtral)", clip(s));
}

std::uint32_t hf_default_first_moe_layer(hf_layout l) { return l == hf_layout::deepseek_v3 ? 3 : 0; }

std::uint32_t hf_decoder_layer(const hf_naming& n, std::uint32_t moe_layer) { return n.first_moe_layer + moe_layer; }

std::string hf_expert_tensor(const hf_naming& n, std::uint32_t moe_layer, std::uint32_t expert, hf_proj p) {
  const auto i = static_cast<std::size_t>(p);
  if (n.layout == hf_layout::mixtral) {
    static constexpr const char* kMixtral[] = {"w1", "w3", "w2"};
    return fmt::format("model.layers.{}.block_sparse_moe.experts.{}.{}.weight", hf_decoder_layer(n, moe_layer), expert,
                       kMixtral[i]);
  }
  static constexpr const char* kProj[] = {"gate_proj", "up_proj", "down_proj"};
  return fmt::format("model.layers.{}.mlp.experts.{}.{}.weight", hf_decoder_layer(n, moe_layer), expert, kProj[i]);
}

std::string hf_router_tensor(const hf_naming& n, std::uint32_t moe_layer) {
  const char* block = n.layout == hf_layout::mixtral ? "block_sparse_moe" : "mlp";
  return fmt::format("model.layers.{}.{}.gate.weight", hf_decoder_layer(n, moe_layer), block);
}

status detect_hf_layout(const checkpoint& ck, hf_naming& out) {
  constexpr std::string_view kPrefix = "model.layers.";
  std::optional<std::uint32_t> mixtral_first, mlp_first;
  bool deepseek_marks = false;
  for (const std::string& name : ck.names()) {
    std::string_view rest(name);
    if (!rest.starts_with(kPrefix)) continue;
    rest.remove_prefix(kPrefix.size());
    std::uint32_t layer = 0;
    const auto [p, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), layer);
    if (ec != std::errc{} || p == rest.data() + rest.size() || *p != '.') continue;
    rest.remove_prefix(static_cast<std::size_t>(p - rest.data()) + 1);
    auto lower = [layer](std::optional<std::uint32_t>& v) { v = std::min(v.value_or(layer), layer); };
    if (rest.starts_with("block_sparse_moe.experts.")) lower(mixtral_first);
    if (rest.starts_with("mlp.experts.")) lower(mlp_first);
    if (rest.starts_with("mlp.shared_experts.") || rest == "mlp.gate.e_score_correction_bias" ||
        rest.starts_with("self_attn.kv_a_proj_with_mqa"))
      deepseek_marks = true;
  }
  if (mixtral_first && mlp_first)
    return EAAS_RT_FAIL(status::invalid_argument,
                        "checkpoint {}: has both block_sparse_moe.experts and mlp.experts tensors; name the layout",
                        ck.path());
  if (mixtral_first) {
    out = hf_naming(hf_layout::mixtral, *mixtral_first);
    return status::ok;
  }
  if (mlp_first) {
    out = hf_naming(deepseek_marks ? hf_layout::deepseek_v3 : hf_layout::qwen3_moe, *mlp_first);
    return status::ok;
  }
  return EAAS_RT_FAIL(status::not_found,
                      "checkpoint {}: no routed-expert tensors (model.layers.N.mlp.experts.* or "
                      "model.layers.N.block_sparse_moe.experts.*)",
                      ck.path());
}

status load_expert(const checkpoint& ck, const hf_naming& n, const model_shape& shape, std::uint32_t moe_layer,
                   std::uint32_t expert, expert_weights& out) {
  if (moe_layer >= shape.layers || expert >= shape.experts || shape.hidden == 0 || shape.inter == 0)
    return EAAS_RT_FAIL(status::invalid_argument,
                        "load_expert: MoE layer {} expert {} is outside the shape (layers {}, experts {}, hidden {}, "
                        "inter {})",
                        moe_layer, expert, shape.layers, shape.experts, shape.hidden, shape.inter);
  const std::uint64_t h = shape.hidden, i = shape.inter;
  expert_weights w;
  EAAS_CHECK(ck.read(hf_expert_tensor(n, moe_layer, expert, hf_proj::gate), {i, h}, w.gate));
  EAAS_CHECK(ck.read(hf_expert_tensor(n, moe_layer, expert, hf_proj::up), {i, h}, w.up));
  EAAS_CHECK(ck.read(hf_expert_tensor(n, moe_layer, expert, hf_proj::down), {h, i}, w.down));
  out = std::move(w);
  return status::ok;
}

status load_router(const checkpoint& ck, const hf_naming& n, const model_shape& shape, std::uint32_t moe_layer,
                   router_weights& out) {
  if (moe_layer >= shape.layers || shape.experts == 0 || shape.hidden == 0)
    return EAAS_RT_FAIL(status::invalid_argument,
                        "load_router: MoE layer {} is outside the shape (layers {}, experts {}, hidden {})", moe_layer,
                        shape.layers, shape.experts, shape.hidden);
  router_weights r;
  EAAS_CHECK(ck.read(hf_router_tensor(n, moe_layer), {shape.experts, shape.hidden}, r.gate));
  out = std::move(r);
  return status::ok;
}

// ------------------------------------------------------------------------------------------------------------------
// Writer
// ------------------------------------------------------------------------------------------------------------------

status write_safetensors(const std::string& path, const std::vector<tensor_to_write>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  try {
    json header = json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    std::uint64_t offset = 0;
    for (const tensor_to_write& t : tensors) {
      if (t.name.empty() || t.name == "__metadata__" || header.contains(t.name))
        return EAAS_RT_FAIL(status::invalid_argument,
                            "write_safetensors {}: tensor name '{}' is empty, reserved or repeated", path,
                            clip(t.name));
      std::uint64_t elements = 1;
      for (const std::uint64_t d : t.shape)
        if (mul_overflows(elements, d, elements))
          return EAAS_RT_FAIL(status::invalid_argument, "write_safetensors {}: tensor '{}': shape {} overflows", path,
                              clip(t.name), shape_str(t.shape));
      if (elements != t.data.size())
        return EAAS_RT_FAIL(status::invalid_argument,
                            "write_safetensors {}: tensor '{}': shape {} has {} elements but {} values were given",
                            path, clip(t.name), shape_str(t.shape), elements, t.data.size());
      const std::uint64_t bytes = elements * (t.dtype == st_dtype::f32 ? 4 : 2);
      header[t.name] = {
          {"dtype", st_dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
      offset += bytes;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');

    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr)
      return EAAS_RT_FAIL(status::internal_error, "write_safetensors {}: cannot create: {}", path,
                          std::strerror(errno));
    const std::uint64_t len = text.size();
    bool ok = std::fwrite(&len, 8, 1, f) == 1 && std::fwrite(text.data(), 1, text.size(), f) == text.size();
    std::vector<std::uint16_t> half;
    for (const tensor_to_write& t : tensors) {
      if (!ok || t.data.empty()) continue;
      if (t.dtype == st_dtype::f32) {
        ok = std::fwrite(t.data.data(), 4, t.data.size(), f) == t.data.size();
        continue;
      }
      half.resize(t.data.size());
      std::transform(t.data.begin(), t.data.end(), half.begin(), t.dtype == st_dtype::bf16 ? f32_to_bf16 : f32_to_f16);
      ok = std::fwrite(half.data(), 2, half.size(), f) == half.size();
    }
    const int e = errno;
    if (std::fclose(f) != 0) ok = false;
    if (!ok)
      return EAAS_RT_FAIL(status::internal_error, "write_safetensors {}: write failed: {}", path, std::strerror(e));
    return status::ok;
  } catch (const std::bad_alloc&) {
    return EAAS_RT_FAIL(status::no_resource, "write_safetensors {}: out of memory", path);
  } catch (const std::exception& e) {
    return EAAS_RT_FAIL(status::invalid_argument, "write_safetensors {}: {}", path, e.what());
  }
}

}  // namespace eaas::runtime
