// The finequant inference engine: loads a finequant model file (any precision) and runs it on
// the CPU or a CUDA device. One object per model; calls are independent (the KV cache lives inside
// a call), so a loaded Engine may serve concurrent callers.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "finequant/device.h"
#include "finequant/tensor.h"

namespace finequant {

struct EngineOptions {
  int threads = 0;             // CPU threads of this Engine (its own pool); 0: the default
  std::string device = "cpu";  // "cpu", "cuda", "cuda:N" or "auto" (a CUDA device when present, else the CPU)
  // How Linears with floating-point inputs (fp32 models, weight-only schemes, an unquantized LM
  // head) multiply: "fp32" (exact fp32 products), or "bf16": the weight stored as bf16 (half the
  // memory and bytes per decode step), inputs rounded to bf16 per call, fp32 sums; on a CPU with
  // AVX512-BF16, elsewhere (and on CUDA) these Linears stay fp32. An explicit precision choice.
  std::string float_precision = "fp32";
  // Bytes the weights plus one call's working memory (activations, KV cache, outputs; estimated up
  // front from the config and the call's shapes) may take: a load or call that would need more throws
  // Error(ResourceLimit) naming the limit instead of running out of memory. 0: the physical memory
  // available at the time (docs/DESIGN.md, Reliability). Each of several concurrent calls is checked alone.
  int64_t max_memory = 0;
  // Per-shape strategy table (docs/DESIGN.md section 12, written by `finequant tune`): "auto" reads
  // strategy.json in the model directory when there is one, "off" ignores any table, else a path
  // (missing or corrupt: Error). A table measured on another CPU or ISA is ignored with a note
  // (strategy_note()). The table may run some integer GEMMs weight-only (an accuracy choice it records).
  std::string strategy = "auto";
};

struct GenerationOptions {
  int64_t max_new_tokens = 32;
  float temperature = 0.f;  // <= 0: greedy (argmax)
  int64_t top_k = 0;        // 0: no top-k filter
  float top_p = 1.f;        // 1: no nucleus filter
  uint64_t seed = 0;        // sampling is deterministic for a given seed
  std::vector<int64_t> stop_tokens;  // a row stops after emitting one of these (it is included)
  // never chosen (their logits taken as -inf, as transformers' suppress_tokens), e.g. the end-of-text token
  // for samples of a fixed length
  std::vector<int64_t> suppress_tokens;
  std::function<void(int64_t row, int64_t token)> on_token;  // called as each token is chosen (streaming)
  // Encoder-decoder models only (-1: unset). The decoder starts from decoder_start_token_id (unset:
  // the config's); forced_bos_token_id is the first new token and forced_eos_token_id the last one a
  // call can make (max_new_tokens or the positions' limit), as transformers' ForcedBOS / ForcedEOS
  // logits processors do; the Python Engine passes the model's generation_config values.
  int64_t decoder_start_token_id = -1;
  int64_t forced_bos_token_id = -1;
  int64_t forced_eos_token_id = -1;
};

class Engine {
 public:
  // `path`: a model directory (holding model.safetensors) or the .safetensors file itself.
  // Throws Error(ModelFormat) for a bad file, Error(Unsupported) for an unsupported config or a
  // device this build lacks, Error(Runtime) for a CUDA device that is not present.
  static std::unique_ptr<Engine> load(const std::string& path, EngineOptions options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // input_ids: I64 [B, T], ids in [0, vocab_size); attention_mask: I64 [B, T] of 0/1 or null
  // (all ones), every row needing at least one 1. T <= max_positions().
  // Returns host F32 [B, T, hidden_size] (encoders, and the encoder of an encoder-decoder: last
  // hidden states) or [B, T, vocab_size] (decoders: logits). Decoder positions are cumsum(mask) - 1, so left or right padding gives
  // the same outputs at real tokens; outputs at padded positions are unspecified.
  Tensor forward(const Tensor& input_ids, const Tensor* attention_mask = nullptr) const;

  // Encoder-decoder models (is_seq2seq()): logits F32 [B, Td, vocab_size] of the decoder run on
  // decoder_input_ids [B, Td] (teacher forcing) over the encoder's output for input_ids [B, T].
  // decoder_attention_mask (0/1 or null) masks padded decoder tokens as keys; decoder positions are
  // 0..Td-1 whatever the padding (as in transformers), so pad decoder inputs on the right.
  Tensor forward_seq2seq(const Tensor& input_ids, const Tensor* attention_mask, const Tensor& decoder_input_ids,
                         const Tensor* decoder_attention_mask = nullptr) const;

  // Decoders: batched prefill with a KV cache, then incremental decoding. Encoder-decoders: the
  // encoder runs once on input_ids, then the decoder from decoder_start_token_id with a growing
  // self-attention cache and the cross-attention keys/values computed once. Returns the new
  // tokens of each row (stopping at a stop token, max_new_tokens, or max_positions in total).
  std::vector<std::vector<int64_t>> generate(const Tensor& input_ids, const Tensor* attention_mask,
                                             const GenerationOptions& options) const;

  const std::string& architecture() const;  // "bert", "gpt2", "llama", "bart"
  bool is_decoder() const;
  bool is_seq2seq() const;  // encoder-decoder ("bart")
  int64_t vocab_size() const;
  int64_t hidden_size() const;
  int64_t num_layers() const;  // encoder-decoder: encoder + decoder layers
  int64_t max_positions() const;
  const std::string& scheme() const;
  Device device() const;
  std::string backend_name() const;  // e.g. "cpu (avx512vnni)", "cuda:0 NVIDIA H200 (sm90)"
  int threads() const;
  void set_threads(int threads);  // 0: the default
  int64_t max_memory() const;      // EngineOptions::max_memory (0: available physical memory)
  // Estimated bytes of the loaded weights, and of one call on [batch, tokens] inputs (generate:
  // with max_new_tokens new tokens, bounded by max_positions; forward: max_new_tokens 0).
  int64_t weight_memory() const;
  // The strategy in use, one line per part ("" when none), and why a table was not used ("" when
  // it was, or there was none); bytes of the weight-only copies the table made.
  std::string strategy_summary() const;
  const std::string& strategy_note() const;
  int64_t strategy_memory() const;
  int64_t call_memory(int64_t batch, int64_t tokens, int64_t max_new_tokens = 0) const;

 private:
  friend class Scheduler;  // runs this Engine's decoder on its own shared KV cache (finequant/scheduler.h)
  std::vector<std::vector<int64_t>> generate_seq2seq(const Tensor& input_ids, const Tensor* attention_mask,
                                                     const GenerationOptions& options) const;
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace finequant
