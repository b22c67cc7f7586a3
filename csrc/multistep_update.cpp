#include "multistep_update.h"

namespace diffsampler {
namespace {

ds_dtype to_ds_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DS_FLOAT32;
    case at::kHalf: return DS_FLOAT16;
    case at::kBFloat16: return DS_BFLOAT16;
    default: TORCH_CHECK(false, "multistep_update: x must be float32, float16 or bfloat16, got ", t);
  }
}

void check_operand(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "multistep_update: ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "multistep_update: ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "multistep_update: ", name, " must be on x's device ", x.device(),
              ", got ", t.device());
}

}  // namespace

at::Tensor threshold_scale(const at::Tensor& m0, double ratio, double max_value) {
  auto flat = m0.reshape({m0.size(0), -1}).to(at::kFloat).abs();
  const int64_t n = flat.size(1);
  const double pos = ratio * static_cast<double>(n - 1);
  const int64_t lo = static_cast<int64_t>(pos);
  const int64_t hi = std::min(lo + 1, n - 1);
  auto v_lo = std::get<0>(flat.kthvalue(lo + 1, 1));
  auto s = v_lo;
  if (hi != lo) {
    auto v_hi = std::get<0>(flat.kthvalue(hi + 1, 1));
    s = v_lo + (v_hi - v_lo) * (pos - static_cast<double>(lo));
  }
  return s.clamp(1.0, max_value).contiguous();
}

at::Tensor run_multistep_update(const at::Tensor& x_in, const at::Tensor& out_in,
                                const c10::optional<at::Tensor>& history, int64_t write_slot,
                                at::IntArrayRef read_slots, at::ArrayRef<double> coeffs,
                                const c10::optional<at::Tensor>& noise_in, double clip, double threshold_ratio,
                                double threshold_max, const c10::optional<at::Tensor>& state_in,
                                at::ArrayRef<double> state_coeffs, const UpdateLaunch& launch) {
  const ds_dtype dtype = to_ds_dtype(x_in.scalar_type());
  check_operand(out_in, x_in, "model_out");
  const int64_t n_reads = static_cast<int64_t>(read_slots.size());
  TORCH_CHECK(n_reads <= DS_MAX_READS, "multistep_update: at most ", DS_MAX_READS, " read_slots, got ", n_reads);
  TORCH_CHECK(static_cast<int64_t>(coeffs.size()) == 6 + 2 * n_reads, "multistep_update: coeffs must have ",
              6 + 2 * n_reads, " entries [p, q, a, e, c, b_0..b_k, r_1..r_k], got ", coeffs.size());
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(0) > 0, "multistep_update: x must have a non-empty batch dim 0");
  const bool thresholding = threshold_ratio > 0;

  ds_update_coeffs k{};
  k.p = static_cast<float>(coeffs[0]);
  k.q = static_cast<float>(coeffs[1]);
  k.a = static_cast<float>(coeffs[2]);
  k.e = static_cast<float>(coeffs[3]);
  k.c = static_cast<float>(coeffs[4]);
  for (int64_t j = 0; j <= n_reads; ++j) k.b[j] = static_cast<float>(coeffs[5 + j]);
  for (int64_t j = 0; j < n_reads; ++j) k.r[j] = static_cast<float>(coeffs[6 + n_reads + j]);
  k.n_reads = static_cast<int>(n_reads);
  k.clip = static_cast<float>(clip);
  const int64_t n_state = static_cast<int64_t>(state_coeffs.size());
  TORCH_CHECK(n_state == 0 || n_state == 1 || n_state == 6 + n_reads, "multistep_update: state_coeffs must have 0, 1 or ",
              6 + n_reads, " entries [g, sa, se, sc, sg, sb_0..sb_k], got ", n_state);
  TORCH_CHECK((n_state > 0) == state_in.has_value(), "multistep_update: state and state_coeffs go together");
  if (n_state > 0) k.g = static_cast<float>(state_coeffs[0]);
  if (n_state > 1) {
    k.state_row = 1;
    k.sa = static_cast<float>(state_coeffs[1]);
    k.se = static_cast<float>(state_coeffs[2]);
    k.sc = static_cast<float>(state_coeffs[3]);
    k.sg = static_cast<float>(state_coeffs[4]);
    for (int64_t j = 0; j <= n_reads; ++j) k.sb[j] = static_cast<float>(state_coeffs[5 + j]);
  }

  auto x = x_in.contiguous();
  auto out = out_in.contiguous();
  ds_update_tensors t{};
  t.x = x.data_ptr();
  t.out = out.data_ptr();
  t.n = x.numel();
  t.per_sample = x.size(0) > 0 ? t.n / x.size(0) : 0;

  std::vector<at::Tensor> keep;  // contiguous copies that must outlive the launches
  at::Tensor m0_slot, m0;
  if (history.has_value()) {
    const auto& h = *history;
    TORCH_CHECK(h.dim() == x.dim() + 1 && h.sizes().slice(1) == x.sizes(),
                "multistep_update: history must have shape (slots, *x.shape) = (R, ", x.sizes(), "), got ", h.sizes());
    TORCH_CHECK(h.scalar_type() == x.scalar_type() && h.device() == x.device(),
                "multistep_update: history must have x's dtype and device");
    const int64_t slots = h.size(0);
    TORCH_CHECK(write_slot >= 0 && write_slot < slots, "multistep_update: write_slot ", write_slot,
                " out of range [0, ", slots, ")");
    for (int64_t j = 0; j < n_reads; ++j) {
      const int64_t r = read_slots[j];
      TORCH_CHECK(r >= 0 && r < slots && r != write_slot, "multistep_update: read_slots[", j, "] = ", r,
                  " must be in [0, ", slots, ") and differ from write_slot");
      keep.push_back(h.select(0, r).contiguous());
      t.reads[j] = keep.back().data_ptr();
    }
    m0_slot = h.select(0, write_slot);
    m0 = m0_slot.is_contiguous() ? m0_slot : at::empty_like(m0_slot, at::MemoryFormat::Contiguous);
  } else {
    TORCH_CHECK(n_reads == 0, "multistep_update: read_slots given without a history");
    if (thresholding) m0 = at::empty_like(x);  // scratch for the two-pass threshold
  }
  t.m0 = m0.defined() ? m0.data_ptr() : nullptr;

  at::Tensor noise;
  if (noise_in.has_value()) {
    check_operand(*noise_in, x, "noise");
    noise = noise_in->contiguous();
    t.noise = noise.data_ptr();
  }

  at::Tensor state;  // contiguous view or copy of the state, written back below when it is a copy
  if (state_in.has_value()) {
    check_operand(*state_in, x, "state");
    state = state_in->contiguous();
    t.state = state.data_ptr();
  }

  auto x_next = at::empty_like(x);
  t.x_next = x_next.data_ptr();
  if (t.n > 0) {
    if (thresholding) {
      launch(dtype, DS_PHASE_CONVERT, t, k);
      auto s = threshold_scale(m0, threshold_ratio, threshold_max);
      t.thr_scale = s.data_ptr<float>();
      launch(dtype, DS_PHASE_THRESHOLD, t, k);
    } else {
      launch(dtype, DS_PHASE_FULL, t, k);
    }
  }
  if (m0_slot.defined() && !m0_slot.is_same(m0)) m0_slot.copy_(m0);
  if (k.state_row && !state.is_same(*state_in)) state_in->copy_(state);
  return x_next;
}

}  // namespace diffsampler
