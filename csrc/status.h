// The optional status word of the ops that clamp device-side indices (cuda/error_flags.h): checked once here.
#pragma once
#include <ATen/ATen.h>

#include "cuda/error_flags.h"

namespace diffsampler {

// The int32 pointer of `status` (one contiguous element on `device`), or NULL when it is absent.
inline int* status_pointer(const c10::optional<at::Tensor>& status, const at::Device& device, const char* op) {
  if (!status.has_value()) return nullptr;
  const auto& s = *status;
  TORCH_CHECK(s.scalar_type() == at::kInt && s.numel() == 1 && s.is_contiguous() && s.device() == device, op,
              ": status must be one contiguous int32 element on ", device, ", got ", s.scalar_type(), " ",
              s.sizes(), " on ", s.device());
  return s.data_ptr<int>();
}

}  // namespace diffsampler
