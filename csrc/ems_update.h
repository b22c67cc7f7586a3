// Host side of ems_update shared by the CPU and CUDA backends: argument checks, contiguous operands, history
// slots, the state write-back. Math: csrc/cuda/ems_update.h.
#pragma once
#include <ATen/ATen.h>

#include <functional>

#include "cuda/ems_update.h"

namespace diffsampler {

using EmsLaunch = std::function<void(ds_ems_dtype, const ds_ems_tensors&)>;

// coeffs: float32 (rows, *x.shape[1:]), rows = 2 + (k + 4) (x' row) or 2 + 2 (k + 4) (x' and state rows).
constexpr const char* kEmsUpdateSchema =
    "ems_update(Tensor x, Tensor model_out, Tensor coeffs, Tensor(a!)? history, int write_slot, int[] read_slots, "
    "Tensor(b!)? state=None) -> Tensor";

at::Tensor run_ems_update(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coeffs,
                          const c10::optional<at::Tensor>& history, int64_t write_slot, at::IntArrayRef read_slots,
                          const c10::optional<at::Tensor>& state, const EmsLaunch& launch);

}  // namespace diffsampler
