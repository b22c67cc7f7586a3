// CUDA kernels of the fused multistep update (math: update_params.h). Raw pointers, no torch headers.
//
// A grid-stride loop over 16-byte packs (4 floats or 8 halves / bfloat16s) when every operand is 16-byte
// aligned, then a scalar tail; fp32 compute whatever the storage dtype. The operand set (reads, noise, state,
// the m0 write) and the phase are template parameters, so each combination is a kernel without dead loads and
// without runtime branches on them in the loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "multistep_update.h"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// N consecutive elements from element i of base, as floats: one 16-byte load when N is the pack size.
template <typename T, int N>
__device__ __forceinline__ void load(const void* base, int64_t i, float (&out)[N]) {
  const T* p = static_cast<const T*>(base) + i;
  if constexpr (N == Pack<T>::kSize) {
    const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_f32(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_f32(p[j]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store(void* base, int64_t i, const float (&in)[N]) {
  T* p = static_cast<T*>(base) + i;
  if constexpr (N == Pack<T>::kSize) {
    Pack<T> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.v[j] = from_f32<T>(in[j]);
    *reinterpret_cast<Pack<T>*>(p) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = from_f32<T>(in[j]);
  }
}

// kState: 0 no state, 1 state read (x' += g s), 2 state read and rewritten with its own row.
// kWriteM0: m0 is stored (always in the two threshold phases; in DS_PHASE_FULL when a history slot is given).
template <typename T, int N, int kReads, bool kNoise, int kState, bool kWriteM0, int kPhase>
__device__ __forceinline__ void update(const ds_update_tensors& t, const ds_update_coeffs& k, int64_t i) {
  float x[N], out[N], m0[N], hist[kReads > 0 ? kReads : 1][N];
  load<T, N>(t.x, i, x);
  load<T, N>(t.out, i, out);
#pragma unroll
  for (int r = 0; r < kReads; ++r) load<T, N>(t.reads[r], i, hist[r]);
  if constexpr (kPhase == DS_PHASE_THRESHOLD) {
    load<T, N>(t.m0, i, m0);
    // One 64-bit division per pack; a pack crosses into the next sample at most once per element.
    int64_t sample = i / t.per_sample;
    int64_t next = (sample + 1) * t.per_sample;
    float s = t.thr_scale[sample];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (i + j == next) {
        s = t.thr_scale[++sample];
        next += t.per_sample;
      }
      m0[j] = fminf(fmaxf(m0[j], -s), s) / s;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      m0[j] = fmaf(k.p, x[j], k.q * out[j]);
#pragma unroll
      for (int r = 0; r < kReads; ++r) m0[j] = fmaf(k.r[r], hist[r][j], m0[j]);
      if (k.clip > 0.f) m0[j] = fminf(fmaxf(m0[j], -k.clip), k.clip);
    }
  }
  if constexpr (kWriteM0) store<T, N>(t.m0, i, m0);
  if constexpr (kPhase != DS_PHASE_CONVERT) {
    float acc[N], sacc[N], h[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      acc[j] = fmaf(k.e, out[j], fmaf(k.b[0], m0[j], k.a * x[j]));
      sacc[j] = fmaf(k.se, out[j], fmaf(k.sb[0], m0[j], k.sa * x[j]));
    }
#pragma unroll
    for (int r = 0; r < kReads; ++r) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        acc[j] = fmaf(k.b[r + 1], hist[r][j], acc[j]);
        sacc[j] = fmaf(k.sb[r + 1], hist[r][j], sacc[j]);
      }
    }
    if constexpr (kNoise) {
      load<T, N>(t.noise, i, h);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        acc[j] = fmaf(k.c, h[j], acc[j]);
        sacc[j] = fmaf(k.sc, h[j], sacc[j]);
      }
    }
    if constexpr (kState > 0) {
      load<T, N>(t.state, i, h);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        acc[j] = fmaf(k.g, h[j], acc[j]);
        sacc[j] = fmaf(k.sg, h[j], sacc[j]);
      }
    }
    store<T, N>(t.x_next, i, acc);
    if constexpr (kState == 2) store<T, N>(t.state, i, sacc);
  }
}

template <typename T, int kReads, bool kNoise, int kState, bool kWriteM0, int kPhase>
__global__ void __launch_bounds__(kThreads)
    multistep_update_kernel(ds_update_tensors t, ds_update_coeffs k, bool packed) {
  constexpr int kPack = Pack<T>::kSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_packs = packed ? t.n / kPack : 0;
  for (int64_t v = tid; v < n_packs; v += stride) {
    update<T, kPack, kReads, kNoise, kState, kWriteM0, kPhase>(t, k, v * kPack);
  }
  for (int64_t i = n_packs * kPack + tid; i < t.n; i += stride) {
    update<T, 1, kReads, kNoise, kState, kWriteM0, kPhase>(t, k, i);
  }
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

int sm_count() {
  static int cached[64] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 108;
  if (cached[device] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cached[device] = n > 0 ? n : 108;
  }
  return cached[device];
}

template <typename T, int kReads, bool kNoise, int kState, bool kWriteM0, int kPhase>
cudaError_t launch(const ds_update_tensors& t, const ds_update_coeffs& k, cudaStream_t stream) {
  bool packed = aligned16(t.x) && aligned16(t.out) && aligned16(t.noise) && aligned16(t.state) &&
                aligned16(t.m0) && aligned16(t.x_next);
  for (int r = 0; r < k.n_reads; ++r) packed = packed && aligned16(t.reads[r]);
  const int64_t work = packed ? (t.n + Pack<T>::kSize - 1) / Pack<T>::kSize : t.n;
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * 8;
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted < max_blocks ? (wanted > 0 ? wanted : 1) : max_blocks);
  multistep_update_kernel<T, kReads, kNoise, kState, kWriteM0, kPhase><<<blocks, kThreads, 0, stream>>>(t, k, packed);
  return cudaGetLastError();
}

template <typename T, int kReads, bool kNoise, int kPhase>
cudaError_t by_state(const ds_update_tensors& t, const ds_update_coeffs& k, cudaStream_t stream) {
  if constexpr (kPhase == DS_PHASE_FULL) {  // the threshold pass always writes m0 back
    if (t.m0 == nullptr) {
      if (t.state == nullptr) return launch<T, kReads, kNoise, 0, false, kPhase>(t, k, stream);
      if (!k.state_row) return launch<T, kReads, kNoise, 1, false, kPhase>(t, k, stream);
      return launch<T, kReads, kNoise, 2, false, kPhase>(t, k, stream);
    }
  }
  if (t.state == nullptr) return launch<T, kReads, kNoise, 0, true, kPhase>(t, k, stream);
  if (!k.state_row) return launch<T, kReads, kNoise, 1, true, kPhase>(t, k, stream);
  return launch<T, kReads, kNoise, 2, true, kPhase>(t, k, stream);
}

template <typename T, int kReads, int kPhase>
cudaError_t by_noise(const ds_update_tensors& t, const ds_update_coeffs& k, cudaStream_t stream) {
  return t.noise != nullptr ? by_state<T, kReads, true, kPhase>(t, k, stream)
                            : by_state<T, kReads, false, kPhase>(t, k, stream);
}

template <typename T, int kPhase>
cudaError_t by_reads(const ds_update_tensors& t, const ds_update_coeffs& k, cudaStream_t stream) {
  switch (k.n_reads) {
    case 0: return by_noise<T, 0, kPhase>(t, k, stream);
    case 1: return by_noise<T, 1, kPhase>(t, k, stream);
    case 2: return by_noise<T, 2, kPhase>(t, k, stream);
    case 3: return by_noise<T, 3, kPhase>(t, k, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t by_phase(ds_phase phase, const ds_update_tensors& t, const ds_update_coeffs& k, cudaStream_t stream) {
  switch (phase) {
    case DS_PHASE_FULL: return by_reads<T, DS_PHASE_FULL>(t, k, stream);
    case DS_PHASE_CONVERT: {  // m0 only: the reads enter it through r, noise and state do not
      if (t.m0 == nullptr) return cudaErrorInvalidValue;
      bool uses_reads = false;
      for (int j = 0; j < k.n_reads; ++j) uses_reads = uses_reads || k.r[j] != 0.f;
      if (!uses_reads) return launch<T, 0, false, 0, true, DS_PHASE_CONVERT>(t, k, stream);
      switch (k.n_reads) {
        case 1: return launch<T, 1, false, 0, true, DS_PHASE_CONVERT>(t, k, stream);
        case 2: return launch<T, 2, false, 0, true, DS_PHASE_CONVERT>(t, k, stream);
        default: return launch<T, 3, false, 0, true, DS_PHASE_CONVERT>(t, k, stream);
      }
    }
    case DS_PHASE_THRESHOLD:
      if (t.m0 == nullptr || t.thr_scale == nullptr) return cudaErrorInvalidValue;
      return by_reads<T, DS_PHASE_THRESHOLD>(t, k, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" int ds_multistep_update_cuda(ds_dtype dtype, ds_phase phase, ds_update_tensors t, ds_update_coeffs k,
                                        cudaStream_t stream) {
  if (t.n <= 0) return cudaSuccess;
  switch (dtype) {
    case DS_FLOAT32: return by_phase<float>(phase, t, k, stream);
    case DS_FLOAT16: return by_phase<__half>(phase, t, k, stream);
    case DS_BFLOAT16: return by_phase<__nv_bfloat16>(phase, t, k, stream);
    default: return cudaErrorInvalidValue;
  }
}
