// CUDA kernel of ems_update (math: ems_update.h). Raw pointers, no torch headers.
//
// A grid-stride loop over elements, fp32 compute whatever the storage dtype. The coefficient rows are
// indexed by the element's position in its sample (d = i mod per_sample): they are shared by the batch and
// stay in L2. The number of reads, the state mode and the m0 write are template parameters.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ems_update.h"
#include "common.cuh"

namespace {

constexpr int kThreads = 256;

using diffsampler_cuda::from_f32;
using diffsampler_cuda::sm_count;
using diffsampler_cuda::to_f32;

template <typename T, int kReads, int kState, bool kWriteM0>
__global__ void __launch_bounds__(kThreads) ems_update_kernel(ds_ems_tensors t) {
  const T* x = static_cast<const T*>(t.x);
  const T* out = static_cast<const T*>(t.out);
  T* st = static_cast<T*>(t.state);
  const int64_t D = t.per_sample;
  const float* c = t.coeffs;
  const float* s = c + (6 + kReads) * D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < t.n; i += stride) {
    const int64_t d = i % D;
    const float xi = to_f32(x[i]);
    const float m0 = fmaf(__ldg(c + d), xi, __ldg(c + D + d) * to_f32(out[i]));
    if constexpr (kWriteM0) static_cast<T*>(t.m0)[i] = from_f32<T>(m0);
    float acc = fmaf(__ldg(c + 2 * D + d), xi, fmaf(__ldg(c + 4 * D + d), m0, __ldg(c + (5 + kReads) * D + d)));
    float sacc = 0.f;
    if constexpr (kState == 2) sacc = fmaf(__ldg(s + d), xi, fmaf(__ldg(s + 2 * D + d), m0, __ldg(s + (3 + kReads) * D + d)));
#pragma unroll
    for (int j = 0; j < kReads; ++j) {
      const float h = to_f32(static_cast<const T*>(t.reads[j])[i]);
      acc = fmaf(__ldg(c + (5 + j) * D + d), h, acc);
      if constexpr (kState == 2) sacc = fmaf(__ldg(s + (3 + j) * D + d), h, sacc);
    }
    if constexpr (kState > 0) {
      const float si = to_f32(st[i]);
      acc = fmaf(__ldg(c + 3 * D + d), si, acc);
      if constexpr (kState == 2) sacc = fmaf(__ldg(s + D + d), si, sacc);
    }
    static_cast<T*>(t.x_next)[i] = from_f32<T>(acc);
    if constexpr (kState == 2) st[i] = from_f32<T>(sacc);
  }
}

template <typename T, int kReads, int kState, bool kWriteM0>
cudaError_t launch(const ds_ems_tensors& t, cudaStream_t stream) {
  const int64_t wanted = (t.n + kThreads - 1) / kThreads;
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * 8;
  const int blocks = static_cast<int>(wanted < max_blocks ? (wanted > 0 ? wanted : 1) : max_blocks);
  ems_update_kernel<T, kReads, kState, kWriteM0><<<blocks, kThreads, 0, stream>>>(t);
  return cudaGetLastError();
}

template <typename T, int kReads>
cudaError_t by_state(const ds_ems_tensors& t, cudaStream_t stream) {
  const bool m0 = t.m0 != nullptr;
  switch (t.state_mode) {
    case 0: return m0 ? launch<T, kReads, 0, true>(t, stream) : launch<T, kReads, 0, false>(t, stream);
    case 1: return m0 ? launch<T, kReads, 1, true>(t, stream) : launch<T, kReads, 1, false>(t, stream);
    case 2: return m0 ? launch<T, kReads, 2, true>(t, stream) : launch<T, kReads, 2, false>(t, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t by_reads(const ds_ems_tensors& t, cudaStream_t stream) {
  switch (t.n_reads) {
    case 0: return by_state<T, 0>(t, stream);
    case 1: return by_state<T, 1>(t, stream);
    case 2: return by_state<T, 2>(t, stream);
    case 3: return by_state<T, 3>(t, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" int ds_ems_update_cuda(ds_ems_dtype dtype, ds_ems_tensors t, cudaStream_t stream) {
  if (t.n <= 0) return cudaSuccess;
  if (t.per_sample <= 0 || t.coeffs == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DS_EMS_FLOAT32: return by_reads<float>(t, stream);
    case DS_EMS_FLOAT16: return by_reads<__half>(t, stream);
    case DS_EMS_BFLOAT16: return by_reads<__nv_bfloat16>(t, stream);
    default: return cudaErrorInvalidValue;
  }
}
