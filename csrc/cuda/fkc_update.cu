// CUDA kernel of fkc_update (math: fkc_update.h). Raw pointers, no torch headers. One block per (chunk, sample):
// each thread updates its elements in fp32 and sums their pair products in double; the block adds its threads'
// weighed sums in a fixed tree and writes the chunk's partial. No atomics: bitwise the same result run to run.
#include "fkc_update.h"
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using diffsampler_cuda::from_f32;
using diffsampler_cuda::to_f32;

template <typename T, int kM, bool kNoise>
__global__ void __launch_bounds__(kThreads) fkc_update_kernel(ds_fkc_tensors t, int64_t chunks) {
  constexpr int kP = kM * (kM + 1) / 2;
  const int64_t b = blockIdx.y;
  const int64_t begin = b * t.per_sample + static_cast<int64_t>(blockIdx.x) * DS_FKC_CHUNK;
  const int64_t stop = begin + DS_FKC_CHUNK;
  const int64_t end = stop < (b + 1) * t.per_sample ? stop : (b + 1) * t.per_sample;
  const T* x = static_cast<const T*>(t.x);
  const T* z = static_cast<const T*>(t.noise);
  T* x_next = static_cast<T*>(t.x_next);
  double sums[kP] = {};
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    float o[kM];
    float acc = t.a * to_f32(x[i]);
#pragma unroll
    for (int j = 0; j < kM; ++j) {
      o[j] = to_f32(static_cast<const T*>(t.outs[j])[i]);
      acc = fmaf(t.e[j], o[j], acc);
    }
    if constexpr (kNoise) acc = fmaf(t.c, to_f32(z[i]), acc);
    x_next[i] = from_f32<T>(acc);
    int p = 0;
#pragma unroll
    for (int j = 0; j < kM; ++j) {
#pragma unroll
      for (int k = j; k < kM; ++k, ++p) sums[p] = fma(static_cast<double>(o[j]), static_cast<double>(o[k]), sums[p]);
    }
  }
  double weighed = 0.0;
#pragma unroll
  for (int p = 0; p < kP; ++p) weighed += t.w[p] * sums[p];
  __shared__ double warp_sums[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) weighed += __shfl_down_sync(0xffffffffu, weighed, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = weighed;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += warp_sums[w];
    t.partial[b * chunks + blockIdx.x] = s;
  }
}

template <typename T, int kM = 1>
cudaError_t launch(const ds_fkc_tensors& t, cudaStream_t stream) {
  if constexpr (kM < DS_FKC_MAX_OUTS) {
    if (t.n_outs > kM) return launch<T, kM + 1>(t, stream);
  }
  const int64_t batch = t.n / t.per_sample;
  const int64_t chunks = (t.per_sample + DS_FKC_CHUNK - 1) / DS_FKC_CHUNK;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(batch));
  if (t.noise != nullptr) {
    fkc_update_kernel<T, kM, true><<<grid, kThreads, 0, stream>>>(t, chunks);
  } else {
    fkc_update_kernel<T, kM, false><<<grid, kThreads, 0, stream>>>(t, chunks);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" int ds_fkc_update_cuda(ds_fkc_dtype dtype, ds_fkc_tensors t, cudaStream_t stream) {
  if (t.n <= 0) return cudaSuccess;
  if (t.per_sample <= 0 || t.n % t.per_sample != 0 || t.n / t.per_sample > 65535 || t.n_outs < 1 ||
      t.n_outs > DS_FKC_MAX_OUTS || t.x_next == nullptr || t.partial == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DS_FKC_FLOAT32: return launch<float>(t, stream);
    case DS_FKC_FLOAT16: return launch<__half>(t, stream);
    case DS_FKC_BFLOAT16: return launch<__nv_bfloat16>(t, stream);
    default: return cudaErrorInvalidValue;
  }
}
