#!/usr/bin/env bash
# Everything that needs a GPU, in one command for a freshly lent machine (NVIDIA sm80 or newer):
#   1. build finequant with the CUDA backend for this GPU (C++ tests + the Python module, one build),
#   2. the host checks (layout, epilogue, SASS) and the GPU tests: C++ test_cuda_kernels (every op of
#      the CUDA backend against the CPU backend) and pytest -m gpu (bit-identical Linears, BERT / GPT-2 /
#      Llama on CUDA vs CPU for every scheme),
#   3. a short benchmark (bench/bench_gpu.py --quick: GEMM TOPS, BERT-base, GPT-2 decode vs torch fp16).
# Target: under 8 minutes on a fresh H200 machine. Logs and the benchmark JSON go to $OUT (default
# build/gpu-check). Exit status: 0 when every step passed.
#
# Needs nvcc, cmake, ninja and a python3 with numpy, torch (CUDA), transformers, safetensors, tokenizers,
# pytest, pybind11 and scikit-build-core (the device image has them), and CUTLASS headers, found in this
# order: $CUTLASS_DIR, a populated third_party/cutlass, an installed nvidia-cutlass package, or a wheel
# .whl/nvidia_cutlass-*.whl in the repository (unpacked here; nothing is downloaded).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/build/gpu-check}
BUILD=$ROOT/build/gpu
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT" "$BUILD"
status=0
step() { echo; echo "=== $* ($(date +%T))"; }
record() { if [ "$1" -ne 0 ]; then echo "FAILED: $2"; status=1; fi; }

step "GPU"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader || {
  echo "no NVIDIA GPU visible (nvidia-smi failed)"; exit 2; }
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
echo "compute capability: sm$cap"

step "CUTLASS headers"
if [ -z "${CUTLASS_DIR:-}" ] && [ ! -f third_party/cutlass/include/cutlass/cutlass.h ]; then
  # The pip package of this python, else a carried wheel (CMake would look through the python3 on PATH).
  CUTLASS_DIR=$($PY -c "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source') if s else '')" 2>/dev/null)
  if [ -z "$CUTLASS_DIR" ]; then
    wheel=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
    [ -n "$wheel" ] || { echo "no CUTLASS headers: set CUTLASS_DIR or carry .whl/nvidia_cutlass-4.2.0.0-*.whl"; exit 2; }
    rm -rf "$BUILD/cutlass" && mkdir -p "$BUILD/cutlass" && $PY -m zipfile -e "$wheel" "$BUILD/cutlass" >/dev/null
    CUTLASS_DIR=$BUILD/cutlass/cutlass_library/source
  fi
  export CUTLASS_DIR
fi
echo "CUTLASS_DIR=${CUTLASS_DIR:-third_party/cutlass}"

step "build (SASS for sm$cap, plus the sm90a kernels)"
# SASS for this GPU only: a quick build.
t0=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFINEQUANT_CUDA=ON -DFINEQUANT_BUILD_TESTS=ON \
  -DFINEQUANT_BUILD_PYTHON=ON -DFINEQUANT_CUDA_SASS="$cap" -DFINEQUANT_CUDA_JOBS="$JOBS" \
  -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
  ${CUTLASS_DIR:+-DCUTLASS_DIR=$CUTLASS_DIR} >"$OUT/cmake.log" 2>&1 &&
  cmake --build "$BUILD" -j "$JOBS" >"$OUT/build.log" 2>&1
rc=$?
echo "build: rc $rc, $(( $(date +%s) - t0 )) s (log: $OUT/build.log)"
if [ $rc -ne 0 ]; then tail -40 "$OUT/cmake.log" "$OUT/build.log" 2>/dev/null; exit 1; fi
# The Python package from the source tree with the freshly built module beside it.
SITE=$BUILD/site
rm -rf "$SITE" && mkdir -p "$SITE" && cp -r python/finequant "$SITE/" && cp "$BUILD"/_core*.so "$SITE/finequant/"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step "C++ tests (host checks + GPU kernels)"
(cd "$BUILD" && ctest --output-on-failure -R "test_gpu|test_cuda|test_gemm" 2>&1 | tee "$OUT/ctest.log")
record "${PIPESTATUS[0]}" "ctest"
grep -q "skipped: no CUDA device" "$BUILD/Testing/Temporary/LastTest.log" 2>/dev/null && {
  echo "FAILED: test_cuda_kernels did not see the GPU"; status=1; }

step "Python GPU tests"
$PY -m pytest -q -ra tests/python/test_gpu.py tests/python/test_devices.py tests/python/test_cuda_sass.py \
  2>&1 | tee "$OUT/pytest.log"
record "${PIPESTATUS[0]}" "pytest -m gpu"
grep -qE "SKIPPED .*(no CUDA device|no CUDA backend)" "$OUT/pytest.log" && {
  echo "FAILED: GPU tests skipped on a GPU machine"; status=1; }

step "benchmark (quick)"
timeout 300 $PY bench/bench_gpu.py --quick --repeats 5 --out "$OUT" 2>&1 | tee "$OUT/bench.log"
record "${PIPESTATUS[0]}" "bench_gpu"

step "done: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status
