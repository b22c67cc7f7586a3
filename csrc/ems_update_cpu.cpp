// CPU kernel of ems_update (math: csrc/cuda/ems_update.h) and the op's registration: its schema as a fragment
// of the diffsampler library (bindings.cpp holds the others) and its CPU implementation. One pass in fp32
// whatever the storage dtype, on vector lanes (cpu_storage.h); runs never cross a sample boundary, so each reads
// its coefficient rows contiguously.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_storage.h"
#include "ems_update.h"

namespace diffsampler {
namespace {

// Elements [begin, end) of one sample; coefficient column d = i + off.
template <typename S, int kReads, int kState, bool kWriteM0>
void ems_run(const ds_ems_tensors& t, int64_t begin, int64_t end, int64_t off) {
  using T = typename S::Raw;
  const T* __restrict__ x = static_cast<const T*>(t.x);
  const T* __restrict__ out = static_cast<const T*>(t.out);
  const T* __restrict__ h0 = static_cast<const T*>(t.reads[0]);
  const T* __restrict__ h1 = static_cast<const T*>(t.reads[1]);
  const T* __restrict__ h2 = static_cast<const T*>(t.reads[2]);
  T* __restrict__ st = static_cast<T*>(t.state);
  T* __restrict__ m0_out = static_cast<T*>(t.m0);
  T* __restrict__ x_next = static_cast<T*>(t.x_next);
  const int64_t D = t.per_sample;
  const float* __restrict__ c = t.coeffs + off;
  const float* __restrict__ s = c + (6 + kReads) * D;  // the state row, when kState == 2
  for_lanes(begin, end, [&](int64_t i, auto load, auto store) {
    const LanesF xi = load(x + i);
    const LanesF m0 = load(c + i) * xi + load(c + D + i) * load(out + i);
    if constexpr (kWriteM0) store(m0_out + i, m0);
    LanesF acc = load(c + 2 * D + i) * xi + load(c + 4 * D + i) * m0 + load(c + (5 + kReads) * D + i);
    LanesF sacc = {};
    if constexpr (kState == 2) sacc = load(s + i) * xi + load(s + 2 * D + i) * m0 + load(s + (3 + kReads) * D + i);
    const T* reads[3] = {h0, h1, h2};
    for (int j = 0; j < kReads; ++j) {
      const LanesF hj = load(reads[j] + i);
      acc += load(c + (5 + j) * D + i) * hj;
      if constexpr (kState == 2) sacc += load(s + (3 + j) * D + i) * hj;
    }
    if constexpr (kState > 0) {
      const LanesF si = load(st + i);
      acc += load(c + 3 * D + i) * si;
      if constexpr (kState == 2) sacc += load(s + D + i) * si;
    }
    store(x_next + i, acc);
    if constexpr (kState == 2) store(st + i, sacc);
  });
}

template <typename S, int kReads, int kState, bool kWriteM0>
void ems_range(const ds_ems_tensors& t, int64_t begin, int64_t end) {
  while (begin < end) {
    const int64_t sample = begin / t.per_sample;
    const int64_t stop = std::min(end, (sample + 1) * t.per_sample);
    ems_run<S, kReads, kState, kWriteM0>(t, begin, stop, -sample * t.per_sample);
    begin = stop;
  }
}

template <typename S, int kReads = 0>
void ems_dispatch(const ds_ems_tensors& t, int64_t begin, int64_t end) {
  if constexpr (kReads < DS_EMS_MAX_READS) {
    if (t.n_reads > kReads) return ems_dispatch<S, kReads + 1>(t, begin, end);
  }
  auto with_m0 = [&](auto state) {
    constexpr int kState = decltype(state)::value;
    if (t.m0 != nullptr) return ems_range<S, kReads, kState, true>(t, begin, end);
    ems_range<S, kReads, kState, false>(t, begin, end);
  };
  switch (t.state_mode) {
    case 0: return with_m0(std::integral_constant<int, 0>{});
    case 1: return with_m0(std::integral_constant<int, 1>{});
    default: return with_m0(std::integral_constant<int, 2>{});
  }
}

void launch_ems_cpu(ds_ems_dtype dtype, const ds_ems_tensors& t) {
  constexpr int64_t kGrain = 1 << 15;
  at::parallel_for(0, t.n, kGrain, [&](int64_t begin, int64_t end) {
    switch (dtype) {
      case DS_EMS_FLOAT32: ems_dispatch<F32>(t, begin, end); break;
      case DS_EMS_FLOAT16: ems_dispatch<F16>(t, begin, end); break;
      case DS_EMS_BFLOAT16: ems_dispatch<BF16>(t, begin, end); break;
    }
  });
}

at::Tensor ems_update_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coeffs,
                          const c10::optional<at::Tensor>& history, int64_t write_slot, at::IntArrayRef read_slots,
                          const c10::optional<at::Tensor>& state) {
  TORCH_CHECK(x.device().is_cpu(), "ems_update_cpu: x must be a CPU tensor, got ", x.device());
  return run_ems_update(x, model_out, coeffs, history, write_slot, read_slots, state, launch_ems_cpu);
}

}  // namespace
}  // namespace diffsampler

TORCH_LIBRARY_FRAGMENT(diffsampler, m) { m.def(diffsampler::kEmsUpdateSchema); }

TORCH_LIBRARY_IMPL(diffsampler, CPU, m) { m.impl("ems_update", &diffsampler::ems_update_cpu); }
