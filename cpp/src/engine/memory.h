// The engine's memory bounds (docs/DESIGN.md, Reliability): what a model's weights and one call will
// hold, estimated up front from the file and the config, so a call or a load that cannot fit fails
// with an error naming the limit instead of being killed for memory half-way.
#pragma once
#include <cstdint>
#include <string>

#include "finequant/model_file.h"
#include "models/config.h"

namespace finequant {

// Bytes (as doubles: the products of absurd configs must not overflow) one call holds at its peak.
struct CallMemory {
  double activations = 0;  // one layer's intermediates (buffers are freed layer by layer) and attention scratch
  double kv_cache = 0;     // keys and values of every layer (decoder and seq2seq generate; seq2seq cross K/V)
  double outputs = 0;      // logits or hidden states handed back (and their host copy)
  double total() const { return activations + kv_cache + outputs; }
};

// One call of the model `c` on B rows: an encoder (or the encoder of an encoder-decoder) over T
// tokens; a decoder over T prompt tokens with a KV cache of `cache_positions` slots (0: no cache,
// forward); an encoder-decoder's decoder over `decoder_T` tokens with `cache_positions` self-attention
// slots. `all_logits`: logits for every decoder token (forward) rather than one row per step.
CallMemory estimate_call_memory(const ModelConfig& c, int64_t B, int64_t T, int64_t decoder_T, int64_t cache_positions,
                                bool all_logits, int threads);

// The bytes the loaded weights occupy: floating-point tensors as fp32 (the kernels' copies), 8-bit
// codes once, packed 4-bit codes unpacked to one byte each; an upper bound, never less.
double estimate_weight_memory(const ModelFile& file);

// The memory a load or call may use: `max_memory` when > 0, else the physical memory available now
// (MemAvailable of /proc/meminfo; sysconf's free pages where that is missing).
int64_t memory_limit(int64_t max_memory);

// Throws Error(ResourceLimit) when `needed` exceeds `limit`: "<what> needs about X GiB (<detail>),
// more than <limit description>".
void check_memory(const std::string& what, double needed, const std::string& detail, int64_t limit,
                  int64_t max_memory);

std::string format_bytes(double bytes);  // "1.5 GiB", "12.0 MiB", "512 B"

}  // namespace finequant
