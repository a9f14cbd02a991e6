// The part of a Hugging Face config.json the engine needs, normalised across families.
#pragma once
#include <cstdint>
#include <string>

namespace finequant {

struct ModelConfig {
  std::string architecture;  // "bert", "gpt2", "llama", "bart"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;  // == num_heads unless grouped-query attention
  int64_t head_dim = 0;
  int64_t intermediate_size = 0;
  int64_t max_positions = 0;
  int64_t type_vocab_size = 0;  // BERT segment embeddings
  float norm_eps = 1e-5f;
  double rope_theta = 10000.0;
  std::string hidden_act;       // HF spelling: "gelu", "gelu_new", "silu", ...
  bool tie_word_embeddings = true;
  bool attention_bias = false;  // llama
  bool mlp_bias = false;        // llama
  // Encoder-decoder (bart): the fields above describe the encoder (num_layers, num_heads,
  // intermediate_size) and the shared parts; these the decoder stack.
  int64_t decoder_layers = 0, decoder_heads = 0, decoder_intermediate_size = 0;
  bool scale_embedding = false;          // token embeddings times sqrt(hidden_size)
  int64_t decoder_start_token_id = -1;   // the decoder's first input token in generate()
  bool is_seq2seq() const { return decoder_layers > 0; }

  // Throws Error(ModelFormat) for missing or inconsistent fields, Error(Unsupported) for
  // features the engine does not implement (e.g. rope_scaling).
  static ModelConfig parse(const std::string& architecture, const std::string& config_json);
};

}  // namespace finequant
