#include "models/config.h"

#include <nlohmann/json.hpp>

#include "finequant/error.h"

namespace finequant {

namespace {

using json = nlohmann::json;

int64_t get_int(const json& j, const char* key) {
  FQ_CHECK(j.contains(key) && j[key].is_number_integer(), ErrorKind::ModelFormat,
           std::string("config: missing or non-integer field '") + key + "'");
  const int64_t v = j[key].get<int64_t>();
  FQ_CHECK(v > 0, ErrorKind::ModelFormat, std::string("config: '") + key + "' must be positive");
  return v;
}

template <class T> T get_or(const json& j, const char* key, T fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  try {
    return j[key].get<T>();
  } catch (const json::exception&) {
    fail(ErrorKind::ModelFormat, std::string("config: field '") + key + "' has the wrong type");
  }
}

}  // namespace

ModelConfig ModelConfig::parse(const std::string& architecture, const std::string& config_json) {
  json j;
  try {
    j = json::parse(config_json);
  } catch (const json::exception& e) {
    fail(ErrorKind::ModelFormat, std::string("config is not valid JSON: ") + e.what());
  }
  FQ_CHECK(j.is_object(), ErrorKind::ModelFormat, "config must be a JSON object");
  ModelConfig c;
  c.architecture = architecture;
  c.vocab_size = get_int(j, "vocab_size");
  if (architecture == "bert") {
    c.hidden_size = get_int(j, "hidden_size");
    c.num_layers = get_int(j, "num_hidden_layers");
    c.num_heads = get_int(j, "num_attention_heads");
    c.intermediate_size = get_int(j, "intermediate_size");
    c.max_positions = get_int(j, "max_position_embeddings");
    c.type_vocab_size = get_or<int64_t>(j, "type_vocab_size", 2);
    c.norm_eps = get_or<float>(j, "layer_norm_eps", 1e-12f);
    c.hidden_act = get_or<std::string>(j, "hidden_act", "gelu");
    const std::string pos = get_or<std::string>(j, "position_embedding_type", "absolute");
    FQ_CHECK(pos == "absolute", ErrorKind::Unsupported, "bert: position_embedding_type '" + pos + "' is not supported");
  } else if (architecture == "gpt2") {
    c.hidden_size = get_int(j, "n_embd");
    c.num_layers = get_int(j, "n_layer");
    c.num_heads = get_int(j, "n_head");
    c.intermediate_size = get_or<int64_t>(j, "n_inner", 4 * c.hidden_size);
    c.max_positions = get_int(j, "n_positions");
    c.norm_eps = get_or<float>(j, "layer_norm_epsilon", 1e-5f);
    c.hidden_act = get_or<std::string>(j, "activation_function", "gelu_new");
    FQ_CHECK(get_or<bool>(j, "scale_attn_weights", true), ErrorKind::Unsupported,
             "gpt2: scale_attn_weights=false is not supported");
    FQ_CHECK(!get_or<bool>(j, "scale_attn_by_inverse_layer_idx", false), ErrorKind::Unsupported,
             "gpt2: scale_attn_by_inverse_layer_idx is not supported");
  } else if (architecture == "llama") {
    c.hidden_size = get_int(j, "hidden_size");
    c.num_layers = get_int(j, "num_hidden_layers");
    c.num_heads = get_int(j, "num_attention_heads");
    c.num_kv_heads = get_or<int64_t>(j, "num_key_value_heads", c.num_heads);
    c.intermediate_size = get_int(j, "intermediate_size");
    c.max_positions = get_int(j, "max_position_embeddings");
    c.norm_eps = get_or<float>(j, "rms_norm_eps", 1e-6f);
    c.rope_theta = get_or<double>(j, "rope_theta", 10000.0);
    // Newer transformers nest rope_theta under rope_parameters.
    if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
      const json& rp = j["rope_parameters"];
      c.rope_theta = get_or<double>(rp, "rope_theta", c.rope_theta);
      const std::string type = get_or<std::string>(rp, "rope_type", "default");
      FQ_CHECK(type == "default", ErrorKind::Unsupported, "llama: rope_type '" + type + "' is not supported");
    }
    FQ_CHECK(!j.contains("rope_scaling") || j["rope_scaling"].is_null() ||
                 get_or<std::string>(j["rope_scaling"], "rope_type", "default") == "default",
             ErrorKind::Unsupported, "llama: rope_scaling is not supported");
    // Mistral-style sliding-window attention changes every position past the window; the engine attends to
    // the whole past, so a window that can take effect is refused (Qwen2 sets use_sliding_window false).
    if (j.contains("sliding_window") && j["sliding_window"].is_number() && get_or<bool>(j, "use_sliding_window", true))
      FQ_CHECK(j["sliding_window"].get<int64_t>() >= c.max_positions, ErrorKind::Unsupported,
               "llama: sliding_window " + std::to_string(j["sliding_window"].get<int64_t>()) +
                   " (attention limited to a window shorter than max_position_embeddings " +
                   std::to_string(c.max_positions) + ") is not supported");
    c.hidden_act = get_or<std::string>(j, "hidden_act", "silu");
    c.tie_word_embeddings = get_or<bool>(j, "tie_word_embeddings", false);
    c.attention_bias = get_or<bool>(j, "attention_bias", false);
    c.mlp_bias = get_or<bool>(j, "mlp_bias", false);
    if (j.contains("head_dim") && !j["head_dim"].is_null()) c.head_dim = get_int(j, "head_dim");
    FQ_CHECK(c.hidden_act == "silu", ErrorKind::Unsupported, "llama: hidden_act '" + c.hidden_act + "' is not supported");
  } else if (architecture == "bart") {
    c.hidden_size = get_int(j, "d_model");
    c.num_layers = get_int(j, "encoder_layers");
    c.num_heads = get_int(j, "encoder_attention_heads");
    c.intermediate_size = get_int(j, "encoder_ffn_dim");
    c.decoder_layers = get_int(j, "decoder_layers");
    c.decoder_heads = get_int(j, "decoder_attention_heads");
    c.decoder_intermediate_size = get_int(j, "decoder_ffn_dim");
    c.max_positions = get_int(j, "max_position_embeddings");
    c.norm_eps = 1e-5f;  // nn.LayerNorm's default: BART's config has no epsilon
    c.hidden_act = get_or<std::string>(j, "activation_function", "gelu");
    c.scale_embedding = get_or<bool>(j, "scale_embedding", false);
    c.tie_word_embeddings = get_or<bool>(j, "tie_word_embeddings", true);
    c.decoder_start_token_id = get_or<int64_t>(j, "decoder_start_token_id", 2);
    FQ_CHECK(c.decoder_start_token_id >= 0 && c.decoder_start_token_id < c.vocab_size, ErrorKind::ModelFormat,
             "bart: decoder_start_token_id " + std::to_string(c.decoder_start_token_id) + " is outside the vocabulary");
    FQ_CHECK(c.hidden_size % c.num_heads == 0 && c.hidden_size % c.decoder_heads == 0, ErrorKind::ModelFormat,
             "bart: d_model is not divisible by the attention heads");
    // Fields of fairseq-converted configs that transformers' BART ignores but that describe another
    // computation (mBART-style pre-LN, a final norm, fixed sinusoidal positions, logit bias from the
    // hidden state): refused rather than silently computed differently.
    FQ_CHECK(!get_or<bool>(j, "normalize_before", false), ErrorKind::Unsupported,
             "bart: normalize_before=true (pre-LN blocks, mBART style) is not supported");
    FQ_CHECK(!get_or<bool>(j, "add_final_layer_norm", false), ErrorKind::Unsupported,
             "bart: add_final_layer_norm=true is not supported");
    FQ_CHECK(get_or<bool>(j, "normalize_embedding", true), ErrorKind::Unsupported,
             "bart: normalize_embedding=false is not supported");
    FQ_CHECK(!get_or<bool>(j, "static_position_embeddings", false), ErrorKind::Unsupported,
             "bart: static_position_embeddings=true is not supported");
    FQ_CHECK(!get_or<bool>(j, "add_bias_logits", false), ErrorKind::Unsupported,
             "bart: add_bias_logits=true is not supported");
    FQ_CHECK(get_or<bool>(j, "is_encoder_decoder", true), ErrorKind::Unsupported,
             "bart: is_encoder_decoder=false (a decoder-only BART) is not supported");
    const std::string act = c.hidden_act;
    FQ_CHECK(act == "gelu" || act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu_fast",
             ErrorKind::Unsupported, "bart: activation_function '" + act + "' is not supported (GeLU only)");
  } else {
    fail(ErrorKind::Unsupported, "unknown architecture '" + architecture + "' (expected bert, gpt2, llama or bart)");
  }
  if (c.num_kv_heads == 0) c.num_kv_heads = c.num_heads;
  if (c.head_dim == 0) {
    FQ_CHECK(c.hidden_size % c.num_heads == 0, ErrorKind::ModelFormat, "config: hidden size not divisible by heads");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  FQ_CHECK(c.num_heads % c.num_kv_heads == 0, ErrorKind::ModelFormat,
           "config: num_attention_heads must be a multiple of num_key_value_heads");
  FQ_CHECK(architecture != "llama" || c.head_dim % 2 == 0, ErrorKind::ModelFormat, "config: RoPE needs an even head_dim");
  return c;
}

}  // namespace finequant
