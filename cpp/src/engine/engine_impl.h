// Engine's state, shared with the Scheduler (which runs the Engine's decoder on its own KV cache).
#pragma once
#include <memory>

#include "core/thread_pool.h"
#include "finequant/engine.h"
#include "finequant/model_file.h"
#include "layers/strategy.h"
#include "models/model.h"

namespace finequant {

struct Engine::Impl {
  ModelFile file;  // keeps the mapping alive: weights may borrow it
  std::unique_ptr<Model> model;
  int threads = 0;  // as asked (0: default_threads())
  Device device;
  // This Engine's CPU threads (docs/DESIGN.md section 5.5); replaced whole by set_threads, so a
  // call that already holds the old pool finishes on it.
  std::shared_ptr<ThreadPool> pool;

  int64_t max_memory = 0;    // EngineOptions::max_memory
  double weight_bytes = 0;   // estimate_weight_memory of the file (engine/memory.h)
  std::unique_ptr<StrategyTable> strategy;  // in use, or null (docs/DESIGN.md section 12)
  std::string strategy_note;                // why a table was ignored

  std::shared_ptr<ThreadPool> current_pool() const { return std::atomic_load(&pool); }
};

// Logits of one step, on the host for sampling (waits for the device's work).
Tensor host_logits(const kernels::Backend& backend, const ExecContext& ctx, const Tensor& t);

}  // namespace finequant
