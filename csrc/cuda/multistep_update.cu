// CUDA kernels of the fused multistep update and of LML's Gram (math: update_params.h). Raw pointers, no torch
// headers.
//
// Update: a grid-stride loop over 16-byte packs (4 floats or 8 halves / bfloat16s) when every operand is 16-byte
// aligned, then a scalar tail; fp32 compute whatever the storage dtype. The operand set (reads, noise, state,
// the m0 write, LML on or off) and the phase are template parameters, so each combination is a kernel without
// dead loads and without runtime branches on them in the loop. With LML the direction d is computed in registers
// from the update's loads and the ring is read and written in the same pass; the number of directions is a
// warp-uniform runtime bound (templating it too would make 4x the LML kernels for no gain in a memory-bound pass).
//
// Gram: one block per (sample, chunk of kGramChunk elements); each thread accumulates its elements' products in
// fp32, the block sums its threads in double in a fixed tree and writes a partial, and a second kernel sums a
// sample's partials in chunk order. No atomics: bitwise the same result run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "multistep_update.h"
#include "common.cuh"

namespace {

constexpr int kThreads = 256;

using diffsampler_cuda::from_f32;
using diffsampler_cuda::sm_count;
using diffsampler_cuda::to_f32;

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

// out += gw guide over N elements when a guide is given (a warp-uniform branch: the pointer is per launch).
template <typename T, int N>
__device__ __forceinline__ void add_guide(const ds_update_tensors& t, const ds_update_coeffs& k, int64_t i,
                                          float (&out)[N]) {
  if (t.guide == nullptr) return;
  float d[N];
  load<T, N>(t.guide, i, d);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = fmaf(k.gw, d[j], out[j]);
}

// N elements of each of the kReads history reads.
template <int kReads, int N>
using Hist = float[kReads > 0 ? kReads : 1][N];

// m0 = p x + q out + sum_r r[r] read_r of element j, clamped to [-clip, clip] when clip > 0.
template <int kReads, int N>
__device__ __forceinline__ float data_prediction(const ds_update_coeffs& k, float x, float out,
                                                 const Hist<kReads, N>& hist, int j) {
  float m0 = fmaf(k.p, x, k.q * out);
#pragma unroll
  for (int r = 0; r < kReads; ++r) m0 = fmaf(k.r[r], hist[r][j], m0);
  return k.clip > 0.f ? fminf(fmaxf(m0, -k.clip), k.clip) : m0;
}

// LML's raw direction dn = da x + de out + db0 m0 + sum_r db[r+1] read_r of element j.
template <int kReads, int N>
__device__ __forceinline__ float direction(const ds_update_coeffs& k, float x, float out, float m0,
                                           const Hist<kReads, N>& hist, int j) {
  float dn = fmaf(k.db[0], m0, fmaf(k.de, out, k.da * x));
#pragma unroll
  for (int r = 0; r < kReads; ++r) dn = fmaf(k.db[r + 1], hist[r][j], dn);
  return dn;
}

// The sample of element i, followed over the consecutive elements of a pack: one 64-bit division per pack, and
// a pack crosses into the next sample at most once per element (per_sample >= 1).
struct SampleCursor {
  int64_t sample, next;
  __device__ SampleCursor(int64_t i, int64_t per_sample) : sample(i / per_sample), next((sample + 1) * per_sample) {}
  // Moves to element i (the one after the last); true when i starts a new sample.
  __device__ bool enter(int64_t i, int64_t per_sample) {
    if (i != next) return false;
    ++sample;
    next += per_sample;
    return true;
  }
};

// LML on the pack at i: acc += W[b][0] d + sum_j W[b][1+j] dirs[j] (b: each element's sample), then
// dirs[dir_slot] = d, after every read of the ring.
template <typename T, int N, int kReads>
__device__ __forceinline__ void lml_correct(const ds_update_tensors& t, const ds_update_coeffs& k, int64_t i,
                                            const float (&x)[N], const float (&out)[N], const float (&m0)[N],
                                            const Hist<kReads, N>& hist, float (&acc)[N]) {
  const int n_dirs = k.n_dirs;
  float dn[N], d[DS_MAX_DIRS][N];
#pragma unroll
  for (int j = 0; j < N; ++j) dn[j] = direction<kReads, N>(k, x[j], out[j], m0[j], hist, j);
#pragma unroll
  for (int r = 0; r < DS_MAX_DIRS; ++r) {
    if (r < n_dirs) load<T, N>(t.dirs[r], i, d[r]);
  }
  SampleCursor cursor(i, t.per_sample);
  const float* w = t.dir_weights + cursor.sample * (1 + n_dirs);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (cursor.enter(i + j, t.per_sample)) w += 1 + n_dirs;
    float v = fmaf(w[0], dn[j], acc[j]);
#pragma unroll
    for (int r = 0; r < DS_MAX_DIRS; ++r) {
      if (r < n_dirs) v = fmaf(w[1 + r], d[r][j], v);
    }
    acc[j] = v;
  }
  store<T, N>(t.dirs[k.dir_slot], i, dn);
}

// kState: 0 no state, 1 state read (x' += g s), 2 state read and rewritten with its own row.
// kWriteM0: m0 is stored (always in the two threshold phases; in DS_PHASE_FULL when a history slot is given).
// kLml: LML's correction and ring write (n_dirs > 0; never in DS_PHASE_CONVERT).
template <typename T, int N, int kReads, bool kNoise, int kState, bool kWriteM0, int kPhase, bool kLml>
__device__ __forceinline__ void update(const ds_update_tensors& t, const ds_update_coeffs& k, int64_t i) {
  float x[N], out[N], m0[N];
  Hist<kReads, N> hist;
  load<T, N>(t.x, i, x);
  load<T, N>(t.out, i, out);
  add_guide<T, N>(t, k, i, out);
#pragma unroll
  for (int r = 0; r < kReads; ++r) load<T, N>(t.reads[r], i, hist[r]);
  if constexpr (kPhase == DS_PHASE_THRESHOLD) {
    load<T, N>(t.m0, i, m0);
    SampleCursor cursor(i, t.per_sample);
    float s = t.thr_scale[cursor.sample];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (cursor.enter(i + j, t.per_sample)) s = t.thr_scale[cursor.sample];
      m0[j] = fmaf(k.hm, fminf(fmaxf(m0[j], -s), s) / s, k.hx * x[j]);  // the history value
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) m0[j] = data_prediction<kReads, N>(k, x[j], out[j], hist, j);
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
    if constexpr (kLml) lml_correct<T, N, kReads>(t, k, i, x, out, m0, hist, acc);
    store<T, N>(t.x_next, i, acc);
    if constexpr (kState == 2) {
      if (k.state_row) store<T, N>(t.state, i, sacc);  // indexed: the step's row decides (ds_load_row)
    }
  }
}

// A grid-stride loop over the elements [begin, end): over the whole tensor, or with per-sample steps over
// sample blockIdx.y's (each row of blocks loads its sample's step row once).
template <typename T, int kReads, bool kNoise, int kState, bool kWriteM0, int kPhase, bool kLml>
__global__ void __launch_bounds__(kThreads)
    multistep_update_kernel(ds_update_tensors t, ds_update_coeffs k, bool packed) {
  int64_t begin = 0, end = t.n;
  if (t.per_sample_steps) {
    begin = static_cast<int64_t>(blockIdx.y) * t.per_sample;
    end = begin + t.per_sample;
    t.step += blockIdx.y;
  }
  if (t.table != nullptr) {  // indexed: this step's row and slots, clamped into range; one thread flags
    const int err = ds_index_step(&t, &k, sizeof(T));
    if (err != 0 && t.status != nullptr && blockIdx.x == 0 && threadIdx.x == 0) atomicOr(t.status, err);
  }
  constexpr int kPack = Pack<T>::kSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t pack_end = packed ? end / kPack : 0;  // packed: begin is a multiple of kPack
  for (int64_t v = begin / kPack + tid; v < pack_end; v += stride) {
    update<T, kPack, kReads, kNoise, kState, kWriteM0, kPhase, kLml>(t, k, v * kPack);
  }
  for (int64_t i = (packed ? pack_end * kPack : begin) + tid; i < end; i += stride) {
    update<T, 1, kReads, kNoise, kState, kWriteM0, kPhase, kLml>(t, k, i);
  }
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

template <typename T, int kReads, bool kNoise, int kState, bool kWriteM0, int kPhase>
cudaError_t launch(const ds_update_tensors& t, const ds_update_coeffs& k, cudaStream_t stream) {
  const bool lml = kPhase != DS_PHASE_CONVERT && k.n_dirs > 0;
  bool packed = aligned16(t.x) && aligned16(t.out) && aligned16(t.noise) && aligned16(t.state) &&
                aligned16(t.m0) && aligned16(t.x_next) && aligned16(t.guide);
  for (int r = 0; r < k.n_reads; ++r) packed = packed && aligned16(t.reads[r]);
  if (t.table != nullptr) {  // the slots are only known on the device: every one must be aligned
    packed = packed && aligned16(t.history) && (t.n * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  }
  const int64_t rows = t.per_sample_steps ? t.n / t.per_sample : 1;  // blockIdx.y: the sample
  const int64_t span = t.per_sample_steps ? t.per_sample : t.n;
  if (t.per_sample_steps) packed = packed && (t.per_sample * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  for (int r = 0; lml && r < k.n_dirs; ++r) packed = packed && aligned16(t.dirs[r]);
  const int64_t work = packed ? (span + Pack<T>::kSize - 1) / Pack<T>::kSize : span;
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * 8 / rows;
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  const int bx = static_cast<int>(wanted < max_blocks ? (wanted > 0 ? wanted : 1) : (max_blocks > 0 ? max_blocks : 1));
  const dim3 blocks(bx, static_cast<unsigned>(rows));
  if constexpr (kPhase != DS_PHASE_CONVERT) {
    if (lml) {
      multistep_update_kernel<T, kReads, kNoise, kState, kWriteM0, kPhase, true>
          <<<blocks, kThreads, 0, stream>>>(t, k, packed);
      return cudaGetLastError();
    }
  }
  multistep_update_kernel<T, kReads, kNoise, kState, kWriteM0, kPhase, false>
      <<<blocks, kThreads, 0, stream>>>(t, k, packed);
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

// LML's Gram. Block (sample b, chunk c) covers the elements [c kGramChunk, (c + 1) kGramChunk) of sample b.
constexpr int kGramThreads = 256;
constexpr int64_t kGramChunk = 2048;  // 8 elements per thread
constexpr int kGramFinishThreads = 128;

// Entries of the upper triangle (row-major) of an m x m symmetric matrix: what a partial stores.
__host__ __device__ constexpr int upper_entries(int m) { return m * (m + 1) / 2; }

// The N elements from i, as floats: one 16-byte load when packed, else N guarded scalar loads with zeros past
// end (a zero element adds exactly nothing: its d and its ring entries are 0).
template <typename T, int N>
__device__ __forceinline__ void load_guarded(const void* base, int64_t i, int64_t end, bool packed, float (&out)[N]) {
  if (packed) return load<T, N>(base, i, out);
  const T* p = static_cast<const T*>(base);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = i + j < end ? to_f32(p[i + j]) : 0.f;
}

// One partial per block: the upper triangle of sum v v^T over its elements, v = [d, dirs[0..kDirs-1]].
// Thread tid takes the packs tid, tid + kGramThreads, ... of the chunk (packs of N elements counted from the
// chunk's start) in both load paths, so the sums do not depend on the operands' alignment.
template <typename T, int kReads, int kDirs>
__global__ void __launch_bounds__(kGramThreads)
    lml_gram_partial_kernel(ds_update_tensors t, ds_update_coeffs k, int64_t chunks, bool packed, double* partial) {
  constexpr int N = Pack<T>::kSize;
  constexpr int kM = 1 + kDirs;
  constexpr int kU = upper_entries(kM);
  constexpr int kWarps = kGramThreads / 32;
  const int64_t b = blockIdx.x / chunks;
  const int64_t begin = b * t.per_sample + (blockIdx.x % chunks) * kGramChunk;
  const int64_t end = begin + kGramChunk < (b + 1) * t.per_sample ? begin + kGramChunk : (b + 1) * t.per_sample;
  float acc[kU] = {};
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * N; i < end; i += kGramThreads * N) {
    float x[N], out[N], v[kM][N];
    Hist<kReads, N> hist;
    load_guarded<T, N>(t.x, i, end, packed, x);
    load_guarded<T, N>(t.out, i, end, packed, out);
    if (t.guide != nullptr) {  // out += gw guide (zeros past end stay zeros)
      float d[N];
      load_guarded<T, N>(t.guide, i, end, packed, d);
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = fmaf(k.gw, d[j], out[j]);
    }
#pragma unroll
    for (int r = 0; r < kReads; ++r) load_guarded<T, N>(t.reads[r], i, end, packed, hist[r]);
#pragma unroll
    for (int r = 0; r < kDirs; ++r) load_guarded<T, N>(t.dirs[r], i, end, packed, v[1 + r]);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float m0 = data_prediction<kReads, N>(k, x[j], out[j], hist, j);
      v[0][j] = direction<kReads, N>(k, x[j], out[j], m0, hist, j);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      int u = 0;
#pragma unroll
      for (int a = 0; a < kM; ++a) {
#pragma unroll
        for (int c = a; c < kM; ++c, ++u) acc[u] = fmaf(v[a][j], v[c][j], acc[u]);
      }
    }
  }
  // Block sum in double: a fixed shuffle tree per warp, then the warps in order.
  __shared__ double warp_sums[kWarps][kU];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    double s = acc[u];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (lane == 0) warp_sums[warp][u] = s;
  }
  __syncthreads();
  if (threadIdx.x < kU) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += warp_sums[w][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.x) * kU + threadIdx.x] = s;
  }
}

// gram[b] = the sum of sample b's partials in chunk order, both triangles written.
__global__ void __launch_bounds__(kGramFinishThreads)
    lml_gram_finish_kernel(const double* partial, int64_t batch, int64_t chunks, int m, double* gram) {
  const int n_upper = upper_entries(m);
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= batch * n_upper) return;
  const int64_t b = id / n_upper;
  const int u = static_cast<int>(id % n_upper);
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[(b * chunks + c) * n_upper + u];
  int row = 0, col = u;  // entry u of the row-major upper triangle
  while (col >= m - row) {
    col -= m - row;
    ++row;
  }
  col += row;
  gram[b * m * m + row * m + col] = s;
  gram[b * m * m + col * m + row] = s;
}

int64_t gram_chunks(const ds_update_tensors& t) { return (t.per_sample + kGramChunk - 1) / kGramChunk; }

template <typename T, int kReads = 0, int kDirs = 1>
cudaError_t gram_launch(const ds_update_tensors& t, const ds_update_coeffs& k, double* gram, double* scratch,
                        cudaStream_t stream) {
  if constexpr (kReads < DS_MAX_READS) {
    if (k.n_reads > kReads) return gram_launch<T, kReads + 1, kDirs>(t, k, gram, scratch, stream);
  }
  if constexpr (kDirs < DS_MAX_DIRS) {
    if (k.n_dirs > kDirs) return gram_launch<T, kReads, kDirs + 1>(t, k, gram, scratch, stream);
  }
  // Packs never straddle samples or chunks when per_sample is a multiple of the pack (kGramChunk always is).
  bool packed = t.per_sample % Pack<T>::kSize == 0 && aligned16(t.x) && aligned16(t.out) && aligned16(t.guide);
  for (int r = 0; r < kReads; ++r) packed = packed && aligned16(t.reads[r]);
  for (int r = 0; r < kDirs; ++r) packed = packed && aligned16(t.dirs[r]);
  const int64_t batch = t.n / t.per_sample;
  const int64_t chunks = gram_chunks(t);
  lml_gram_partial_kernel<T, kReads, kDirs><<<static_cast<unsigned>(batch * chunks), kGramThreads, 0, stream>>>(
      t, k, chunks, packed, scratch);
  const int64_t entries = batch * upper_entries(1 + kDirs);
  const int64_t blocks = (entries + kGramFinishThreads - 1) / kGramFinishThreads;
  lml_gram_finish_kernel<<<static_cast<unsigned>(blocks), kGramFinishThreads, 0, stream>>>(scratch, batch, chunks,
                                                                                            1 + kDirs, gram);
  return cudaGetLastError();
}

}  // namespace

extern "C" int ds_multistep_update_cuda(ds_dtype dtype, ds_phase phase, ds_update_tensors t, ds_update_coeffs k,
                                        cudaStream_t stream) {
  if (t.n <= 0) return cudaSuccess;
  if (t.per_sample_steps && (t.table == nullptr || t.per_sample <= 0 || t.n % t.per_sample != 0 ||
                             t.n / t.per_sample > 65535 || phase != DS_PHASE_FULL || k.n_dirs != 0)) {
    return cudaErrorInvalidValue;
  }
  if (k.n_dirs < 0 || k.n_dirs > DS_MAX_DIRS) return cudaErrorInvalidValue;
  if (k.n_dirs > 0) {
    if (t.dir_weights == nullptr || k.dir_slot < 0 || k.dir_slot >= k.n_dirs) return cudaErrorInvalidValue;
    for (int r = 0; r < k.n_dirs; ++r) {
      if (t.dirs[r] == nullptr) return cudaErrorInvalidValue;
    }
  }
  switch (dtype) {
    case DS_FLOAT32: return by_phase<float>(phase, t, k, stream);
    case DS_FLOAT16: return by_phase<__half>(phase, t, k, stream);
    case DS_BFLOAT16: return by_phase<__nv_bfloat16>(phase, t, k, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" int64_t ds_lml_gram_cuda_scratch(ds_update_tensors t, ds_update_coeffs k) {
  if (t.n <= 0 || t.per_sample <= 0 || k.n_dirs < 1 || k.n_dirs > DS_MAX_DIRS) return 0;
  return (t.n / t.per_sample) * gram_chunks(t) * upper_entries(1 + k.n_dirs);
}

extern "C" int ds_lml_gram_cuda(ds_dtype dtype, ds_update_tensors t, ds_update_coeffs k, double* gram,
                                double* scratch, cudaStream_t stream) {
  if (t.n <= 0) return cudaSuccess;
  if (t.per_sample <= 0 || t.n % t.per_sample != 0 || k.n_reads < 0 || k.n_reads > DS_MAX_READS ||
      k.n_dirs < 1 || k.n_dirs > DS_MAX_DIRS || gram == nullptr || scratch == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DS_FLOAT32: return gram_launch<float>(t, k, gram, scratch, stream);
    case DS_FLOAT16: return gram_launch<__half>(t, k, gram, scratch, stream);
    case DS_BFLOAT16: return gram_launch<__nv_bfloat16>(t, k, gram, scratch, stream);
    default: return cudaErrorInvalidValue;
  }
}
