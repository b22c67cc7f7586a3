#include "ems_update.h"

#include <vector>

namespace diffsampler {
namespace {

ds_ems_dtype to_ems_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DS_EMS_FLOAT32;
    case at::kHalf: return DS_EMS_FLOAT16;
    case at::kBFloat16: return DS_EMS_BFLOAT16;
    default: TORCH_CHECK(false, "ems_update: x must be float32, float16 or bfloat16, got ", t);
  }
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
              "ems_update: ", name, " must have x's shape ", x.sizes(), ", dtype and device");
}

}  // namespace

at::Tensor run_ems_update(const at::Tensor& x_in, const at::Tensor& out_in, const at::Tensor& coeffs_in,
                          const c10::optional<at::Tensor>& history, int64_t write_slot, at::IntArrayRef read_slots,
                          const c10::optional<at::Tensor>& state_in, const EmsLaunch& launch) {
  const ds_ems_dtype dtype = to_ems_dtype(x_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(0) > 0, "ems_update: x must have a non-empty batch dim 0");
  check_like(out_in, x_in, "model_out");
  const int64_t k = static_cast<int64_t>(read_slots.size());
  TORCH_CHECK(k <= DS_EMS_MAX_READS, "ems_update: at most ", DS_EMS_MAX_READS, " read_slots, got ", k);
  TORCH_CHECK(coeffs_in.scalar_type() == at::kFloat && coeffs_in.device() == x_in.device(),
              "ems_update: coeffs must be float32 on x's device");
  const int64_t per_sample = x_in.numel() / x_in.size(0);
  const int64_t rows = coeffs_in.dim() >= 1 ? coeffs_in.size(0) : 0;
  TORCH_CHECK(coeffs_in.dim() == x_in.dim() && coeffs_in.sizes().slice(1) == x_in.sizes().slice(1),
              "ems_update: coeffs must have shape (rows, *x.shape[1:]), got ", coeffs_in.sizes());
  TORCH_CHECK(rows == 6 + k || (rows == 10 + 2 * k && state_in.has_value()), "ems_update: coeffs must have ",
              6 + k, " rows (", 10 + 2 * k, " with a state row), got ", rows);

  auto x = x_in.contiguous();
  auto out = out_in.contiguous();
  auto coeffs = coeffs_in.contiguous();
  ds_ems_tensors t{};
  t.x = x.data_ptr();
  t.out = out.data_ptr();
  t.coeffs = coeffs.data_ptr<float>();
  t.n = x.numel();
  t.per_sample = per_sample;
  t.n_reads = static_cast<int>(k);

  std::vector<at::Tensor> keep;  // contiguous reads that must outlive the launch
  at::Tensor m0_slot, m0;
  if (history.has_value()) {
    const auto& h = *history;
    TORCH_CHECK(h.dim() == x.dim() + 1 && h.sizes().slice(1) == x.sizes() && h.scalar_type() == x.scalar_type() &&
                    h.device() == x.device(),
                "ems_update: history must have shape (slots, *x.shape) and x's dtype and device, got ", h.sizes());
    const int64_t slots = h.size(0);
    TORCH_CHECK(write_slot >= 0 && write_slot < slots, "ems_update: write_slot ", write_slot, " out of range");
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = read_slots[j];
      TORCH_CHECK(r >= 0 && r < slots && r != write_slot, "ems_update: read_slots[", j, "] = ", r,
                  " must be in [0, ", slots, ") and differ from write_slot");
      keep.push_back(h.select(0, r).contiguous());
      t.reads[j] = keep.back().data_ptr();
    }
    m0_slot = h.select(0, write_slot);
    m0 = m0_slot.is_contiguous() ? m0_slot : at::empty_like(m0_slot, at::MemoryFormat::Contiguous);
    t.m0 = m0.data_ptr();
  } else {
    TORCH_CHECK(k == 0, "ems_update: read_slots given without a history");
  }

  at::Tensor state;
  if (state_in.has_value()) {
    check_like(*state_in, x, "state");
    state = state_in->contiguous();
    t.state = state.data_ptr();
    t.state_mode = rows == 10 + 2 * k ? 2 : 1;
  }

  auto x_next = at::empty_like(x);
  t.x_next = x_next.data_ptr();
  if (t.n > 0) launch(dtype, t);
  if (m0_slot.defined() && !m0_slot.is_same(m0)) m0_slot.copy_(m0);
  if (t.state_mode == 2 && !state.is_same(*state_in)) state_in->copy_(state);
  return x_next;
}

}  // namespace diffsampler
