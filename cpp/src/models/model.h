// Models built from a finequant file's config: Encoder (BERT family), Decoder (GPT-2, Llama
// family) and Seq2Seq (BART). All are stacks of the shared Block; the family only decides
// embeddings, block variant and head. Inputs reaching these classes have been validated by the Engine; ids and masks are host
// arrays, everything else lives on the model's device.
#pragma once
#include <memory>
#include <vector>

#include "finequant/model_file.h"
#include "layers/block.h"
#include "layers/strategy.h"
#include "models/config.h"

namespace finequant {

class Model {
 public:
  Model() = default;
  Model(const Model&) = delete;  // its Linears point at each other (Linear::set_next)
  Model& operator=(const Model&) = delete;
  virtual ~Model() = default;
  const ModelConfig& config() const { return config_; }
  const kernels::Backend& backend() const { return *backend_; }
  virtual bool is_decoder() const = 0;
  virtual bool is_seq2seq() const { return false; }
  // ids, mask: [B, T] row-major host arrays (mask 0/1). Encoder: last hidden states F32 [B, T, C];
  // decoder: logits F32 [B, T, V]; on the model's device.
  virtual Tensor forward(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B,
                         int64_t T) const = 0;

 protected:
  ModelConfig config_;
  const kernels::Backend* backend_ = nullptr;
  std::vector<Block> blocks_;
};

class Encoder : public Model {
 public:
  Encoder(const ModelFile& file, ModelConfig config, const kernels::Backend& backend, ThreadPool& pool,
          kernels::FloatPrecision precision, const StrategyTable* strategy = nullptr);
  bool is_decoder() const override { return false; }
  Tensor forward(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T) const override;

 private:
  Tensor word_, position_, token_type_;  // F32 embedding tables
  Norm embed_norm_;
};

// Keys/values of every layer plus, per sequence, which cache slots hold real tokens and the
// position the next real token gets (host bookkeeping, uploaded per step).
struct KVCache {
  std::vector<LayerKV> layers;
  int64_t B = 0, capacity = 0, length = 0;
  std::vector<uint8_t> key_valid;       // [B, capacity]
  std::vector<int64_t> key_position;    // [B, capacity]: each slot's position (read by sliding windows only)
  std::vector<int64_t> next_position;   // [B]
};

class Decoder : public Model {
 public:
  Decoder(const ModelFile& file, ModelConfig config, const kernels::Backend& backend, ThreadPool& pool,
          kernels::FloatPrecision precision, const StrategyTable* strategy = nullptr);
  bool is_decoder() const override { return true; }
  Tensor forward(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T) const override;

  KVCache new_cache(int64_t B, int64_t capacity) const;
  // Runs a chunk [B, T] (mask 0/1) after what `cache` holds and appends it to the cache.
  // Positions: each real token gets the number of real tokens before it in its sequence
  // (cumsum(mask) - 1, as transformers' generate() does), so left and right padding give the
  // same result for the real tokens; padded slots are never attended to.
  // all_logits: F32 [B, T, V]; else F32 [B, V] at the last real token of each row in the chunk.
  Tensor step(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T, KVCache& cache,
              bool all_logits) const;

 private:
  bool gpt2_ = false;
  bool has_window_ = false;  // some layer attends through a sliding window
  Tensor embed_, position_;  // position_: GPT-2 learned positions only
  Norm final_norm_;
  Rope rope_;
  Linear head_;
};

// The state of one seq2seq call: the encoder's keys and values for every decoder layer's
// cross-attention (computed once from the encoder output) and the decoder's growing self-attention cache.
struct Seq2SeqCache {
  KVCache self;
  std::vector<CrossKV> cross;  // per decoder layer
};

// Encoder-decoder (BART): a post-LN encoder over the input ids; a post-LN decoder whose blocks
// attend causally to the decoder tokens and to the encoder's output, LM head tied to the shared
// embedding plus final_logits_bias. Learned positions with BART's offset of 2: token t of a
// sequence reads row t + 2 (positions ignore padding, as in transformers).
class Seq2Seq : public Model {
 public:
  Seq2Seq(const ModelFile& file, ModelConfig config, const kernels::Backend& backend, ThreadPool& pool,
          kernels::FloatPrecision precision, const StrategyTable* strategy = nullptr);
  bool is_decoder() const override { return false; }
  bool is_seq2seq() const override { return true; }
  // The encoder's last hidden states F32 [B, T, C].
  Tensor forward(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T) const override;

  // Runs the encoder over [B, T] (mask 0/1) and projects its output into every decoder layer's
  // cross-attention keys and values; the decoder cache holds up to `capacity` tokens.
  Seq2SeqCache start(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T,
                     int64_t capacity) const;
  // Decoder chunk [B, T] after what `cache` holds (mask 0/1: padded decoder tokens are never
  // attended to; positions are cache.length + t). all_logits: F32 [B, T, V]; else F32 [B, V] of
  // each row's last real token in the chunk.
  Tensor step(const ExecContext& ctx, const int64_t* ids, const uint8_t* mask, int64_t B, int64_t T,
              Seq2SeqCache& cache, bool all_logits) const;

 private:
  // F32 [V, C]: each stack's token embedding (model.shared unless the file has the stack's own
  // embed_tokens, untied), times sqrt(C) when scale_embedding
  Tensor enc_embed_, dec_embed_;
  Tensor enc_pos_, dec_pos_;  // F32 [max_positions + 2, C]
  Norm enc_embed_norm_, dec_embed_norm_;
  std::vector<Block> dec_blocks_;  // blocks_ holds the encoder's
  Linear head_;
  Tensor embed_rows(const ExecContext& ctx, const Tensor& table, const Tensor& table_pos, const int64_t* ids,
                    const Tensor& positions, int64_t M) const;
};

// The hidden row of the last real token (mask 1) of each of the B rows of a chunk x [B * T, C]: the rows
// that predict the next token (decoder and seq2seq steps).
Tensor last_real_rows(const ExecContext& ctx, const Tensor& x, const uint8_t* mask, int64_t B, int64_t T);

// Builds the model that matches the file's architecture, its weights prepared for `backend`; its
// floating-point Linears multiply at `precision` (EngineOptions::float_precision).
// With `strategy`, integer Linears also hold the weight-only kernel the table picks for some row
// counts (docs/DESIGN.md section 12); the table counts the copies made.
std::unique_ptr<Model> build_model(const ModelFile& file, const kernels::Backend& backend, ThreadPool& pool,
                                   kernels::FloatPrecision precision = kernels::FloatPrecision::F32,
                                   const StrategyTable* strategy = nullptr);

}  // namespace finequant
