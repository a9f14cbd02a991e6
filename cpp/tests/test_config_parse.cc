// ModelConfig::parse on hostile config.json files: each case below was undefined behaviour, a
// multi-terabyte allocation or a config with negative sizes accepted before the parser's limits
// (docs/DESIGN.md, Reliability); each must now be a ModelFormat error naming the field. Run under
// make test-sanitize, the UBSan cases would abort if the undefined conversion came back.
#include <string>

#include "check.h"
#include "models/config.h"

using namespace finequant;

namespace {

const std::string kLlama =
    R"("vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4, )"
    R"("max_position_embeddings": 64)";
std::string llama(const std::string& extra) { return "{" + kLlama + ", " + extra + "}"; }
const std::string kGpt2 = R"("vocab_size": 32, "n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 64)";
std::string gpt2(const std::string& extra) { return "{" + kGpt2 + (extra.empty() ? "" : ", " + extra) + "}"; }

const ErrorKind kFmt = ErrorKind::ModelFormat;

}  // namespace

TEST(valid_configs_still_parse) {
  const ModelConfig l = ModelConfig::parse("llama", llama(R"("num_hidden_layers": 2, "num_key_value_heads": 2)"));
  CHECK_EQ(l.num_kv_heads, int64_t{2});
  CHECK_EQ(l.head_dim, int64_t{4});
  const ModelConfig g = ModelConfig::parse("gpt2", gpt2(""));
  CHECK_EQ(g.intermediate_size, int64_t{64});  // n_inner defaults to 4 * n_embd
  CHECK_EQ(ModelConfig::parse("gpt2", gpt2(R"("n_inner": 24)")).intermediate_size, int64_t{24});
  CHECK_EQ(ModelConfig::parse("llama", llama(R"("num_hidden_layers": 2, "rms_norm_eps": 1e-5)")).norm_eps, 1e-5f);
}

// Fuzz finding: a float where an integer is read went through nlohmann's static_cast (UB for 1e300).
TEST(floats_for_integer_fields) {
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("llama", llama(R"("num_hidden_layers": 2, "num_key_value_heads": 1e300)")),
                        kFmt, "num_key_value_heads");
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("llama", llama(R"("num_hidden_layers": 2, "num_key_value_heads": 2.0)")),
                        kFmt, "num_key_value_heads");
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("llama", llama(R"("num_hidden_layers": 2, "model_type": "qwen2", )"
                                                          R"("max_window_layers": -1e300)")),
                        kFmt, "max_window_layers");
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("bart", R"({"vocab_size": 32, "d_model": 16, "encoder_layers": 1, )"
                                                   R"("decoder_layers": 1, "encoder_attention_heads": 4, )"
                                                   R"("decoder_attention_heads": 4, "encoder_ffn_dim": 8, )"
                                                   R"("decoder_ffn_dim": 8, "max_position_embeddings": 16, )"
                                                   R"("decoder_start_token_id": 9e99})"),
                        kFmt, "decoder_start_token_id");
}

// num_hidden_layers 10^12 allocated a per-layer table of 8 TB while parsing.
TEST(layer_counts_are_bounded) {
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("llama", llama(R"("num_hidden_layers": 1000000000000)")), kFmt,
                        "'num_hidden_layers' = 1000000000000 exceeds the limit 65536");
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("gpt2", R"({"vocab_size": 32, "n_embd": 16, "n_layer": 100000, )"
                                                   R"("n_head": 4, "n_positions": 64})"),
                        kFmt, "n_layer");
}

// 4 * n_embd overflowed int64 (UB) for n_embd 2^62; sizes are bounded by 2^40.
TEST(sizes_are_bounded) {
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("gpt2", R"({"vocab_size": 32, "n_embd": 4611686018427387904, )"
                                                   R"("n_layer": 2, "n_head": 1, "n_positions": 64})"),
                        kFmt, "'n_embd' = 4611686018427387904 exceeds the limit");
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("llama", llama(R"("num_hidden_layers": 2, "head_dim": 2199023255552)")),
                        kFmt, "head_dim");
}

// Negative or zero optional sizes were accepted (num_key_value_heads -2 passed the divisibility check).
TEST(optional_sizes_must_be_positive) {
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("llama", llama(R"("num_hidden_layers": 2, "num_key_value_heads": -2)")),
                        kFmt, "'num_key_value_heads' must be positive");
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("gpt2", gpt2(R"("n_inner": -5)")), kFmt, "'n_inner' must be positive");
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("bert", llama(R"("num_hidden_layers": 2, "type_vocab_size": -1)")), kFmt,
                        "'type_vocab_size' must be positive");
}

TEST(floating_fields_must_be_finite_and_sane) {
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("llama", llama(R"("num_hidden_layers": 2, "rms_norm_eps": 1e300)")), kFmt,
                        "rms_norm_eps");
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("llama", llama(R"("num_hidden_layers": 2, "rms_norm_eps": -1e-6)")), kFmt,
                        "epsilon");
  CHECK_THROWS_KIND_MSG(ModelConfig::parse("llama", llama(R"("num_hidden_layers": 2, "model_type": "gemma2", )"
                                                          R"("head_dim": 4, "sliding_window": 8, "query_pre_attn_scalar": -1)")),
                        kFmt, "query_pre_attn_scalar");
}

int main() { return RUN_ALL_TESTS(); }
