// Models built from a finequant file's config: Encoder (BERT family) and Decoder (GPT-2, Llama
// family). Both are a stack of the shared Block; the family only decides embeddings, block variant
// and head. Inputs reaching these classes have been validated by the Engine; ids and masks are host
// arrays, everything else lives on the model's device.
#pragma once
#include <memory>
#include <vector>

#include "finequant/model_file.h"
#include "layers/block.h"
#include "models/config.h"

namespace finequant {

class Model {
 public:
  virtual ~Model() = default;
  const ModelConfig& config() const { return config_; }
  const kernels::Backend& backend() const { return *backend_; }
  virtual bool is_decoder() const = 0;
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
          kernels::FloatPrecision precision);
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
  std::vector<int64_t> next_position;   // [B]
};

class Decoder : public Model {
 public:
  Decoder(const ModelFile& file, ModelConfig config, const kernels::Backend& backend, ThreadPool& pool,
          kernels::FloatPrecision precision);
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
  Tensor embed_, position_;  // position_: GPT-2 learned positions only
  Norm final_norm_;
  Rope rope_;
  Linear head_;
};

// Builds the model that matches the file's architecture, its weights prepared for `backend`; its
// floating-point Linears multiply at `precision` (EngineOptions::float_precision).
std::unique_ptr<Model> build_model(const ModelFile& file, const kernels::Backend& backend, ThreadPool& pool,
                                   kernels::FloatPrecision precision = kernels::FloatPrecision::F32);

}  // namespace finequant
