#include "kernels/backend.h"

#include "finequant/error.h"

namespace finequant {
namespace kernels {

const Backend& cpu_backend();                 // kernels/cpu/backend_cpu.cc
#ifdef FINEQUANT_WITH_CUDA
const Backend& cuda_backend(int device_index);  // cuda/src/backend_cuda.cc
#endif

const Backend& backend_for(Device device) {
  if (device.is_cpu()) return cpu_backend();
#ifdef FINEQUANT_WITH_CUDA
  return cuda_backend(device.index);
#else
  fail(ErrorKind::Unsupported, "device " + device.str() +
                                   ": this build of finequant has no CUDA backend (nvcc or the CUTLASS headers were "
                                   "not found when it was built)");
#endif
}

LinearWeights LinearWeights::dequantized() const {
  LinearWeights f = *this;
  f.weight_f32 = dequantize(weight);
  f.weight = QuantizedTensor();
  f.act = QuantSpec{0, true};
  return f;
}

}  // namespace kernels
}  // namespace finequant
