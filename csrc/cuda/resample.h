// CUDA launchers of the resampling ops over raw pointers: no torch headers, so `nvcc -c` checks them anywhere.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "resample_math.h"

#ifdef __cplusplus
extern "C" {
#endif

// Device pointers to contiguous buffers. log_w (G, K) float32; uniforms (G, width) float64 (width 1 for
// systematic, K otherwise, sorted per group for multinomial / residual); outputs: log_w_out (G, K), ancestors
// (G, K), ess, resampled, log_norm (G,); cum and counts: int64 workspaces of G K elements.
typedef struct {
  const float* log_w;
  const double* uniforms;
  float* log_w_out;
  int64_t* ancestors;
  float* ess;
  bool* resampled;
  float* log_norm;
  int64_t* cum;
  int64_t* counts;
  int64_t G, K, width;
  int method;
  double ess_threshold;
  int* status;  // DS_ERR_UNIFORM is ORed in for invalid uniforms (clamped); NULL: not recorded
} ds_resample_args;

// Returns a cudaError_t value (cudaSuccess = 0) of the launch.
int ds_resample_ancestors_cuda(ds_resample_args args, cudaStream_t stream);

// particles: G K rows of row_bytes bytes; row n K + k of a resampled group takes row n K + ancestors[n K + k],
// the ancestor clamped into [0, K) (DS_ERR_ANCESTOR ORed into *status when it was outside; status may be NULL).
int ds_resample_move_cuda(void* particles, const int64_t* ancestors, const bool* resampled, int64_t G, int64_t K,
                          int64_t row_bytes, int* status, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
