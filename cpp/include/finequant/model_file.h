// Reader of finequant model files (safetensors, DESIGN.md section 3). Everything in the header is
// checked against the file before any byte of tensor data is trusted; tensors borrow the mapping.
#pragma once
#include <map>
#include <memory>
#include <string>

#include "finequant/tensor.h"

namespace finequant {

class SafetensorsFile {
 public:
  // Maps and validates the file; throws Error(ModelFormat) naming the problem and the path.
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::map<std::string, Tensor>& tensors() const { return tensors_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const Tensor& tensor(const std::string& name) const;  // throws ModelFormat when missing
  const std::string& meta(const std::string& key) const;  // throws ModelFormat when missing

 private:
  std::string path_;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, Tensor> tensors_;
};

// Per-layer quantization record, from the file's "quantization" metadata.
struct LinearRecord {
  std::string name;        // module name, e.g. "model.layers.0.self_attn.q_proj"
  std::string part;        // "qkv", "attn_out", "fc1", "fc2", "head"
  int weight_bits = 0;     // 0: floating point weight; else 8 or 4
  bool weight_symmetric = true;
  int64_t tile_rows = 0, tile_cols = 0;
  int act_bits = 0;        // 0: floating point activations; else 8 or 4
  bool act_symmetric = true;
  int64_t rotation = 0;    // block-Hadamard input rotation: 0 none, else the block size (docs/DESIGN.md section 2)
  bool half_scales = false;  // "scale_dtype": "fp16": every weight scale is exactly an IEEE half (DESIGN.md section 2)
};

// A finequant model file: a validated SafetensorsFile whose metadata says format "finequant",
// a supported format_version, an architecture and config, and one LinearRecord per Linear whose
// tensors (weight, weight_scale, weight_zero_point, bias) have the dtypes and shapes it implies.
struct ModelFile {
  SafetensorsFile file;
  std::string architecture;  // "bert", "gpt2", "llama"
  std::string config_json;   // the Hugging Face config, as JSON text
  std::string scheme;        // e.g. "w8a8"
  std::map<std::string, LinearRecord> linears;

  static ModelFile open(const std::string& path);
};

}  // namespace finequant
