#pragma once

/// Checkpoint loading: safetensors files (read and write) and the tensor names Hugging Face MoE models use.
///
/// A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the data area:
///   { "__metadata__": {"k": "v", ...},                                       (optional)
///     "<tensor name>": {"dtype": "BF16", "shape": [r, c], "data_offsets": [begin, end]}, ... }
/// Offsets count from the start of the data area. Everything in the header is checked when a file is opened, so
/// a malformed file is a status with a sentence in `last_error()` naming the file and the field, never a crash.
/// Files are memory-mapped read-only; nothing is converted until a tensor is read. (A file truncated by someone
/// else while it is mapped faults on access, as any mapping does: checkpoints are expected to stay put.)
///
/// None of these functions throws. They are for the host, one thread per object (distinct objects are independent).

#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "eaas/common/status.hpp"
#include "eaas/runtime/model.hpp"

namespace eaas::runtime {

/// Largest header accepted (the limit the reference implementation uses).
inline constexpr std::uint64_t kSafetensorsMaxHeader = 100ull << 20;

/// The element types eaas converts to and from fp32.
enum class st_dtype : std::uint8_t { f32, bf16, f16 };

/// The safetensors spelling of a dtype: "F32", "BF16", "F16".
const char* st_dtype_name(st_dtype t);

/// One tensor of an open file, as its (validated) header describes it.
struct tensor_info {
  std::string name;
  std::string dtype;                 ///< as written in the file ("BF16", "F8_E4M3", ...)
  std::vector<std::uint64_t> shape;  ///< may be empty (a scalar)
  std::uint64_t offset = 0;          ///< from the start of the data area
  std::uint64_t bytes = 0;           ///< == product(shape) × element size
  std::uint64_t elements = 0;        ///< product(shape)
};

/// A read-only, memory-mapped safetensors file. Move-only; unmaps on destruction.
class safetensors_file {
 public:
  safetensors_file() = default;
  safetensors_file(safetensors_file&& o) noexcept;
  safetensors_file& operator=(safetensors_file&& o) noexcept;
  safetensors_file(const safetensors_file&) = delete;
  safetensors_file& operator=(const safetensors_file&) = delete;
  ~safetensors_file();

  /// Maps `path` and validates its header: length <= kSafetensorsMaxHeader and within the file, a JSON object
  /// (nesting at most 3 deep); each tensor has exactly dtype (a known safetensors dtype), shape (unsigned
  /// integers) and data_offsets ([begin, end], begin <= end <= data size); end - begin == product(shape) × dtype
  /// size without overflow; no two tensors overlap; "__metadata__", if present, maps strings to strings.
  /// Returns not_found / permission_denied when the file cannot be opened, invalid_argument when it is malformed,
  /// unsupported for a dtype this build does not know. On failure the object is left empty.
  status open(const std::string& path);

  /// True after a successful open().
  bool is_open() const { return map_ != nullptr; }
  /// The path given to the last open().
  const std::string& path() const { return path_; }
  /// Tensors sorted by name.
  const std::vector<tensor_info>& tensors() const { return tensors_; }
  /// The "__metadata__" entries (empty if none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Bytes in the data area (file size - 8 - header length).
  std::uint64_t data_size() const { return data_size_; }

  /// The tensor called `name`, or null.
  const tensor_info* find(std::string_view name) const;
  /// The raw little-endian bytes of `t` (a tensor of this file). Not necessarily aligned.
  std::span<const std::byte> raw(const tensor_info& t) const;
  /// Converts `t` (a tensor of this file) to fp32; `out` is resized to t.elements. `unsupported`, naming the
  /// dtype, for anything but F32, BF16 and F16.
  status read_f32(const tensor_info& t, std::vector<float>& out) const;

 private:
  status parse_header(std::uint64_t header_len);
  void close() noexcept;

  std::string path_;
  const std::byte* map_ = nullptr;
  std::uint64_t map_size_ = 0;
  std::uint64_t data_begin_ = 0;
  std::uint64_t data_size_ = 0;
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// The tensors of a model: one .safetensors file, or a directory of shards.
class checkpoint {
 public:
  /// `path` is a .safetensors file or a directory. In a directory, `model.safetensors.index.json`'s
  /// "weight_map" (tensor name -> shard file name in that directory) decides which file holds which tensor
  /// (every listed tensor must be in its shard; shard names may not contain '/'); without an index, every
  /// `*.safetensors` file there is opened, and a tensor name found in two files is invalid_argument.
  status open(const std::string& path);

  /// The path given to the last open().
  const std::string& path() const { return path_; }
  /// The files opened (one, or the shards).
  const std::vector<safetensors_file>& files() const { return files_; }
  /// All tensor names, sorted.
  std::vector<std::string> names() const;
  /// True if the checkpoint has a tensor called `name`.
  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }

  /// Looks `name` up: not_found (naming it and the checkpoint) if absent.
  status find(std::string_view name, const safetensors_file*& file, const tensor_info*& info) const;
  /// Reads `name` as fp32 after checking that its shape is `shape`: invalid_argument naming the tensor and
  /// both shapes if not; not_found if absent; unsupported for a dtype other than F32/BF16/F16.
  status read(std::string_view name, const std::vector<std::uint64_t>& shape, std::vector<float>& out) const;

 private:
  std::string path_;
  std::vector<safetensors_file> files_;
  struct where {
    std::uint32_t file;    ///< into files_
    std::uint32_t tensor;  ///< into files_[file].tensors()
  };
  std::map<std::string, where, std::less<>> index_;
};

/// The tensor naming schemes of the Hugging Face MoE families eaas loads.
///   mixtral      model.layers.{L}.block_sparse_moe.experts.{E}.{w1 = gate, w3 = up, w2 = down}.weight,
///                router model.layers.{L}.block_sparse_moe.gate.weight; MoE from decoder layer 0
///   qwen3_moe    model.layers.{L}.mlp.experts.{E}.{gate_proj, up_proj, down_proj}.weight,
///                router model.layers.{L}.mlp.gate.weight; MoE from decoder layer 0
///   deepseek_v3  the same names as qwen3_moe; MoE from decoder layer 3 (first_k_dense_replace)
enum class hf_layout : std::uint8_t { deepseek_v3, qwen3_moe, mixtral };

/// "deepseek-v3", "qwen3-moe", "mixtral".
const char* hf_layout_name(hf_layout l);
/// Parses a layout name for command lines: the names above, case-insensitive, '_' accepted for '-'.
/// invalid_argument listing the known names otherwise.
status parse_hf_layout(std::string_view s, hf_layout& out);
/// The decoder layer of the family's first MoE layer (3 for deepseek_v3, 0 for the others).
std::uint32_t hf_default_first_moe_layer(hf_layout l);

/// A layout and the decoder layer where its MoE layers start. Built implicitly from a layout (with that
/// layout's default start), so `load_expert(ck, hf_layout::mixtral, ...)` reads naturally.
struct hf_naming {
  hf_layout layout;
  std::uint32_t first_moe_layer;  ///< decoder layer of MoE layer 0

  hf_naming(hf_layout l) : layout(l), first_moe_layer(hf_default_first_moe_layer(l)) {}  // NOLINT: implicit
  hf_naming(hf_layout l, std::uint32_t first) : layout(l), first_moe_layer(first) {}
};

/// Which of an expert's matrices.
enum class hf_proj : std::uint8_t { gate, up, down };

/// The decoder layer of MoE layer `moe_layer`: first_moe_layer + moe_layer.
std::uint32_t hf_decoder_layer(const hf_naming& n, std::uint32_t moe_layer);
/// The tensor name of one expert matrix, e.g. "model.layers.3.mlp.experts.7.up_proj.weight".
std::string hf_expert_tensor(const hf_naming& n, std::uint32_t moe_layer, std::uint32_t expert, hf_proj p);
/// The tensor name of a router, e.g. "model.layers.0.block_sparse_moe.gate.weight".
std::string hf_router_tensor(const hf_naming& n, std::uint32_t moe_layer);

/// Guesses the layout from the names present: block_sparse_moe experts -> mixtral; mlp.experts with any
/// DeepSeek-only tensor (mlp.shared_experts, gate.e_score_correction_bias, self_attn.kv_a_proj_with_mqa) ->
/// deepseek_v3, else qwen3_moe. first_moe_layer = the lowest decoder layer that has routed experts.
/// not_found if the checkpoint has no routed experts in any of these schemes.
status detect_hf_layout(const checkpoint& ck, hf_naming& out);

/// Reads expert `expert` of MoE layer `moe_layer` into `out` (fp32, shapes as in model.hpp), checking every
/// shape against `shape`. invalid_argument if moe_layer >= shape.layers or expert >= shape.experts.
status load_expert(const checkpoint& ck, const hf_naming& n, const model_shape& shape, std::uint32_t moe_layer,
                   std::uint32_t expert, expert_weights& out);
/// Reads the router of MoE layer `moe_layer` ([experts, hidden]) into `out`.
status load_router(const checkpoint& ck, const hf_naming& n, const model_shape& shape, std::uint32_t moe_layer,
                   router_weights& out);

/// One tensor for write_safetensors: fp32 values, stored as `dtype` (bf16 and f16 round to nearest even).
struct tensor_to_write {
  std::string name;
  st_dtype dtype = st_dtype::f32;
  std::vector<std::uint64_t> shape;
  std::vector<float> data;  ///< product(shape) values, row-major
};

/// Writes a safetensors file (tensors in the given order, header padded with spaces to a multiple of 8).
/// invalid_argument for an empty, duplicate or "__metadata__" name or data.size() != product(shape);
/// internal_error if the file cannot be written.
status write_safetensors(const std::string& path, const std::vector<tensor_to_write>& tensors,
                         const std::map<std::string, std::string>& metadata = {});

}  // namespace eaas::runtime
