#include "models/config.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "finequant/error.h"

namespace finequant {

namespace {

using json = nlohmann::json;

// Sizes past these are refused while parsing (docs/DESIGN.md, Reliability): products of sizes stay far
// from int64 overflow, and per-layer tables are allocated before the engine's memory check runs. Whether
// a model that passes fits the machine is that check's business (engine/memory.h).
constexpr int64_t kMaxSize = int64_t{1} << 40;
constexpr int64_t kMaxLayers = int64_t{1} << 16;

int64_t get_int(const json& j, const char* key, int64_t max = kMaxSize) {
  FQ_CHECK(j.contains(key) && j[key].is_number_integer(), ErrorKind::ModelFormat,
           std::string("config: missing or non-integer field '") + key + "'");
  const int64_t v = j[key].get<int64_t>();
  FQ_CHECK(v > 0, ErrorKind::ModelFormat, std::string("config: '") + key + "' must be positive");
  FQ_CHECK(v <= max, ErrorKind::ModelFormat,
           std::string("config: '") + key + "' = " + std::to_string(v) + " exceeds the limit " + std::to_string(max));
  return v;
}

// An optional field; integers must be JSON integers and floating-point values finite numbers that fit
// T (nlohmann's get would convert 1e300 to an integer or a float with undefined behaviour).
template <class T> T get_or(const json& j, const char* key, T fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const json& v = j[key];
  const std::string wrong = std::string("config: field '") + key + "' has the wrong type";
  if constexpr (std::is_same_v<T, bool> || std::is_same_v<T, std::string>) {
    try {
      return v.get<T>();
    } catch (const json::exception&) {
      fail(ErrorKind::ModelFormat, wrong);
    }
  } else if constexpr (std::is_integral_v<T>) {
    FQ_CHECK(v.is_number_integer(), ErrorKind::ModelFormat, wrong + " (an integer is expected)");
    return v.get<T>();
  } else {
    FQ_CHECK(v.is_number(), ErrorKind::ModelFormat, wrong + " (a number is expected)");
    const double d = v.get<double>();
    FQ_CHECK(std::isfinite(d) && std::fabs(d) <= static_cast<double>(std::numeric_limits<T>::max()),
             ErrorKind::ModelFormat, std::string("config: field '") + key + "' is out of range");
    return static_cast<T>(d);
  }
}


bool has(const json& j, const char* key) { return j.contains(key) && !j[key].is_null(); }

// rope_parameters (transformers 5) or rope_scaling (older files; it wins when both are present, as
// in transformers' convert_rope_params_to_dict), with rope_theta at the top level or inside.
void parse_rope(const json& j, ModelConfig& c) {
  const std::string& mt = c.model_type;
  RopeConfig& r = c.rope;
  r.theta = get_or<double>(j, "rope_theta", 10000.0);
  json p = json::object();
  if (has(j, "rope_scaling")) {
    FQ_CHECK(j["rope_scaling"].is_object(), ErrorKind::ModelFormat, mt + ": rope_scaling must be an object");
    p = j["rope_scaling"];
  } else if (has(j, "rope_parameters")) {
    FQ_CHECK(j["rope_parameters"].is_object(), ErrorKind::ModelFormat, mt + ": rope_parameters must be an object");
    p = j["rope_parameters"];
  }
  for (const char* layer_type : {"full_attention", "sliding_attention"})
    FQ_CHECK(!p.contains(layer_type), ErrorKind::Unsupported,
             mt + ": rope_parameters per layer type (" + layer_type + ") are not supported");
  r.theta = get_or<double>(p, "rope_theta", r.theta);
  r.type = get_or<std::string>(p, "rope_type", get_or<std::string>(p, "type", "default"));
  const double partial = get_or<double>(p, "partial_rotary_factor", get_or<double>(j, "partial_rotary_factor", 1.0));
  FQ_CHECK(partial == 1.0, ErrorKind::Unsupported,
           mt + ": partial_rotary_factor " + std::to_string(partial) + " (RoPE on part of each head) is not supported");
  FQ_CHECK(r.theta > 0, ErrorKind::ModelFormat, mt + ": rope_theta must be positive");
  // Phi-3's configuration reads rope_type "su" and "yarn" as longrope.
  FQ_CHECK(mt != "phi3" || r.type == "default", ErrorKind::Unsupported,
           "phi3: rope_type '" + r.type + "' (longrope for Phi-3) is not supported");
  FQ_CHECK(r.type == "default" || r.type == "linear" || r.type == "dynamic" || r.type == "yarn" || r.type == "llama3",
           ErrorKind::Unsupported,
           mt + ": rope_type '" + r.type + "' is not supported (supported: default, linear, dynamic, yarn, llama3)");
  if (r.type == "default") return;
  // transformers moves a top-level original_max_position_embeddings (Phi-3 style) into the rope
  // parameters for llama3 / yarn, else defaults it to max_position_embeddings.
  r.original_max_positions = has(j, "original_max_position_embeddings")
                                 ? get_int(j, "original_max_position_embeddings")
                                 : get_or<int64_t>(p, "original_max_position_embeddings", c.max_positions);
  FQ_CHECK(r.original_max_positions > 0, ErrorKind::ModelFormat,
           mt + ": original_max_position_embeddings must be positive");
  if (r.type == "yarn") {
    const bool given = has(p, "factor");
    r.factor = given ? get_or<double>(p, "factor", 1.0)
                     : static_cast<double>(c.max_positions) / static_cast<double>(r.original_max_positions);
    auto mscale_of = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
    const double mscale = get_or<double>(p, "mscale", 0.0), mscale_all = get_or<double>(p, "mscale_all_dim", 0.0);
    if (has(p, "attention_factor")) r.attention_factor = get_or<double>(p, "attention_factor", 1.0);
    else if (mscale != 0 && mscale_all != 0)
      r.attention_factor = mscale_of(r.factor, mscale) / mscale_of(r.factor, mscale_all);
    else
      r.attention_factor = mscale_of(r.factor, 1.0);
    // transformers: `get("beta_fast") or 32`
    r.beta_fast = get_or<double>(p, "beta_fast", 0.0);
    if (r.beta_fast == 0) r.beta_fast = 32;
    r.beta_slow = get_or<double>(p, "beta_slow", 0.0);
    if (r.beta_slow == 0) r.beta_slow = 1;
    r.truncate = get_or<bool>(p, "truncate", true);
  } else {
    FQ_CHECK(has(p, "factor"), ErrorKind::ModelFormat, mt + ": rope_type '" + r.type + "' needs a factor");
    r.factor = get_or<double>(p, "factor", 1.0);
  }
  FQ_CHECK(r.factor > 0, ErrorKind::ModelFormat, mt + ": rope factor must be positive");
  if (r.type == "dynamic") {
    // NTK scaling stretches max_position_embeddings (the length past which frequencies are rescaled)
    // by factor: the engine accepts sequences up to that.
    FQ_CHECK(r.factor >= 1, ErrorKind::ModelFormat, mt + ": dynamic rope factor must be >= 1");
    r.original_max_positions = c.max_positions;
    c.max_positions = static_cast<int64_t>(r.factor * static_cast<double>(c.max_positions));
  }
  if (r.type == "llama3") {
    FQ_CHECK(has(p, "low_freq_factor") && has(p, "high_freq_factor"), ErrorKind::ModelFormat,
             mt + ": rope_type 'llama3' needs low_freq_factor and high_freq_factor");
    r.low_freq_factor = get_or<double>(p, "low_freq_factor", 1.0);
    r.high_freq_factor = get_or<double>(p, "high_freq_factor", 4.0);
    FQ_CHECK(r.high_freq_factor > r.low_freq_factor && r.low_freq_factor > 0, ErrorKind::ModelFormat,
             mt + ": llama3 rope needs 0 < low_freq_factor < high_freq_factor");
  }
}

// Which layers attend through a sliding window, and its width, by transformers' rule per model type.
void parse_windows(const json& j, ModelConfig& c) {
  const std::string& mt = c.model_type;
  c.layer_window.assign(static_cast<size_t>(c.num_layers), 0);
  if (mt == "llama" || mt == "gemma") return;  // their models ignore sliding_window
  int64_t window = has(j, "sliding_window") ? get_int(j, "sliding_window") : 0;
  if (mt == "qwen2" && !get_or<bool>(j, "use_sliding_window", false)) window = 0;
  if (mt == "mistral" || mt == "phi3") {  // one causal-mask kind for every layer (layer_types ignored)
    std::fill(c.layer_window.begin(), c.layer_window.end(), window);
    return;
  }
  // qwen2, gemma2: per layer_types, or the rule transformers derives them by.
  std::vector<std::string> types;
  if (has(j, "layer_types")) {
    FQ_CHECK(j["layer_types"].is_array() && static_cast<int64_t>(j["layer_types"].size()) == c.num_layers,
             ErrorKind::ModelFormat, mt + ": layer_types must list one type per layer");
    for (const json& t : j["layer_types"]) {
      FQ_CHECK(t.is_string(), ErrorKind::ModelFormat, mt + ": layer_types entries must be strings");
      types.push_back(t.get<std::string>());
    }
  } else {
    const int64_t first = mt == "qwen2" ? get_or<int64_t>(j, "max_window_layers", 28) : 0;
    for (int64_t i = 0; i < c.num_layers; ++i) {
      const bool sliding = mt == "qwen2" ? window > 0 && i >= first : (i + 1) % 2 == 1;
      types.push_back(sliding ? "sliding_attention" : "full_attention");
    }
  }
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string& t = types[static_cast<size_t>(i)];
    FQ_CHECK(t == "full_attention" || t == "sliding_attention", ErrorKind::Unsupported,
             mt + ": layer type '" + t + "' is not supported (full_attention, sliding_attention)");
    if (t == "sliding_attention") {
      FQ_CHECK(window > 0, ErrorKind::Unsupported,
               mt + ": layer " + std::to_string(i) + " is a sliding_attention layer without a sliding_window" +
                   (mt == "qwen2" ? " (use_sliding_window is false)" : ""));
      c.layer_window[static_cast<size_t>(i)] = window;
    }
  }
}

// The Llama family: Llama 2/3, Mistral, Qwen2, Phi-3, Gemma, Gemma 2 (docs/DESIGN.md section 10).
void parse_llama_family(const json& j, ModelConfig& c) {
  // A file made before model_type variants were read is a Llama.
  c.model_type = get_or<std::string>(j, "model_type", "llama");
  const std::string& mt = c.model_type;
  FQ_CHECK(mt == "llama" || mt == "mistral" || mt == "qwen2" || mt == "phi3" || mt == "gemma" || mt == "gemma2",
           ErrorKind::Unsupported,
           "model_type '" + mt +
               "' is not supported by the llama decoder (llama, mistral, qwen2, phi3, gemma, gemma2)");
  const bool gemma = mt == "gemma" || mt == "gemma2";
  c.hidden_size = get_int(j, "hidden_size");
  c.num_layers = get_int(j, "num_hidden_layers", kMaxLayers);
  c.num_heads = get_int(j, "num_attention_heads");
  c.num_kv_heads = has(j, "num_key_value_heads") ? get_int(j, "num_key_value_heads") : c.num_heads;
  c.intermediate_size = get_int(j, "intermediate_size");
  c.max_positions = get_int(j, "max_position_embeddings");
  c.norm_eps = get_or<float>(j, "rms_norm_eps", mt == "phi3" ? 1e-5f : 1e-6f);
  if (has(j, "head_dim")) c.head_dim = get_int(j, "head_dim");
  c.tie_word_embeddings = get_or<bool>(j, "tie_word_embeddings", gemma);
  parse_rope(j, c);
  // The gated MLP's activation: Gemma 2 reads hidden_activation, the others hidden_act; Gemma's
  // configuration turns the legacy "gelu" into the tanh form.
  c.hidden_act = mt == "gemma2" ? get_or<std::string>(j, "hidden_activation", "gelu_pytorch_tanh")
                                : get_or<std::string>(j, "hidden_act", gemma ? "gelu_pytorch_tanh" : "silu");
  if (mt == "gemma" && c.hidden_act == "gelu") c.hidden_act = "gelu_pytorch_tanh";
  FQ_CHECK(c.hidden_act == "silu" || c.hidden_act == "gelu_pytorch_tanh", ErrorKind::Unsupported,
           mt + ": " + (mt == "gemma2" ? "hidden_activation" : "hidden_act") + " '" + c.hidden_act +
               "' is not supported (silu, gelu_pytorch_tanh)");
  c.mlp_act = c.hidden_act == "silu" ? "silu" : "gelu_tanh";
  // Biases: Llama and Gemma by attention_bias (q/k/v/o) and Llama's mlp_bias; Qwen2 always on q/k/v.
  if (mt == "llama" || gemma) c.qkv_bias = c.o_bias = get_or<bool>(j, "attention_bias", false);
  if (mt == "llama") c.mlp_bias = get_or<bool>(j, "mlp_bias", false);
  if (mt == "qwen2") c.qkv_bias = true;
  parse_windows(j, c);
  if (gemma) {
    c.norm_offset = 1.f;
    c.embed_scale = static_cast<float>(std::sqrt(static_cast<double>(c.hidden_size)));
  }
  if (mt == "gemma2") {
    c.sandwich_norms = true;
    const double query_pre_attn_scalar = get_or<double>(j, "query_pre_attn_scalar", 256.0);
    FQ_CHECK(query_pre_attn_scalar > 0, ErrorKind::ModelFormat, "gemma2: query_pre_attn_scalar must be positive");
    c.query_scale = static_cast<float>(std::pow(query_pre_attn_scalar, -0.5));
    c.attn_softcap = get_or<float>(j, "attn_logit_softcapping", 0.f);
    c.final_softcap = get_or<float>(j, "final_logit_softcapping", 0.f);
    FQ_CHECK(c.attn_softcap >= 0 && c.final_softcap >= 0, ErrorKind::ModelFormat, "gemma2: soft-capping must be >= 0");
    FQ_CHECK(!get_or<bool>(j, "use_bidirectional_attention", false), ErrorKind::Unsupported,
             "gemma2: use_bidirectional_attention=true is not supported");
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
    c.num_layers = get_int(j, "num_hidden_layers", kMaxLayers);
    c.num_heads = get_int(j, "num_attention_heads");
    c.intermediate_size = get_int(j, "intermediate_size");
    c.max_positions = get_int(j, "max_position_embeddings");
    c.type_vocab_size = has(j, "type_vocab_size") ? get_int(j, "type_vocab_size") : 2;
    c.norm_eps = get_or<float>(j, "layer_norm_eps", 1e-12f);
    c.hidden_act = get_or<std::string>(j, "hidden_act", "gelu");
    const std::string pos = get_or<std::string>(j, "position_embedding_type", "absolute");
    FQ_CHECK(pos == "absolute", ErrorKind::Unsupported, "bert: position_embedding_type '" + pos + "' is not supported");
  } else if (architecture == "gpt2") {
    c.hidden_size = get_int(j, "n_embd");
    c.num_layers = get_int(j, "n_layer", kMaxLayers);
    c.num_heads = get_int(j, "n_head");
    c.intermediate_size = has(j, "n_inner") ? get_int(j, "n_inner") : 4 * c.hidden_size;
    c.max_positions = get_int(j, "n_positions");
    c.norm_eps = get_or<float>(j, "layer_norm_epsilon", 1e-5f);
    c.hidden_act = get_or<std::string>(j, "activation_function", "gelu_new");
    FQ_CHECK(get_or<bool>(j, "scale_attn_weights", true), ErrorKind::Unsupported,
             "gpt2: scale_attn_weights=false is not supported");
    FQ_CHECK(!get_or<bool>(j, "scale_attn_by_inverse_layer_idx", false), ErrorKind::Unsupported,
             "gpt2: scale_attn_by_inverse_layer_idx is not supported");
  } else if (architecture == "llama") {
    parse_llama_family(j, c);
  } else if (architecture == "bart") {
    c.hidden_size = get_int(j, "d_model");
    c.num_layers = get_int(j, "encoder_layers", kMaxLayers);
    c.num_heads = get_int(j, "encoder_attention_heads");
    c.intermediate_size = get_int(j, "encoder_ffn_dim");
    c.decoder_layers = get_int(j, "decoder_layers", kMaxLayers);
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
  FQ_CHECK(c.norm_eps >= 0, ErrorKind::ModelFormat, "config: the norm epsilon must be >= 0");
  FQ_CHECK(c.num_heads % c.num_kv_heads == 0, ErrorKind::ModelFormat,
           "config: num_attention_heads must be a multiple of num_key_value_heads");
  FQ_CHECK(architecture != "llama" || c.head_dim % 2 == 0, ErrorKind::ModelFormat, "config: RoPE needs an even head_dim");
  return c;
}

}  // namespace finequant
