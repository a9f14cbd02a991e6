#include "finequant/engine.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>

#include "engine/engine_impl.h"
#include "engine/memory.h"
#include "engine/sampling.h"
#include "kernels/backend.h"

namespace finequant {

namespace {
std::shared_ptr<ThreadPool> make_pool(int threads) {
  return std::make_shared<ThreadPool>(threads > 0 ? threads : default_threads());
}
}  // namespace

namespace {

struct Batch {
  int64_t B = 0, T = 0;
  const int64_t* ids = nullptr;
  std::vector<uint8_t> mask;  // [B, T] 0/1
};

// All checks on user input happen here, before any kernel runs. `what`: the argument's name.
Batch validate(const Model& model, const Tensor& ids, const Tensor* mask, const std::string& what = "input_ids",
               const std::string& mask_what = "attention_mask") {
  const ModelConfig& c = model.config();
  FQ_CHECK_ARG(ids.defined(), what + " is empty (undefined tensor)");
  FQ_CHECK_ARG(ids.dtype() == DType::I64, what + " must be int64, got " + dtype_name(ids.dtype()));
  FQ_CHECK_ARG(ids.ndim() == 2, what + " must be 2-D [batch, tokens], got shape " + shape_str(ids.shape()));
  Batch b;
  b.B = ids.dim(0);
  b.T = ids.dim(1);
  FQ_CHECK_ARG(b.B > 0 && b.T > 0, what + " is empty: shape " + shape_str(ids.shape()));
  FQ_CHECK_ARG(b.T <= c.max_positions, "sequence length " + std::to_string(b.T) + " exceeds max_positions " +
                                           std::to_string(c.max_positions));
  b.ids = ids.data<int64_t>();
  for (int64_t i = 0; i < b.B * b.T; ++i)
    FQ_CHECK_ARG(b.ids[i] >= 0 && b.ids[i] < c.vocab_size, what + "[" + std::to_string(i / b.T) + ", " +
                                                               std::to_string(i % b.T) + "] = " + std::to_string(b.ids[i]) +
                                                               " is outside [0, " + std::to_string(c.vocab_size) + ")");
  b.mask.assign(static_cast<size_t>(b.B * b.T), 1);
  if (mask) {
    FQ_CHECK_ARG(mask->defined() && mask->dtype() == DType::I64,
                 mask_what + " must be int64, got " + (mask->defined() ? dtype_name(mask->dtype()) : "undefined"));
    FQ_CHECK_ARG(mask->shape() == ids.shape(), mask_what + " shape " + shape_str(mask->shape()) + " does not match " +
                                                   what + " shape " + shape_str(ids.shape()));
    const int64_t* m = mask->data<int64_t>();
    for (int64_t i = 0; i < b.B * b.T; ++i) {
      FQ_CHECK_ARG(m[i] == 0 || m[i] == 1, mask_what + " values must be 0 or 1, got " + std::to_string(m[i]));
      b.mask[i] = static_cast<uint8_t>(m[i]);
    }
    for (int64_t r = 0; r < b.B; ++r)
      FQ_CHECK_ARG(std::any_of(b.mask.begin() + r * b.T, b.mask.begin() + (r + 1) * b.T, [](uint8_t v) { return v; }),
                   mask_what + " row " + std::to_string(r) + " has no tokens");
  }
  return b;
}

// The token loop both generate paths share. `logits` [B, V] (host) predict each row's next token; a row
// takes the forced token of step n if forced(n) >= 0 (transformers' forced logits leave one finite score,
// so it consumes no randomness), else one sampled by choose_token, streams it and stops at a stop token.
// At most `limit` tokens per row; between steps `step(next, mask)` feeds the chosen tokens back (finished
// rows ride along as padding, mask 0) and returns the next logits.
template <class Forced, class Step>
std::vector<std::vector<int64_t>> token_loop(int64_t B, int64_t V, const GenerationOptions& o, int64_t limit,
                                             Tensor logits, Forced forced, Step step) {
  std::mt19937_64 rng(o.seed);
  std::vector<std::vector<int64_t>> out(static_cast<size_t>(B));
  std::vector<int64_t> next(static_cast<size_t>(B), 0);
  std::vector<uint8_t> done(static_cast<size_t>(B), 0), mask(static_cast<size_t>(B), 1);
  for (int64_t n = 0; n < limit; ++n) {
    const int64_t f = forced(n);
    for (int64_t r = 0; r < B; ++r) {
      if (done[r]) continue;
      next[r] = f >= 0 ? f : choose_token(logits.data<float>() + r * V, V, o, rng);
      out[r].push_back(next[r]);
      if (o.on_token) o.on_token(r, next[r]);
      if (is_stop_token(o, next[r])) done[r] = 1;
    }
    if (std::all_of(done.begin(), done.end(), [](uint8_t d) { return d; }) || n + 1 == limit) break;
    for (int64_t r = 0; r < B; ++r) mask[r] = done[r] ? 0 : 1;
    logits = step(next.data(), mask.data());
  }
  return out;
}

// Refuses a call whose estimated working memory, with the weights, exceeds the Engine's limit
// (docs/DESIGN.md, Reliability): before anything is allocated.
// `limits`: the Engine's max_memory and weight bytes; `threads`: its pool's.
struct MemoryLimits {
  int64_t max_memory;
  double weight_bytes;
  int threads;
};

void check_call_memory(const Model& model, const MemoryLimits& limits, const std::string& what, int64_t B, int64_t T,
                       int64_t decoder_T, int64_t cache_positions, bool all_logits) {
  const CallMemory m =
      estimate_call_memory(model.config(), B, T, decoder_T, cache_positions, all_logits, limits.threads);
  // With max_memory the weights count against it; without, they are already resident.
  const double weights = limits.max_memory > 0 ? limits.weight_bytes : 0;
  check_memory(what + " on [" + std::to_string(B) + ", " + std::to_string(T) + "]", weights + m.total(),
               "activations " + format_bytes(m.activations) + ", KV cache " + format_bytes(m.kv_cache) + ", outputs " +
                   format_bytes(m.outputs) + (weights > 0 ? ", weights " + format_bytes(weights) : std::string()),
               memory_limit(limits.max_memory), limits.max_memory);
}

}  // namespace

// The strategy table EngineOptions::strategy names, when it was measured on this machine
// (docs/DESIGN.md section 12).
static void load_strategy(const std::string& model_path, const std::string& option, Device device,
                          std::unique_ptr<StrategyTable>& strategy, std::string& note) {
  if (option == "off") return;
  std::string table_path = option;
  if (option == "auto") {
    struct stat st {};
    const bool dir = ::stat(model_path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
    const size_t slash = model_path.rfind('/');
    table_path = dir ? model_path + "/strategy.json"
                 : slash == std::string::npos ? std::string("strategy.json")
                                              : model_path.substr(0, slash) + "/strategy.json";
    if (::stat(table_path.c_str(), &st) != 0) return;
  }
  StrategyTable table = StrategyTable::read(table_path);
  if (!device.is_cpu()) {
    note = table_path + " ignored: tables are measured for the CPU backend";
  } else if (table.cpu != machine_cpu_name() || table.backend != machine_backend_name()) {
    note = table_path + " ignored: measured on '" + table.cpu + "' / " + table.backend + ", this is '" +
                         machine_cpu_name() + "' / " + machine_backend_name() + " (rerun `finequant tune`)";
  } else {
    strategy = std::make_unique<StrategyTable>(std::move(table));
  }
}

Tensor host_logits(const kernels::Backend& backend, const ExecContext& ctx, const Tensor& t) {
  Tensor host = t.to(Device::cpu());
  backend.finish(ctx);
  return host;
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

std::unique_ptr<Engine> Engine::load(const std::string& path, EngineOptions options) {
  FQ_CHECK_ARG(options.threads >= 0, "threads must be >= 0");
  FQ_CHECK_ARG(options.max_memory >= 0, "max_memory must be >= 0 (0: the available physical memory)");
  FQ_CHECK_ARG(options.float_precision == "fp32" || options.float_precision == "bf16",
               "float_precision must be 'fp32' or 'bf16', got '" + options.float_precision + "'");
  const kernels::FloatPrecision precision =
      options.float_precision == "bf16" ? kernels::FloatPrecision::BF16 : kernels::FloatPrecision::F32;
  std::string file_path = path;
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) file_path = path + "/model.safetensors";
  Device device = Device::parse(options.device);
  const kernels::Backend* backend = nullptr;
  try {
    backend = &kernels::backend_for(device);
  } catch (const Error& e) {
    // "auto" means a GPU finequant can use: one it cannot (e.g. older than sm80) leaves the CPU.
    if (options.device != "auto" || e.kind() != ErrorKind::Unsupported) throw;
    device = Device::cpu();
    backend = &kernels::backend_for(device);
  }
  auto impl = std::make_unique<Impl>(Impl{ModelFile::open(file_path), nullptr, options.threads, device,
                                          make_pool(options.threads)});
  impl->max_memory = options.max_memory;
  // Refuse a model that cannot fit before building it: its weights plus the smallest call (one token).
  impl->weight_bytes = estimate_weight_memory(impl->file);
  const ModelConfig config = ModelConfig::parse(impl->file.architecture, impl->file.config_json);
  const CallMemory one = estimate_call_memory(config, 1, 1, config.is_seq2seq() ? 1 : 0, 0, false, impl->pool->size());
  check_memory("loading " + path, impl->weight_bytes + one.total(),
               "weights " + format_bytes(impl->weight_bytes) + ", a one-token call " + format_bytes(one.total()),
               memory_limit(options.max_memory), options.max_memory);
  load_strategy(path, options.strategy, device, impl->strategy, impl->strategy_note);
  impl->model = build_model(impl->file, *backend, *impl->pool, precision, impl->strategy.get());
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

Tensor Engine::forward(const Tensor& input_ids, const Tensor* attention_mask) const {
  const Batch b = validate(*impl_->model, input_ids, attention_mask);
  check_call_memory(*impl_->model, {impl_->max_memory, impl_->weight_bytes, impl_->current_pool()->size()},
                    "forward", b.B, b.T, 0, 0, impl_->model->is_decoder());
  const kernels::Backend& backend = impl_->model->backend();
  const std::shared_ptr<ThreadPool> pool = impl_->current_pool();
  const ExecContext ctx = backend.context(*pool);
  Tensor out = impl_->model->forward(ctx, b.ids, b.mask.data(), b.B, b.T).to(Device::cpu());
  backend.finish(ctx);
  return out;
}

Tensor Engine::forward_seq2seq(const Tensor& input_ids, const Tensor* attention_mask, const Tensor& decoder_input_ids,
                               const Tensor* decoder_attention_mask) const {
  FQ_CHECK(impl_->model->is_seq2seq(), ErrorKind::Unsupported,
           "forward_seq2seq() needs an encoder-decoder model, this is '" + architecture() + "'");
  const Batch b = validate(*impl_->model, input_ids, attention_mask);
  const Batch d = validate(*impl_->model, decoder_input_ids, decoder_attention_mask, "decoder_input_ids",
                           "decoder_attention_mask");
  FQ_CHECK_ARG(d.B == b.B, "decoder_input_ids has " + std::to_string(d.B) + " rows, input_ids " + std::to_string(b.B));
  check_call_memory(*impl_->model, {impl_->max_memory, impl_->weight_bytes, impl_->current_pool()->size()},
                    "forward_seq2seq", b.B, b.T, d.T, d.T, true);
  const auto& model = static_cast<const Seq2Seq&>(*impl_->model);
  const kernels::Backend& backend = model.backend();
  const std::shared_ptr<ThreadPool> pool = impl_->current_pool();
  const ExecContext ctx = backend.context(*pool);
  Seq2SeqCache cache = model.start(ctx, b.ids, b.mask.data(), b.B, b.T, d.T);
  Tensor out = model.step(ctx, d.ids, d.mask.data(), d.B, d.T, cache, true).to(Device::cpu());
  backend.finish(ctx);
  return out;
}

std::vector<std::vector<int64_t>> Engine::generate(const Tensor& input_ids, const Tensor* attention_mask,
                                                   const GenerationOptions& o) const {
  FQ_CHECK(impl_->model->is_decoder() || impl_->model->is_seq2seq(), ErrorKind::Unsupported,
           "generate() needs a decoder or encoder-decoder model, this is '" + architecture() + "'");
  const int64_t V = vocab_size();
  check_sampling_options(o, V);
  for (const auto& [name, id] : {std::pair<const char*, int64_t>{"decoder_start_token_id", o.decoder_start_token_id},
                                 {"forced_bos_token_id", o.forced_bos_token_id},
                                 {"forced_eos_token_id", o.forced_eos_token_id}})
    FQ_CHECK_ARG(id >= -1 && id < V, std::string(name) + " " + std::to_string(id) + " is outside [0, " +
                                         std::to_string(V) + ") (-1: unset)");
  if (impl_->model->is_seq2seq()) return generate_seq2seq(input_ids, attention_mask, o);
  const Batch b = validate(*impl_->model, input_ids, attention_mask);
  const auto& decoder = static_cast<const Decoder&>(*impl_->model);
  const kernels::Backend& backend = decoder.backend();
  const std::shared_ptr<ThreadPool> pool = impl_->current_pool();
  const ExecContext ctx = backend.context(*pool);
  auto logits_of = [&](const Tensor& t) { return host_logits(backend, ctx, t); };
  if (o.max_new_tokens == 0) return std::vector<std::vector<int64_t>>(static_cast<size_t>(b.B));
  // (b.T + max_new_tokens could overflow: max_new_tokens is the caller's.)
  const int64_t capacity = b.T + std::min(o.max_new_tokens, max_positions() - b.T);
  check_call_memory(*impl_->model, {impl_->max_memory, impl_->weight_bytes, impl_->current_pool()->size()},
                    "generate", b.B, b.T, 0, capacity, false);
  KVCache cache = decoder.new_cache(b.B, capacity);
  // The last token is never fed back: a full cache still allows one more.
  const int64_t limit = std::min(o.max_new_tokens, capacity - b.T + 1);
  Tensor logits = logits_of(decoder.step(ctx, b.ids, b.mask.data(), b.B, b.T, cache, false));
  return token_loop(b.B, V, o, limit, std::move(logits), [](int64_t) { return int64_t{-1}; },
                    [&](const int64_t* next, const uint8_t* mask) {
                      return logits_of(decoder.step(ctx, next, mask, b.B, 1, cache, false));
                    });
}

std::vector<std::vector<int64_t>> Engine::generate_seq2seq(const Tensor& input_ids, const Tensor* attention_mask,
                                                           const GenerationOptions& o) const {
  const Batch b = validate(*impl_->model, input_ids, attention_mask);
  const auto& model = static_cast<const Seq2Seq&>(*impl_->model);
  const kernels::Backend& backend = model.backend();
  const std::shared_ptr<ThreadPool> pool = impl_->current_pool();
  const ExecContext ctx = backend.context(*pool);
  auto logits_of = [&](const Tensor& t) { return host_logits(backend, ctx, t); };
  const int64_t V = vocab_size();
  if (o.max_new_tokens == 0) return std::vector<std::vector<int64_t>>(static_cast<size_t>(b.B));
  // The decoder holds the start token plus the new tokens but the last (never fed back).
  const int64_t limit = std::min<int64_t>(o.max_new_tokens, max_positions());  // new tokens this call can make
  check_call_memory(*impl_->model, {impl_->max_memory, impl_->weight_bytes, impl_->current_pool()->size()},
                    "generate", b.B, b.T, 1, limit, false);
  Seq2SeqCache cache = model.start(ctx, b.ids, b.mask.data(), b.B, b.T, limit);
  const int64_t start = o.decoder_start_token_id >= 0 ? o.decoder_start_token_id : model.config().decoder_start_token_id;
  const std::vector<int64_t> starts(static_cast<size_t>(b.B), start);
  const std::vector<uint8_t> all(static_cast<size_t>(b.B), 1);
  Tensor logits = logits_of(model.step(ctx, starts.data(), all.data(), b.B, 1, cache, false));
  // transformers applies ForcedBOS, then ForcedEOS: when both fall on one token, EOS wins.
  auto forced = [&](int64_t n) {
    return n + 1 == limit && o.forced_eos_token_id >= 0 ? o.forced_eos_token_id
           : n == 0 && o.forced_bos_token_id >= 0       ? o.forced_bos_token_id
                                                        : int64_t{-1};
  };
  return token_loop(b.B, V, o, limit, std::move(logits), forced, [&](const int64_t* next, const uint8_t* mask) {
    return logits_of(model.step(ctx, next, mask, b.B, 1, cache, false));
  });
}

const std::string& Engine::architecture() const { return impl_->model->config().architecture; }
bool Engine::is_decoder() const { return impl_->model->is_decoder(); }
bool Engine::is_seq2seq() const { return impl_->model->is_seq2seq(); }
int64_t Engine::vocab_size() const { return impl_->model->config().vocab_size; }
int64_t Engine::hidden_size() const { return impl_->model->config().hidden_size; }
int64_t Engine::num_layers() const {
  const ModelConfig& c = impl_->model->config();
  return c.num_layers + c.decoder_layers;
}
int64_t Engine::max_positions() const { return impl_->model->config().max_positions; }
const std::string& Engine::scheme() const { return impl_->file.scheme; }
Device Engine::device() const { return impl_->device; }
std::string Engine::backend_name() const { return impl_->model->backend().name(); }
int Engine::threads() const { return impl_->threads; }
int64_t Engine::max_memory() const { return impl_->max_memory; }
int64_t Engine::weight_memory() const { return static_cast<int64_t>(impl_->weight_bytes); }
std::string Engine::strategy_summary() const { return impl_->strategy ? impl_->strategy->describe() : std::string(); }
const std::string& Engine::strategy_note() const { return impl_->strategy_note; }
int64_t Engine::strategy_memory() const { return impl_->strategy ? impl_->strategy->alternative_bytes : 0; }
int64_t Engine::call_memory(int64_t batch, int64_t tokens, int64_t max_new_tokens) const {
  FQ_CHECK_ARG(batch > 0 && tokens > 0 && max_new_tokens >= 0,
               "call_memory needs batch > 0, tokens > 0 and max_new_tokens >= 0");
  const ModelConfig& c = impl_->model->config();
  const int threads = impl_->current_pool()->size();
  CallMemory m;
  if (max_new_tokens == 0)  // forward
    m = estimate_call_memory(c, batch, tokens, 0, 0, is_decoder(), threads);
  else if (is_seq2seq())  // as generate_seq2seq
    m = estimate_call_memory(c, batch, tokens, 1, std::min(max_new_tokens, c.max_positions), false, threads);
  else  // as generate: the cache holds the prompt and the new tokens, up to max_positions
    m = estimate_call_memory(c, batch, tokens, 0, std::min(tokens + std::min(max_new_tokens, c.max_positions), c.max_positions),
                             false, threads);
  return static_cast<int64_t>(std::min(m.total(), 9.2e18));
}
void Engine::set_threads(int threads) {
  FQ_CHECK_ARG(threads >= 0, "threads must be >= 0");
  impl_->threads = threads;
  std::atomic_store(&impl_->pool, make_pool(threads));
}

}  // namespace finequant
