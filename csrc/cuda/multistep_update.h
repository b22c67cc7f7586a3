// CUDA launchers of the fused multistep update and of LML's Gram over raw pointers: no torch headers, so
// `nvcc -c` checks them anywhere.
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

// LML's Gram (update_params.h): gram receives B x (1 + n_dirs)^2 doubles, row-major per sample. scratch holds
// ds_lml_gram_cuda_scratch(t, k) doubles (the per-block partials); it may be reused once the stream is past
// the launch. Deterministic: a fixed partition of each sample into chunks, summed in a fixed order.
int64_t ds_lml_gram_cuda_scratch(ds_update_tensors t, ds_update_coeffs k);
int ds_lml_gram_cuda(ds_dtype dtype, ds_update_tensors t, ds_update_coeffs k, double* gram, double* scratch,
                     cudaStream_t stream);

#ifdef __cplusplus
}
#endif
