// Plain-data parameters and the CUDA launcher of fkc_update, the per-step math of Feynman-Kac correctors
// (python/diffsampler/smc.py). No torch headers, so `nvcc -c` checks it anywhere. Math, per element i of sample
// b = i / per_sample, in fp32 (the products in double):
//   x' = a x + sum_{m<n_outs} e[m] out_m + c z                     (z read when noise != NULL)
//   partial[b][chunk] = sum_p w[p] sum over the chunk's elements of out_m out_n,  p the (m, n >= m) pair,
//                       row-major (the pair sums in double, weighed at the chunk's end)
// The host sums a sample's chunks in order: the log-weight increment.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DS_FKC_MAX_OUTS 4
#define DS_FKC_MAX_PAIRS (DS_FKC_MAX_OUTS * (DS_FKC_MAX_OUTS + 1) / 2)
#define DS_FKC_CHUNK 8192  // elements of a sample per partial (and per CUDA block)

typedef enum { DS_FKC_FLOAT32 = 0, DS_FKC_FLOAT16 = 1, DS_FKC_BFLOAT16 = 2 } ds_fkc_dtype;

typedef struct {
  const void* x;
  const void* outs[DS_FKC_MAX_OUTS];  // n_outs of them, x's shape
  const void* noise;                  // NULL: no noise term
  void* x_next;
  double* partial;                    // (B, chunks), chunks = ceil(per_sample / DS_FKC_CHUNK)
  int64_t n;                          // elements of x
  int64_t per_sample;                 // elements per sample (n / B)
  int n_outs;                         // 1 .. DS_FKC_MAX_OUTS
  float a, c;
  float e[DS_FKC_MAX_OUTS];
  double w[DS_FKC_MAX_PAIRS];         // the pair weights, n_outs (n_outs + 1) / 2 of them
} ds_fkc_tensors;

#ifdef __cplusplus
}
#endif

#if defined(__CUDACC__) || defined(DS_FKC_CUDA_LAUNCHER)
#include <cuda_runtime.h>
#ifdef __cplusplus
extern "C" {
#endif
// Device pointers to contiguous buffers of `dtype`; returns a cudaError_t value (cudaSuccess = 0).
int ds_fkc_update_cuda(ds_fkc_dtype dtype, ds_fkc_tensors t, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
