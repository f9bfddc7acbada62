# The six chosen dependencies, found once for every target.
find_package(Threads REQUIRED)
find_package(OpenMP REQUIRED)              # FAISS's static library needs it
find_package(faiss REQUIRED)
find_package(TBB REQUIRED)
find_package(dnnl REQUIRED)                # oneDNN: the k-means' bf16 products on AMX
find_package(absl REQUIRED)
find_package(nlohmann_json 3 REQUIRED)
if(KVRT_BUILD_TOOLS)
  find_package(CLI11 REQUIRED)
endif()
if(KVRT_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

# hnswlib is header-only and Debian ships no CMake config for it.
find_path(HNSWLIB_INCLUDE_DIR hnswlib/hnswlib.h REQUIRED)
add_library(kvrt_hnswlib INTERFACE)
target_include_directories(kvrt_hnswlib SYSTEM INTERFACE ${HNSWLIB_INCLUDE_DIR})
# NOTE: hnswlib 0.6.2's SSE path prefetches through the link after a list's last one
# (searchBaseLayer, hnswalg.h:214): a 4-byte read past the end of an upper-layer link list. It is
# harmless in practice (the value only feeds a prefetch address, inside malloc's slack), but ASan
# reports it as a heap-buffer-overflow and stops the test. Sanitizer builds therefore use hnswlib's
# plain loops (NO_MANUAL_VECTORIZATION), which do not prefetch.
if(KVRT_SANITIZE MATCHES "address")
  target_compile_definitions(kvrt_hnswlib INTERFACE NO_MANUAL_VECTORIZATION)
endif()

# CUDA Toolkit: always looked for; kernels compiled when KVRT_CUDA allows.
if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
  set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
endif()
find_package(CUDAToolkit QUIET)
set(KVRT_WITH_CUDA OFF)
if(KVRT_CUDA STREQUAL "ON" OR (KVRT_CUDA STREQUAL "AUTO" AND CUDAToolkit_FOUND))
  if(NOT CUDAToolkit_FOUND)
    message(FATAL_ERROR "KVRT_CUDA=ON but the CUDA Toolkit was not found")
  endif()
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  set(KVRT_WITH_CUDA ON)
endif()
message(STATUS "kvrt: CUDA kernels ${KVRT_WITH_CUDA} (archs: ${CMAKE_CUDA_ARCHITECTURES})")
