// CPU kernels of the fused multistep update and of LML's Gram: fp32 whatever the storage dtype, loops on fp32
// vector lanes (cpu_storage.h) specialised on the number of reads and the noise term, and at::parallel_for
// over contiguous chunks. LML's correction joins the update's loop in the common case (no state, no
// thresholding, m0 stored); otherwise it is a second loop over each L1-sized block right after the update's,
// its operands read from cache. Math: csrc/cuda/update_params.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_storage.h"
#include "multistep_update.h"

namespace diffsampler {
namespace {

// clamp(v, -bound, bound) as std::min(std::max(v, -bound), bound) does it on each lane: NaN passes through.
inline LanesF clamp_lanes(LanesF v, float bound) {
  v = v < -bound ? -bound : v;
  return v > bound ? bound : v;
}

// The model output of elements [i, i + kLanes) as the update sees it: out + gw guide when a guide is given.
template <typename T, typename Load>
inline LanesF guided_out(Load load, const T* out, const T* guide, float gw, int64_t i) {
  const LanesF o = load(out + i);
  return guide != nullptr ? o + gw * load(guide + i) : o;
}

// Elements [begin, end) with the phase's math; s = the threshold bound of the (single) sample they lie in.
// kState: 0 no state, 1 state read (x' += g s), 2 state read and rewritten with its own row.
// kDirs > 0: LML in the same loop (phase FULL), w = the sample's 1 + kDirs weights.
template <typename S, int kReads, bool kNoise, bool kWriteM0, int kState, ds_phase kPhase, int kDirs = 0>
void update_run(const ds_update_tensors& t, const ds_update_coeffs& k, int64_t begin, int64_t end, float s,
                const float* w = nullptr) {
  using T = typename S::Raw;
  const T* __restrict__ x = static_cast<const T*>(t.x);
  const T* __restrict__ out = static_cast<const T*>(t.out);
  const T* __restrict__ r0 = static_cast<const T*>(t.reads[0]);
  const T* __restrict__ r1 = static_cast<const T*>(t.reads[1]);
  const T* __restrict__ r2 = static_cast<const T*>(t.reads[2]);
  const T* __restrict__ z = static_cast<const T*>(t.noise);
  const T* __restrict__ guide = static_cast<const T*>(t.guide);
  T* __restrict__ m0_out = static_cast<T*>(t.m0);
  T* __restrict__ st = static_cast<T*>(t.state);
  T* __restrict__ x_next = static_cast<T*>(t.x_next);
  // Locals, not k's fields: the stores below could alias k as far as the compiler knows.
  const float p = k.p, q = k.q, a = k.a, e = k.e, c = k.c, g = k.g, gw = k.gw;
  const float r0w = k.r[0], r1w = k.r[1], r2w = k.r[2];
  const float b0 = k.b[0], b1 = k.b[1], b2 = k.b[2], b3 = k.b[3];
  const float sa = k.sa, se = k.se, sc = k.sc, sg = k.sg;
  const float sb0 = k.sb[0], sb1 = k.sb[1], sb2 = k.sb[2], sb3 = k.sb[3];
  const float clip = k.clip > 0 ? k.clip : INFINITY;
  const float inv_s = 1.0f / s, hx = k.hx, hm = k.hm;
  T* dirs[DS_MAX_DIRS > 0 ? DS_MAX_DIRS : 1] = {};
  for (int j = 0; j < kDirs; ++j) dirs[j] = static_cast<T*>(t.dirs[j]);
  T* __restrict__ slot = dirs[k.dir_slot];
  const float da = k.da, de = k.de, db0 = k.db[0], db1 = k.db[1], db2 = k.db[2], db3 = k.db[3];
  float wd[DS_MAX_DIRS];
  for (int j = 0; j < DS_MAX_DIRS; ++j) wd[j] = j < kDirs ? w[1 + j] : 0.0f;
  const float w0 = kDirs > 0 ? w[0] : 0.0f;
  // Elements [i, i + kLanes) as fp32 lanes: load(ptr) / store(ptr, lanes) move them (the last, partial ones of
  // the range through a buffer, with the same conversions).
  auto lanes = [&](int64_t i, auto load, auto store) {
    const LanesF xi = load(x + i);
    const LanesF oi = guided_out(load, out, guide, gw, i);
    const LanesF h0 = kReads > 0 ? load(r0 + i) : LanesF{};
    const LanesF h1 = kReads > 1 ? load(r1 + i) : LanesF{};
    const LanesF h2 = kReads > 2 ? load(r2 + i) : LanesF{};
    LanesF m0;
    if constexpr (kPhase == DS_PHASE_THRESHOLD) {
      m0 = hx * xi + hm * (clamp_lanes(load(m0_out + i), s) * inv_s);
    } else {
      m0 = p * xi + q * oi;
      if constexpr (kReads > 0) m0 += r0w * h0;
      if constexpr (kReads > 1) m0 += r1w * h1;
      if constexpr (kReads > 2) m0 += r2w * h2;
      m0 = clamp_lanes(m0, clip);
    }
    if constexpr (kWriteM0) store(m0_out + i, m0);
    if constexpr (kPhase != DS_PHASE_CONVERT) {
      LanesF acc = a * xi + b0 * m0 + e * oi;
      LanesF sacc = sa * xi + sb0 * m0 + se * oi;
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
        const LanesF zi = load(z + i);
        acc += c * zi;
        sacc += sc * zi;
      }
      if constexpr (kState > 0) {
        const LanesF si = load(st + i);
        acc += g * si;
        sacc += sg * si;
      }
      if constexpr (kDirs > 0) {  // d_n = the direction row; x' += W_0 d_n + sum_j W_j dirs[j]; record d_n
        LanesF dn = da * xi + de * oi + db0 * m0;
        if constexpr (kReads > 0) dn += db1 * h0;
        if constexpr (kReads > 1) dn += db2 * h1;
        if constexpr (kReads > 2) dn += db3 * h2;
        acc += w0 * dn;
        for (int j = 0; j < kDirs; ++j) acc += wd[j] * load(dirs[j] + i);
        store(slot + i, dn);
      }
      store(x_next + i, acc);
      if constexpr (kState == 2) store(st + i, sacc);
    }
  };
  for_lanes(begin, end, lanes);
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

// LML's common case in one loop (phase FULL, no state, m0 stored): per sample, with its weights.
template <typename S, int kReads = 0, int kDirs = 1>
void lml_fused_dispatch(const ds_update_tensors& t, const ds_update_coeffs& k, int64_t begin, int64_t end) {
  if constexpr (kReads < DS_MAX_READS) {
    if (k.n_reads > kReads) return lml_fused_dispatch<S, kReads + 1, kDirs>(t, k, begin, end);
  }
  if constexpr (kDirs < DS_MAX_DIRS) {
    if (k.n_dirs > kDirs) return lml_fused_dispatch<S, kReads, kDirs + 1>(t, k, begin, end);
  }
  while (begin < end) {
    const int64_t b = begin / t.per_sample;
    const int64_t stop = std::min(end, (b + 1) * t.per_sample);
    const float* w = t.dir_weights + b * (1 + kDirs);
    if (t.noise != nullptr) {
      update_run<S, kReads, true, true, 0, DS_PHASE_FULL, kDirs>(t, k, begin, stop, 1.0f, w);
    } else {
      update_run<S, kReads, false, true, 0, DS_PHASE_FULL, kDirs>(t, k, begin, stop, 1.0f, w);
    }
    begin = stop;
  }
}

// m0 as the update computes it before any thresholding (p x + q out + sum r read, clipped).
template <int kReads>
inline LanesF data_prediction(const ds_update_coeffs& k, LanesF xi, LanesF oi, const LanesF* h) {
  LanesF m0 = k.p * xi + k.q * oi;
  for (int j = 0; j < kReads; ++j) m0 += k.r[j] * h[j];
  return clamp_lanes(m0, k.clip > 0 ? k.clip : INFINITY);
}

// LML on [begin, end) after the update wrote x_next there: d = the direction row (m0 read back from the
// history slot when it was stored, recomputed otherwise), x_next += W[b][0] d + sum_j W[b][1+j] dirs[j],
// dirs[dir_slot] = d. The range lies in one sample (weights are per sample).
template <typename S, int kReads, int kDirs, bool kM0Stored>
void lml_run(const ds_update_tensors& t, const ds_update_coeffs& k, int64_t begin, int64_t end, const float* w) {
  using T = typename S::Raw;
  const T* __restrict__ x = static_cast<const T*>(t.x);
  const T* __restrict__ out = static_cast<const T*>(t.out);
  const T* __restrict__ m0s = static_cast<const T*>(t.m0);
  const T* __restrict__ guide = static_cast<const T*>(t.guide);
  const T* reads[DS_MAX_READS] = {};
  for (int j = 0; j < kReads; ++j) reads[j] = static_cast<const T*>(t.reads[j]);
  T* dirs[DS_MAX_DIRS] = {};
  for (int j = 0; j < kDirs; ++j) dirs[j] = static_cast<T*>(t.dirs[j]);
  T* __restrict__ slot = dirs[k.dir_slot];
  T* __restrict__ x_next = static_cast<T*>(t.x_next);
  const float da = k.da, de = k.de, db0 = k.db[0];
  float db[DS_MAX_READS], wd[DS_MAX_DIRS];
  for (int j = 0; j < DS_MAX_READS; ++j) db[j] = k.db[j + 1];
  for (int j = 0; j < DS_MAX_DIRS; ++j) wd[j] = j < kDirs ? w[1 + j] : 0.0f;
  const float w0 = w[0], gw = k.gw;
  for_lanes(begin, end, [&](int64_t i, auto load, auto store) {
    const LanesF xi = load(x + i);
    const LanesF oi = guided_out(load, out, guide, gw, i);
    LanesF h[DS_MAX_READS > 0 ? DS_MAX_READS : 1];
    for (int j = 0; j < kReads; ++j) h[j] = load(reads[j] + i);
    LanesF m0;
    if constexpr (kM0Stored) {
      m0 = load(m0s + i);
    } else {
      m0 = data_prediction<kReads>(k, xi, oi, h);
    }
    LanesF dn = da * xi + de * oi + db0 * m0;
    for (int j = 0; j < kReads; ++j) dn += db[j] * h[j];
    LanesF acc = load(x_next + i) + w0 * dn;
    for (int j = 0; j < kDirs; ++j) acc += wd[j] * load(dirs[j] + i);
    store(x_next + i, acc);
    store(slot + i, dn);
  });
}

template <typename S, int kReads = 0, int kDirs = 1>
void lml_dispatch(const ds_update_tensors& t, const ds_update_coeffs& k, int64_t begin, int64_t end) {
  if constexpr (kReads < DS_MAX_READS) {
    if (k.n_reads > kReads) return lml_dispatch<S, kReads + 1, kDirs>(t, k, begin, end);
  }
  if constexpr (kDirs < DS_MAX_DIRS) {
    if (k.n_dirs > kDirs) return lml_dispatch<S, kReads, kDirs + 1>(t, k, begin, end);
  }
  while (begin < end) {  // per sample: each has its own weights
    const int64_t b = begin / t.per_sample;
    const int64_t stop = std::min(end, (b + 1) * t.per_sample);
    const float* w = t.dir_weights + b * (1 + kDirs);
    if (t.m0 != nullptr) {
      lml_run<S, kReads, kDirs, true>(t, k, begin, stop, w);
    } else {
      lml_run<S, kReads, kDirs, false>(t, k, begin, stop, w);
    }
    begin = stop;
  }
}

// LML's Gram: per sample, the dot products of v = [d, dirs[0..n_dirs-1]] (d and the directions in fp32) over
// fixed chunks (one task each), the chunks summed in order: the result does not depend on the thread count.
// The products of two floats are exact in double; each pair sums them in double lanes (two independent sets)
// over the chunk, the lanes added in a fixed order at its end. (fp32 products and sums would halve the
// arithmetic, but the corrector mode's step is ill-conditioned: a 1e-7 relative change of its Gram moves DDIM
// samples by 1e-3.)
constexpr int64_t kGramChunk = 1 << 13;

// Each half of kLanes fp32 lanes (cpu_storage.h) widens to kLanes / 2 double lanes.
typedef float HalfF __attribute__((vector_size(2 * kLanes)));
typedef double LanesD __attribute__((vector_size(4 * kLanes)));

template <typename S, int kReads, int kDirs, bool kClip>
void gram_chunk(const ds_update_tensors& t, const ds_update_coeffs& k, int64_t begin, int64_t end, double* acc) {
  using T = typename S::Raw;
  constexpr int kM = 1 + kDirs;
  constexpr int kP = kM * (kM + 1) / 2;  // the upper triangle, row by row
  const T* __restrict__ x = static_cast<const T*>(t.x);
  const T* __restrict__ out = static_cast<const T*>(t.out);
  const T* __restrict__ guide = static_cast<const T*>(t.guide);
  const float gw = k.gw;
  const T* reads[DS_MAX_READS] = {};
  for (int j = 0; j < kReads; ++j) reads[j] = static_cast<const T*>(t.reads[j]);
  const T* dirs[DS_MAX_DIRS] = {};
  for (int j = 0; j < kDirs; ++j) dirs[j] = static_cast<const T*>(t.dirs[j]);
  // d = da x + de out + db0 m0 + sum_j db[j+1] read_j; without clip m0 is linear and the row folds into
  // d = cx x + co out + sum_j ch[j] read_j.
  const float cx = kClip ? k.da : k.da + k.db[0] * k.p, co = kClip ? k.de : k.de + k.db[0] * k.q;
  float ch[DS_MAX_READS > 0 ? DS_MAX_READS : 1];
  for (int j = 0; j < DS_MAX_READS; ++j) ch[j] = kClip ? k.db[j + 1] : k.db[j + 1] + k.db[0] * k.r[j];
  LanesD sums[2][kP] = {};  // the low and high halves: independent chains
  auto lanes = [&](int64_t i, auto load, auto) {  // the products of elements [i, i + kLanes)
    LanesF v[kM];
    const LanesF xi = load(x + i), oi = guided_out(load, out, guide, gw, i);
    LanesF h[DS_MAX_READS > 0 ? DS_MAX_READS : 1];
    for (int j = 0; j < kReads; ++j) h[j] = load(reads[j] + i);
    v[0] = cx * xi + co * oi;
    for (int j = 0; j < kReads; ++j) v[0] += ch[j] * h[j];
    if constexpr (kClip) v[0] += k.db[0] * data_prediction<kReads>(k, xi, oi, h);
    for (int j = 0; j < kDirs; ++j) v[1 + j] = load(dirs[j] + i);
    for (int half = 0; half < 2; ++half) {
      LanesD d[kM];
      for (int a = 0; a < kM; ++a) {
        HalfF f;
        __builtin_memcpy(&f, reinterpret_cast<const float*>(&v[a]) + kLanes / 2 * half, sizeof f);
        d[a] = __builtin_convertvector(f, LanesD);
      }
      int p = 0;
      for (int a = 0; a < kM; ++a)
        for (int c = a; c < kM; ++c, ++p) sums[half][p] += d[a] * d[c];
    }
  };
  for_lanes(begin, end, lanes);
  int p = 0;
  for (int a = 0; a < kM; ++a) {
    for (int c = a; c < kM; ++c, ++p) {
      double s = 0.0;
      for (int half = 0; half < 2; ++half)
        for (int l = 0; l < kLanes / 2; ++l) s += sums[half][p][l];
      acc[a * kM + c] = acc[c * kM + a] = s;
    }
  }
}

template <typename S, int kReads = 0, int kDirs = 1>
void gram_dispatch(const ds_update_tensors& t, const ds_update_coeffs& k, double* gram) {
  if constexpr (kReads < DS_MAX_READS) {
    if (k.n_reads > kReads) return gram_dispatch<S, kReads + 1, kDirs>(t, k, gram);
  }
  if constexpr (kDirs < DS_MAX_DIRS) {
    if (k.n_dirs > kDirs) return gram_dispatch<S, kReads, kDirs + 1>(t, k, gram);
  }
  constexpr int kM = 1 + kDirs;
  const int64_t batch = t.n / t.per_sample;
  const int64_t chunks = (t.per_sample + kGramChunk - 1) / kGramChunk;
  std::vector<double> partial(static_cast<size_t>(batch * chunks * kM * kM));
  at::parallel_for(0, batch * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      const int64_t begin = b * t.per_sample + c * kGramChunk;
      const int64_t end = std::min(begin + kGramChunk, (b + 1) * t.per_sample);
      double* acc = partial.data() + task * kM * kM;
      if (k.clip > 0) {
        gram_chunk<S, kReads, kDirs, true>(t, k, begin, end, acc);
      } else {
        gram_chunk<S, kReads, kDirs, false>(t, k, begin, end, acc);
      }
    }
  });
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < chunks; ++c)
      for (int j = 0; j < kM * kM; ++j) gram[b * kM * kM + j] += partial[(b * chunks + c) * kM * kM + j];
}

void gram_cpu(ds_dtype dtype, const ds_update_tensors& t, const ds_update_coeffs& k, double* gram) {
  switch (dtype) {
    case DS_FLOAT32: return gram_dispatch<F32>(t, k, gram);
    case DS_FLOAT16: return gram_dispatch<F16>(t, k, gram);
    case DS_BFLOAT16: return gram_dispatch<BF16>(t, k, gram);
  }
}

// Indexed steps on host memory: the row and every used slot of t.step's entry are checked (raising), then
// resolved into (t, k).
void resolve_step(ds_dtype dtype, ds_update_tensors& t, ds_update_coeffs& k) {
  const int64_t i = *t.step;
  TORCH_CHECK(i >= 0 && i < t.n_steps, "multistep_update_indexed: step ", i, " is outside the table's [0, ",
              t.n_steps, ")");
  if (t.history != nullptr) {
    const int64_t* slot = t.slots + i * DS_SLOTS_WIDTH;
    for (int j = 0; j <= k.n_reads; ++j) {
      TORCH_CHECK(slot[j] >= 0 && slot[j] < t.history_slots, "multistep_update_indexed: the table's ",
                  j == 0 ? "write slot" : "read slot", " ", slot[j], " of step ", i, " is outside the history's [0, ",
                  t.history_slots, ")");
    }
  }
  ds_index_step(&t, &k, dtype == DS_FLOAT32 ? 4 : 2);
}

void launch_cpu(ds_dtype dtype, ds_phase phase, const ds_update_tensors& t_in, const ds_update_coeffs& k_in) {
  // One (t, k) for the batch, or one per sample (indexed per-sample steps; a range never crosses a sample).
  std::vector<ds_update_tensors> ts{t_in};
  std::vector<ds_update_coeffs> ks{k_in};
  if (t_in.table != nullptr) {
    const int64_t rows = t_in.per_sample_steps ? t_in.n / t_in.per_sample : 1;
    ts.assign(rows, t_in);
    ks.assign(rows, k_in);
    for (int64_t b = 0; b < rows; ++b) {
      ts[b].step = t_in.step + b;
      resolve_step(dtype, ts[b], ks[b]);
    }
  }
  const bool per_sample = ts.size() > 1;
  constexpr int64_t kGrain = 1 << 15;  // elements per task: well above the per-task overhead
  constexpr int64_t kLmlBlock = 1 << 9;  // LML follows the update block by block, its operands still in L1
  auto run = [&](auto tag, const ds_update_tensors& t, const ds_update_coeffs& k, int64_t begin, int64_t end) {
    using S = decltype(tag);
    const bool lml = k.n_dirs > 0 && phase != DS_PHASE_CONVERT;
    const bool fused = phase == DS_PHASE_FULL && t.state == nullptr && t.m0 != nullptr;
    if (!lml) return dispatch<S>(phase, t, k, begin, end);
    if (fused) return lml_fused_dispatch<S>(t, k, begin, end);
    for (int64_t lo = begin; lo < end; lo += kLmlBlock) {
      const int64_t hi = std::min(end, lo + kLmlBlock);
      dispatch<S>(phase, t, k, lo, hi);
      lml_dispatch<S>(t, k, lo, hi);
    }
  };
  at::parallel_for(0, t_in.n, kGrain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t b = per_sample ? begin / t_in.per_sample : 0;
      const int64_t stop = per_sample ? std::min(end, (b + 1) * t_in.per_sample) : end;
      switch (dtype) {
        case DS_FLOAT32: run(F32{}, ts[b], ks[b], begin, stop); break;
        case DS_FLOAT16: run(F16{}, ts[b], ks[b], begin, stop); break;
        case DS_BFLOAT16: run(BF16{}, ts[b], ks[b], begin, stop); break;
      }
      begin = stop;
    }
  });
}

}  // namespace

at::Tensor multistep_update_cpu(const at::Tensor& x, const at::Tensor& model_out,
                                const c10::optional<at::Tensor>& history, int64_t write_slot,
                                at::IntArrayRef read_slots, at::ArrayRef<double> coeffs,
                                const c10::optional<at::Tensor>& noise, double clip, bool thresholding,
                                const c10::optional<at::Tensor>& state, const c10::optional<at::Tensor>& dirs,
                                int64_t dir_slot, at::ArrayRef<double> dir_coeffs,
                                const c10::optional<at::Tensor>& dir_weights, const c10::optional<at::Tensor>& guide) {
  TORCH_CHECK(x.device().is_cpu(), "multistep_update_cpu: x must be a CPU tensor, got ", x.device());
  return run_multistep_update(x, model_out, history, write_slot, read_slots, coeffs, noise, clip, thresholding,
                              state, dirs, dir_slot, dir_coeffs, dir_weights, guide, launch_cpu);
}

at::Tensor multistep_update_indexed_cpu(const at::Tensor& x, const at::Tensor& model_out,
                                        const c10::optional<at::Tensor>& history, const at::Tensor& table,
                                        const at::Tensor& slots, const at::Tensor& step, int64_t n_reads,
                                        const c10::optional<at::Tensor>& noise, double clip,
                                        const c10::optional<at::Tensor>& state,
                                        const c10::optional<at::Tensor>& status,
                                        const c10::optional<at::Tensor>& guide) {
  TORCH_CHECK(x.device().is_cpu(), "multistep_update_indexed_cpu: x must be a CPU tensor, got ", x.device());
  return run_multistep_update_indexed(x, model_out, history, table, slots, step, n_reads, noise, clip, state,
                                      status, guide, launch_cpu);
}

at::Tensor lml_gram_cpu(const at::Tensor& x, const at::Tensor& model_out, const c10::optional<at::Tensor>& history,
                        at::IntArrayRef read_slots, at::ArrayRef<double> coeffs, double clip, const at::Tensor& dirs,
                        at::ArrayRef<double> dir_coeffs, const c10::optional<at::Tensor>& guide) {
  TORCH_CHECK(x.device().is_cpu(), "lml_gram_cpu: x must be a CPU tensor, got ", x.device());
  return run_lml_gram(x, model_out, history, read_slots, coeffs, clip, dirs, dir_coeffs, guide, gram_cpu);
}

at::Tensor multistep_update_functional_cpu(const at::Tensor& x, const at::Tensor& model_out,
                                           at::ArrayRef<double> coeffs, const c10::optional<at::Tensor>& noise,
                                           double clip, bool thresholding,
                                           const c10::optional<at::Tensor>& guide) {
  TORCH_CHECK(x.device().is_cpu(), "multistep_update_functional_cpu: x must be a CPU tensor, got ", x.device());
  return run_multistep_update_functional(x, model_out, coeffs, noise, clip, thresholding, guide, launch_cpu);
}

}  // namespace diffsampler
