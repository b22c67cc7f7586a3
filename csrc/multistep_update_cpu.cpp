// CPU kernel of the fused multistep update: one pass over memory, at::vec vectors of fp32 lanes whatever the
// storage dtype, at::parallel_for over contiguous chunks. Math: csrc/cuda/update_params.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "multistep_update.h"

namespace diffsampler {
namespace {

using fVec = at::vec::Vectorized<float>;

// W = Vectorized<T>::size() elements of storage type T as NF vectors of floats.
template <typename T>
struct Lanes {
  static constexpr int NF = std::is_same_v<T, float> ? 1 : 2;
  static constexpr int64_t W = at::vec::Vectorized<T>::size();
  fVec v[NF];

  static Lanes load(const void* base, int64_t i, int64_t count) {
    const T* p = static_cast<const T*>(base) + i;
    auto raw = count == W ? at::vec::Vectorized<T>::loadu(p) : at::vec::Vectorized<T>::loadu(p, count);
    Lanes l;
    if constexpr (NF == 1) {
      l.v[0] = raw;
    } else {
      std::tie(l.v[0], l.v[1]) = at::vec::convert_to_float<T>(raw);
    }
    return l;
  }

  void store(void* base, int64_t i, int64_t count) const {
    T* p = static_cast<T*>(base) + i;
    if constexpr (NF == 1) {
      v[0].store(p, count);
    } else {
      at::vec::convert_from_float<T>(v[0], v[1]).store(p, count);
    }
  }
};

// One block of `count` (<= W) elements starting at i, all in one sample with bound s (threshold phase).
template <typename T>
inline void update_block(ds_phase phase, const ds_update_tensors& t, const ds_update_coeffs& k, int64_t i,
                         int64_t count, float s) {
  using L = Lanes<T>;
  const L x = L::load(t.x, i, count);
  const L out = L::load(t.out, i, count);
  L m0;
  if (phase == DS_PHASE_THRESHOLD) {
    m0 = L::load(t.m0, i, count);
    const fVec sv(s), inv(1.0f / s);
    for (int j = 0; j < L::NF; ++j) m0.v[j] = at::vec::minimum(at::vec::maximum(m0.v[j], -sv), sv) * inv;
  } else {
    for (int j = 0; j < L::NF; ++j) {
      m0.v[j] = at::vec::fmadd(fVec(k.q), out.v[j], fVec(k.p) * x.v[j]);
      if (k.clip > 0) m0.v[j] = at::vec::minimum(at::vec::maximum(m0.v[j], fVec(-k.clip)), fVec(k.clip));
    }
  }
  if (t.m0 != nullptr) m0.store(t.m0, i, count);
  if (phase == DS_PHASE_CONVERT) return;

  L acc;
  for (int j = 0; j < L::NF; ++j) {
    acc.v[j] = at::vec::fmadd(fVec(k.b[0]), m0.v[j], fVec(k.a) * x.v[j]);
    if (k.e != 0) acc.v[j] = at::vec::fmadd(fVec(k.e), out.v[j], acc.v[j]);
  }
  for (int r = 0; r < k.n_reads; ++r) {
    const L h = L::load(t.reads[r], i, count);
    for (int j = 0; j < L::NF; ++j) acc.v[j] = at::vec::fmadd(fVec(k.b[r + 1]), h.v[j], acc.v[j]);
  }
  if (t.noise != nullptr) {
    const L z = L::load(t.noise, i, count);
    for (int j = 0; j < L::NF; ++j) acc.v[j] = at::vec::fmadd(fVec(k.c), z.v[j], acc.v[j]);
  }
  acc.store(t.x_next, i, count);
}

template <typename T>
void update_range(ds_phase phase, const ds_update_tensors& t, const ds_update_coeffs& k, int64_t begin,
                  int64_t end) {
  constexpr int64_t W = Lanes<T>::W;
  while (begin < end) {
    // In the threshold phase a run must not cross a sample boundary: each sample has its own bound.
    int64_t stop = end;
    float s = 1.0f;
    if (phase == DS_PHASE_THRESHOLD) {
      const int64_t b = begin / t.per_sample;
      stop = std::min(end, (b + 1) * t.per_sample);
      s = t.thr_scale[b];
    }
    for (int64_t i = begin; i < stop; i += W) update_block<T>(phase, t, k, i, std::min(W, stop - i), s);
    begin = stop;
  }
}

void launch_cpu(ds_dtype dtype, ds_phase phase, const ds_update_tensors& t, const ds_update_coeffs& k) {
  constexpr int64_t kGrain = 1 << 15;  // elements per task: well above the per-task overhead
  at::parallel_for(0, t.n, kGrain, [&](int64_t begin, int64_t end) {
    switch (dtype) {
      case DS_FLOAT32: update_range<float>(phase, t, k, begin, end); break;
      case DS_FLOAT16: update_range<at::Half>(phase, t, k, begin, end); break;
      case DS_BFLOAT16: update_range<at::BFloat16>(phase, t, k, begin, end); break;
    }
  });
}

}  // namespace

at::Tensor multistep_update_cpu(const at::Tensor& x, const at::Tensor& model_out,
                                const c10::optional<at::Tensor>& history, int64_t write_slot,
                                at::IntArrayRef read_slots, at::ArrayRef<double> coeffs,
                                const c10::optional<at::Tensor>& noise, double clip, double threshold_ratio,
                                double threshold_max) {
  TORCH_CHECK(x.device().is_cpu(), "multistep_update_cpu: x must be a CPU tensor, got ", x.device());
  return run_multistep_update(x, model_out, history, write_slot, read_slots, coeffs, noise, clip, threshold_ratio,
                              threshold_max, launch_cpu);
}

}  // namespace diffsampler
