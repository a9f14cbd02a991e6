// libFuzzer target: config.json as the engine reads it. Input: the architecture on the first line,
// the JSON text after it. A config that parses must describe a model the engine can size: positive
// dimensions, heads that divide as the attention assumes; its memory estimate for a small call must
// be computable (docs/DESIGN.md, Reliability). Anything else than success or finequant::Error is a finding.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "engine/memory.h"
#include "finequant/error.h"
#include "models/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t newline = input.find('\n');
  const std::string architecture = input.substr(0, newline == std::string::npos ? 0 : newline);
  const std::string json = newline == std::string::npos ? input : input.substr(newline + 1);
  try {
    const finequant::ModelConfig c = finequant::ModelConfig::parse(architecture, json);
    const bool ok = c.vocab_size > 0 && c.hidden_size > 0 && c.num_layers > 0 && c.num_heads > 0 &&
                    c.num_kv_heads > 0 && c.head_dim > 0 && c.intermediate_size > 0 && c.max_positions > 0 &&
                    c.num_heads % c.num_kv_heads == 0 &&
                    static_cast<int64_t>(c.layer_window.size()) <= c.num_layers &&
                    (!c.is_seq2seq() || (c.decoder_heads > 0 && c.hidden_size % c.decoder_heads == 0));
    if (!ok) std::abort();
    const double bytes = finequant::estimate_call_memory(c, 2, 3, 0, 8, false, 2).total();
    if (!(bytes > 0) || std::isnan(bytes)) std::abort();
  } catch (const finequant::Error&) {
  }
  return 0;
}
