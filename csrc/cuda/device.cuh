// Device queries shared by the CUDA launchers (csrc/cuda/*.cu). CUDA runtime headers only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace genflow {

// Multiprocessors of the current device (1 if the query fails), for sizing grid-stride grids.
inline int64_t sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    sms = 1;
  return sms;
}

}  // namespace genflow
