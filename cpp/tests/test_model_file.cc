// Model file reader: a valid tiny file opens; every class of corruption is a ModelFormat error;
// random byte flips and truncations only ever throw finequant::Error.
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "finequant/model_file.h"

using namespace finequant;
using nlohmann::json;

namespace {

// Builds a safetensors file in memory: add tensors, edit `header` freely, then serialize.
struct Builder {
  json header = json::object();
  std::string data;

  void add(const std::string& name, const std::string& dtype, std::vector<int64_t> shape, const std::string& bytes,
           bool align = true) {
    if (align)
      while (data.size() % 8) data.push_back('\0');
    const size_t begin = data.size();
    data += bytes;
    header[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
  }
  template <class T> void add_values(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
                                     const std::vector<T>& v, bool align = true) {
    add(name, dtype, shape, std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T)), align);
  }
  static std::string frame(std::string h, const std::string& data) {
    while ((8 + h.size()) % 8) h.push_back(' ');  // keep the data section 8-byte aligned
    std::string out(8, '\0');
    uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
    return out + h + data;
  }
  std::string bytes() const { return frame(header.dump(), data); }
};

json quantization() {
  return {{"l0.q", {{"part", "qkv"}, {"weight_bits", 8}, {"weight_symmetric", true}, {"tile", {1, 8}},
                    {"act_bits", 8}, {"act_symmetric", true}}},
          {"l0.fc1", {{"part", "fc1"}, {"weight_bits", 4}, {"weight_symmetric", false}, {"tile", {1, 6}},
                      {"act_bits", 8}, {"act_symmetric", false}}},
          {"l0.fc2", {{"part", "fc2"}, {"weight_bits", 0}, {"act_bits", 0}}}};
}

// A valid finequant file: INT8 symmetric qkv with bias, INT4 asymmetric fc1 with a partial K-block
// (K = 8, blocks of 6), FP fc2, and a misaligned F32 tensor that the reader must copy.
Builder valid_model() {
  Builder b;
  b.header["__metadata__"] = {{"format", "finequant"},      {"format_version", "1"},
                              {"architecture", "bert"},     {"config", R"({"hidden_size": 8})"},
                              {"scheme", "w8a8"},           {"quantization", quantization().dump()}};
  b.add_values<int8_t>("l0.q.weight", "I8", {4, 8}, std::vector<int8_t>(32, -3));
  b.add_values<float>("l0.q.weight_scale", "F32", {4, 1}, std::vector<float>(4, 0.5f));
  b.add_values<float>("l0.q.bias", "F32", {4}, {1, 2, 3, 4});
  b.add_values<uint8_t>("l0.fc1.weight", "U8", {4, 4}, std::vector<uint8_t>(16, 0x21));
  b.add_values<float>("l0.fc1.weight_scale", "F32", {4, 2}, std::vector<float>(8, 0.25f));
  b.add_values<uint8_t>("l0.fc1.weight_zero_point", "U8", {4, 2}, std::vector<uint8_t>(8, 3));
  b.add_values<float>("l0.fc2.weight", "F32", {8, 4}, std::vector<float>(32, 1.0f));
  b.add_values<uint8_t>("odd", "U8", {3}, {1, 2, 3});
  b.add_values<float>("misaligned", "F32", {2}, {7.0f, 8.0f}, /*align=*/false);
  return b;
}

std::string temp_path() {
  static int counter = 0;
  return "/tmp/fq_test_model_" + std::to_string(getpid()) + "_" + std::to_string(counter++) + ".safetensors";
}

// Writes bytes to a temporary file, opens it as a model file, removes the file.
ModelFile open_bytes(const std::string& bytes) {
  const std::string path = temp_path();
  {
    std::ofstream f(path, std::ios::binary);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  struct Remove {
    std::string p;
    ~Remove() { std::remove(p.c_str()); }
  } remove{path};
  return ModelFile::open(path);
}

ModelFile open_builder(const Builder& b) { return open_bytes(b.bytes()); }

void set_meta(Builder& b, const std::string& key, const std::string& value) { b.header["__metadata__"][key] = value; }

void set_quant(Builder& b, const std::string& layer, const std::string& key, const json& value) {
  json q = quantization();
  q[layer][key] = value;
  set_meta(b, "quantization", q.dump());
}

const ErrorKind kFmt = ErrorKind::ModelFormat;

}  // namespace

TEST(valid_file_opens) {
  ModelFile m = open_builder(valid_model());
  CHECK(m.architecture == "bert");
  CHECK(m.scheme == "w8a8");
  CHECK(m.config_json == R"({"hidden_size": 8})");
  CHECK_EQ(m.linears.size(), size_t(3));
  const LinearRecord& fc1 = m.linears.at("l0.fc1");
  CHECK(fc1.part == "fc1" && fc1.weight_bits == 4 && !fc1.weight_symmetric && !fc1.act_symmetric);
  CHECK(fc1.tile_rows == 1 && fc1.tile_cols == 6);
  CHECK(m.linears.at("l0.fc2").weight_bits == 0);
  const Tensor& w = m.file.tensor("l0.q.weight");
  CHECK(w.dtype() == DType::I8 && w.shape() == Shape({4, 8}));
  CHECK_EQ(int(w.data<int8_t>()[31]), -3);
  CHECK_EQ(m.file.tensor("l0.q.bias").data<float>()[3], 4.0f);
  const Tensor& mis = m.file.tensor("misaligned");  // copied into aligned storage
  CHECK(reinterpret_cast<uintptr_t>(mis.raw()) % 4 == 0);
  CHECK_EQ(mis.data<float>()[1], 8.0f);
  CHECK(m.file.meta("format") == "finequant");
  CHECK_THROWS_KIND_MSG(m.file.tensor("nope"), kFmt, "missing tensor 'nope'");
}

TEST(tensors_outlive_the_file_object) {
  Tensor w;
  {
    ModelFile m = open_builder(valid_model());
    w = m.file.tensor("l0.fc2.weight");
  }
  CHECK_EQ(w.data<float>()[31], 1.0f);  // the mapping is kept alive by the tensor
}

TEST(framing_errors) {
  const std::string good = valid_model().bytes();
  CHECK_THROWS_KIND_MSG(open_bytes(""), kFmt, "too short");
  CHECK_THROWS_KIND_MSG(open_bytes(good.substr(0, 5)), kFmt, "too short");
  CHECK_THROWS_KIND_MSG(open_bytes(good.substr(0, good.size() - 3)), kFmt, "past the");  // truncated data
  CHECK_THROWS_KIND_MSG(open_bytes(good.substr(0, 40)), kFmt, "exceeds the file size");   // truncated header
  std::string huge = good;
  for (int i = 0; i < 8; ++i) huge[i] = '\x7f';
  CHECK_THROWS_KIND_MSG(open_bytes(huge), kFmt, "header length");
  CHECK_THROWS_KIND_MSG(open_bytes(Builder::frame("{not json", "")), kFmt, "not valid JSON");
  CHECK_THROWS_KIND_MSG(open_bytes(Builder::frame("[1, 2]", "")), kFmt, "not a JSON object");
  CHECK_THROWS_KIND_MSG(ModelFile::open("/nonexistent/model.safetensors"), kFmt, "cannot open");
}

TEST(header_entry_errors) {
  Builder b = valid_model();
  b.header["l0.q.weight"]["dtype"] = "F64";
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "unsupported dtype 'F64'");

  b = valid_model();
  b.header["l0.q.weight"]["shape"] = {4, 9};
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "bytes of data for shape [4, 9]");

  b = valid_model();
  b.header["l0.q.weight"]["shape"] = {4, -8};
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "non-negative integer");

  b = valid_model();
  b.header["l0.q.weight"]["shape"] = {1ull << 62, 1ull << 62};
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "too large");

  b = valid_model();  // scale [4] F32 = 16 bytes starting inside the weight's 32 bytes
  b.header["l0.q.weight_scale"]["data_offsets"] = {16, 32};
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "overlap");

  b = valid_model();
  b.header["l0.q.bias"]["data_offsets"] = {b.data.size(), b.data.size() + 16};
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "past the");

  b = valid_model();
  b.header["l0.q.bias"]["data_offsets"] = {16, 0};
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "begin > end");

  b = valid_model();
  b.header["l0.q.bias"]["extra"] = 1;
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "exactly dtype, shape and data_offsets");

  b = valid_model();
  b.header["__metadata__"]["format"] = 1;
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "is not a string");
}

TEST(metadata_errors) {
  Builder b = valid_model();
  set_meta(b, "format", "other");
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "expected 'finequant'");

  b = valid_model();
  set_meta(b, "format_version", "2");
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "unsupported format_version 2");

  b = valid_model();
  set_meta(b, "architecture", "t5");
  CHECK_THROWS_KIND_MSG(open_builder(b), ErrorKind::Unsupported, "unsupported architecture 't5'");

  b = valid_model();
  b.header["__metadata__"].erase("scheme");
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "missing metadata key 'scheme'");

  b = valid_model();
  set_meta(b, "config", "[1]");
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'config' is not a JSON object");

  b = valid_model();
  set_meta(b, "quantization", "{bad");
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'quantization' is not valid JSON");

  b = valid_model();
  set_quant(b, "l0.q", "part", "gate");
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "unknown part 'gate'");

  b = valid_model();
  set_quant(b, "l0.q", "weight_bits", 3);
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "must be 0, 4 or 8");

  b = valid_model();
  set_quant(b, "l0.q", "act_bits", "8");
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'act_bits' must be an integer");

  b = valid_model();
  set_quant(b, "l0.q", "tile", {1, 0});
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'tile' must be [rows, cols]");

  b = valid_model();
  set_quant(b, "l0.q", "tile", {3, 8});
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "does not fit its weight [4, 8]");

  b = valid_model();
  set_quant(b, "l0.fc1", "tile", {1, 9});  // INT4: K = 2 * 4 stored bytes = 8
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "does not fit its weight [4, 8]");
}

// "rotation": absent or 0 none, else a power of two in [2, 4096] dividing the Linear's K (INT4: the
// unpacked K); anything else names the Linear and the value.
TEST(rotation_values) {
  Builder b = valid_model();
  CHECK_EQ(open_builder(b).linears.at("l0.q").rotation, int64_t{0});
  set_quant(b, "l0.q", "rotation", 0);
  CHECK_EQ(open_builder(b).linears.at("l0.q").rotation, int64_t{0});
  for (int r : {2, 4, 8}) {
    set_quant(b, "l0.q", "rotation", r);
    CHECK_EQ(open_builder(b).linears.at("l0.q").rotation, int64_t{r});
  }
  set_quant(b, "l0.fc1", "rotation", 8);  // INT4: 4 stored bytes are K = 8
  CHECK_EQ(open_builder(b).linears.at("l0.fc1").rotation, int64_t{8});
  set_quant(b, "l0.fc2", "rotation", 4);  // an FP weight may be rotated too
  CHECK_EQ(open_builder(b).linears.at("l0.fc2").rotation, int64_t{4});
  for (int r : {1, 3, 6, -4, 8192, 1 << 20}) {
    set_quant(b, "l0.q", "rotation", r);
    CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "quantization entry 'l0.q': 'rotation' must be 0 or a power of two");
    CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "got " + std::to_string(r));
  }
  set_quant(b, "l0.q", "rotation", "64");
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'rotation' must be an integer");
  set_quant(b, "l0.q", "rotation", 2.0);
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'rotation' must be an integer");
  set_quant(b, "l0.q", "rotation", true);
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'rotation' must be an integer");
  set_quant(b, "l0.q", "rotation", 16);  // K = 8
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'l0.q': 'rotation' 16 does not divide the 8 input columns");
  set_quant(b, "l0.fc2", "rotation", 8);  // K = 4
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'l0.fc2': 'rotation' 8 does not divide the 4 input columns");
}

// A tensor "goes missing" by renaming its entry: dropping it would leave its bytes a hole in the data,
// which is an error of its own.
void rename_tensor(Builder& b, const std::string& from) {
  b.header["unused." + from] = b.header[from];
  b.header.erase(from);
}

TEST(linear_tensor_errors) {
  Builder b = valid_model();
  rename_tensor(b, "l0.q.weight_scale");
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "missing tensor 'l0.q.weight_scale'");

  b = valid_model();
  rename_tensor(b, "l0.fc2.weight");
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "missing tensor 'l0.fc2.weight'");

  b = valid_model();
  b.header["l0.q.weight_scale"]["shape"] = {2, 2};
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'l0.q.weight_scale': expected F32 [4, 1], found F32 [2, 2]");

  b = valid_model();
  b.header["l0.q.weight"]["dtype"] = "U8";
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'l0.q.weight': expected I8");

  b = valid_model();
  b.header["l0.fc2.weight"]["dtype"] = "I32";
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "expected F32 or BF16");

  b = valid_model();
  b.header["l0.fc1.weight_zero_point"]["dtype"] = "I8";
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'l0.fc1.weight_zero_point': expected U8 [4, 2]");

  b = valid_model();
  rename_tensor(b, "l0.fc1.weight_zero_point");
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "missing tensor 'l0.fc1.weight_zero_point'");

  b = valid_model();
  b.header["l0.q.weight_zero_point"] = b.header["l0.fc1.weight_zero_point"];
  b.header["l0.q.weight_zero_point"]["shape"] = {4, 2};
  b.header.erase("l0.fc1.weight_zero_point");
  set_quant(b, "l0.fc1", "weight_symmetric", true);
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "present but 'l0.q' is symmetric");

  b = valid_model();
  b.header["l0.q.bias"]["shape"] = {2, 2};
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "'l0.q.bias': expected F32 [4], found F32 [2, 2]");

  b = valid_model();
  b.header["l0.q.weight"]["shape"] = {32};
  CHECK_THROWS_KIND_MSG(open_builder(b), kFmt, "expected 2-D");
}

TEST(random_corruption_never_crashes) {
  const std::string good = valid_model().bytes();
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(good[i]);
  const uint64_t header_end = 8 + header_len;
  std::mt19937 rng(1234);
  int opened = 0, rejected = 0;
  for (int iter = 0; iter < 300; ++iter) {
    std::string bytes = good;
    const int mode = static_cast<int>(rng() % 4);
    if (mode == 0) {
      bytes.resize(rng() % bytes.size());  // truncation
    } else {
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int k = 0; k < flips; ++k) {
        // Mostly hit the header and its length, where the validation lives.
        const size_t pos = (rng() % 5 != 0) ? rng() % header_end : rng() % bytes.size();
        bytes[pos] = static_cast<char>(mode == 1 ? bytes[pos] ^ (1 << (rng() % 8)) : rng() % 256);
      }
    }
    try {
      open_bytes(bytes);
      ++opened;
    } catch (const Error&) {
      ++rejected;
    } catch (const std::exception& e) {
      ::fqtest::report(__FILE__, __LINE__, "iteration " + std::to_string(iter) + " threw a non-finequant exception: " +
                                               e.what());
    }
  }
  CHECK(rejected > 100);
  std::printf("  fuzz: %d opened, %d rejected\n", opened, rejected);
}

int main() { return RUN_ALL_TESTS(); }
