// Python binding of finequant::Scheduler as finequant._core._Scheduler (finequant/serve.py drives it
// from one thread: step() and wait_for_work() release the GIL; events come back through poll()).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "finequant/scheduler.h"

namespace py = pybind11;
using finequant::Engine;
using finequant::Scheduler;

void bind_scheduler(py::module_& m) {
  py::class_<Scheduler>(m, "_Scheduler", "Continuous batching over one shared KV cache (see finequant.serve).")
      .def(py::init([](const Engine& engine, int64_t slots, int64_t max_length, int64_t cache_length) {
             finequant::SchedulerOptions o;
             o.slots = slots;
             o.max_length = max_length;
             o.cache_length = cache_length;
             return std::make_unique<Scheduler>(engine, o);
           }),
           py::arg("engine"), py::arg("slots") = 8, py::arg("max_length") = 0, py::arg("cache_length") = 0,
           py::keep_alive<1, 2>(), "A scheduler over a decoder _Engine (kept alive as long as the scheduler).")
      .def(
          "submit",
          [](Scheduler& s, std::vector<int64_t> prompt, int64_t max_new_tokens, float temperature, int64_t top_k,
             float top_p, uint64_t seed, std::vector<int64_t> stop_tokens) {
            finequant::GenerationOptions o;
            o.max_new_tokens = max_new_tokens;
            o.temperature = temperature;
            o.top_k = top_k;
            o.top_p = top_p;
            o.seed = seed;
            o.stop_tokens = std::move(stop_tokens);
            return s.submit(std::move(prompt), std::move(o));
          },
          py::arg("prompt"), py::arg("max_new_tokens") = 32, py::arg("temperature") = 0.f, py::arg("top_k") = 0,
          py::arg("top_p") = 1.f, py::arg("seed") = 0, py::arg("stop_tokens") = std::vector<int64_t>{},
          "Queue a request (prompt token ids) -> its id; ValueError for a bad one.")
      .def("cancel", &Scheduler::cancel, py::arg("request"), "Cancel a waiting or running request -> whether it was one.")
      .def("step", &Scheduler::step, py::call_guard<py::gil_scoped_release>(),
           "Admit waiting requests and run one decode step -> whether there was work.")
      .def(
          "poll",
          [](Scheduler& s) {
            py::list out;
            for (const finequant::TokenEvent& e : s.poll())
              out.append(py::make_tuple(e.request, e.token, finequant::finish_reason_name(e.finish), e.error));
            return out;
          },
          "Events since the last call: (request, token or -1, finish reason ('' while running, 'stop', 'length', "
          "'cancelled', 'error'), error message).")
      .def("wait_for_work", &Scheduler::wait_for_work, py::arg("seconds"), py::call_guard<py::gil_scoped_release>(),
           "Wait until a request is waiting or running (True) or `seconds` pass (False).")
      .def("run_until_idle", &Scheduler::run_until_idle, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("slots", &Scheduler::slots)
      .def_property_readonly("max_length", &Scheduler::max_length)
      .def_property_readonly("cache_length", &Scheduler::cache_length)
      .def_property_readonly("running", &Scheduler::running)
      .def_property_readonly("waiting", &Scheduler::waiting)
      .def_property_readonly("compactions", &Scheduler::compactions);
}
