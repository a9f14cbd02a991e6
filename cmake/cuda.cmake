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

# ---- the backend's targets (called from CMakeLists.txt once the core library exists) ----------
# Architectures per file (CUDA_ARCHITECTURES OFF, -gencode given per source):
#   *_sm90.cu      sm_90a alone: wgmma/TMA kernels; plain sm_90 would compile them to empty stubs.
#   other .cu      SASS for sm_80, sm_86, sm_89, sm_90 and PTX for compute_80.
#   gemm_int_*.cu  also -fmad=false: their fp32 epilogues round as the CPU reference (no FMA).
#   FINEQUANT_CUDA_SASS (e.g. "90" on a lent H200: scripts/gpu-check.sh) builds the sm80-family SASS
#   for those archs only: a quick build for one GPU.
set(FINEQUANT_CUDA_SASS "" CACHE STRING "SASS archs of the sm80-family kernels (default: 80;86;89;90 + PTX 80)")
set(FINEQUANT_CUDA_JOBS 2 CACHE STRING "CUDA compiles at once with Ninja (CUTLASS files take 2-4.5 GB each)")
set(FINEQUANT_CUDA_GENCODE_SM90A -gencode=arch=compute_90a,code=sm_90a)
if(FINEQUANT_CUDA_SASS)
  list(TRANSFORM FINEQUANT_CUDA_SASS PREPEND sm_ OUTPUT_VARIABLE _sass)
  list(JOIN _sass "," _sass)
  set(FINEQUANT_CUDA_GENCODE_SM80 "-gencode=arch=compute_80,code=[${_sass}]")
else()
  set(FINEQUANT_CUDA_GENCODE_SM80 "-gencode=arch=compute_80,code=[sm_80,sm_86,sm_89,sm_90,compute_80]")
endif()

# finequant_add_cuda_backend(CORE): the OBJECT library finequant_cuda (cuda/src/*.cu and the host
# files cuda/src/*.cc), its objects added to CORE. OBJECT, not STATIC: kernels in a static library
# that nothing references were dropped at link time.
function(finequant_add_cuda_backend core)
  file(GLOB cu_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/cuda/src/*.cu)
  file(GLOB cc_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/cuda/src/*.cc)
  add_library(finequant_cuda OBJECT ${cu_sources} ${cc_sources})
  target_include_directories(finequant_cuda PRIVATE ${PROJECT_SOURCE_DIR} ${PROJECT_SOURCE_DIR}/cpp/src
    ${PROJECT_SOURCE_DIR}/cpp/include ${PROJECT_SOURCE_DIR}/third_party/nlohmann_json/include
    ${CUTLASS_INCLUDE_DIRS} ${CUDAToolkit_INCLUDE_DIRS} ${FINEQUANT_CCCL_INCLUDE_DIR})
  target_compile_definitions(finequant_cuda PRIVATE FINEQUANT_WITH_CUDA=1)
  target_compile_options(finequant_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++17 --expt-relaxed-constexpr>)
  set_target_properties(finequant_cuda PROPERTIES CUDA_ARCHITECTURES OFF POSITION_INDEPENDENT_CODE ON)
  foreach(src ${cu_sources})
    get_filename_component(name ${src} NAME)
    if(name MATCHES "_sm90\\.cu$")
      set(options ${FINEQUANT_CUDA_GENCODE_SM90A})
    else()
      set(options ${FINEQUANT_CUDA_GENCODE_SM80})
    endif()
    if(name MATCHES "^gemm_int_")
      list(APPEND options -fmad=false)
    endif()
    set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "${options}")
  endforeach()

  # At most FINEQUANT_CUDA_JOBS CUDA compiles at once with Ninja (CUTLASS files take 2-4.5 GB each).
  set_property(GLOBAL APPEND PROPERTY JOB_POOLS finequant_cuda_pool=${FINEQUANT_CUDA_JOBS})
  set_target_properties(finequant_cuda PROPERTIES JOB_POOL_COMPILE finequant_cuda_pool)

  # ccache, keyed on paths relative to the source tree so that build folders share hits.
  find_program(FINEQUANT_CCACHE ccache)
  if(FINEQUANT_CCACHE AND NOT CMAKE_CUDA_COMPILER_LAUNCHER)
    set_target_properties(finequant_cuda PROPERTIES CUDA_COMPILER_LAUNCHER
      "${CMAKE_COMMAND};-E;env;CCACHE_BASEDIR=${PROJECT_SOURCE_DIR};CCACHE_NOHASHDIR=1;${FINEQUANT_CCACHE}")
  endif()

  target_sources(${core} PRIVATE $<TARGET_OBJECTS:finequant_cuda>)
  target_compile_definitions(${core} PUBLIC FINEQUANT_WITH_CUDA=1)
  target_link_libraries(${core} PUBLIC CUDA::cudart_static)
endfunction()

# finequant_add_cuda_tests(): C++ tests of the backend that need no GPU (registered with ctest).
#   test_cuda_epilogue: the EVT functors (cuda/src/evt_functors.h) on the host, bit-identical to
#   the scalar epilogue helpers and to an int64 reference (g++ with the CUTLASS headers).
function(finequant_add_cuda_tests)
  add_executable(test_cuda_epilogue ${PROJECT_SOURCE_DIR}/cpp/tests/test_cuda_epilogue.cc)
  target_include_directories(test_cuda_epilogue PRIVATE ${PROJECT_SOURCE_DIR} ${PROJECT_SOURCE_DIR}/cpp/src
    ${PROJECT_SOURCE_DIR}/cpp/include ${PROJECT_SOURCE_DIR}/cpp/tests ${CUTLASS_INCLUDE_DIRS}
    ${CUDAToolkit_INCLUDE_DIRS} ${FINEQUANT_CCCL_INCLUDE_DIR})
  target_compile_options(test_cuda_epilogue PRIVATE -ffp-contract=off -Wno-deprecated-declarations)
  add_test(NAME test_cuda_epilogue COMMAND test_cuda_epilogue)
  # test_cuda_kernels: every op of the CUDA backend against the CPU backend; exits 77 (ctest: skipped)
  # without a device.
  add_executable(test_cuda_kernels ${PROJECT_SOURCE_DIR}/cpp/tests/test_cuda_kernels.cc)
  target_link_libraries(test_cuda_kernels PRIVATE finequant)
  target_include_directories(test_cuda_kernels PRIVATE ${PROJECT_SOURCE_DIR}/cpp/src ${PROJECT_SOURCE_DIR}/cpp/tests
    ${PROJECT_SOURCE_DIR})
  add_test(NAME test_cuda_kernels COMMAND test_cuda_kernels)
  set_tests_properties(test_cuda_kernels PROPERTIES SKIP_RETURN_CODE 77)
endfunction()
