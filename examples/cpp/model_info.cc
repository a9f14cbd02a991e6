// Opens a finequant model file through the installed C++ API and prints what it holds.
#include <finequant/model_file.h>
#include <finequant/runtime.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s MODEL_DIR/model.safetensors\n", argv[0]);
    return 2;
  }
  try {
    auto model = finequant::ModelFile::open(argv[1]);
    int quantized = 0;
    for (const auto& entry : model.linears) quantized += entry.second.weight_bits != 0;
    std::printf("finequant %s, CUDA devices: %d\n", finequant::version().c_str(), finequant::cuda_device_count());
    std::printf("architecture: %s\nscheme: %s\ntensors: %zu\nquantized linears: %d of %zu\n",
                model.architecture.c_str(), model.scheme.c_str(), model.file.tensors().size(), quantized,
                model.linears.size());
  } catch (const finequant::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
