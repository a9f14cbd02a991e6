// Runs a finequant model through the installed C++ engine API on token ids from the command line.
//
//   generate MODEL_DIR ID [ID ...]             forward pass: prints the output shape and, per position,
//                                              the argmax (decoders) or the first values (encoders)
//   generate MODEL_DIR --new N ID [ID ...]     decoders: greedy generation of N tokens, ids printed
//                                              space-separated on one line
//
// Errors from the engine (bad file, out-of-range id, ...) are printed as "error: ..." and exit 1.
#include <finequant/engine.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

bool parse_int(const char* text, long long* out) {
  char* end = nullptr;
  *out = std::strtoll(text, &end, 10);
  return end != text && *end == '\0';
}

int usage(const char* prog) {
  std::fprintf(stderr, "usage: %s MODEL_DIR [--new N] TOKEN_ID [TOKEN_ID ...]\n", prog);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage(argv[0]);
  const std::string model_dir = argv[1];
  long long new_tokens = -1;  // < 0: forward only
  int first = 2;
  if (std::strcmp(argv[2], "--new") == 0) {
    if (argc < 5 || !parse_int(argv[3], &new_tokens) || new_tokens < 1) return usage(argv[0]);
    first = 4;
  }
  std::vector<int64_t> ids;
  for (int i = first; i < argc; ++i) {
    long long v;
    if (!parse_int(argv[i], &v)) {
      std::fprintf(stderr, "error: not a token id: %s\n", argv[i]);
      return 1;
    }
    ids.push_back(static_cast<int64_t>(v));
  }
  if (ids.empty()) return usage(argv[0]);

  try {
    auto engine = finequant::Engine::load(model_dir);
    const int64_t n = static_cast<int64_t>(ids.size());
    finequant::Tensor input = finequant::Tensor::empty(finequant::DType::I64, {1, n});
    for (int64_t t = 0; t < n; ++t) input.data<int64_t>()[t] = ids[t];

    if (new_tokens >= 0) {
      if (!engine->is_decoder()) {
        std::fprintf(stderr, "error: %s is an encoder; --new needs a decoder\n", engine->architecture().c_str());
        return 1;
      }
      finequant::GenerationOptions options;
      options.max_new_tokens = new_tokens;  // greedy (temperature 0), no stop tokens
      auto rows = engine->generate(input, nullptr, options);
      for (size_t i = 0; i < rows[0].size(); ++i) std::printf(i ? " %lld" : "%lld", static_cast<long long>(rows[0][i]));
      std::printf("\n");
      return 0;
    }

    finequant::Tensor out = engine->forward(input);
    const int64_t width = out.dim(-1);
    const float* data = out.data<float>();
    std::printf("%s (%s): output %s\n", engine->architecture().c_str(), engine->scheme().c_str(),
                finequant::shape_str(out.shape()).c_str());
    for (int64_t t = 0; t < n; ++t) {
      const float* row = data + t * width;
      if (engine->is_decoder()) {
        int64_t best = 0;
        for (int64_t v = 1; v < width; ++v)
          if (row[v] > row[best]) best = v;
        std::printf("%lld: argmax %lld (logit %.4f)\n", static_cast<long long>(t), static_cast<long long>(best),
                    row[best]);
      } else {
        std::printf("%lld: [", static_cast<long long>(t));
        for (int64_t k = 0; k < width && k < 4; ++k) std::printf(k ? ", %.4f" : "%.4f", row[k]);
        std::printf(", ...]\n");
      }
    }
  } catch (const finequant::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
