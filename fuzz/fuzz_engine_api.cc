// libFuzzer target: the C++ API's input checks on a tiny W8A8 Llama (cpp/tests/tiny_model.h), as a
// tokenizer or a network request would drive them: forward / generate / forward_seq2seq with fuzzed
// dtypes, ranks, shapes (past max_positions too), ids, masks and generation options (huge
// max_new_tokens, NaN temperatures, odd top_k / top_p, stop and forced tokens). A call either
// throws finequant::Error or returns outputs of the documented shape and range; anything else
// (a crash, another exception, a sanitizer report, a hang) is a finding.
#include <fuzzer/FuzzedDataProvider.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "finequant/engine.h"
#include "tiny_model.h"

using namespace finequant;

namespace {

fqtest::TinyLlama kModel = [] {
  fqtest::TinyLlama m;
  m.vocab = 29;
  m.hidden = 16;
  m.inter = 16;
  m.layers = 1;
  m.heads = 2;
  m.kv_heads = 1;
  m.max_positions = 12;
  m.int8 = true;
  return m;
}();

const Engine& engine() {
  static const std::unique_ptr<Engine> e = [] {
    const std::string path = "/tmp/fq_fuzz_engine_api_" + std::to_string(getpid()) + ".safetensors";
    fqtest::write_tiny_llama(path, kModel);
    EngineOptions o;
    o.threads = 1;
    o.max_memory = 256 << 20;  // calls past it must be refused, not attempted
    auto eng = Engine::load(path, o);
    ::unlink(path.c_str());
    return eng;
  }();
  return *e;
}

void require(bool ok) {
  if (!ok) std::abort();
}

// A tensor of a fuzzed dtype and rank (mostly I64 [B, T]); values in range or anything.
Tensor make_tensor(FuzzedDataProvider& in, bool mask_values) {
  static const DType kDtypes[] = {DType::I64, DType::I64, DType::I64, DType::I64, DType::I32, DType::F32, DType::U8};
  const DType dtype = kDtypes[in.ConsumeIntegralInRange<size_t>(0, 6)];
  const int rank = in.ConsumeBool() ? 2 : in.ConsumeIntegralInRange<int>(0, 3);
  Shape shape;
  for (int d = 0; d < rank; ++d) shape.push_back(in.ConsumeIntegralInRange<int64_t>(0, d == 0 ? 4 : kModel.max_positions + 3));
  Tensor t = Tensor::zeros(dtype, shape);
  if (dtype != DType::I64) return t;
  const bool wild = in.ConsumeIntegralInRange<int>(0, 7) == 0;
  for (int64_t i = 0; i < t.numel(); ++i)
    t.data<int64_t>()[i] = wild ? in.ConsumeIntegral<int64_t>()
                           : mask_values ? static_cast<int64_t>(in.ConsumeIntegralInRange<int>(0, 9) != 0)
                                         : in.ConsumeIntegralInRange<int64_t>(0, kModel.vocab - 1);
  return t;
}

float fuzz_float(FuzzedDataProvider& in, float usual) {
  switch (in.ConsumeIntegralInRange<int>(0, 5)) {
    case 0: return std::numeric_limits<float>::quiet_NaN();
    case 1: return std::numeric_limits<float>::infinity();
    case 2: return in.ConsumeFloatingPoint<float>();
    case 3: return in.ConsumeFloatingPointInRange<float>(0.f, 2.f);
    default: return usual;
  }
}

int64_t fuzz_id(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: return in.ConsumeIntegral<int64_t>();
    case 1: return in.ConsumeIntegralInRange<int64_t>(0, kModel.vocab - 1);
    default: return -1;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const Engine& e = engine();
  const int op = in.ConsumeIntegralInRange<int>(0, 3);
  const Tensor ids = make_tensor(in, false);
  Tensor mask;
  if (in.ConsumeBool()) mask = make_tensor(in, true);
  const Tensor* mask_ptr = mask.defined() && in.ConsumeIntegralInRange<int>(0, 7) != 0 ? &mask : nullptr;
  try {
    if (op == 0) {
      const Tensor out = e.forward(ids, mask_ptr);
      require(out.dtype() == DType::F32 && out.ndim() == 3 && out.dim(0) == ids.dim(0) && out.dim(1) == ids.dim(1) &&
              out.dim(2) == kModel.vocab);
      for (int64_t i = 0; i < out.numel(); ++i) require(std::isfinite(out.data<float>()[i]));
    } else if (op == 3) {
      const Tensor dec = make_tensor(in, false);
      e.forward_seq2seq(ids, mask_ptr, dec, nullptr);
      require(false);  // a decoder-only model must refuse it
    } else {
      GenerationOptions o;
      o.max_new_tokens = in.ConsumeBool() ? in.ConsumeIntegralInRange<int64_t>(0, 16) : in.ConsumeIntegral<int64_t>();
      o.temperature = fuzz_float(in, 0.f);
      o.top_k = in.ConsumeBool() ? in.ConsumeIntegralInRange<int64_t>(0, 40) : in.ConsumeIntegral<int64_t>();
      o.top_p = fuzz_float(in, 1.f);
      o.seed = in.ConsumeIntegral<uint64_t>();
      const int stops = in.ConsumeIntegralInRange<int>(0, 3);
      for (int i = 0; i < stops; ++i) o.stop_tokens.push_back(fuzz_id(in));
      if (in.ConsumeBool()) {
        o.decoder_start_token_id = fuzz_id(in);
        o.forced_bos_token_id = fuzz_id(in);
        o.forced_eos_token_id = fuzz_id(in);
      }
      int64_t streamed = 0;
      if (in.ConsumeBool()) o.on_token = [&](int64_t, int64_t) { ++streamed; };
      const auto rows = e.generate(ids, mask_ptr, o);
      require(static_cast<int64_t>(rows.size()) == ids.dim(0));
      int64_t total = 0;
      for (const auto& r : rows) {
        require(static_cast<int64_t>(r.size()) <= o.max_new_tokens);
        require(static_cast<int64_t>(r.size()) <= kModel.max_positions);
        for (int64_t t : r) require(t >= 0 && t < kModel.vocab);
        total += static_cast<int64_t>(r.size());
      }
      require(!o.on_token || streamed == total);
    }
  } catch (const Error&) {
  }
  return 0;
}
