// finequant model file: safetensors + metadata (docs/model-format.md). Every Linear's tensors are
// checked against its quantization record, so the engine can trust dtypes and shapes.
#include <cmath>
#include <nlohmann/json.hpp>

#include "finequant/model_file.h"

#include "core/convert.h"

namespace finequant {

namespace {

using nlohmann::json;

constexpr int64_t kMaxRotation = 4096;  // the largest block-Hadamard rotation (python/finequant/rotate.py MAX_BLOCK)

[[noreturn]] void format_error(const std::string& path, const std::string& what) {
  fail(ErrorKind::ModelFormat, path + ": " + what);
}

json parse_json_object(const std::string& path, const std::string& key, const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    format_error(path, "metadata '" + key + "' is not valid JSON: " + e.what());
  }
  if (!j.is_object()) format_error(path, "metadata '" + key + "' is not a JSON object");
  return j;
}

int parse_bits(const std::string& path, const std::string& where, const json& j, const char* key) {
  if (!j.contains(key) || !j[key].is_number_integer()) format_error(path, where + ": '" + key + "' must be an integer");
  const int64_t b = j[key].get<int64_t>();
  if (b != 0 && b != 4 && b != 8)
    format_error(path, where + ": '" + key + "' must be 0, 4 or 8, got " + std::to_string(b));
  return static_cast<int>(b);
}

// Optional boolean (default true: symmetric), but a present value must be a boolean.
bool parse_sym(const std::string& path, const std::string& where, const json& j, const char* key) {
  if (!j.contains(key)) return true;
  if (!j[key].is_boolean()) format_error(path, where + ": '" + key + "' must be a boolean");
  return j[key].get<bool>();
}

LinearRecord parse_record(const std::string& path, const std::string& name, const json& j) {
  const std::string where = "quantization entry '" + name + "'";
  if (!j.is_object()) format_error(path, where + " is not an object");
  LinearRecord rec;
  rec.name = name;
  if (!j.contains("part") || !j["part"].is_string()) format_error(path, where + ": 'part' must be a string");
  rec.part = j["part"].get<std::string>();
  if (rec.part != "qkv" && rec.part != "attn_out" && rec.part != "fc1" && rec.part != "fc2" && rec.part != "head")
    format_error(path, where + ": unknown part '" + rec.part + "' (expected qkv, attn_out, fc1, fc2 or head)");
  rec.weight_bits = parse_bits(path, where, j, "weight_bits");
  rec.weight_symmetric = parse_sym(path, where, j, "weight_symmetric");
  rec.act_bits = parse_bits(path, where, j, "act_bits");
  rec.act_symmetric = parse_sym(path, where, j, "act_symmetric");
  if (rec.weight_bits > 0) {
    const json* t = j.contains("tile") ? &j["tile"] : nullptr;
    if (!t || !t->is_array() || t->size() != 2 || !(*t)[0].is_number_integer() || !(*t)[1].is_number_integer() ||
        (*t)[0].get<int64_t>() < 1 || (*t)[1].get<int64_t>() < 1)
      format_error(path, where + ": 'tile' must be [rows, cols] of positive integers");
    rec.tile_rows = (*t)[0].get<int64_t>();
    rec.tile_cols = (*t)[1].get<int64_t>();
  }
  // Optional; absent or 0: no rotation. check_linear checks that the block divides K.
  if (j.contains("rotation")) {
    const json& r = j["rotation"];
    if (!r.is_number_integer())
      format_error(path, where + ": 'rotation' must be an integer (0 or a power of two in [2, " +
                             std::to_string(kMaxRotation) + "]), got " + r.dump());
    const int64_t b = r.get<int64_t>();
    if (b != 0 && (b < 2 || b > kMaxRotation || (b & (b - 1)) != 0))
      format_error(path, where + ": 'rotation' must be 0 or a power of two in [2, " + std::to_string(kMaxRotation) +
                             "], got " + std::to_string(b));
    rec.rotation = b;
  }
  // Optional; absent: "fp32". The values stay F32 in the file; "fp16" promises they are exact halves.
  if (j.contains("scale_dtype")) {
    const json& d = j["scale_dtype"];
    if (!d.is_string() || (d.get<std::string>() != "fp32" && d.get<std::string>() != "fp16"))
      format_error(path, where + ": 'scale_dtype' must be \"fp32\" or \"fp16\", got " + d.dump());
    rec.half_scales = d.get<std::string>() == "fp16";
  }
  return rec;
}

std::string describe(const Tensor& t) { return std::string(dtype_name(t.dtype())) + " " + shape_str(t.shape()); }

void expect_tensor(const std::string& path, const std::string& name, const Tensor& t, DType dtype, const Shape& shape) {
  if (t.dtype() != dtype || t.shape() != shape)
    format_error(path, "tensor '" + name + "': expected " + dtype_name(dtype) + " " + shape_str(shape) + ", found " +
                           describe(t));
}

void check_linear(const SafetensorsFile& f, const LinearRecord& rec) {
  const std::string& path = f.path();
  const std::string wname = rec.name + ".weight";
  const Tensor& w = f.tensor(wname);
  if (w.ndim() != 2) format_error(path, "tensor '" + wname + "': expected 2-D, found " + describe(w));
  const int64_t N = w.dim(0);
  int64_t K = w.dim(1);

  if (rec.weight_bits == 0) {
    if (w.dtype() != DType::F32 && w.dtype() != DType::BF16)
      format_error(path, "tensor '" + wname + "': expected F32 or BF16, found " + describe(w));
  } else {
    DType want = DType::U8;
    if (rec.weight_bits == 8 && rec.weight_symmetric) want = DType::I8;
    if (w.dtype() != want)
      format_error(path, "tensor '" + wname + "': expected " + dtype_name(want) + " for " +
                             std::to_string(rec.weight_bits) + "-bit " +
                             (rec.weight_symmetric ? "symmetric" : "asymmetric") + " weights, found " + describe(w));
    if (rec.weight_bits == 4) K *= 2;  // two nibbles per stored byte
    if (N % rec.tile_rows != 0 || rec.tile_cols > K)
      format_error(path, "tile [" + std::to_string(rec.tile_rows) + ", " + std::to_string(rec.tile_cols) +
                             "] of '" + rec.name + "' does not fit its weight [" + std::to_string(N) + ", " +
                             std::to_string(K) + "]");
    const Shape grid = {N / rec.tile_rows, (K + rec.tile_cols - 1) / rec.tile_cols};
    const std::string sname = rec.name + ".weight_scale", zname = rec.name + ".weight_zero_point";
    const Tensor& s = f.tensor(sname);
    expect_tensor(path, sname, s, DType::F32, grid);
    const float* scales = s.data<float>();
    for (int64_t i = 0, n = s.numel(); i < n; ++i) {
      uint16_t half_bits;
      if (!(std::isfinite(scales[i]) && scales[i] > 0.0f))
        format_error(path, "tensor '" + sname + "' holds a scale that is not a positive finite number");
      if (rec.half_scales && !float_to_half_exact(scales[i], half_bits))
        format_error(path, "tensor '" + sname + "' holds a scale that is not an exact fp16 value, but '" + rec.name +
                               "' says scale_dtype fp16");
    }
    if (rec.weight_symmetric) {
      if (f.has(zname)) format_error(path, "tensor '" + zname + "' present but '" + rec.name + "' is symmetric");
      // Symmetric codes are in [-qmax, qmax]; the kernels' exact sums (and the unsigned-operand tricks of
      // DESIGN.md section 5.4) assume -128 / -8 never occur.
      const uint8_t* codes = rec.weight_bits == 8 ? reinterpret_cast<const uint8_t*>(w.data<int8_t>()) : w.data<uint8_t>();
      for (int64_t i = 0, n = w.numel(); i < n; ++i) {
        const uint8_t q = codes[i];
        const bool bad = rec.weight_bits == 8 ? q == 0x80 : ((q & 0x0F) == 0x08 || (q >> 4) == 0x08);
        if (bad)
          format_error(path, "tensor '" + wname + "' holds " + (rec.weight_bits == 8 ? "-128" : "-8") + " at byte " +
                                 std::to_string(i) + ", outside the symmetric " + std::to_string(rec.weight_bits) +
                                 "-bit range [" + (rec.weight_bits == 8 ? "-127, 127" : "-7, 7") + "]");
      }
    } else {
      const Tensor& z = f.tensor(zname);
      expect_tensor(path, zname, z, DType::U8, grid);
      const int zmax = (1 << rec.weight_bits) - 1;
      const uint8_t* zero_points = z.data<uint8_t>();
      for (int64_t i = 0, n = z.numel(); i < n; ++i)
        if (zero_points[i] > zmax)
          format_error(path, "tensor '" + zname + "' holds a zero point above " + std::to_string(zmax));
    }
  }
  if (rec.rotation != 0 && K % rec.rotation != 0)
    format_error(path, "quantization entry '" + rec.name + "': 'rotation' " + std::to_string(rec.rotation) +
                           " does not divide the " + std::to_string(K) + " input columns of its weight");
  const std::string bname = rec.name + ".bias";
  if (f.has(bname)) expect_tensor(path, bname, f.tensor(bname), DType::F32, {N});
}

}  // namespace

ModelFile ModelFile::open(const std::string& path) {
  ModelFile m{SafetensorsFile::open(path), {}, {}, {}, {}};
  const SafetensorsFile& f = m.file;
  if (f.meta("format") != "finequant")
    format_error(path, "metadata format is '" + f.meta("format") + "', expected 'finequant'");
  if (f.meta("format_version") != "1")
    format_error(path, "unsupported format_version " + f.meta("format_version"));
  m.architecture = f.meta("architecture");
  if (m.architecture != "bert" && m.architecture != "gpt2" && m.architecture != "llama" && m.architecture != "bart")
    fail(ErrorKind::Unsupported, path + ": unsupported architecture '" + m.architecture + "'");
  m.config_json = f.meta("config");
  parse_json_object(path, "config", m.config_json);
  m.scheme = f.meta("scheme");

  const json q = parse_json_object(path, "quantization", f.meta("quantization"));
  for (auto it = q.begin(); it != q.end(); ++it) {
    LinearRecord rec = parse_record(path, it.key(), *it);
    check_linear(f, rec);
    m.linears.emplace(rec.name, std::move(rec));
  }
  return m;
}

}  // namespace finequant
