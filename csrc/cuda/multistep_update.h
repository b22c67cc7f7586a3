// CUDA launcher of the fused multistep update over raw pointers: no torch headers, so `nvcc -c` checks it anywhere.
#pragma once
#include <cuda_runtime.h>
#include "update_params.h"

#ifdef __cplusplus
extern "C" {
#endif

// All pointers are device pointers to contiguous buffers of `dtype` (thr_scale: float32).
// Returns a cudaError_t value (cudaSuccess = 0) of the launch.
int ds_multistep_update_cuda(ds_dtype dtype, ds_phase phase, ds_update_tensors t, ds_update_coeffs k,
                             cudaStream_t stream);

#ifdef __cplusplus
}
#endif
