// Plain-data parameters and the CUDA launcher of ems_update (DPM-Solver-v3's per-step map with per-element
// coefficients). No torch headers, so `nvcc -c` checks it anywhere. Math, per element i of a sample,
// d = i mod per_sample, row r at coeffs[r * per_sample + d], fp32:
//   m0 = P x + Q out
//   x' = A x + H s + B_0 m0 + sum_{j<n_reads} B_{j+1} read_j + C
//   s' = As x + Hs s + Bs_0 m0 + sum_j Bs_{j+1} read_j + Cs        (state_mode 2; written over s)
// Rows: P, Q, A, H, B_0..B_k, C, then (state_mode 2) As, Hs, Bs_0..Bs_k, Cs.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DS_EMS_MAX_READS 3

typedef enum { DS_EMS_FLOAT32 = 0, DS_EMS_FLOAT16 = 1, DS_EMS_BFLOAT16 = 2 } ds_ems_dtype;

typedef struct {
  const void* x;
  const void* out;
  const void* reads[DS_EMS_MAX_READS];  // history slots read, n_reads of them
  void* state;                          // NULL: no state (state_mode 0)
  void* m0;                             // history slot written (NULL: not stored)
  void* x_next;
  const float* coeffs;                  // (rows, per_sample) float32, contiguous
  int64_t n;                            // elements of x
  int64_t per_sample;                   // elements per sample (n / batch)
  int n_reads;                          // 0 .. DS_EMS_MAX_READS
  int state_mode;                       // 0 none, 1 state read (H), 2 state read and rewritten
} ds_ems_tensors;

#ifdef __cplusplus
}
#endif

#if defined(__CUDACC__) || defined(DS_EMS_CUDA_LAUNCHER)
#include <cuda_runtime.h>
#ifdef __cplusplus
extern "C" {
#endif
// Device pointers to contiguous buffers of `dtype`; returns a cudaError_t value (cudaSuccess = 0).
int ds_ems_update_cuda(ds_ems_dtype dtype, ds_ems_tensors t, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
