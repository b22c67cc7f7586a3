// CPU kernel of the fused multistep update: one pass over memory in fp32 whatever the storage dtype, plain
// loops specialised on the number of reads and the noise term so the compiler vectorizes them, and
// at::parallel_for over contiguous chunks. Math: csrc/cuda/update_params.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "multistep_update.h"

namespace diffsampler {
namespace {

// Storage <-> fp32 for each storage type; Raw is the element as the loops read and write it. bfloat16 is done
// on the raw bits with integer ops (round to nearest even, NaN kept quiet) so its loops vectorize; float16
// uses c10's conversion (scalar unless built with F16C).
struct F32 {
  using Raw = float;
  static float load(Raw v) { return v; }
  static Raw store(float v) { return v; }
};
struct BF16 {
  using Raw = uint16_t;
  static float load(Raw v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }
  static Raw store(float v) {
    const uint32_t u = __builtin_bit_cast(uint32_t, v);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return static_cast<Raw>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
  }
};
struct F16 {
  using Raw = at::Half;
  static float load(Raw v) { return static_cast<float>(v); }
  static Raw store(float v) { return static_cast<Raw>(v); }
};

// Elements [begin, end) with the phase's math; s = the threshold bound of the (single) sample they lie in.
// kState: 0 no state, 1 state read (x' += g s), 2 state read and rewritten with its own row.
template <typename S, int kReads, bool kNoise, bool kWriteM0, int kState, ds_phase kPhase>
void update_run(const ds_update_tensors& t, const ds_update_coeffs& k, int64_t begin, int64_t end, float s) {
  using T = typename S::Raw;
  const T* __restrict__ x = static_cast<const T*>(t.x);
  const T* __restrict__ out = static_cast<const T*>(t.out);
  const T* __restrict__ r0 = static_cast<const T*>(t.reads[0]);
  const T* __restrict__ r1 = static_cast<const T*>(t.reads[1]);
  const T* __restrict__ r2 = static_cast<const T*>(t.reads[2]);
  const T* __restrict__ z = static_cast<const T*>(t.noise);
  T* __restrict__ m0_out = static_cast<T*>(t.m0);
  T* __restrict__ st = static_cast<T*>(t.state);
  T* __restrict__ x_next = static_cast<T*>(t.x_next);
  // Locals, not k's fields: the stores below could alias k as far as the compiler knows.
  const float p = k.p, q = k.q, a = k.a, e = k.e, c = k.c, g = k.g;
  const float r0w = k.r[0], r1w = k.r[1], r2w = k.r[2];
  const float b0 = k.b[0], b1 = k.b[1], b2 = k.b[2], b3 = k.b[3];
  const float sa = k.sa, se = k.se, sc = k.sc, sg = k.sg;
  const float sb0 = k.sb[0], sb1 = k.sb[1], sb2 = k.sb[2], sb3 = k.sb[3];
  const float clip = k.clip > 0 ? k.clip : INFINITY;
  const float inv_s = 1.0f / s;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float xi = S::load(x[i]);
    const float oi = S::load(out[i]);
    const float h0 = kReads > 0 ? S::load(r0[i]) : 0.0f;
    const float h1 = kReads > 1 ? S::load(r1[i]) : 0.0f;
    const float h2 = kReads > 2 ? S::load(r2[i]) : 0.0f;
    float m0;
    if constexpr (kPhase == DS_PHASE_THRESHOLD) {
      m0 = std::min(std::max(S::load(m0_out[i]), -s), s) * inv_s;
    } else {
      m0 = p * xi + q * oi;
      if constexpr (kReads > 0) m0 += r0w * h0;
      if constexpr (kReads > 1) m0 += r1w * h1;
      if constexpr (kReads > 2) m0 += r2w * h2;
      m0 = std::min(std::max(m0, -clip), clip);
    }
    if constexpr (kWriteM0) m0_out[i] = S::store(m0);
    if constexpr (kPhase != DS_PHASE_CONVERT) {
      float acc = a * xi + b0 * m0 + e * oi;
      float sacc = sa * xi + sb0 * m0 + se * oi;
      if constexpr (kReads > 0) {
        acc += b1 * h0;
        sacc += sb1 * h0;
      }
      if constexpr (kReads > 1) {
        acc += b2 * h1;
        sacc += sb2 * h1;
      }
      if constexpr (kReads > 2) {
        acc += b3 * h2;
        sacc += sb3 * h2;
      }
      if constexpr (kNoise) {
        const float zi = S::load(z[i]);
        acc += c * zi;
        sacc += sc * zi;
      }
      if constexpr (kState > 0) {
        const float si = S::load(st[i]);
        acc += g * si;
        sacc += sg * si;
      }
      x_next[i] = S::store(acc);
      if constexpr (kState == 2) st[i] = S::store(sacc);
    }
  }
}

template <typename S, int kReads, bool kNoise, int kState, ds_phase kPhase>
void update_range(const ds_update_tensors& t, const ds_update_coeffs& k, int64_t begin, int64_t end) {
  if constexpr (kPhase == DS_PHASE_FULL) {
    if (t.m0 != nullptr) return update_run<S, kReads, kNoise, true, kState, kPhase>(t, k, begin, end, 1.0f);
    update_run<S, kReads, kNoise, false, kState, kPhase>(t, k, begin, end, 1.0f);
  } else if constexpr (kPhase == DS_PHASE_CONVERT) {
    update_run<S, kReads, false, true, 0, kPhase>(t, k, begin, end, 1.0f);
  } else {
    while (begin < end) {  // a run must not cross a sample boundary: each sample has its own bound
      const int64_t b = begin / t.per_sample;
      const int64_t stop = std::min(end, (b + 1) * t.per_sample);
      update_run<S, kReads, kNoise, true, kState, kPhase>(t, k, begin, stop, t.thr_scale[b]);
      begin = stop;
    }
  }
}

// Picks the specialisation for the runtime reads / noise / state / phase.
template <typename S, int kReads = 0>
void dispatch(ds_phase phase, const ds_update_tensors& t, const ds_update_coeffs& k, int64_t begin, int64_t end) {
  if constexpr (kReads < DS_MAX_READS) {
    if (k.n_reads > kReads) return dispatch<S, kReads + 1>(phase, t, k, begin, end);
  }
  if (phase == DS_PHASE_CONVERT) {  // the reads enter m0 through r
    bool uses_reads = false;
    for (int j = 0; j < k.n_reads; ++j) uses_reads = uses_reads || k.r[j] != 0;
    if (uses_reads) return update_range<S, kReads, false, 0, DS_PHASE_CONVERT>(t, k, begin, end);
    return update_range<S, 0, false, 0, DS_PHASE_CONVERT>(t, k, begin, end);
  }
  const int state = t.state == nullptr ? 0 : (k.state_row ? 2 : 1);
  auto run = [&](auto noise, auto st) {
    constexpr bool kNoise = decltype(noise)::value;
    constexpr int kState = decltype(st)::value;
    if (phase == DS_PHASE_FULL) return update_range<S, kReads, kNoise, kState, DS_PHASE_FULL>(t, k, begin, end);
    update_range<S, kReads, kNoise, kState, DS_PHASE_THRESHOLD>(t, k, begin, end);
  };
  auto with_state = [&](auto noise) {
    switch (state) {
      case 0: return run(noise, std::integral_constant<int, 0>{});
      case 1: return run(noise, std::integral_constant<int, 1>{});
      default: return run(noise, std::integral_constant<int, 2>{});
    }
  };
  if (t.noise != nullptr) return with_state(std::true_type{});
  with_state(std::false_type{});
}

void launch_cpu(ds_dtype dtype, ds_phase phase, const ds_update_tensors& t, const ds_update_coeffs& k) {
  constexpr int64_t kGrain = 1 << 15;  // elements per task: well above the per-task overhead
  at::parallel_for(0, t.n, kGrain, [&](int64_t begin, int64_t end) {
    switch (dtype) {
      case DS_FLOAT32: dispatch<F32>(phase, t, k, begin, end); break;
      case DS_FLOAT16: dispatch<F16>(phase, t, k, begin, end); break;
      case DS_BFLOAT16: dispatch<BF16>(phase, t, k, begin, end); break;
    }
  });
}

}  // namespace

at::Tensor multistep_update_cpu(const at::Tensor& x, const at::Tensor& model_out,
                                const c10::optional<at::Tensor>& history, int64_t write_slot,
                                at::IntArrayRef read_slots, at::ArrayRef<double> coeffs,
                                const c10::optional<at::Tensor>& noise, double clip, double threshold_ratio,
                                double threshold_max, const c10::optional<at::Tensor>& state,
                                at::ArrayRef<double> state_coeffs) {
  TORCH_CHECK(x.device().is_cpu(), "multistep_update_cpu: x must be a CPU tensor, got ", x.device());
  return run_multistep_update(x, model_out, history, write_slot, read_slots, coeffs, noise, clip, threshold_ratio,
                              threshold_max, state, state_coeffs, launch_cpu);
}

at::Tensor multistep_update_pure_cpu(const at::Tensor& x, const at::Tensor& model_out, at::ArrayRef<double> coeffs,
                                     const c10::optional<at::Tensor>& noise, double clip, double threshold_ratio,
                                     double threshold_max) {
  TORCH_CHECK(x.device().is_cpu(), "multistep_update_pure_cpu: x must be a CPU tensor, got ", x.device());
  return run_multistep_update_pure(x, model_out, coeffs, noise, clip, threshold_ratio, threshold_max, launch_cpu);
}

}  // namespace diffsampler
