// Tiny random Llama model files written from C++ (no Python): the concurrency test and the
// engine-API fuzz target (fuzz/) load them. Optionally W8A8 (symmetric INT8 weights, per-row
// scales, INT8 activations) so the integer GEMMs run too.
#pragma once
#include <cmath>
#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

namespace fqtest {

struct TinyLlama {
  int64_t vocab = 37, hidden = 16, inter = 24, layers = 2, heads = 4, kv_heads = 2, max_positions = 24;
  bool int8 = false;  // W8A8 Linears (the head stays fp32)
  uint32_t seed = 7;
};

// The safetensors bytes of a finequant file of the model `m`.
inline std::string tiny_llama_bytes(const TinyLlama& m) {
  using nlohmann::json;
  std::mt19937 rng(m.seed);
  json header = json::object(), quantization = json::object();
  std::string data;
  auto append = [&](const void* p, size_t n) { data.append(static_cast<const char*>(p), n); };
  auto add_f32 = [&](const std::string& name, std::vector<int64_t> shape, float sd, float shift = 0.f) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::normal_distribution<float> nd(shift, sd);
    const size_t begin = data.size();
    for (int64_t i = 0; i < n; ++i) {
      const float v = nd(rng);
      append(&v, sizeof v);
    }
    header[name] = {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
  };
  // A Linear [N, K]: fp32, or INT8 codes in [-127, 127] with one scale per row.
  auto add_linear = [&](const std::string& name, const std::string& part, int64_t N, int64_t K) {
    const float sd = 1.f / std::sqrt(static_cast<float>(K));
    if (!m.int8) return add_f32(name + ".weight", {N, K}, sd);
    std::uniform_int_distribution<int> code(-127, 127);
    size_t begin = data.size();
    for (int64_t i = 0; i < N * K; ++i) data.push_back(static_cast<char>(static_cast<int8_t>(code(rng))));
    header[name + ".weight"] = {{"dtype", "I8"}, {"shape", {N, K}}, {"data_offsets", {begin, data.size()}}};
    begin = data.size();  // (misaligned F32 data, when N * K is not a multiple of 4: the reader copies it)
    for (int64_t i = 0; i < N; ++i) {
      const float s = sd * 2.f / 127.f;
      append(&s, sizeof s);
    }
    header[name + ".weight_scale"] = {{"dtype", "F32"}, {"shape", {N, 1}}, {"data_offsets", {begin, data.size()}}};
    quantization[name] = {{"part", part},     {"weight_bits", 8}, {"weight_symmetric", true}, {"tile", {1, K}},
                          {"act_bits", 8}, {"act_symmetric", true}};
  };
  const int64_t D = m.hidden / m.heads;
  add_f32("model.embed_tokens.weight", {m.vocab, m.hidden}, 1.f);
  for (int64_t l = 0; l < m.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add_f32(p + "input_layernorm.weight", {m.hidden}, 0.1f, 1.f);
    add_f32(p + "post_attention_layernorm.weight", {m.hidden}, 0.1f, 1.f);
    add_linear(p + "self_attn.q_proj", "qkv", m.heads * D, m.hidden);
    add_linear(p + "self_attn.k_proj", "qkv", m.kv_heads * D, m.hidden);
    add_linear(p + "self_attn.v_proj", "qkv", m.kv_heads * D, m.hidden);
    add_linear(p + "self_attn.o_proj", "attn_out", m.hidden, m.heads * D);
    add_linear(p + "mlp.gate_proj", "fc1", m.inter, m.hidden);
    add_linear(p + "mlp.up_proj", "fc1", m.inter, m.hidden);
    add_linear(p + "mlp.down_proj", "fc2", m.hidden, m.inter);
  }
  add_f32("model.norm.weight", {m.hidden}, 0.1f, 1.f);
  add_f32("lm_head.weight", {m.vocab, m.hidden}, 3.f / std::sqrt(static_cast<float>(m.hidden)));
  const json config = {{"vocab_size", m.vocab},          {"hidden_size", m.hidden},
                       {"intermediate_size", m.inter},   {"num_hidden_layers", m.layers},
                       {"num_attention_heads", m.heads}, {"num_key_value_heads", m.kv_heads},
                       {"max_position_embeddings", m.max_positions}, {"rope_theta", 10000.0},
                       {"tie_word_embeddings", false},   {"model_type", "llama"}};
  header["__metadata__"] = {{"format", "finequant"}, {"format_version", "1"}, {"architecture", "llama"},
                            {"config", config.dump()}, {"scheme", m.int8 ? "w8a8" : "fp32"},
                            {"quantization", quantization.dump()}};
  std::string h = header.dump();
  while ((8 + h.size()) % 8) h.push_back(' ');
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((static_cast<uint64_t>(h.size()) >> (8 * i)) & 0xFF);
  return bytes + h + data;
}

// Writes the model to `path` and returns it.
inline std::string write_tiny_llama(const std::string& path, const TinyLlama& m) {
  std::ofstream(path, std::ios::binary) << tiny_llama_bytes(m);
  return path;
}

}  // namespace fqtest
