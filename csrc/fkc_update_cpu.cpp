// CPU kernel of fkc_update (math: csrc/cuda/fkc_update.h) and the op's registration: its schema as a fragment of
// the diffsampler library and its CPU implementation. One task per (sample, chunk): the update in fp32 and the
// pair sums in double lanes over the chunk, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_storage.h"
#include "fkc_update.h"

namespace diffsampler {
namespace {

template <typename S, int kM, bool kNoise>
double fkc_chunk(const ds_fkc_tensors& t, int64_t begin, int64_t end) {
  using T = typename S::Raw;
  constexpr int kP = kM * (kM + 1) / 2;
  const T* __restrict__ x = static_cast<const T*>(t.x);
  const T* __restrict__ z = static_cast<const T*>(t.noise);
  T* __restrict__ x_next = static_cast<T*>(t.x_next);
  const T* outs[kM];
  float e[kM];
  for (int j = 0; j < kM; ++j) {
    outs[j] = static_cast<const T*>(t.outs[j]);
    e[j] = t.e[j];
  }
  const float a = t.a, c = t.c;
  double sums[kP] = {};
#pragma omp simd reduction(+ : sums[:kP])
  for (int64_t i = begin; i < end; ++i) {
    float o[kM];
    float acc = a * S::load(x[i]);
    for (int j = 0; j < kM; ++j) {
      o[j] = S::load(outs[j][i]);
      acc += e[j] * o[j];
    }
    if constexpr (kNoise) acc += c * S::load(z[i]);
    x_next[i] = S::store(acc);
    int p = 0;
    for (int j = 0; j < kM; ++j)
      for (int k = j; k < kM; ++k, ++p) sums[p] += static_cast<double>(o[j]) * static_cast<double>(o[k]);
  }
  double total = 0.0;
  for (int p = 0; p < kP; ++p) total += t.w[p] * sums[p];
  return total;
}

template <typename S, int kM = 1>
void fkc_dispatch(const ds_fkc_tensors& t) {
  if constexpr (kM < DS_FKC_MAX_OUTS) {
    if (t.n_outs > kM) return fkc_dispatch<S, kM + 1>(t);
  }
  const int64_t batch = t.n / t.per_sample;
  const int64_t chunks = std::max<int64_t>((t.per_sample + DS_FKC_CHUNK - 1) / DS_FKC_CHUNK, 1);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / chunks, ch = task % chunks;
      const int64_t begin = b * t.per_sample + ch * DS_FKC_CHUNK;
      const int64_t end = std::min(begin + DS_FKC_CHUNK, (b + 1) * t.per_sample);
      t.partial[task] = t.noise != nullptr ? fkc_chunk<S, kM, true>(t, begin, end) : fkc_chunk<S, kM, false>(t, begin, end);
    }
  });
}

void launch_cpu(ds_fkc_dtype dtype, const ds_fkc_tensors& t) {
  switch (dtype) {
    case DS_FKC_FLOAT32: return fkc_dispatch<F32>(t);
    case DS_FKC_FLOAT16: return fkc_dispatch<F16>(t);
    case DS_FKC_BFLOAT16: return fkc_dispatch<BF16>(t);
  }
}

std::tuple<at::Tensor, at::Tensor> fkc_update_cpu(const at::Tensor& x, at::TensorList outs, at::ArrayRef<double> coeffs,
                                                  const c10::optional<at::Tensor>& noise) {
  TORCH_CHECK(x.device().is_cpu(), "fkc_update_cpu: x must be a CPU tensor, got ", x.device());
  return run_fkc_update(x, outs, coeffs, noise, launch_cpu);
}

}  // namespace
}  // namespace diffsampler

TORCH_LIBRARY_FRAGMENT(diffsampler, m) { m.def(diffsampler::kFkcUpdateSchema); }

TORCH_LIBRARY_IMPL(diffsampler, CPU, m) { m.impl("fkc_update", &diffsampler::fkc_update_cpu); }
