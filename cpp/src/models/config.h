// The part of a Hugging Face config.json the engine needs, normalised across families.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace finequant {

// Rotary-embedding frequencies as transformers' modeling_rope_utils computes them for rope_type
// default, linear, dynamic (NTK, by the current sequence length), yarn and llama3 (docs/DESIGN.md
// section 10).
struct RopeConfig {
  std::string type = "default";
  double theta = 10000.0;
  double factor = 1.0;                                // linear, dynamic, yarn, llama3
  int64_t original_max_positions = 0;                 // yarn, llama3; dynamic: max_position_embeddings
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  double beta_fast = 32.0, beta_slow = 1.0;           // yarn
  bool truncate = true;                               // yarn
  double attention_factor = 1.0;                      // yarn: cos and sin are scaled by it
};

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
  std::string hidden_act;       // HF spelling: "gelu", "gelu_new", "silu", ...
  bool tie_word_embeddings = true;
  // The Llama family's variants, as config flags on the one decoder (docs/DESIGN.md section 10).
  std::string model_type;       // llama, mistral, qwen2, phi3, gemma, gemma2
  RopeConfig rope;
  bool qkv_bias = false, o_bias = false, mlp_bias = false;  // biases the file must hold
  std::vector<int64_t> layer_window;  // per layer: 0 full causal attention, W: a token sees the last W positions
  float query_scale = 0.f;      // attention scores times this (0: 1 / sqrt(head_dim))
  float attn_softcap = 0.f;     // scores <- cap * tanh(scores / cap) before the softmax (0: none)
  float final_softcap = 0.f;    // logits <- cap * tanh(logits / cap) (0: none)
  float embed_scale = 1.f;      // token embeddings times this (Gemma: sqrt(hidden_size) as an fp32)
  float norm_offset = 0.f;      // RMSNorms multiply by (norm_offset + weight) (Gemma: 1)
  bool sandwich_norms = false;  // Gemma 2: norms after attention and MLP too, before the residual adds
  std::string mlp_act = "silu"; // gated MLP: act(gate) * up with silu or gelu_pytorch_tanh
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
