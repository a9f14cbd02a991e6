// Python binding of finequant::Engine as finequant._core._Engine (NumPy in, NumPy out).
// finequant::Error is translated to Python exceptions by the module's translator (bindings.cc).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "finequant/engine.h"

namespace py = pybind11;
using finequant::DType;
using finequant::Engine;
using finequant::Tensor;

namespace {

// An integer NumPy array of any int kind as a C-contiguous int64 [B, T] array.
py::array_t<int64_t> as_int64_2d(const py::array& a, const char* what) {
  const char kind = a.dtype().kind();
  FQ_CHECK_ARG(kind == 'i' || kind == 'u' || (kind == 'b' && std::string(what).find("attention_mask") != std::string::npos),
               std::string(what) + " must be an integer array, got dtype " + std::string(py::str(a.dtype())));
  FQ_CHECK_ARG(a.ndim() == 2, std::string(what) + " must be 2-D [batch, tokens], got " + std::to_string(a.ndim()) + "-D");
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

// The engine only reads inputs, so read-only arrays are fine (hence the const_cast).
Tensor borrow_i64(const py::array_t<int64_t>& a) {
  return Tensor::borrow(const_cast<int64_t*>(a.data()), DType::I64, {a.shape(0), a.shape(1)});
}

// input_ids and attention_mask as int64 arrays (kept alive here) and the tensors borrowing them.
struct Inputs {
  py::array_t<int64_t> ids_array, mask_array;
  Tensor ids, mask;
  const Tensor* mask_or_null() const { return mask.defined() ? &mask : nullptr; }
};

Inputs read_inputs(const py::array& ids, const std::optional<py::array>& mask, const char* ids_name = "input_ids",
                   const char* mask_name = "attention_mask") {
  Inputs in;
  in.ids_array = as_int64_2d(ids, ids_name);
  in.ids = borrow_i64(in.ids_array);
  if (mask) {
    in.mask_array = as_int64_2d(*mask, mask_name);
    in.mask = borrow_i64(in.mask_array);
  }
  return in;
}

}  // namespace

void bind_scheduler(py::module_& m);  // python/src/scheduler_bindings.cc

// Hands an F32 tensor's storage to NumPy without a copy (also used by bindings.cc).
py::array_t<float> float_tensor_to_numpy(Tensor t) {
  auto* owner = new Tensor(std::move(t));
  py::capsule keep(owner, [](void* p) { delete static_cast<Tensor*>(p); });
  std::vector<py::ssize_t> shape(owner->shape().begin(), owner->shape().end());
  return py::array_t<float>(shape, owner->data<float>(), keep);
}

void bind_engine(py::module_& m) {
  py::class_<Engine>(m, "_Engine", "The C++ inference engine (see finequant.Engine for the Python API).")
      .def_static(
          "load",
          [](const std::string& path, int threads, const std::string& device, const std::string& float_precision,
             int64_t max_memory, const std::string& strategy) {
            finequant::EngineOptions options;
            options.strategy = strategy;
            options.threads = threads;
            options.device = device;
            options.float_precision = float_precision;
            options.max_memory = max_memory;
            py::gil_scoped_release release;
            return Engine::load(path, options);
          },
          py::arg("path"), py::arg("threads") = 0, py::arg("device") = "cpu", py::arg("float_precision") = "fp32",
          py::arg("max_memory") = 0, py::arg("strategy") = "auto")
      .def(
          "forward",
          [](const Engine& e, const py::array& ids, std::optional<py::array> mask) {
            const Inputs in = read_inputs(ids, mask);
            Tensor out;
            {
              py::gil_scoped_release release;
              out = e.forward(in.ids, in.mask_or_null());
            }
            return float_tensor_to_numpy(std::move(out));
          },
          py::arg("input_ids"), py::arg("attention_mask") = py::none(),
          "input_ids int [B, T], attention_mask 0/1 [B, T] or None -> float32 [B, T, hidden or vocab]")
      .def(
          "forward_seq2seq",
          [](const Engine& e, const py::array& ids, std::optional<py::array> mask, const py::array& decoder_ids,
             std::optional<py::array> decoder_mask) {
            const Inputs in = read_inputs(ids, mask);
            const Inputs dec = read_inputs(decoder_ids, decoder_mask, "decoder_input_ids", "decoder_attention_mask");
            Tensor out;
            {
              py::gil_scoped_release release;
              out = e.forward_seq2seq(in.ids, in.mask_or_null(), dec.ids, dec.mask_or_null());
            }
            return float_tensor_to_numpy(std::move(out));
          },
          py::arg("input_ids"), py::arg("attention_mask"), py::arg("decoder_input_ids"),
          py::arg("decoder_attention_mask") = py::none(),
          "Encoder-decoder models: encoder ids/mask [B, T], decoder ids [B, Td] (+ 0/1 mask or None) -> "
          "float32 logits [B, Td, vocab]")
      .def(
          "generate",
          [](const Engine& e, const py::array& ids, std::optional<py::array> mask, int64_t max_new_tokens,
             float temperature, int64_t top_k, float top_p, uint64_t seed, std::vector<int64_t> stop_tokens,
             std::optional<py::function> on_token, int64_t decoder_start_token_id, int64_t forced_bos_token_id,
             int64_t forced_eos_token_id, std::vector<int64_t> suppress_tokens) {
            const Inputs in = read_inputs(ids, mask);
            finequant::GenerationOptions o;
            o.decoder_start_token_id = decoder_start_token_id;
            o.forced_bos_token_id = forced_bos_token_id;
            o.forced_eos_token_id = forced_eos_token_id;
            o.max_new_tokens = max_new_tokens;
            o.temperature = temperature;
            o.top_k = top_k;
            o.top_p = top_p;
            o.seed = seed;
            o.stop_tokens = std::move(stop_tokens);
            o.suppress_tokens = std::move(suppress_tokens);
            if (on_token) {
              // Called from the generation loop with the GIL released: take it for the Python call.
              o.on_token = [fn = *on_token](int64_t row, int64_t token) {
                py::gil_scoped_acquire acquire;
                if (row == 0) fn(token);
              };
            }
            py::gil_scoped_release release;
            return e.generate(in.ids, in.mask_or_null(), o);
          },
          py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("max_new_tokens") = 32,
          py::arg("temperature") = 0.f, py::arg("top_k") = 0, py::arg("top_p") = 1.f, py::arg("seed") = 0,
          py::arg("stop_tokens") = std::vector<int64_t>{}, py::arg("on_token") = py::none(),
          py::arg("decoder_start_token_id") = -1, py::arg("forced_bos_token_id") = -1,
          py::arg("forced_eos_token_id") = -1, py::arg("suppress_tokens") = std::vector<int64_t>{},
          "Greedy (temperature <= 0) or sampled continuation (encoder-decoders: the decoder's output for "
          "the input); returns the new tokens of each row.")
      .def_property_readonly("architecture", &Engine::architecture)
      .def_property_readonly("is_decoder", &Engine::is_decoder)
      .def_property_readonly("is_seq2seq", &Engine::is_seq2seq)
      .def_property_readonly("vocab_size", &Engine::vocab_size)
      .def_property_readonly("hidden_size", &Engine::hidden_size)
      .def_property_readonly("num_layers", &Engine::num_layers)
      .def_property_readonly("max_positions", &Engine::max_positions)
      .def_property_readonly("scheme", &Engine::scheme)
      .def_property_readonly("device", [](const Engine& e) { return e.device().str(); })
      .def_property_readonly("backend", &Engine::backend_name)
      .def_property("threads", &Engine::threads, &Engine::set_threads)
      .def_property_readonly("max_memory", &Engine::max_memory)
      .def_property_readonly("weight_memory", &Engine::weight_memory)
      .def_property_readonly("strategy_summary", &Engine::strategy_summary)
      .def_property_readonly("strategy_note", &Engine::strategy_note)
      .def_property_readonly("strategy_memory", &Engine::strategy_memory)
      .def("call_memory", &Engine::call_memory, py::arg("batch"), py::arg("tokens"), py::arg("max_new_tokens") = 0,
           "Estimated working memory (bytes) of a forward (max_new_tokens 0) or generate call on [batch, tokens]");
  bind_scheduler(m);
}
