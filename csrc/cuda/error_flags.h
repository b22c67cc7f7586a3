// Error bits of the int32 status word (one element, on the tensors' device) that kernels OR into when an index
// or a value known only on the device is out of range. The kernel clamps it into range first, so no access leaves
// its buffer; the caller reads the word when it may synchronize (diffsampler.error_flags, docs/validation.md).
// C++ CPU kernels read such values in host memory and raise instead. No torch or CUDA headers.
#pragma once
#include <stdint.h>

#define DS_ERR_STEP 1      // multistep_update_indexed: the step is outside [0, table rows)
#define DS_ERR_SLOT 2      // multistep_update_indexed: a table slot is outside [0, history slots)
#define DS_ERR_ANCESTOR 4  // resample_move: an ancestor is outside [0, K)
#define DS_ERR_UNIFORM 8   // resample_ancestors: a uniform outside [0, 1) or NaN, or multinomial / residual unsorted

#ifdef __CUDACC__
#define DS_ERR_HD __host__ __device__ __forceinline__
#else
#define DS_ERR_HD static inline
#endif

// i clamped into [0, n) (n >= 1); bit is ORed into *err when it was outside.
DS_ERR_HD int64_t ds_clamp_index(int64_t i, int64_t n, int bit, int* err) {
  if (i >= 0 && i < n) return i;
  *err |= bit;
  return i < 0 ? 0 : n - 1;
}
