// Host side of the fused multistep update shared by the CPU and CUDA backends: argument checks, layout
// (contiguous operands, history slots), the two-pass dynamic thresholding, and the write-back.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <vector>

#include "cuda/update_params.h"

namespace diffsampler {

// Runs one kernel pass over prepared raw pointers; the backend supplies it.
using UpdateLaunch = std::function<void(ds_dtype, ds_phase, const ds_update_tensors&, const ds_update_coeffs&)>;
// Computes the LML Gram (B x (1+n_dirs)^2 doubles, on the tensors' device) over prepared raw pointers.
using GramLaunch = std::function<void(ds_dtype, const ds_update_tensors&, const ds_update_coeffs&, double*)>;

// Schema: kMultistepUpdateSchema. guide (x's shape, optional): out + gw guide replaces out everywhere, gw the
// row's DS_ROW_GUIDE entry (every op below takes it the same way). coeffs = the step row (update_params.h,
// DS_ROW_WIDTH entries; reads beyond k = len(read_slots) <= DS_MAX_READS are not used). thresholding: m0 (the data prediction) -> hx x + hm
// clamp(m0, -s_b, s_b) / s_b, s_b = threshold_scale(m0, ratio, max_value), all four from the row. The state is
// read when given (x' += g s) and rewritten when the row's writes_state is set (then it is required).
// LML: dirs (R, *x.shape) with R <= DS_MAX_DIRS, dir_coeffs = [da, de, db_0, ..., db_k], dir_weights (B, 1 + R).
at::Tensor run_multistep_update(const at::Tensor& x, const at::Tensor& model_out,
                                const c10::optional<at::Tensor>& history, int64_t write_slot,
                                at::IntArrayRef read_slots, at::ArrayRef<double> coeffs,
                                const c10::optional<at::Tensor>& noise, double clip, bool thresholding,
                                const c10::optional<at::Tensor>& state, const c10::optional<at::Tensor>& dirs,
                                int64_t dir_slot, at::ArrayRef<double> dir_coeffs,
                                const c10::optional<at::Tensor>& dir_weights, const c10::optional<at::Tensor>& guide,
                                const UpdateLaunch& launch);

// LML's per-sample Gram matrix of [d, dirs[0..R-1]] (float64, shape (B, 1 + R, 1 + R)); d as in the update
// (coeffs: the step row; its p, q, r give m0).
constexpr const char* kLmlGramSchema =
    "lml_gram(Tensor x, Tensor model_out, Tensor? history, int[] read_slots, float[] coeffs, float clip, "
    "Tensor dirs, float[] dir_coeffs, Tensor? guide=None) -> Tensor";

at::Tensor run_lml_gram(const at::Tensor& x, const at::Tensor& model_out, const c10::optional<at::Tensor>& history,
                        at::IntArrayRef read_slots, at::ArrayRef<double> coeffs, double clip, const at::Tensor& dirs,
                        at::ArrayRef<double> dir_coeffs, const c10::optional<at::Tensor>& guide,
                        const GramLaunch& launch);

// The same update without history or state: a functional op (torch.compile's inductor cannot lower a mutating
// op whose mutable arguments are all None). coeffs = the step row.
constexpr const char* kMultistepUpdateFunctionalSchema =
    "multistep_update_functional(Tensor x, Tensor model_out, float[] coeffs, Tensor? noise, float clip, "
    "bool thresholding, Tensor? guide=None) -> Tensor";

// The schema string of the op (one place for bindings.cpp).
constexpr const char* kMultistepUpdateSchema =
    "multistep_update(Tensor x, Tensor model_out, Tensor(a!)? history, int write_slot, int[] read_slots, "
    "float[] coeffs, Tensor? noise, float clip, bool thresholding, Tensor(b!)? state=None, "
    "Tensor(c!)? dirs=None, int dir_slot=0, float[] dir_coeffs=[], Tensor? dir_weights=None, Tensor? guide=None) "
    "-> Tensor";

// Indexed steps, for per-step CUDA-graph capture: the step's coefficients and history slots are read from row
// `step` (an int64 tensor on x's device of one element, or of B: sample b takes row step[b], at most
// kMaxPerSampleSteps samples) of `table` (steps, DS_ROW_WIDTH) float64 and `slots`
// (steps, DS_SLOTS_WIDTH) int64, on the device (update_params.h). n_reads, clip, noise and state are fixed for the
// table; history and state must be contiguous (written in place). A step or used slot out of range is clamped
// into range and ORs DS_ERR_STEP / DS_ERR_SLOT into `status` (int32, one element) on the device; the CPU kernel
// raises instead.
constexpr int64_t kMaxPerSampleSteps = 65535;  // the CUDA grid's second dimension: one sample per row of blocks
constexpr const char* kMultistepUpdateIndexedSchema =
    "multistep_update_indexed(Tensor x, Tensor model_out, Tensor(a!)? history, Tensor table, Tensor slots, "
    "Tensor step, int n_reads, Tensor? noise, float clip, Tensor(b!)? state, Tensor(c!)? status=None, "
    "Tensor? guide=None) -> Tensor";

at::Tensor run_multistep_update_indexed(const at::Tensor& x, const at::Tensor& model_out,
                                        const c10::optional<at::Tensor>& history, const at::Tensor& table,
                                        const at::Tensor& slots, const at::Tensor& step, int64_t n_reads,
                                        const c10::optional<at::Tensor>& noise, double clip,
                                        const c10::optional<at::Tensor>& state,
                                        const c10::optional<at::Tensor>& status,
                                        const c10::optional<at::Tensor>& guide, const UpdateLaunch& launch);

// multistep_update_functional on a backend's launch.
inline at::Tensor run_multistep_update_functional(const at::Tensor& x, const at::Tensor& model_out,
                                                  at::ArrayRef<double> coeffs, const c10::optional<at::Tensor>& noise,
                                                  double clip, bool thresholding,
                                                  const c10::optional<at::Tensor>& guide, const UpdateLaunch& launch) {
  return run_multistep_update(x, model_out, c10::nullopt, 0, {}, coeffs, noise, clip, thresholding, c10::nullopt,
                              c10::nullopt, 0, {}, c10::nullopt, guide, launch);
}

// Per-sample dynamic-thresholding bound clamp(quantile(|m0_b|, ratio), 1, max_value) in float32, shape (B,);
// the same order-statistic interpolation as reference.threshold_scale.
at::Tensor threshold_scale(const at::Tensor& m0, double ratio, double max_value);

}  // namespace diffsampler
