// finequant._core: the C++ core exposed to Python with NumPy arrays. Inputs are validated here
// (dtype, ndim) instead of silently cast, so a float64 array is a ValueError, not a hidden copy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstring>
#include <string>

#include "finequant/error.h"
#include "finequant/model_file.h"
#include "finequant/quant.h"
#include "finequant/runtime.h"
#include "finequant/tensor.h"
#include "core/context.h"
#include "kernels/cpu/cpu_isa.h"
#include "kernels/cpu/gemm.h"
#include "layers/linear.h"
#include "models/config.h"

namespace py = pybind11;
using namespace finequant;

namespace {

// NumPy dtype for a finequant dtype; BF16 has no NumPy type, so it travels as raw uint16.
py::dtype numpy_dtype(DType dt) {
  switch (dt) {
    case DType::F32: return py::dtype::of<float>();
    case DType::F16: return py::dtype("float16");
    case DType::BF16: return py::dtype::of<uint16_t>();
    case DType::I8: return py::dtype::of<int8_t>();
    case DType::U8: return py::dtype::of<uint8_t>();
    case DType::I32: return py::dtype::of<int32_t>();
    case DType::I64: return py::dtype::of<int64_t>();
  }
  throw Error(ErrorKind::Runtime, "unknown dtype");
}

// Copies a tensor into a new NumPy array (never aliases a model file mapping).
py::array to_numpy(const Tensor& t) {
  py::array out(numpy_dtype(t.dtype()), std::vector<py::ssize_t>(t.shape().begin(), t.shape().end()));
  if (t.nbytes()) std::memcpy(out.mutable_data(), t.raw(), t.nbytes());
  return out;
}

struct Borrowed {
  py::array array;  // C-contiguous; keeps the memory alive while `tensor` is used
  Tensor tensor;
};

// Borrows a NumPy array as a Tensor of one of `allowed` dtypes and `ndim` dimensions (-1: any >= 1).
Borrowed from_numpy(const py::array& a, const char* what, std::initializer_list<DType> allowed, int ndim) {
  const py::dtype dt = a.dtype();
  DType found;
  bool known = true;
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  if (kind == 'f' && size == 4) found = DType::F32;
  else if (kind == 'f' && size == 2) found = DType::F16;
  else if (kind == 'i' && size == 1) found = DType::I8;
  else if (kind == 'u' && size == 1) found = DType::U8;
  else if (kind == 'i' && size == 4) found = DType::I32;
  else if (kind == 'i' && size == 8) found = DType::I64;
  else known = false;
  bool ok = known && dt.byteorder() != '>';
  if (ok) {
    ok = false;
    for (DType d : allowed) ok = ok || d == found;
  }
  if (!ok) {
    std::string names;
    for (DType d : allowed) names += std::string(names.empty() ? "" : " or ") + py::str(numpy_dtype(d)).cast<std::string>();
    throw py::value_error(std::string(what) + " must be a " + names + " array, got " + py::str(dt).cast<std::string>());
  }
  if (ndim >= 0 ? a.ndim() != ndim : a.ndim() < 1)
    throw py::value_error(std::string(what) + " must have " + (ndim >= 0 ? std::to_string(ndim) : ">= 1") +
                          " dimensions, got " + std::to_string(a.ndim()));
  Borrowed b;
  b.array = py::array::ensure(a, py::array::c_style);
  if (!b.array) throw py::error_already_set();
  Shape shape(b.array.shape(), b.array.shape() + b.array.ndim());
  // A zero-size array may have a null data pointer; Tensor::borrow needs a real address.
  alignas(64) static char dummy[64];
  void* p = b.array.nbytes() ? const_cast<void*>(b.array.data()) : dummy;
  b.tensor = Tensor::borrow(p, found, std::move(shape));
  return b;
}

// A Linear with the device it runs on (the Python Linear).
struct PyLinear {
  Linear linear;
  Device device;
};

py::tuple quantized_to_python(const QuantizedTensor& qt) {
  py::object zp = qt.zero_point.defined() ? py::object(to_numpy(qt.zero_point)) : py::object(py::none());
  return py::make_tuple(to_numpy(qt.q), to_numpy(qt.scale), zp);
}

py::dict metadata_dict(const SafetensorsFile& f) {
  py::dict d;
  for (const auto& [k, v] : f.metadata()) d[py::str(k)] = py::str(v);
  return d;
}

}  // namespace

void bind_engine(py::module_& m);                       // python/src/engine_bindings.cc
py::array_t<float> float_tensor_to_numpy(Tensor t);  // python/src/engine_bindings.cc

PYBIND11_MODULE(_core, m) {
  m.doc() = "finequant C++ core: reference quantization, model file reader, runtime info";

  // ---- exceptions: finequant::Error kinds -> Python exceptions ----------------------------------
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> model_file_error;
  model_file_error.call_once_and_store_result([&]() {
    return py::object(py::exception<Error>(m, "ModelFileError", PyExc_ValueError));
  });
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      switch (e.kind()) {
        case ErrorKind::InvalidArgument: PyErr_SetString(PyExc_ValueError, e.what()); return;
        case ErrorKind::ModelFormat: PyErr_SetString(model_file_error.get_stored().ptr(), e.what()); return;
        case ErrorKind::Unsupported: PyErr_SetString(PyExc_NotImplementedError, e.what()); return;
        case ErrorKind::ResourceLimit: PyErr_SetString(PyExc_MemoryError, e.what()); return;
        case ErrorKind::Runtime: PyErr_SetString(PyExc_RuntimeError, e.what()); return;
      }
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  // ---- reference quantization (the math contract) -----------------------------------------------
  m.def(
      "quantize",
      [](const py::array& x, int bits, bool symmetric, int64_t tile_rows, int64_t tile_cols) {
        Borrowed bx = from_numpy(x, "x", {DType::F32}, 2);
        QuantizedTensor qt;
        {
          py::gil_scoped_release nogil;
          qt = quantize(bx.tensor, QuantSpec{bits, symmetric}, Tile{tile_rows, tile_cols});
        }
        return quantized_to_python(qt);
      },
      py::arg("x"), py::arg("bits"), py::arg("symmetric"), py::arg("tile_rows"), py::arg("tile_cols"),
      "Quantize a float32 [R, C] array in tiles of tile_rows x tile_cols -> (q, scale, zero_point or None).");

  m.def(
      "quantize_rows",
      [](const py::array& x, int bits, bool symmetric) {
        Borrowed bx = from_numpy(x, "x", {DType::F32}, 2);
        QuantizedTensor qt;
        {
          py::gil_scoped_release nogil;
          qt = quantize_rows(bx.tensor, QuantSpec{bits, symmetric});
        }
        return quantized_to_python(qt);
      },
      py::arg("x"), py::arg("bits"), py::arg("symmetric"),
      "Token-wise quantization: one scale (and zero point) per row -> (q, scale, zero_point or None).");

  m.def(
      "dequantize",
      [](const py::array& q, const py::array& scale, const py::object& zero_point, int bits, bool symmetric,
         int64_t tile_rows, int64_t tile_cols) {
        QuantizedTensor qt;
        qt.spec = QuantSpec{bits, symmetric};
        qt.tile = Tile{tile_rows, tile_cols};
        Borrowed bq = from_numpy(q, "q", {symmetric ? DType::I8 : DType::U8}, 2);
        Borrowed bs = from_numpy(scale, "scale", {DType::F32}, 2);
        Borrowed bz;
        if (!zero_point.is_none()) {
          if (symmetric) throw py::value_error("zero_point must be None for symmetric quantization");
          bz = from_numpy(py::array(zero_point), "zero_point", {DType::U8}, 2);
        } else if (!symmetric) {
          throw py::value_error("asymmetric dequantize needs a zero_point");
        }
        qt.q = bq.tensor;
        qt.scale = bs.tensor;
        qt.zero_point = bz.tensor;
        Tensor out;
        {
          py::gil_scoped_release nogil;
          out = dequantize(qt);
        }
        return to_numpy(out);
      },
      py::arg("q"), py::arg("scale"), py::arg("zero_point"), py::arg("bits"), py::arg("symmetric"),
      py::arg("tile_rows"), py::arg("tile_cols"), "s * (q - z) as float32.");

  m.def(
      "pack_int4",
      [](const py::array& q) { return to_numpy(pack_int4(from_numpy(q, "q", {DType::I8, DType::U8}, -1).tensor)); },
      py::arg("q"), "Pack int8 in [-8, 7] or uint8 in [0, 15] along the last axis: element 2i low nibble.");
  m.def(
      "unpack_int4",
      [](const py::array& packed, bool is_signed) {
        return to_numpy(unpack_int4(from_numpy(packed, "packed", {DType::U8}, -1).tensor, is_signed));
      },
      py::arg("packed"), py::arg("is_signed"), "Inverse of pack_int4 -> int8 (is_signed) or uint8.");

  // ---- model files --------------------------------------------------------------------------------
  m.def(
      "read_safetensors",
      [](const std::string& path) {
        SafetensorsFile f;
        {
          py::gil_scoped_release nogil;
          f = SafetensorsFile::open(path);
        }
        py::dict tensors;
        for (const auto& [name, t] : f.tensors()) tensors[py::str(name)] = to_numpy(t);
        return py::make_tuple(metadata_dict(f), tensors);
      },
      py::arg("path"),
      "Validate and read a safetensors file -> (metadata, {name: array}); arrays are copies, BF16 as uint16.");

  m.def(
      "check_config",
      [](const std::string& architecture, const std::string& config_json) {
        ModelConfig::parse(architecture, config_json);
      },
      py::arg("architecture"), py::arg("config_json"),
      "Check a config.json (as text) the way the engine reads it at load: NotImplementedError names a "
      "setting the engine does not implement, ModelFileError a missing or malformed field.");

  m.def(
      "open_model_file",
      [](const std::string& path) {
        ModelFile mf;
        {
          py::gil_scoped_release nogil;
          mf = ModelFile::open(path);
        }
        py::dict linears;
        for (const auto& [name, r] : mf.linears) {
          py::object tile = r.weight_bits > 0 ? py::object(py::make_tuple(r.tile_rows, r.tile_cols))
                                              : py::object(py::none());
          linears[py::str(name)] = py::dict(py::arg("part") = r.part, py::arg("weight_bits") = r.weight_bits,
                                            py::arg("weight_symmetric") = r.weight_symmetric, py::arg("tile") = tile,
                                            py::arg("act_bits") = r.act_bits,
                                            py::arg("act_symmetric") = r.act_symmetric,
                                            py::arg("rotation") = r.rotation);
        }
        py::list names;
        for (const auto& kv : mf.file.tensors()) names.append(py::str(kv.first));
        return py::dict(py::arg("architecture") = mf.architecture, py::arg("config") = mf.config_json,
                        py::arg("scheme") = mf.scheme, py::arg("metadata") = metadata_dict(mf.file),
                        py::arg("linears") = linears, py::arg("tensor_names") = names);
      },
      py::arg("path"), "Validate a finequant model file and describe it (no tensor data is copied).");

  // ---- kernels: one Linear as the engine runs it (tests and bench/) ------------------------------
  py::class_<PyLinear>(m, "Linear", "One linear layer y = act(x W^T + b) exactly as the engine runs it.")
      .def(py::init([](const py::array& weight, int weight_bits, bool weight_symmetric, int64_t tile_rows,
                       int64_t tile_cols, int act_bits, bool act_symmetric, py::object bias, const std::string& activation,
                       const std::string& device, int64_t rotation, const std::string& precision) {
             const Borrowed w = from_numpy(weight, "weight", {DType::F32}, 2);
             kernels::LinearWeights lw;
             if (!bias.is_none()) {
               const Borrowed bb = from_numpy(bias.cast<py::array>(), "bias", {DType::F32}, 1);
               if (bb.tensor.numel() != w.tensor.dim(0))
                 throw py::value_error("bias has " + std::to_string(bb.tensor.numel()) + " values, the weight " +
                                       std::to_string(w.tensor.dim(0)) + " rows");
               lw.bias = bb.tensor.clone();
             }
             if (activation == "none") lw.epilogue = kernels::Epilogue::None;
             else if (activation == "gelu") lw.epilogue = kernels::Epilogue::GeluErf;
             else if (activation == "gelu_tanh") lw.epilogue = kernels::Epilogue::GeluTanh;
             else throw py::value_error("activation must be 'none', 'gelu' or 'gelu_tanh', got '" + activation + "'");
             if (act_bits != 0 && act_bits != 4 && act_bits != 8)
               throw py::value_error("act_bits must be 0, 4 or 8, got " + std::to_string(act_bits));
             if (weight_bits == 0) {
               lw.weight_f32 = w.tensor.clone();
             } else {
               lw.weight = quantize(w.tensor, QuantSpec{weight_bits, weight_symmetric},
                                    Tile{tile_rows, tile_cols > 0 ? tile_cols : w.tensor.dim(1)});
               lw.act = QuantSpec{act_bits, act_symmetric};
             }
             lw.rotation = rotation;  // Linear::create checks it
             if (precision != "fp32" && precision != "bf16")
               throw py::value_error("precision must be 'fp32' or 'bf16', got '" + precision + "'");
             lw.precision = precision == "bf16" ? kernels::FloatPrecision::BF16 : kernels::FloatPrecision::F32;
             const Device d = Device::parse(device);
             py::gil_scoped_release nogil;
             return PyLinear{Linear::create(kernels::backend_for(d), lw, ThreadPool::shared(0)), d};
           }),
           py::arg("weight"), py::arg("weight_bits") = 0, py::arg("weight_symmetric") = true, py::arg("tile_rows") = 1,
           py::arg("tile_cols") = 0, py::arg("act_bits") = 0, py::arg("act_symmetric") = true,
           py::arg("bias") = py::none(), py::arg("activation") = "none", py::arg("device") = "cpu",
           py::arg("rotation") = 0, py::arg("precision") = "fp32",
           "weight float32 [N, K], quantized with the math contract when weight_bits is 4 or 8 (tile_cols 0: per "
           "channel); act_bits 0 keeps float inputs (weight-only), 4/8 quantizes the rows token-wise. The kernel is "
           "chosen at construction (CPU: the one the active ISA selects, see set_isa; device 'cuda[:N]': the CUDA "
           "backend's). rotation b > 0: the input rows are rotated by blockdiag(H_b) / sqrt(b) before the GEMM "
           "(the weight given is then W H, see finequant.rotate). precision 'bf16': a floating-point Linear multiplies "
           "bf16 operands (AVX512-BF16 CPUs; elsewhere fp32), as EngineOptions::float_precision.")
      .def(
          "forward",
          [](const PyLinear& l, const py::array& x) {
            const Borrowed xb = from_numpy(x, "x", {DType::F32}, 2);
            Tensor y;
            {
              py::gil_scoped_release nogil;
              const kernels::Backend& backend = kernels::backend_for(l.device);
              const ExecContext ctx = backend.context(ThreadPool::shared(0));
              y = l.linear.forward(ctx, xb.tensor.to(l.device)).to(Device::cpu());
              backend.finish(ctx);
            }
            return float_tensor_to_numpy(std::move(y));
          },
          py::arg("x"), "x float32 [M, K] -> float32 [M, N]")
      .def(
          "time_forward",
          [](const PyLinear& l, const py::array& x, int iterations) {
            if (iterations < 1) throw py::value_error("iterations must be >= 1");
            const Borrowed xb = from_numpy(x, "x", {DType::F32}, 2);
            py::gil_scoped_release nogil;
            const kernels::Backend& backend = kernels::backend_for(l.device);
            const ExecContext ctx = backend.context(ThreadPool::shared(0));
            const Tensor xd = xb.tensor.to(l.device);
            l.linear.forward(ctx, xd);  // warm-up: kernel selection, allocator pools
            backend.finish(ctx);
            const auto start = std::chrono::steady_clock::now();
            for (int i = 0; i < iterations; ++i) l.linear.forward(ctx, xd);
            backend.finish(ctx);
            return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iterations;
          },
          py::arg("x"), py::arg("iterations") = 10,
          "Seconds per forward with x already on the Linear's device (activation quantization and epilogue "
          "included, no host copies): for benchmarks.")
      .def_property_readonly("in_features", [](const PyLinear& l) { return l.linear.in_features(); })
      .def_property_readonly("out_features", [](const PyLinear& l) { return l.linear.out_features(); })
      .def_property_readonly("kernel", [](const PyLinear& l) { return l.linear.kernel(); },
                             "The kernel that runs this Linear, e.g. 'cpu/avx2 int'.");

  m.def(
      "hadamard",
      [](const py::array& x, int64_t block, const std::string& device) {
        const Borrowed xb = from_numpy(x, "x", {DType::F32}, 2);
        if (block < 2 || block > 4096 || (block & (block - 1)) != 0)
          throw py::value_error("block must be a power of two in [2, 4096], got " + std::to_string(block));
        if (xb.tensor.dim(1) % block != 0)
          throw py::value_error("block " + std::to_string(block) + " does not divide the " +
                                std::to_string(xb.tensor.dim(1)) + " columns of x");
        const Device d = Device::parse(device);
        Tensor y;
        {
          py::gil_scoped_release nogil;
          const kernels::Backend& backend = kernels::backend_for(d);
          const ExecContext ctx = backend.context(ThreadPool::shared(0));
          const Tensor xd = xb.tensor.to(d);
          Tensor yd = Tensor::empty(DType::F32, xd.shape(), d);
          backend.hadamard(ctx, xd, yd, block);
          backend.finish(ctx);
          y = yd.to(Device::cpu());
        }
        return float_tensor_to_numpy(std::move(y));
      },
      py::arg("x"), py::arg("block"), py::arg("device") = "cpu",
      "The backend's block-Hadamard rotation x [M, K] float32 -> x blockdiag(H_b) / sqrt(b), as a rotated Linear "
      "runs it (bit-identical to finequant.rotate.hadamard_blocks).");
  m.def(
      "set_isa", [](const std::string& name) { kernels::force_isa(name); }, py::arg("name"),
      "Force the CPU kernels' instruction-set level for Linears built from now on and for attention ('auto' "
      "restores the default; a level the CPU lacks falls back to the next lower one).");
  m.def(
      "strategy_machine", []() { return py::make_tuple(machine_cpu_name(), machine_backend_name()); },
      "(cpu name, CPU backend name): the machine a strategy table from `finequant tune` belongs to.");
  m.def("active_isa", []() { return std::string(kernels::isa_name(kernels::active_isa())); });
  m.def(
      "bf16_available", []() { return kernels::bf16_kernel_eligible(kernels::active_isa()); },
      "Whether Engine(..., float_precision='bf16') multiplies in bf16 on the CPU at the active level (AVX512-BF16); "
      "where not, its floating-point Linears stay fp32.");
  m.def(
      "cpu_isas",
      []() {
        py::list out;
        for (const kernels::IsaInfo& i : kernels::isa_table()) out.append(py::make_tuple(i.name, i.supported()));
        return out;
      },
      "Every CPU instruction-set level, lowest first, as (name, supported by this CPU).");
  m.def(
      "set_threads",
      [](int n) {
        if (n < 0) throw py::value_error("threads must be >= 0");
        set_default_threads(n);
      },
      py::arg("n"),
      "Default CPU threads for work that names no count (Engines made with threads=0 after this, Linear); 0 restores "
      "the default (FINEQUANT_NUM_THREADS, OMP_NUM_THREADS, else the CPUs this process may use).");
  m.def("default_threads", &default_threads, "CPU threads of work that names no count (see set_threads).");
  m.def(
      "dram_read_gbps",
      [](int threads, double megabytes, double seconds) {
        py::gil_scoped_release nogil;
        return kernels::dram_read_gbps(ThreadPool::shared(threads), static_cast<int64_t>(megabytes * 1e6), seconds);
      },
      py::arg("threads") = 1, py::arg("megabytes") = 512.0, py::arg("seconds") = 1.0,
      "The machine's DRAM read bandwidth in GB/s: best sweep of a buffer of `megabytes` on `threads` threads.");
  m.def(
      "int8_peak_gops",
      [](int threads, double seconds, const std::string& unit) {
        if (unit != "vnni" && unit != "amx" && unit != "amx-loads")
          throw py::value_error("unit must be 'vnni', 'amx' or 'amx-loads', got '" + unit + "'");
        py::gil_scoped_release nogil;
        if (unit == "amx-loads") return kernels::amx_tile_loop_gops(threads, seconds);
        return unit == "amx" ? kernels::amx_int8_peak_gops(threads, seconds) : kernels::int8_peak_gops(threads, seconds);
      },
      py::arg("threads") = 1, py::arg("seconds") = 0.5, py::arg("unit") = "vnni",
      "Measured INT8 throughput (GOPS, 2 ops per multiply-add) on register operands: the peak of vpdpbusd "
      "(unit='vnni', AVX512-VNNI) or of tdpbssd (unit='amx'); unit='amx-loads': tdpbssd with its four operand "
      "tiles loaded from L1 every step, the ceiling of a 2 x 2 tile-loop GEMM. 0 where the CPU lacks the unit.");

  // ---- runtime info -------------------------------------------------------------------------------
  m.def("cuda_backend_built", &cuda_backend_built);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("version", &version);

  // ---- engine ---------------------------------------------------------------------------------------
  // The engine bindings (python/src/engine_bindings.cc, `void bind_engine(py::module_& m)`) are
  // registered here once they exist: declare it above and call `bind_engine(m);` at this point.
  bind_engine(m);
}
