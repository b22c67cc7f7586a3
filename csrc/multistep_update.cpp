#include "multistep_update.h"
#include "status.h"

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

namespace {

// The operands of one call as raw pointers and fp32 coefficients, plus the tensors that must outlive the
// launches (contiguous copies) and those written back after them.
struct Layout {
  ds_update_tensors t{};
  ds_update_coeffs k{};
  ds_dtype dtype;
  at::Tensor x, out, m0_slot, m0, state, dirs, guide;
  std::vector<at::Tensor> keep;
};

// The step row (update_params.h): exactly DS_ROW_WIDTH entries, loaded by ds_load_row.
void load_row(ds_update_coeffs& k, const char* op, at::ArrayRef<double> coeffs, int64_t n_reads, double clip) {
  TORCH_CHECK(static_cast<int64_t>(coeffs.size()) == DS_ROW_WIDTH, op, ": coeffs must be a step row of ",
              DS_ROW_WIDTH, " entries (diffsampler.step_row.WIDTH), got ", coeffs.size());
  ds_load_row(coeffs.data(), &k);
  k.n_reads = static_cast<int>(n_reads);
  k.clip = static_cast<float>(clip);
}

// x, model_out and the history slots: checks, contiguous views, the m0 slot (written only when write_slot >= 0).
Layout prepare(const char* op, const at::Tensor& x_in, const at::Tensor& out_in,
               const c10::optional<at::Tensor>& history, int64_t write_slot, at::IntArrayRef read_slots,
               at::ArrayRef<double> coeffs, double clip) {
  Layout l;
  l.dtype = to_ds_dtype(x_in.scalar_type());
  check_operand(out_in, x_in, "model_out");
  const int64_t n_reads = static_cast<int64_t>(read_slots.size());
  TORCH_CHECK(n_reads <= DS_MAX_READS, "multistep_update: at most ", DS_MAX_READS, " read_slots, got ", n_reads);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(0) > 0, "multistep_update: x must have a non-empty batch dim 0");
  load_row(l.k, op, coeffs, n_reads, clip);
  l.x = x_in.contiguous();
  l.out = out_in.contiguous();
  l.t.x = l.x.data_ptr();
  l.t.out = l.out.data_ptr();
  l.t.n = l.x.numel();
  l.t.per_sample = l.t.n / l.x.size(0);
  if (history.has_value()) {
    const auto& h = *history;
    TORCH_CHECK(h.dim() == l.x.dim() + 1 && h.sizes().slice(1) == l.x.sizes(),
                "multistep_update: history must have shape (slots, *x.shape) = (R, ", l.x.sizes(), "), got ",
                h.sizes());
    TORCH_CHECK(h.scalar_type() == l.x.scalar_type() && h.device() == l.x.device(),
                "multistep_update: history must have x's dtype and device");
    const int64_t slots = h.size(0);
    TORCH_CHECK(write_slot < slots, "multistep_update: write_slot ", write_slot, " out of range [0, ", slots, ")");
    for (int64_t j = 0; j < n_reads; ++j) {
      const int64_t r = read_slots[j];
      TORCH_CHECK(r >= 0 && r < slots && r != write_slot, "multistep_update: read_slots[", j, "] = ", r,
                  " must be in [0, ", slots, ") and differ from write_slot");
      l.keep.push_back(h.select(0, r).contiguous());
      l.t.reads[j] = l.keep.back().data_ptr();
    }
    if (write_slot >= 0) {
      l.m0_slot = h.select(0, write_slot);
      l.m0 = l.m0_slot.is_contiguous() ? l.m0_slot : at::empty_like(l.m0_slot, at::MemoryFormat::Contiguous);
      l.t.m0 = l.m0.data_ptr();
    }
  } else {
    TORCH_CHECK(n_reads == 0, "multistep_update: read_slots given without a history");
  }
  return l;
}

// The guide d (out + gw d in every use of out; gw from the row): a contiguous view or copy.
void prepare_guide(Layout& l, const c10::optional<at::Tensor>& guide) {
  if (!guide.has_value()) return;
  check_operand(*guide, l.x, "guide");
  l.guide = guide->contiguous();
  l.t.guide = l.guide.data_ptr();
}

// LML's ring of directions and its row: dirs (R, *x.shape), dir_coeffs [da, de, db_0..db_k].
void prepare_dirs(Layout& l, const at::Tensor& dirs, int64_t dir_slot, at::ArrayRef<double> dir_coeffs) {
  const auto& x = l.x;
  TORCH_CHECK(dirs.dim() == x.dim() + 1 && dirs.sizes().slice(1) == x.sizes() && dirs.size(0) >= 1 &&
                  dirs.size(0) <= DS_MAX_DIRS,
              "multistep_update: dirs must have shape (R, *x.shape) with 1 <= R <= ", DS_MAX_DIRS, ", got ",
              dirs.sizes());
  TORCH_CHECK(dirs.scalar_type() == x.scalar_type() && dirs.device() == x.device(),
              "multistep_update: dirs must have x's dtype and device");
  const int64_t n_reads = l.k.n_reads;
  TORCH_CHECK(static_cast<int64_t>(dir_coeffs.size()) == 3 + n_reads, "multistep_update: dir_coeffs must have ",
              3 + n_reads, " entries [da, de, db_0..db_k], got ", dir_coeffs.size());
  TORCH_CHECK(dir_slot >= 0 && dir_slot < dirs.size(0), "multistep_update: dir_slot ", dir_slot,
              " out of range [0, ", dirs.size(0), ")");
  l.dirs = dirs.contiguous();
  l.k.n_dirs = static_cast<int>(dirs.size(0));
  l.k.dir_slot = static_cast<int>(dir_slot);
  l.k.da = static_cast<float>(dir_coeffs[0]);
  l.k.de = static_cast<float>(dir_coeffs[1]);
  for (int64_t j = 0; j <= n_reads; ++j) l.k.db[j] = static_cast<float>(dir_coeffs[2 + j]);
  for (int64_t j = 0; j < l.k.n_dirs; ++j) l.t.dirs[j] = l.dirs.select(0, j).data_ptr();
}

}  // namespace

at::Tensor run_multistep_update(const at::Tensor& x_in, const at::Tensor& out_in,
                                const c10::optional<at::Tensor>& history, int64_t write_slot,
                                at::IntArrayRef read_slots, at::ArrayRef<double> coeffs,
                                const c10::optional<at::Tensor>& noise_in, double clip, bool thresholding,
                                const c10::optional<at::Tensor>& state_in, const c10::optional<at::Tensor>& dirs_in,
                                int64_t dir_slot, at::ArrayRef<double> dir_coeffs,
                                const c10::optional<at::Tensor>& dir_weights_in,
                                const c10::optional<at::Tensor>& guide, const UpdateLaunch& launch) {
  TORCH_CHECK(!history.has_value() || write_slot >= 0, "multistep_update: write_slot must be >= 0, got ",
              write_slot);
  Layout l = prepare("multistep_update", x_in, out_in, history, write_slot, read_slots, coeffs, clip);
  prepare_guide(l, guide);
  auto& t = l.t;
  auto& k = l.k;
  const auto& x = l.x;
  if (!history.has_value() && thresholding) {
    l.m0 = at::empty_like(x);  // scratch for the two-pass threshold
    t.m0 = l.m0.data_ptr();
  }

  TORCH_CHECK(!k.state_row || state_in.has_value(), "multistep_update: coeffs rewrites the state (its "
              "writes_state entry, index ", DS_ROW_WRITES_STATE, ", is set): state is required");

  at::Tensor noise;
  if (noise_in.has_value()) {
    check_operand(*noise_in, x, "noise");
    noise = noise_in->contiguous();
    t.noise = noise.data_ptr();
  }
  if (state_in.has_value()) {  // a contiguous view or copy, written back below when it is a copy
    check_operand(*state_in, x, "state");
    l.state = state_in->contiguous();
    t.state = l.state.data_ptr();
  }

  at::Tensor weights;
  TORCH_CHECK(dirs_in.has_value() || !dir_weights_in.has_value(), "multistep_update: dir_weights needs dirs");
  if (dirs_in.has_value()) {
    prepare_dirs(l, *dirs_in, dir_slot, dir_coeffs);
    if (dir_weights_in.has_value()) {
      const auto& w = *dir_weights_in;
      TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(0) && w.size(1) == 1 + k.n_dirs,
                  "multistep_update: dir_weights must have shape (B, 1 + R) = (", x.size(0), ", ", 1 + k.n_dirs,
                  "), got ", w.sizes());
      TORCH_CHECK(w.device() == x.device(), "multistep_update: dir_weights must be on x's device");
      weights = w.to(at::kFloat).contiguous();
    } else {  // d is only recorded
      weights = at::zeros({x.size(0), 1 + k.n_dirs}, x.options().dtype(at::kFloat));
    }
    t.dir_weights = weights.data_ptr<float>();
  } else {
    TORCH_CHECK(dir_coeffs.empty(), "multistep_update: dir_coeffs given without dirs");
  }

  auto x_next = at::empty_like(x);
  t.x_next = x_next.data_ptr();
  if (t.n > 0) {
    if (thresholding) {
      launch(l.dtype, DS_PHASE_CONVERT, t, k);
      auto s = threshold_scale(l.m0, coeffs[DS_ROW_THR_RATIO], coeffs[DS_ROW_THR_MAX]);
      t.thr_scale = s.data_ptr<float>();
      launch(l.dtype, DS_PHASE_THRESHOLD, t, k);
    } else {
      launch(l.dtype, DS_PHASE_FULL, t, k);
    }
  }
  if (l.m0_slot.defined() && !l.m0_slot.is_same(l.m0)) l.m0_slot.copy_(l.m0);
  if (k.state_row && !l.state.is_same(*state_in)) state_in->copy_(l.state);
  if (l.dirs.defined() && !l.dirs.is_same(*dirs_in)) dirs_in->copy_(l.dirs);
  return x_next;
}

at::Tensor run_multistep_update_indexed(const at::Tensor& x_in, const at::Tensor& out_in,
                                        const c10::optional<at::Tensor>& history, const at::Tensor& table,
                                        const at::Tensor& slots, const at::Tensor& step, int64_t n_reads,
                                        const c10::optional<at::Tensor>& noise_in, double clip,
                                        const c10::optional<at::Tensor>& state,
                                        const c10::optional<at::Tensor>& status,
                                        const c10::optional<at::Tensor>& guide, const UpdateLaunch& launch) {
  const auto dev = x_in.device();
  TORCH_CHECK(table.dim() == 2 && table.size(1) == DS_ROW_WIDTH && table.scalar_type() == at::kDouble &&
                  table.is_contiguous() && table.device() == dev,
              "multistep_update_indexed: table must be a contiguous float64 (steps, ", DS_ROW_WIDTH, ") tensor on ",
              dev, ", got ", table.scalar_type(), " ", table.sizes(), " on ", table.device());
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == table.size(0) && slots.size(1) == DS_SLOTS_WIDTH &&
                  slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.device() == dev,
              "multistep_update_indexed: slots must be a contiguous int64 (", table.size(0), ", ", DS_SLOTS_WIDTH,
              ") tensor on ", dev, ", got ", slots.scalar_type(), " ", slots.sizes());
  TORCH_CHECK(table.size(0) >= 1, "multistep_update_indexed: table must have at least one row");
  const int64_t batch = x_in.dim() >= 1 ? x_in.size(0) : 0;
  TORCH_CHECK(step.dim() <= 1 && (step.numel() == 1 || step.numel() == batch) && step.scalar_type() == at::kLong &&
                  step.device() == dev,
              "multistep_update_indexed: step must be an int64 tensor on ", dev, " of one element or one per sample "
              "(", batch, "), got ", step.scalar_type(), " ", step.sizes());
  TORCH_CHECK(step.numel() == 1 || batch <= kMaxPerSampleSteps, "multistep_update_indexed: per-sample steps take "
              "at most ", kMaxPerSampleSteps, " samples, got ", batch);
  const at::Tensor steps = step.contiguous();  // outlives the launch (stream-ordered on the device)
  TORCH_CHECK(n_reads >= 0 && n_reads <= DS_MAX_READS, "multistep_update_indexed: n_reads must be in [0, ",
              DS_MAX_READS, "], got ", n_reads);
  TORCH_CHECK(n_reads == 0 || history.has_value(), "multistep_update_indexed: n_reads > 0 needs a history");
  Layout l = prepare("multistep_update_indexed", x_in, out_in, c10::nullopt, -1, {},
                     std::vector<double>(DS_ROW_WIDTH, 0.0), clip);
  prepare_guide(l, guide);
  auto& t = l.t;
  l.k.n_reads = static_cast<int>(n_reads);
  t.table = table.data_ptr<double>();
  t.slots = slots.data_ptr<int64_t>();
  t.step = steps.data_ptr<int64_t>();
  t.per_sample_steps = steps.numel() > 1;
  t.n_steps = table.size(0);
  t.status = status_pointer(status, dev, "multistep_update_indexed");
  if (history.has_value()) {
    const auto& h = *history;
    TORCH_CHECK(h.dim() == l.x.dim() + 1 && h.sizes().slice(1) == l.x.sizes() && h.size(0) > n_reads &&
                    h.scalar_type() == l.x.scalar_type() && h.device() == dev && h.is_contiguous(),
                "multistep_update_indexed: history must be a contiguous (slots > n_reads, *x.shape) tensor of x's "
                "dtype and device, got ", h.sizes());
    t.history = h.data_ptr();
    t.history_slots = h.size(0);
    t.m0 = t.history;  // placeholders: the launch resolves the step's slots
    for (int64_t j = 0; j < n_reads; ++j) t.reads[j] = t.history;
  }
  at::Tensor noise;
  if (noise_in.has_value()) {
    check_operand(*noise_in, l.x, "noise");
    noise = noise_in->contiguous();
    t.noise = noise.data_ptr();
  }
  if (state.has_value()) {
    check_operand(*state, l.x, "state");
    TORCH_CHECK(state->is_contiguous(), "multistep_update_indexed: state must be contiguous (written in place)");
    t.state = state->data_ptr();
    l.k.state_row = 1;  // the kernel's form; each step's row decides whether it writes s (ds_load_row)
  }
  auto x_next = at::empty_like(l.x);
  t.x_next = x_next.data_ptr();
  if (t.n > 0) launch(l.dtype, DS_PHASE_FULL, t, l.k);
  return x_next;
}

at::Tensor run_lml_gram(const at::Tensor& x_in, const at::Tensor& out_in, const c10::optional<at::Tensor>& history,
                        at::IntArrayRef read_slots, at::ArrayRef<double> coeffs, double clip, const at::Tensor& dirs,
                        at::ArrayRef<double> dir_coeffs, const c10::optional<at::Tensor>& guide,
                        const GramLaunch& launch) {
  Layout l = prepare("lml_gram", x_in, out_in, history, -1, read_slots, coeffs, clip);
  prepare_guide(l, guide);
  prepare_dirs(l, dirs, 0, dir_coeffs);
  const int64_t m = 1 + l.k.n_dirs;
  auto gram = at::zeros({l.x.size(0), m, m}, l.x.options().dtype(at::kDouble));
  if (l.t.n > 0) launch(l.dtype, l.t, l.k, gram.data_ptr<double>());
  return gram;
}

}  // namespace diffsampler
