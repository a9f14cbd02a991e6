# Decide whether to build the CUDA backend. FINEQUANT_CUDA=AUTO builds it when nvcc and CUTLASS
# headers are found; ON makes their absence an error; OFF never builds it.
# CUTLASS is looked for, in order: -DCUTLASS_DIR / $ENV{CUTLASS_DIR}, a populated third_party/cutlass,
# the headers of the PyPI package nvidia-cutlass (found through the Python on PATH, not imported).
set(FINEQUANT_WITH_CUDA OFF)
if(FINEQUANT_CUDA STREQUAL "OFF")
  message(STATUS "finequant: CUDA backend disabled (FINEQUANT_CUDA=OFF)")
  return()
endif()

set(_cutlass_candidates)
if(CUTLASS_DIR)
  list(APPEND _cutlass_candidates ${CUTLASS_DIR})
elseif(DEFINED ENV{CUTLASS_DIR})
  list(APPEND _cutlass_candidates $ENV{CUTLASS_DIR})
endif()
list(APPEND _cutlass_candidates ${PROJECT_SOURCE_DIR}/third_party/cutlass)
find_program(_fq_python NAMES python3 python)
if(_fq_python)
  execute_process(
    COMMAND ${_fq_python} -c "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source') if s else '')"
    OUTPUT_VARIABLE _pip_cutlass OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_pip_cutlass)
    list(APPEND _cutlass_candidates ${_pip_cutlass})
  endif()
endif()
set(CUTLASS_INCLUDE_DIRS)
foreach(dir ${_cutlass_candidates})
  if(EXISTS ${dir}/include/cutlass/cutlass.h)
    set(CUTLASS_INCLUDE_DIRS ${dir}/include ${dir}/tools/util/include)
    break()
  endif()
endforeach()

include(CheckLanguage)
check_language(CUDA)
set(_why "")
if(NOT CMAKE_CUDA_COMPILER)
  set(_why "no CUDA compiler (nvcc) found")
elseif(NOT CUTLASS_INCLUDE_DIRS)
  set(_why "no CUTLASS headers found (set CUTLASS_DIR, populate third_party/cutlass or pip install nvidia-cutlass)")
endif()
if(_why)
  if(FINEQUANT_CUDA STREQUAL "ON")
    message(FATAL_ERROR "finequant: FINEQUANT_CUDA=ON but ${_why}")
  endif()
  message(STATUS "finequant: CUDA backend not built: ${_why}")
  return()
endif()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  # One PTX for compute_80 plus SASS for the Ampere/Ada parts (sm_90a kernels set their own arch).
  set(CMAKE_CUDA_ARCHITECTURES 80-real 86-real 89-real 80-virtual)
endif()
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
# cutlass.h includes <cuda/std/...> from CCCL, which older CMake leaves out of the include path.
find_path(FINEQUANT_CCCL_INCLUDE_DIR cuda/std/utility HINTS ${CUDAToolkit_INCLUDE_DIRS}
  PATH_SUFFIXES cccl NO_DEFAULT_PATH)
set(FINEQUANT_WITH_CUDA ON)
message(STATUS "finequant: CUDA backend enabled (CUTLASS: ${CUTLASS_INCLUDE_DIRS})")
